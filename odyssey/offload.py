"""Optimizer offload: the AdamW moments wait on disk between optimizer steps.

AdamW keeps two fp32 moments per trained weight (exp_avg, exp_avg_sq): twice the LoRA weights,
107 MiB for the 1.2B model at r=16, 320 MiB for an 8B. Only `optimizer.step()` reads them, once a
step, after backward, when the activations are gone; through the whole forward and backward they
only occupy RAM at the step's peak. With the offload on, `MomentsOffload.evict` writes them after
each optimizer step into one unlinked O_DIRECT file (spill.open_unlinked: page cache untouched, so
the bytes do not count against a memory cgroup; a crash leaves nothing) and drops them; `load`
reads them back just before the next optimizer step (and before a checkpoint takes the optimizer's
state). The bytes are exact: the optimizer sees bit for bit what it wrote (tests/test_offload.py).

The planner (planner.plan, `offload`) then counts the adapters without their moments at the step's
peak, and a phase of its own for the optimizer step (the moments back in RAM, every gradient);
train.training_plan turns the offload on (`optimizer_offload: auto`) where that lets the budget
spill or keep layers it would otherwise recompute, or fit at all. It costs one write and one read
of the moments a step: ~0.15 s for the 1.2B model on a 1.5 GB/s disk.
"""

from __future__ import annotations

import os
import shutil

import torch

from odyssey.errors import OdysseyError
from odyssey.spill import aligned_buffer, existing, open_unlinked, round_up

CHUNK = 64 << 20  # bytes a pwrite / preadv moves at once (a whole number of pages)
STAGING = 8 << 20  # the page-aligned buffer a moment that is not yet in one buffer is written through
ALIGN = 4096  # each moment's offset in the file and in RAM: whole pages, as O_DIRECT writes them


def offload_possible(directory: str) -> bool:
    """Whether `directory` (or the nearest existing directory above it) takes an O_DIRECT file: on
    tmpfs the moments would stay in RAM."""
    try:
        fd, direct = open_unlinked(existing(str(directory)))
    except OdysseyError:
        return False
    os.close(fd)
    return direct


def moment_bytes(params) -> int:
    """Bytes of AdamW's two moments for `params` (each moment the size and dtype of its weight)."""
    return sum(2 * round_up(p.numel() * p.element_size(), ALIGN) for p in params)


