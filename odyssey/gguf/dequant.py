"""GGML tensor bytes -> float tensors, in torch on the CPU: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, Q4_K, Q5_K, Q6_K.

Each dequantizer is bit-exact against the `gguf` package's numpy reference
(`gguf.quants.dequantize`, tests/test_gguf_read.py): it reads the same block layout and performs
the same float operations in the same order and dtypes (f16 scales widened to f32, then e.g.
`(d * sc) * q - dmin * m` for Q4_K), so the f32 result has the same bits. Most of it is exact
anyway: an f16 scale times a 6-bit scale times a 4-6 bit integer fits f32's 24-bit mantissa; only
the `+ m` / `- dmin * m` rounds, once, as in the reference. NaNs keep their payloads as numpy's
widening keeps them (torch's own f16 -> f32 makes every NaN 0x7fffffff; a chunk holding one takes
numpy's path). A cast to the compute dtype, when asked for, comes after.

Block layouts (bytes; `d`, `m`, `dmin` are f16; `qs` packs two 4-bit values a byte, low nibbles
first; `qh` holds the fifth (or fifth and sixth) bits):
```
type   elems  bytes  layout                                        value
Q8_0   32     34     d, qs[32] int8                                d * q
Q4_0   32     18     d, qs[16]                                     d * (q - 8)
Q4_1   32     20     d, m, qs[16]                                  d * q + m
Q5_0   32     22     d, qh[4], qs[16]                              d * (q - 16)
Q5_1   32     24     d, m, qh[4], qs[16]                           d * q + m
Q4_K   256    144    d, dmin, scales[12] (8 x 6-bit sc and m), qs[128]      (d * sc) * q - dmin * m
Q5_K   256    176    d, dmin, scales[12], qh[32], qs[128]                   (d * sc) * q - dmin * m
Q6_K   256    210    ql[128], qh[64], scales[16] int8, d                    (d * sc) * (q - 32)
```
Vectorised over blocks; the only Python loop is over chunks of `CHUNK_ELEMENTS`, which keeps the
integer temporaries in cache whatever the matrix. The output is written in place (a reused
workspace via `out=`: the workspace of a matrix is its output, and reusing it saves the page faults
of a fresh allocation, which cost more than the arithmetic).

Measured on a 4096 x 4096 matrix (16.8 M elements), f32 output, one thread's CPU time (the 2-core
Intel Xeon VM this ran on was shared, so wall time drifted with its load), torch 2.13, best of 5,
`python -m odyssey.gguf.dequant`; MB/s of GGUF bytes read, M elements/s written into a reused
workspace, and M elements/s into a fresh output:
```
type   GGUF MB/s  Melem/s  fresh output
F32         9725     2431        465
F16         5175     2588        463
BF16        6256     3128        477
Q8_0        2156     2029        439
Q4_0         507      901        315
Q4_1         470      753        334
Q5_0         239      348        211
Q5_1         262      349        214
Q4_K         319      567        282
Q5_K         232      337        206
Q6_K         400      487        235
```
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from odyssey.errors import OdysseyError
from odyssey.gguf.blocks import BLOCKS, SUPPORTED, check_type, row_bytes, tensor_bytes

CHUNK_ELEMENTS = 1 << 18  # elements dequantized per step: temporaries stay in cache (1 MiB of f32)


def _as_bytes(raw) -> torch.Tensor:
    """numpy array (a memmap too) or torch tensor -> a flat torch uint8 view, no copy."""
    if isinstance(raw, torch.Tensor):
        return raw.reshape(-1).view(torch.uint8)
    a = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # read-only maps: we never write through the view
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


# --------------------------------------------------------------------------------------------
# one kind of block each: fill o (n, elements per block) f32 from b (n, bytes per block) uint8.
# In place into o (the output itself): a fresh tensor per operation costs page faults that took
# longer than the arithmetic. Every float operation is the reference's, in its order.


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) bytes -> (n, 1) f32, as numpy's f16 -> f32 widening (exact)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs (n, k, w) uint8 -> (n, k, 2, w) uint8: low nibbles, then high nibbles (integer work in
    bytes, then one contiguous widening copy into the f32 output)."""
    q = torch.empty(*qs.shape[:-1], 2, qs.shape[-1], dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=q[..., 0, :])
    torch.bitwise_right_shift(qs, 4, out=q[..., 1, :])
    return q


