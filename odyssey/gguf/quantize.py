"""Float tensors -> GGML block bytes, for a quantized GGUF export: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
through the `gguf` package's own quantizers (`gguf.quants.quantize`, numpy), and Q4_K, Q5_K, Q6_K,
which that package does not quantize, in torch here.

The k-quants follow llama.cpp's reference quantizers (ggml-quants.c, the ones `llama-quantize`
runs without an importance matrix), vectorised over blocks: where the reference loops over
candidate scales for one block, the loop here runs over the same candidates in the same order on
every block of a chunk at once, with the same acceptance rule (a candidate replaces the best only
when strictly better; in make_qkx2_quants an accepted candidate's min is the next candidates'
min, so its candidates cannot be batched) and the same float32 roundings (`nearest_int` rounds half
to even, as `torch.round`; f16 scales round to nearest even, as `Tensor.half()`):
```
type  super-block of 256                       per sub-block                          reference
Q4_K  8 x 32: 6-bit scale and min, f16 d, dmin  make_qkx2_quants(nmax 15, weights      quantize_row_q4_K_ref
                                               av + |x|, 21 scales (15 - 1 + 0.1 i)),
                                               then x requantized on the 6-bit scales
Q5_K  the same, 5-bit values (qh: fifth bit)   make_qkx2_quants(nmax 31, 16 scales    quantize_row_q5_K_ref
                                               (31 - 0.5 + 0.1 i))
Q6_K  16 x 16: int8 scale, f16 d               make_qx_quants(nmax 32, weights x^2,   quantize_row_q6_K_ref
                                               19 scales (32 + 0.1 i), signed)
```
The error of each candidate is computed from the weighted sums the reference forms anyway (sum w,
w x, w x^2 once; w l, w l^2, w l x per candidate) in float64, instead
of a second pass over the block; with sums in another order than the reference's, two candidates
whose errors agree to about 1e-7 can rank the other way. Measured against llama.cpp's own
functions (tests/test_gguf_quant.py, slow): the same bytes for 97.6% (Q4_K), 97.5% (Q5_K), 99.5%
(Q6_K) of random blocks and for all-zero, tiny and one-signed ones, the same RMS error to 5-6
digits. (A constant block is a tie of that kind too: its least-squares determinant is zero up to
the float32 residue of the sums, whose sign decides llama.cpp's choice; either way its values
come back within 0.2%.)

Memory: the output, plus one chunk of `CHUNK_ELEMENTS` source elements per thread at a time (each
thread quantizes its own chunks), whatever the tensor: a 4096 x 14336 bf16 matrix (an 8B model's
ffn_down) to Q4_K raised anonymous memory by 54 MiB, its 31.5 MiB of output included.

Speed, `python -m odyssey.gguf.quantize`: a 4096 x 4096 f32 matrix (16.8 M elements), torch 2.13,
two threads, best of 3, two runs, on the shared 2-core Intel Xeon VM these tests run on while other
jobs kept its load near 7-8 (wall time got 0.4-0.7 of a core). The figure per CPU-second is what
one idle core does; the last column projects an 8B model (8e9 weights) on two idle cores from the
lower one (on the loaded VM itself, from the wall figure: 16-21 minutes for Q4_K):
```
type   Melem/s (wall, loaded)  per CPU-second  8e9 weights, 2 idle cores
Q8_0        72-91                 145-189          0.5 min    gguf.quants
Q4_0        83-94                 165-189          0.4 min    gguf.quants
Q4_1        49-67                 116-134          0.6 min    gguf.quants
Q5_0        86-108                142-164          0.5 min    gguf.quants
Q5_1        60-74                 112-122          0.6 min    gguf.quants
Q4_K        6.3-8.3               13-16            5 min      here (21 candidate scales, in order)
Q5_K        7.5-10                16-20            4 min      here (16, in order)
Q6_K        7.5-8.8               16-17.5          4 min      here (19, independent: one batch)
```
A q4_k file (Q4_K_M: about 1/6 of the weights in Q6_K) of an 8B model: about 5 minutes.
"""

from __future__ import annotations

import numpy as np
import torch

from odyssey.errors import OdysseyError
from odyssey.gguf.blocks import BLOCKS