class MomentsOffload:
    """The moments of `optimizer` on disk between its steps, in `directory`."""

    def __init__(self, optimizer: torch.optim.Optimizer, directory):
        self.optimizer = optimizer
        self.directory = str(directory)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise OdysseyError(
                f"optimizer offload: cannot create {self.directory} ({e.strerror}); "
                "choose --spill-dir elsewhere, or optimizer_offload=off"
            ) from None
        self.fd, _ = open_unlinked(self.directory)
        self.layout: list[tuple] = []  # (param, key, offset, shape, dtype) of each moment on disk
        self.loaded: tuple | None = None  # (the buffer `load` read into, the views it put in the state)
        self.size = 0  # bytes of the file in use (whole pages)
        self.bytes_moved = 0  # written and read back since take_stats
        reserve = round_up(moment_bytes(self.params))
        try:
            if reserve:
                os.posix_fallocate(self.fd, 0, reserve)
        except OSError as e:
            self.close()
            free = shutil.disk_usage(self.directory).free
            raise OdysseyError(
                f"optimizer offload: cannot reserve {reserve / 1e9:.2f} GB for the AdamW moments in "
                f"{self.directory} ({e.strerror}; {free / 1e9:.2f} GB free); free space, choose --spill-dir "
                "elsewhere, or optimizer_offload=off"
            ) from None

    @property
    def on_disk(self) -> bool:
        return bool(self.layout)

    def _moments(self) -> list[tuple]:
        return [
            (p, k, t)
            for p in self.params
            for k, t in self.optimizer.state.get(p, {}).items()
            if isinstance(t, torch.Tensor) and t.dim() > 0  # not the step counters
        ]

    def evict(self) -> None:
        """Write the moments to the file and drop them from RAM (after `optimizer.step()`, and after
        a checkpoint's state was loaded into the optimizer). The state keeps meta tensors of their
        shapes: an optimizer step without `load` first fails loudly instead of starting from zero."""
        if self.on_disk:
            return
        moments = self._moments()
        if not moments:
            return  # no step yet: AdamW creates its state in its first step
        layout, offset = [], 0
        for p, k, t in moments:
            layout.append((p, k, offset, tuple(t.shape), t.dtype))
            offset = round_up(offset + t.numel() * t.element_size(), ALIGN)
        size = round_up(offset)
        try:
            flat = self._loaded_buffer(moments)
            if flat is not None:  # after a load: the buffer as it is
                self._write(flat[:size], 0)
            else:  # the first step's moments, or a checkpoint's: one at a time through a small buffer
                stage = aligned_buffer(min(STAGING, size))
                for (_, _, t), (_, _, off, _, _) in zip(moments, layout, strict=True):
                    src = t.contiguous().view(-1).view(torch.uint8)
                    for done in range(0, src.numel(), stage.numel()):
                        n = min(stage.numel(), src.numel() - done)
                        stage[:n].copy_(src[done : done + n])
                        self._write(stage[: round_up(n)], off + done)
        except OSError as e:
            raise OdysseyError(
                f"optimizer offload: writing the AdamW moments in {self.directory} failed ({e.strerror}); "
                "free space, choose --spill-dir elsewhere, or optimizer_offload=off"
            ) from None
        for p, k, _, shape, dtype in layout:
            self.optimizer.state[p][k] = torch.empty(shape, dtype=dtype, device="meta")
        self.layout, self.size, self.loaded = layout, size, None
        self.bytes_moved += size

    def _write(self, buf: torch.Tensor, offset: int) -> None:
        """`buf` (page-aligned, whole pages) at `offset` of the file."""
        view = memoryview(buf.numpy())
        for start in range(0, len(view), CHUNK):
            n = min(CHUNK, len(view) - start)
            if os.pwrite(self.fd, view[start : start + n], offset + start) != n:
                raise OSError(28, "short write")

    def _loaded_buffer(self, moments) -> torch.Tensor | None:
        """The buffer `load` read into, when the state still holds the views it put there (AdamW
        updates them in place; a checkpoint's load_state_dict replaces them)."""
        if self.loaded is None:
            return None
        flat, views = self.loaded
        same = len(views) == len(moments) and all(t is v for (_, _, t), v in zip(moments, views, strict=True))
        return flat if same else None

    def load(self) -> None:
        """Read the moments back into RAM (before `optimizer.step()` or its `state_dict()`): every
        moment a view of one buffer, which the next `evict` writes as it is."""
        if not self.on_disk:
            return
        flat = aligned_buffer(self.size)
        view = memoryview(flat.numpy())
        done = 0
        try:
            while done < self.size:
                got = os.preadv(self.fd, [view[done : min(done + CHUNK, self.size)]], done)
                if got <= 0:
                    raise OSError(5, "short read")
                done += got
        except OSError as e:
            raise OdysseyError(
                f"optimizer offload: reading the AdamW moments back from {self.directory} failed ({e.strerror})"
            ) from None
        views = []
        for p, k, off, shape, dtype in self.layout:
            n = torch.Size(shape).numel() * dtype.itemsize
            views.append(flat[off : off + n].view(dtype).view(shape))
            self.optimizer.state[p][k] = views[-1]
        self.layout, self.loaded = [], (flat, views)
        self.bytes_moved += self.size

    def take_stats(self) -> int:
        """Bytes written and read back since the last call, then zero."""
        n, self.bytes_moved = self.bytes_moved, 0
        return n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