_BITS8 = torch.arange(8, dtype=torch.uint8)


def _low4_high1(b: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 values (n, 32) uint8 from qs (n, 16) and qh = b (n, 4) (a little-endian uint32,
    bit i for element i)."""
    q = _nibbles(qs).view(-1, 32)
    return q.bitwise_or_(((b.unsqueeze(-1) >> _BITS8) & 1).reshape(-1, 32) << 4)


def _q8_0(b, o):
    o.copy_(b[:, 2:].view(torch.int8)).mul_(_f16(b[:, :2]))


def _q4_0(b, o):
    q = _nibbles(b[:, 2:]).view(torch.int8).sub_(8)  # q - 8, exact in int8 as in the reference
    o.copy_(q.view(-1, 32)).mul_(_f16(b[:, :2]))  # d * (q - 8)


def _q4_1(b, o):
    o.copy_(_nibbles(b[:, 4:]).view(-1, 32)).mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))  # d * q + m


def _q5_0(b, o):
    q = _low4_high1(b[:, 2:6], b[:, 6:]).view(torch.int8).sub_(16)  # q - 16 in int8, as the reference
    o.copy_(q).mul_(_f16(b[:, :2]))


def _q5_1(b, o):
    o.copy_(_low4_high1(b[:, 4:8], b[:, 8:])).mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes (n, 12) -> 6-bit scales and mins, (n, 8) each (gguf's
    Q4_K.get_scale_min)."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _k_scale(o, b):
    """o (n, 8, 32) holding q <- (d * sc) * q - dmin * m (Q4_K, Q5_K)."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = _f16(b[:, :2]) * sc.to(torch.float32)
    dm = _f16(b[:, 2:4]) * mn.to(torch.float32)
    o.mul_(d.unsqueeze(-1)).sub_(dm.unsqueeze(-1))


def _q4_k(b, o):
    o3 = o.view(-1, 8, 32)
    o3.copy_(_nibbles(b[:, 16:].reshape(-1, 4, 32)).view(-1, 8, 32))
    _k_scale(o3, b)


def _q5_k(b, o):
    o3 = o.view(-1, 8, 32)
    ql = b[:, 48:].reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    qh = (b[:, 16:48].unsqueeze(1) >> _BITS8.reshape(1, 8, 1)) & 1  # (n, 8, 32): bit j of qh[i], chunk j
    o3.copy_((ql & 0x0F).reshape(-1, 8, 32) | (qh << 4))
    _k_scale(o3, b)


_SHIFT6 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)


