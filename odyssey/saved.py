"""What a kept layer's autograd graph saves of its base weights (engine.Engine, selective
recompute): handles in place of views of the weights bound for the layer, rebuilt in backward from
the weights bound again then, so a kept layer's weights need not stay in RAM from its forward to
its backward (see engine.py's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from odyssey.engine import Engine
    from odyssey.pager import Resident


@dataclass(frozen=True)
class WeightHandle:
    """What autograd saves in place of a view of a bound base weight: its HF name and the view's
    geometry relative to the weight (elements)."""

    name: str
    size: tuple
    stride: tuple
    offset: int  # storage offset of the view minus the weight's


class SavedWeights:
    """The pack and unpack hooks of a kept layer's forward (`torch.autograd.graph.
    saved_tensors_hooks`). pack: a saved tensor that lies inside one of the base weights bound
    for the unit (same dtype: the weight itself, its transpose `W.t()` that F.linear's backward
    needs, a norm's weight) becomes a `WeightHandle`; any other tensor is saved as is. A tensor
    that overlaps a bound weight without being a view of it in its dtype is a RuntimeError (it
    would keep pointing at a slot). unpack: the handle's view of the weight bound under that name
    when backward runs (the layer paged in and bound again)."""

    def __init__(self, engine: Engine, res: Resident, inner=None):
        self.engine = engine
        self.inner = inner  # pack/unpack of the other saved tensors (spill.LayerSpill), or None: as they are
        self.weights = []  # (HF name, first byte address, nbytes, dtype) of each bound base weight
        for name in res.tensors:
            entry = engine._bound.get(name)
            if entry is None or entry[1] is None:  # not a bound Parameter (a GGUF QWeight saves nothing)
                continue
            w = engine.bound_weight(name)
            if w.numel():
                self.weights.append((name, w.data_ptr(), w.numel() * w.element_size(), w.dtype))

    def pack(self, t: torch.Tensor):
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.layout != torch.strided:
            return t
        lo = t.data_ptr()
        hi = lo + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))) * t.element_size()
        for name, w0, nbytes, dtype in self.weights:
            if hi <= w0 or lo >= w0 + nbytes:
                continue
            if t.dtype != dtype or lo < w0 or hi > w0 + nbytes or (lo - w0) % t.element_size():
                raise RuntimeError(f"engine: autograd saves a tensor overlapping {name} that is not a view of it")
            return WeightHandle(name, tuple(t.shape), tuple(t.stride()), (lo - w0) // t.element_size())
        return t if self.inner is None else self.inner.pack(t)

    def unpack(self, h):
        if not isinstance(h, WeightHandle):
            return h if self.inner is None else self.inner.unpack(h)
        w = self.engine.bound_weight(h.name)
        return w.as_strided(h.size, h.stride, w.storage_offset() + h.offset)