CHUNK_ELEMENTS = 1 << 18  # source elements per step and thread: the k-quants' temporaries stay a few MB
GGUF_CHUNK_ELEMENTS = 1 << 22  # elements per gguf.quants call: bounds its f32 temporaries (16 MiB)
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a group whose largest |x| is below this is all zero
F16_MAX = 65504.0  # block scales are f16: larger weights would overflow them
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
GGUF_PACKAGE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
QUANTIZED = GGUF_PACKAGE_TYPES + K_TYPES


def quantize(x: torch.Tensor, qtype: str, name: str = "tensor") -> np.ndarray:
    """A 2-D float tensor (rows, cols) -> its GGML bytes (rows, bytes per row) uint8, in chunks of
    rows so that memory stays bounded by one chunk. `cols` must be a multiple of the type's block.
    Refuses (OdysseyError naming `name`) values that f16 block scales cannot hold (NaN, inf,
    |x| >= 65504)."""
    qtype = qtype.upper()
    if qtype not in QUANTIZED:
        raise ValueError(f"no quantizer for {qtype}; have {', '.join(QUANTIZED)}")
    elems, nbytes = BLOCKS[qtype]
    rows, cols = x.shape
    if cols % elems:
        raise ValueError(f"{qtype} rows must be a multiple of {elems} elements long, got {cols}")
    out = np.empty((rows, cols // elems * nbytes), dtype=np.uint8)
    per_call = GGUF_CHUNK_ELEMENTS if qtype in GGUF_PACKAGE_TYPES else CHUNK_ELEMENTS
    step = max(1, per_call // cols)

    def one(r0: int) -> None:  # rows [r0, r0 + step) into out
        part = x[r0 : r0 + step].to(torch.float32)
        _check_range(part, name)
        if qtype in GGUF_PACKAGE_TYPES:
            import gguf

            out[r0 : r0 + step] = gguf.quants.quantize(part.numpy(), gguf.GGMLQuantizationType[qtype])
        else:
            out[r0 : r0 + step] = _K_KERNELS[qtype](part.reshape(-1, 256)).reshape(part.shape[0], -1).numpy()

    # Each chunk's ops run on one thread, chunks on a pool of torch.get_num_threads() threads
    # (torch and numpy release the GIL in their kernels): no intra-op barrier per operation, which
    # on a busy 2-core machine made the k-quants' many small operations 5-20x slower (measured).
    from concurrent.futures import ThreadPoolExecutor

    starts = range(0, rows, step)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if len(starts) == 1 or threads == 1:
            for r0 in starts:
                one(r0)
        else:
            with ThreadPoolExecutor(min(threads, len(starts))) as pool:
                for _ in pool.map(one, starts):  # re-raises a chunk's error (e.g. _check_range's)
                    pass
    finally:
        torch.set_num_threads(threads)
    return out


def _check_range(part: torch.Tensor, name: str) -> None:
    amax = float(part.abs().amax()) if part.numel() else 0.0
    if not amax < F16_MAX:  # NaN fails the comparison too
        raise OdysseyError(
            f"{name} holds {'NaN or inf' if not np.isfinite(amax) else f'a value of magnitude {amax:g}'}, "
            f"which a quantized GGUF's f16 block scales cannot represent; check the model "
            f"(`odyssey verify`), or export it with --gguf-type f32"
        )


# --------------------------------------------------------------------------------------------
# helpers shared by the k-quants


def _f32(values) -> torch.Tensor:
    """Constants formed in float32 as the C reference forms them (e.g. rmin + rdelta * is + nmax)."""
    return torch.from_numpy(np.asarray(values, dtype=np.float32))


def _qkx2_factors(nmax: int, rmin: float, rdelta: float, nstep: int) -> torch.Tensor:
    """make_qkx2_quants' candidate numerators: nmax (the first guess), then rmin + rdelta*is + nmax."""
    f32 = np.float32
    return _f32([f32(nmax)] + [f32(rmin) + f32(rdelta) * f32(i) + f32(nmax) for i in range(nstep + 1)])


def _qkx2(x: torch.Tensor, w: torch.Tensor, factors: torch.Tensor, nmax: int):
    """make_qkx2_quants(use_mad=false) on every row of x (m, n) with weights w (m, n) at once:
    -> (scale (m,), the_min (m,) >= 0, L (m, n) float values 0..nmax) such that x ~ scale * L - the_min.

    The reference: min = min(x) clamped to <= 0; the first guess quantizes with iscale = nmax /
    (max - min) and keeps scale 1 / iscale; then candidate k quantizes with iscale = factors[k] /
    (max - min) and fits scale and min by weighted least squares (min clamped to <= 0, the scale
    refit then), and replaces the best when its weighted squared error is strictly smaller. An
    accepted candidate's min is the min of the next ones (their x - min and max - min): the
    candidates run in order, each on every row at once. Rows with max == min: L = 0, scale 0."""
    mn = x.amin(-1, keepdim=True).clamp_(max=0)  # (m, 1), the reference's running `min`
    mx = x.amax(-1, keepdim=True)
    flat = (mx == mn).squeeze(-1)  # (m,)
    mx = torch.where(mx == mn, mn + 1, mx)  # flat rows: any finite range, overwritten at the end
    wx = w * x
    sum_w = w.sum(-1).double()  # (m,)
    sum_x = wx.sum(-1).double()
    sum_x2 = (wx * x).sum(-1).double()

    def candidate(iscale):  # (m, 1) -> sum w l, sum w l^2, sum w l x (m,) f64 of l = nearest(iscale (x - min))
        L = (x - mn).mul_(iscale).round_().clamp_(0, nmax)
        wl = w * L
        sums = (wl.sum(-1), (wl * L).sum(-1), (L.mul_(wx)).sum(-1))  # (elementwise: faster than bmm here)
        return tuple(v.double() for v in sums)

    def error(scale, mins, sum_l, sum_l2, sum_xl):  # sum w (scale l + min - x)^2 from the sums
        return (
            scale * scale * sum_l2
            + 2 * scale * mins * sum_l
            - 2 * scale * sum_xl
            + mins * mins * sum_w
            - 2 * mins * sum_x
            + sum_x2
        )

    iscale = factors[0] / (mx - mn)
    sum_l, sum_l2, sum_xl = candidate(iscale)
    scale = (1 / iscale).squeeze(-1)  # f32, as the reference
    best = error(scale.double(), mn.squeeze(-1).double(), sum_l, sum_l2, sum_xl)
    used = (iscale, mn)  # the winner's iscale and the min it quantized with: its L, recomputed at the end
    for f in factors[1:]:
        iscale = f / (mx - mn)
        sum_l, sum_l2, sum_xl = candidate(iscale)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0  # the reference then fixes min = 0 and refits the scale alone
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale).float()  # f32, as the reference
        this_min = torch.where(pos, 0.0, this_min).float()
        err = error(this_scale.double(), this_min.double(), sum_l, sum_l2, sum_xl)
        take = (D > 0) & (err < best)  # NaN (D == 0) compares false
        best = torch.where(take, err, best)
        scale = torch.where(take, this_scale, scale)
        t = take.unsqueeze(-1)
        used = (torch.where(t, iscale, used[0]), torch.where(t, mn, used[1]))
        mn = torch.where(t, this_min.unsqueeze(-1), mn)
    L = (x - used[1]).mul_(used[0]).round_().clamp_(0, nmax)
    L = torch.where(flat.unsqueeze(-1), 0.0, L)
    return torch.where(flat, 0.0, scale), -mn.squeeze(-1), L


def _k_scales(scales: torch.Tensor, mins: torch.Tensor):
    """Q4_K/Q5_K: the 8 sub-block scales and mins (n, 8) -> (d, dmin f16 (n, 1), 6-bit ls, lm
    (n, 8) float), as quantize_row_q4_K_ref: each set divided by its largest (taken >= 0) over 63."""
    max_s, max_m = scales.amax(-1, keepdim=True), mins.amax(-1, keepdim=True)
    max_s = torch.where(max_s > 0, max_s, 0.0)  # +0 where the reference keeps its initial 0 (not -0)
    max_m = torch.where(max_m > 0, max_m, 0.0)
    inv_s = torch.where(max_s > 0, 63.0 / max_s, 0.0)
    inv_m = torch.where(max_m > 0, 63.0 / max_m, 0.0)
    ls = (inv_s * scales).round_().clamp_(0, 63)
    lm = (inv_m * mins).round_().clamp_(0, 63)
    return (max_s / 63.0).half(), (max_m / 63.0).half(), ls, lm


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """(n, 8) 6-bit scales and mins -> the 12 bytes (n, 12) of get_scale_min_k4's layout: bytes 0-3
    the low 6 bits of scales 0-3 and bits 4-5 of scales 4-7 on top; 4-7 the same for mins; 8-11
    the low nibbles of scales 4-7 and (high nibble) of mins 4-7."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return torch.cat(
        (lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)), dim=1
    )


def _requantize_k(x: torch.Tensor, d, dmin, ls, lm, L, nmax: int) -> torch.Tensor:
    """x (n, 8, 32) on the stored scales: l = nearest((x + dmin * lm) / (d * ls)) in 0..nmax; where
    d * ls == 0 the values of the search stay (the reference skips those sub-blocks)."""
    dd = (d.float() * ls).unsqueeze(-1)  # (n, 8, 1)
    dm = (dmin.float() * lm).unsqueeze(-1)
    q = ((x + dm) / dd).round_().clamp_(0, nmax)
    return torch.where(dd != 0, q, L).to(torch.uint8)


def _subblocks_qkx2(x: torch.Tensor, nmax: int, factors: torch.Tensor):
    """Q4_K/Q5_K's first pass: x (n, 256) -> scales, mins (n, 8), L (n, 8, 32); weights av_x + |x|
    with av_x the sub-block's RMS."""
    xs = x.reshape(-1, 32)
    w = (xs.square().sum(-1, keepdim=True) / 32).sqrt_() + xs.abs()
    s, m, L = _qkx2(xs, w, factors, nmax)
    n = x.shape[0]
    return s.view(n, 8), m.view(n, 8), L.view(n, 8, 32)


_Q4K_FACTORS = _qkx2_factors(15, -1.0, 0.1, 20)
_Q5K_FACTORS = _qkx2_factors(31, -0.5, 0.1, 15)


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """x (n, 256) f32 -> Q4_K blocks (n, 144) uint8: d, dmin (f16), scales[12], qs[128] (value 32c + l
    of chunk c in the low nibble of qs[32 (c // 2) + l] for even c, the high nibble for odd c)."""
    n = x.shape[0]
    scales, mins, L = _subblocks_qkx2(x, 15, _Q4K_FACTORS)
    d, dmin, ls, lm = _k_scales(scales, mins)
    q = _requantize_k(x.view(n, 8, 32), d, dmin, ls, lm, L, 15).view(n, 4, 2, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 4)  # (n, 4, 32)
    return torch.cat((d.view(torch.uint8), dmin.view(torch.uint8), _pack_k_scales(ls, lm), qs.view(n, 128)), 1)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    """x (n, 256) f32 -> Q5_K blocks (n, 176) uint8: d, dmin, scales[12], qh[32] (bit c of qh[l]: the
    fifth bit of value 32c + l), qs[128] (low four bits, laid out as Q4_K's)."""
    n = x.shape[0]
    scales, mins, L = _subblocks_qkx2(x, 31, _Q5K_FACTORS)
    d, dmin, ls, lm = _k_scales(scales, mins)
    q = _requantize_k(x.view(n, 8, 32), d, dmin, ls, lm, L, 31)  # (n, 8, 32)
    lo = (q & 0x0F).view(n, 4, 2, 32)
    qs = lo[:, :, 0] | (lo[:, :, 1] << 4)
    bits = (q >> 4) << torch.arange(8, dtype=torch.uint8).view(1, 8, 1)  # bit c for sub-block c
    qh = bits.sum(1, dtype=torch.uint8)  # distinct bits: the sum is the OR
    return torch.cat((d.view(torch.uint8), dmin.view(torch.uint8), _pack_k_scales(ls, lm), qh, qs.view(n, 128)), 1)


_QX_STEPS = [0, *range(-9, 0), *range(1, 10)]  # make_qx_quants: the first guess, then is = -9..9 but 0


def _qx(x: torch.Tensor, nmax: int):
    """make_qx_quants(rmse_type 1, no importance weights) on every row of x (m, n): weights x^2,
    candidates iscale = -(nmax + 0.1 is) / max (max: the value of largest |x|), l in -nmax..nmax-1;
    a candidate replaces the best when sumlx^2 > best * suml2. -> (scale (m,), L (m, n) float
    values l + nmax in 0..2 nmax - 1; 0 for all-zero rows)."""
    ax = x.abs()
    i = ax.argmax(-1, keepdim=True)  # the first largest, as the reference's strict >
    mx = x.gather(-1, i)  # (m, 1), signed
    zero = (ax.gather(-1, i) < GROUP_MAX_EPS).squeeze(-1)
    f32 = np.float32
    num = _f32([f32(nmax) + f32(0.1) * f32(s) if s else f32(nmax) for s in _QX_STEPS])
    iscale = -num / torch.where(zero.unsqueeze(-1), 1.0, mx)  # (m, K)
    q = (iscale.unsqueeze(-1) * x.unsqueeze(1)).round_().clamp_(-nmax, nmax - 1)  # (m, K, n): l
    w = x * x
    sumlx = torch.bmm(q, (w * x).unsqueeze(-1)).squeeze(-1)  # (m, K): sum (w x) l, as the reference
    suml2 = torch.bmm(q.square_(), w.unsqueeze(-1)).squeeze(-1)
    del q
    scale = torch.where(suml2[:, 0] > 0, sumlx[:, 0] / suml2[:, 0], 0.0)
    best_val = scale * sumlx[:, 0]
    best = torch.zeros(x.shape[0], dtype=torch.long)
    for k in range(1, len(_QX_STEPS)):
        better = (suml2[:, k] > 0) & (sumlx[:, k] * sumlx[:, k] > best_val * suml2[:, k])
        best = torch.where(better, k, best)
        s_k = sumlx[:, k] / suml2[:, k]
        scale = torch.where(better, s_k, scale)
        best_val = torch.where(better, s_k * sumlx[:, k], best_val)
    L = (iscale.gather(1, best.unsqueeze(-1)) * x).round_().clamp_(-nmax, nmax - 1).add_(nmax)
    return torch.where(zero, 0.0, scale), torch.where(zero.unsqueeze(-1), 0.0, L)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """x (n, 256) f32 -> Q6_K blocks (n, 210) uint8: ql[128], qh[64], scales[16] int8, d f16. Value
    128h + 32q + l (l < 32) has its low nibble in ql[64h + 32(q % 2) + l] (high nibble when q >= 2)
    and its top two bits at bits 2q of qh[32h + l]."""
    n = x.shape[0]
    sub, L = _qx(x.reshape(-1, 16), 32)
    sub, L = sub.view(n, 16), L.view(n, 16, 16)
    a = sub.abs()
    i = a.argmax(-1, keepdim=True)
    max_scale = sub.gather(-1, i)  # (n, 1), signed: the first of largest |scale|
    zero = (a.gather(-1, i) < GROUP_MAX_EPS).squeeze(-1)
    iscale = -128.0 / torch.where(zero.unsqueeze(-1), 1.0, max_scale)
    d = (1 / iscale).half()  # (n, 1)
    sc = (iscale * sub).round_().clamp_(max=127)  # (n, 16), -128..127
    dd = (d.float() * sc).unsqueeze(-1)  # (n, 16, 1)
    q = (x.view(n, 16, 16) / dd).round_().clamp_(-32, 31).add_(32)
    q = torch.where(dd != 0, q, L).to(torch.uint8).view(n, 2, 4, 32)  # (half, quarter, l)
    lo = q & 0x0F
    ql = lo[:, :, :2] | (lo[:, :, 2:] << 4)  # (n, 2, 2, 32)
    qh = ((q >> 4) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)).sum(2, dtype=torch.uint8)
    sc8 = sc.to(torch.int8).view(torch.uint8)
    out = torch.cat((ql.reshape(n, 128), qh.reshape(n, 64), sc8, d.view(torch.uint8)), 1)
    return torch.where(zero.unsqueeze(-1), 0, out)  # an all-zero super-block: every byte 0 (d = 0)


_K_KERNELS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def _bench(rows: int = 4096, cols: int = 4096, repeat: int = 3) -> list[tuple[str, float, float]]:
    """[(type, M elements/s of wall time, M elements per CPU-second)] of `quantize` on a random
    normal matrix, best of `repeat` (the CPU figure: what a machine of idle cores gets per core)."""
    import time

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g) * 0.02
    res = []
    for name in QUANTIZED:
        wall, cpu = float("inf"), float("inf")
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            quantize(x, name)
            wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        res.append((name, rows * cols / 1e6 / wall, rows * cols / 1e6 / cpu))
    return res


if __name__ == "__main__":
    print(f"type   Melem/s  per CPU-s  8e9 weights   {torch.get_num_threads()} threads, 4096 x 4096 f32")
    for name, me_s, me_cpu in _bench():
        print(f"{name:5s} {me_s:8.1f} {me_cpu:10.1f} {8e9 / me_s / 1e6 / 60:8.1f} min")
