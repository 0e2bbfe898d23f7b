"""Data-parallel ranks on PyTorch's own engine (torch.distributed), when launched by torchrun.

`torchrun --nproc-per-node N -m odyssey train ...` (or `odyssey train --nproc N`) starts N ranks;
each pages its own copy of the frozen base from its local disk under its own RAM budget, reads a
disjoint shard of the data (data.BatchSampler with rank and world_size), and after its
micro-batches the trained parameters' gradients are averaged with one all-reduce (gloo on CPU,
nccl where CUDA is present). The loss rides in the same buffer, so every rank logs the global mean.

A rank that dies makes the others' next collective fail (gloo notices the closed connection at
once; otherwise after `timeout_s`): they raise `PeerLost`, and the trainer stops with a checkpoint
of the last step every rank completed instead of hanging.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch


class PeerLost(RuntimeError):
    """A collective failed: another rank died or stopped answering within the timeout."""


class Ranks:
    """The process group (or a single process when WORLD_SIZE is unset or 1)."""

    def __init__(self, timeout_s: float = 300.0):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1
        if self.active:
            import torch.distributed as dist

            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            self._dist = dist

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        try:
            self._dist.all_reduce(t, op=op)
        except RuntimeError as e:  # DistBackendError and gloo's connection errors
            raise PeerLost(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        return t

    def average_grads(self, params: list, loss: float, weight: float | None = None) -> float:
        """Averages every parameter's .grad over the ranks in one flat fp32 all-reduce; returns the
        mean loss. Grads: sum of numel floats, e.g. 12.6M for the 1.2B with r=16 (50 MB).

        `weight` (the trained targets of this rank's step, for masked examples where ranks train
        different counts): a weighted mean, sum(w_r * g_r) / sum(w_r), so the step's gradient is
        the mean over every rank's trained targets; None: the plain mean (equal counts)."""
        if not self.active:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if weight is None:
            flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss])])
            self._all_reduce(flat, self._dist.ReduceOp.SUM).div_(self.world)
        else:
            w = float(weight)
            flat = torch.cat([g.reshape(-1).float() * w for g in grads] + [torch.tensor([loss * w, w])])
            self._all_reduce(flat, self._dist.ReduceOp.SUM)
            flat = flat[:-1].div_(max(float(flat[-1]), 1.0))
        k = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[k : k + n].view_as(g).to(g.dtype)
            k += n
        return float(flat[-1])

    def flags(self, values: list[int]) -> list[int]:
        """Element-wise maximum of small integer flags over the ranks (stop, pause, checkpoint)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        return [int(v) for v in self._all_reduce(t, self._dist.ReduceOp.MAX)]

    def barrier(self) -> None:
        if self.active:
            self.flags([0])

    def close(self, clean: bool = True) -> None:
        """Leaves the group. After a lost peer the group is broken: do not wait on it."""
        if self.active and clean:
            try:
                self._dist.destroy_process_group()
            except RuntimeError:
                pass