def _q6_k(b, o):
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(b[:, 208:210]) * sc  # (n, 16)
    ql = b[:, :128].reshape(-1, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    qh = (b[:, 128:192].reshape(-1, 2, 1, 32) >> _SHIFT6) & 3  # (n, 2, 4, 32)
    q = ((ql & 0x0F).reshape(-1, 8, 32) | (qh.reshape(-1, 8, 32) << 4)).view(torch.int8).sub_(32)
    o.view(-1, 8, 32).copy_(q)
    o.view(-1, 16, 16).mul_(d.unsqueeze(-1))  # (d * sc) * (q - 32)


def _bf16(b, o):
    o.copy_(b.view(torch.bfloat16))  # the bits shifted left by 16, NaN payloads kept


def _f16s(b, o):
    h = b.contiguous().view(torch.float16)
    o.copy_(h)
    # torch widens every NaN to 0x7fffffff, numpy (the reference) keeps sign and payload: where the
    # chunk has a NaN (a sum is one cheap pass; inf - inf only takes the exact path needlessly)
    if o.sum().isnan():
        np.copyto(o.numpy(), h.numpy(), casting="unsafe")


def _f32(b, o):
    o.copy_(b.view(torch.float32))


_KERNELS = {
    "F32": _f32,
    "F16": _f16s,
    "BF16": _bf16,
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


# --------------------------------------------------------------------------------------------
# tensors


def dequantize(raw, qtype, shape, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The bytes of one GGML tensor (numpy uint8 array, memmap or torch uint8 tensor, exactly
    `tensor_bytes(qtype, shape)` long) -> a tensor of `shape` (HF order) in `dtype`: `out` when
    given (a reused workspace: contiguous, at least that many elements; its first elements are
    returned, reshaped), else a new one. In f32 it equals `gguf.quants.dequantize` bit for bit;
    another dtype is that result cast."""
    name = check_type(qtype)
    shape = tuple(int(s) for s in shape)
    b = _as_bytes(raw)
    need = tensor_bytes(name, shape)
    if b.numel() != need:
        raise OdysseyError(f"{name} tensor of shape {list(shape)} needs {need} bytes, got {b.numel()}")
    elems, nbytes = BLOCKS[name]
    blocks = b.reshape(-1, nbytes)
    n = blocks.shape[0] * elems
    if out is None:
        out = torch.empty(n, dtype=dtype)
    elif out.dtype != dtype or not out.is_contiguous() or out.numel() < n:
        raise ValueError(f"out must be a contiguous {dtype} tensor of at least {n} elements")
    out = out.reshape(-1)[:n].view(-1, elems)
    kernel = _KERNELS[name]
    step = max(1, CHUNK_ELEMENTS // elems)
    scratch = None if dtype == torch.float32 else torch.empty(min(step, blocks.shape[0]), elems)
    for i in range(0, blocks.shape[0], step):
        part = blocks[i : i + step]
        if scratch is None:
            kernel(part, out[i : i + step])
        else:  # f32 as the reference, then the cast
            kernel(part, scratch[: part.shape[0]])
            out[i : i + step].copy_(scratch[: part.shape[0]])
    return out.view(shape)


def dequantize_rows(raw, qtype, shape, row_start: int, row_end: int, dtype: torch.dtype = torch.float32):
    """Rows [row_start, row_end) of a 2-D tensor of `shape` (rows, cols) whose bytes are `raw`
    (the whole tensor's): == dequantize(raw, qtype, shape)[row_start:row_end], reading only those
    rows' bytes (a row is whole blocks)."""
    name = check_type(qtype)
    rows, cols = (int(s) for s in shape)
    if not 0 <= row_start <= row_end <= rows:
        raise ValueError(f"row range [{row_start}, {row_end}) outside 0..{rows}")
    rb = row_bytes(name, cols)
    b = _as_bytes(raw)
    return dequantize(b[row_start * rb : row_end * rb], name, (row_end - row_start, cols), dtype)


def _bench(rows: int = 4096, cols: int = 4096, repeat: int = 5) -> list[tuple[str, float, float, float]]:
    """[(type, MB/s of GGUF bytes, M elements/s, the same with a fresh output)]: CPU time of one
    thread (the machine this was measured on is shared: wall time drifts with its load), on random
    bytes (finite values for F32/F16/BF16), into a reused f32 workspace; the last figure allocates
    the output each call (its page faults included)."""
    import time

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    res = []
    for name in SUPPORTED:
        n = tensor_bytes(name, (rows, cols))
        raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        if name in ("F32", "F16", "BF16"):
            dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]
            raw = torch.randn(rows * cols, generator=g).to(dt).view(torch.uint8)
        work = torch.empty(rows * cols)
        times = {True: float("inf"), False: float("inf")}
        for _ in range(repeat):
            for reuse in (True, False):
                t0 = time.process_time()
                dequantize(raw, name, (rows, cols), out=work if reuse else None)
                times[reuse] = min(times[reuse], time.process_time() - t0)
        res.append((name, n / 1e6 / times[True], rows * cols / 1e6 / times[True], rows * cols / 1e6 / times[False]))
    return res


if __name__ == "__main__":
    print("type   GGUF MB/s  Melem/s  (fresh output: Melem/s)   one thread, CPU time, 4096 x 4096")
    for name, mb_s, me_s, fresh in _bench():
        print(f"{name:5s} {mb_s:10.0f} {me_s:8.0f} {fresh:10.0f}")
