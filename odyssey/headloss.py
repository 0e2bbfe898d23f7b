"""The training head's loss: cross-entropy over the head's row blocks with an online log-sum-exp
(`OnlineCrossEntropy`), used by engine.Engine.loss_and_grad_x. The gradient w.r.t. the final
hidden state is accumulated block by block too, and the target rows are picked from the block that
holds them: never B x T x V logits in fp32, never all of W. Targets equal to IGNORE (-100:
prompts, padding) are left out before the head: the loss is the mean over the trained targets,
their gradient exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from odyssey.dtypes import IGNORE, VOCAB_CHUNK
from odyssey.gguf.qweight import Workspace, row_chunk, take_rows


class OnlineCrossEntropy:
    """Mean cross-entropy of hf @ W.T against tgt, and (if grad) its gradient w.r.t. hf, in one pass
    over the rows of W given block by block (`add(v0, W rows v0..)`, in any order, each row once),
    each block in vocab chunks: never the (N, V) logits, never all of W at once.

    hf (N, d) compute dtype; tgt (N,) int64, IGNORE (-100) where not trained: those rows are left
    out before anything is computed (no loss, gradient exactly 0). Over the n trained rows: for
    each chunk c of logits l_c (n, C): running max m, sum s = sum exp(l - m) and G = sum exp(l - m)
    @ W_c (n, d), rescaled when m grows; the target rows w_t (n, d) are taken from the block that
    holds them. Then loss = mean(m + log s - hf.w_t) and dloss/dhf = (G / s - w_t) / n, fp32 (loss
    0 and gradient 0 when n = 0).

    In a lower compute precision (bf16), the gradient's matmul `e @ W_c` runs in that precision,
    as the family's class does under autocast (its logits' gradient, cast to bf16 by `.float()`'s
    backward, times the bf16 head): no fp32 copy of W_c, 2.7x less CPU per chunk (benchmarks/
    results/lora-bf16.md). The target's own term is kept out of it (its e, rescaled like s, in
    e_t; G sums the other rows), so that dloss/dhf = (G / s + (e_t / s - 1) w_t) / n: a confident
    prediction (p_t near 1) does not cancel against a bf16-rounded G.
    """

    def __init__(
        self, hf: torch.Tensor, tgt: torch.Tensor, grad: bool, dtype: torch.dtype, ws: Workspace | None = None
    ):
        self.rows = hf.shape[0]
        self.ws = ws  # where a float head's chunks are converted (row_chunk), else a new tensor each
        self.keep = None  # (n,) indices of the trained rows, None when every row is trained
        trained = tgt != IGNORE
        if not bool(trained.all()):
            self.keep = trained.nonzero().squeeze(1)
            hf, tgt = hf[self.keep], tgt[self.keep]
        N, d = hf.shape
        self.hf, self.tgt, self.grad, self.dtype = hf, tgt, grad, dtype
        self.m = torch.full((N,), float("-inf"))
        self.s = torch.zeros(N)
        self.G = torch.zeros(N, d) if grad else None
        self.w_t = torch.zeros(N, d)  # target rows, fp32
        self.low = dtype != torch.float32  # the gradient's matmul in the compute dtype, target apart
        self.e_t = torch.zeros(N) if grad and self.low else None  # the target's exp(l_t - m)

    def add(self, v0: int, W: torch.Tensor) -> None:
        """Head rows v0..v0+R-1: W (R, d) in the store dtype, or a GGUF block (QWeight)."""
        hf = self.hf
        if hf.shape[0] == 0:
            return
        for c0 in range(0, W.shape[0], VOCAB_CHUNK):
            Wc = row_chunk(W, c0, c0 + VOCAB_CHUNK, self.dtype, self.ws)  # (C, d); a GGUF block's dequantized
            lc = F.linear(hf, Wc).float()  # (N, C)
            m_new = torch.maximum(self.m, lc.max(dim=1).values)
            alpha = torch.exp(self.m - m_new)  # (N,) rescales what was summed under the old max
            e = torch.exp(lc - m_new[:, None])  # (N, C)
            self.s = self.s * alpha + e.sum(dim=1)
            if self.grad and self.low:
                self.e_t = self.e_t * alpha
                rows = ((self.tgt >= v0 + c0) & (self.tgt < v0 + c0 + Wc.shape[0])).nonzero().squeeze(1)
                if rows.numel():
                    cols = self.tgt[rows] - (v0 + c0)
                    self.e_t[rows] = e[rows, cols]
                    e[rows, cols] = 0.0
                self.G = self.G * alpha[:, None] + torch.mm(e.to(Wc.dtype), Wc)  # (N, d) bf16 into fp32
            elif self.grad:
                self.G = self.G * alpha[:, None] + e @ Wc.float()
            self.m = m_new
            del lc, e, Wc
        here = ((self.tgt >= v0) & (self.tgt < v0 + W.shape[0])).nonzero().squeeze(1)
        if here.numel():
            self.w_t[here] = take_rows(W, self.tgt[here] - v0)

    @property
    def trained(self) -> int:
        """Rows that carry loss (targets != IGNORE)."""
        return self.hf.shape[0]

    def result(self) -> tuple[float, torch.Tensor | None]:
        """(mean loss over the trained rows, dloss/dhf (N, d) fp32 or None; 0 on untrained rows)."""
        N, d = self.hf.shape
        if N == 0:
            return 0.0, (torch.zeros(self.rows, d) if self.grad else None)
        l_t = (self.hf.float() * self.w_t).sum(dim=1)  # (n,) target logits
        if self.low:  # rounded as the head's matmul rounds the other logits (the family's loss)
            l_t = l_t.to(self.dtype).float()
        loss = float((self.m + torch.log(self.s) - l_t).mean())
        if not self.grad:
            return loss, None
        if self.low:
            g = (self.G / self.s[:, None] + (self.e_t / self.s - 1.0)[:, None] * self.w_t) / N
        else:
            g = (self.G / self.s[:, None] - self.w_t) / N
        if self.keep is not None:
            full = torch.zeros(self.rows, d)
            full[self.keep] = g
            g = full
        return loss, g
