"""A GGUF matrix as the engine computes with it: its bytes stay in the pager slot, quantized, and
each use dequantizes it into the compute dtype just before the matmul, into one reused workspace
(one matrix, not one layer), and again in backward (the base is frozen: only the input's gradient
is needed, so nothing of the weight is saved between the two).

`QWeight` holds the uint8 view of the tensor's bytes, its GGML type, its HF shape and, for the
q/k projections of an architecture that permutes their rows (llama: RoPE on adjacent pairs), the
head count that undoes the permutation. The permutation is undone on the output, not the weight:
with W' = P W (GGUF rows in llama.cpp's order), x W^T = (x W'^T)[..., perm] and the input gradient
g W = g[..., inv] W', so the workspace is the dequantized matrix as stored, no second copy.

PEFT's `lora.Linear` wraps our `nn.Linear` as `base_layer` and calls `base_layer(x)`: the engine
binds a QWeight by giving that Linear an instance `forward` (`bind_linear`), removed at unbind, so
LoRA's own path (A, B, scaling, dropout) is PEFT's, unchanged; its gradients equal PEFT's on the
dequantized weights (tests/test_gguf_store.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from odyssey.gguf.blocks import row_bytes
from odyssey.gguf.dequant import dequantize


class QWeight:
    """A (rows, cols) GGUF matrix in a pager slot: raw uint8 bytes (flat, exactly the tensor's),
    GGML type name, HF shape, and `heads` (q/k of a permuting architecture) or None."""

    def __init__(self, raw: torch.Tensor, qtype: str, shape: tuple[int, int], heads: int | None = None):
        self.raw, self.qtype, self.shape, self.heads = raw, qtype, tuple(shape), heads
        self._perm = None

    def __repr__(self) -> str:
        return f"QWeight({self.qtype}, {list(self.shape)}{', permuted' if self.heads else ''})"

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def stored(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The matrix as stored (llama.cpp's row order when permuted), dequantized into `out`."""
        return dequantize(self.raw, self.qtype, self.shape, dtype, out=out)

    def perm(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(perm, inv): HF row r is stored row perm[r]; inv undoes it. None when not permuted."""
        if self.heads is None:
            return None
        if self._perm is None:
            from odyssey.export.gguf_layout import unpermute_qk

            perm = unpermute_qk(torch.arange(self.shape[0]), self.heads).contiguous()
            self._perm = perm, torch.argsort(perm)
        return self._perm

    def hf(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A new tensor in HF layout (rows unpermuted), dequantized (bit-exact f32, then `dtype`)."""
        w = self.stored(torch.float32)
        p = self.perm()
        if p is not None:
            w = w[p[0]]
        return w if dtype == torch.float32 else w.to(dtype)

    # --- row blocks (embedding, head): never permuted ---
    def rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [r0, r1) dequantized into a new (r1 - r0, cols) tensor of `dtype`."""
        rb = row_bytes(self.qtype, self.shape[1])
        r1 = min(r1, self.shape[0])
        return dequantize(self.raw[r0 * rb : r1 * rb], self.qtype, (r1 - r0, self.shape[1]), dtype)

    def take(self, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `idx` (int64, any order, repeats allowed) dequantized into (len(idx), cols)."""
        rb = row_bytes(self.qtype, self.shape[1])
        raw = self.raw.view(self.shape[0], rb)[idx]
        return dequantize(raw, self.qtype, (idx.numel(), self.shape[1]), dtype)


class CastWeight(QWeight):
    """A float matrix of a store whose dtype is not the compute dtype (a bf16 store computed in
    fp32): bound like a QWeight, so each use converts it into the workspace just before its matmul
    and backward converts it again. RAM holds one converted matrix, not a converted layer (172 MiB
    of a 1.2B layer in fp32 against 46 MiB for its largest matrix); the values are the same
    conversion, so the numbers are those of the whole-layer copy."""

    def __init__(self, t: torch.Tensor):
        names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
        super().__init__(t, names[t.dtype], tuple(t.shape))

    def stored(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return self.raw.to(dtype)
        return out[: self.numel].view(self.shape).copy_(self.raw)

    def hf(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.raw.to(dtype)


def row_chunk(W, r0: int, r1: int, dtype: torch.dtype, ws: Workspace | None = None) -> torch.Tensor:
    """Rows [r0, r1) of a head block W (a tensor view or a QWeight) in `dtype` (a new tensor when
    converted or dequantized). With `ws`, a float block's chunk is converted into the workspace,
    which sits idle while the head runs: RAM holds the larger of a layer's matrix and a head chunk,
    not both (a 1.2B in fp32: 64 MiB, not 46 + 64)."""
    if isinstance(W, QWeight):
        return W.rows(r0, r1, dtype)
    chunk = W[r0:r1]
    if ws is None or chunk.dtype == dtype:
        return chunk.to(dtype)
    return ws.get(chunk.numel(), dtype)[: chunk.numel()].view(chunk.shape).copy_(chunk)


def take_rows(W, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of W (a tensor view or a QWeight) in f32."""
    if isinstance(W, QWeight):
        return W.take(idx)
    return W[idx].float()


class Workspace:
    """One reused buffer per dtype, grown to the largest matrix asked for: where every QWeight is
    dequantized before its matmul. Holds one matrix at a time (forward and backward of a layer
    dequantize one matrix after another, never two at once)."""

    def __init__(self):
        self._bufs: dict[torch.dtype, torch.Tensor] = {}
        self.allocations = 0  # buffers allocated (grown) so far: tests count them

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._bufs.get(dtype)
        if numel == 0:
            return buf if buf is not None else torch.empty(0, dtype=dtype)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            self._bufs[dtype] = buf
            self.allocations += 1
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def clear(self) -> None:
        self._bufs.clear()


class _QLinear(torch.autograd.Function):
    """y = x W^T with W dequantized into the workspace; backward dequantizes W again for the input's
    gradient (no weight gradient: the base is frozen). Given the Linear `mod` it is bound to
    (`bind_linear`), backward takes the QWeight bound to `mod` when it runs, not the one of the
    forward: a layer that keeps its graph from forward to backward (saved.SavedWeights) has
    released that slot and is bound again, maybe from another slot, before its backward."""

    @staticmethod
    def forward(ctx, x, qw: QWeight, ws: Workspace, mod: nn.Module | None = None):
        ctx.qw = qw if mod is None else None  # with mod: nothing of the slot is held
        ctx.mod, ctx.ws, ctx.geometry = mod, ws, (qw.qtype, qw.shape, qw.heads)
        W = qw.stored(x.dtype, out=ws.get(qw.numel, x.dtype))
        y = F.linear(x, W)
        p = qw.perm()
        return y.index_select(-1, p[0]) if p is not None else y

    @staticmethod
    def backward(ctx, g):
        qw, ws = ctx.qw if ctx.mod is None else bound_qweight(ctx.mod), ctx.ws
        if (qw.qtype, qw.shape, qw.heads) != ctx.geometry:
            raise RuntimeError(f"qlinear: backward with {qw}, forward had {ctx.geometry}")
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        p = qw.perm()
        if p is not None:
            g = g.index_select(-1, p[1])
        W = qw.stored(g.dtype, out=ws.get(qw.numel, g.dtype))
        return g @ W, None, None, None


def qlinear(
    x: torch.Tensor, qw: QWeight, ws: Workspace, bias: torch.Tensor | None = None, mod: nn.Module | None = None
) -> torch.Tensor:
    y = _QLinear.apply(x, qw, ws, mod)
    return y if bias is None else y + bias


def _forward(mod: nn.Linear, ws: Workspace, x: torch.Tensor) -> torch.Tensor:
    b = mod.bias
    return qlinear(x, bound_qweight(mod), ws, None if b is None or b.device.type == "meta" else b, mod)


def bind_linear(mod: nn.Linear, qw: QWeight, ws: Workspace) -> None:
    """`mod(x)` computes with `qw` (its meta weight stays in place) until `unbind_linear(mod)`."""
    mod.__dict__["_qweight"] = qw
    mod.forward = functools.partial(_forward, mod, ws)


def bound_qweight(mod: nn.Module) -> QWeight:
    """The QWeight bound to `mod` now; a RuntimeError when none is (a backward outside the
    layer's binding)."""
    qw = mod.__dict__.get("_qweight")
    if qw is None:
        raise RuntimeError(f"qlinear: no GGUF matrix is bound to {type(mod).__name__} (backward outside its binding)")
    return qw


def unbind_linear(mod: nn.Linear) -> None:
    mod.__dict__.pop("forward", None)
    mod.__dict__.pop("_qweight", None)
