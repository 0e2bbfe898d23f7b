"""What a kept or spilled layer's autograd graph saves (engine.Engine, selective recompute and
spill), and what it need not.

- Base weights: handles in place of views of the weights bound for the layer, rebuilt in backward
  from the weights bound again then, so a kept layer's weights need not stay in RAM from its forward
  to its backward (see engine.py's docstring).
- Derived tensors: the two RMSNorm outputs that feed LoRA's q/k/v and gate/up, and the GLU's output
  that feeds down_proj's, are elementwise functions of tensors the graph saves anyway (the layer's
  input, the residual, gate and up) and of the norms' weights. LoRA's A matmuls save them as their
  inputs: 2d + f of the 3d + 2q + 2kv + 3f values a token that a layer's graph holds (35 % of the
  1.2B's 54.5 MiB a layer at seq 512 in fp32; stepmemory.saved_bytes). While the engine runs a kept
  or spilled layer's forward (`noting`), model.RMSNorm and model.glu note each output with its
  function and inputs (`note`); when autograd saves such an output or a view of it, the pack hook
  saves a `DerivedHandle` instead: the function, its inputs packed by the same hook (a weight's
  handle, the spill's handle, or the tensor itself) and the view's geometry. In backward the first
  unpack runs the function again, without grad, on the unpacked inputs, and the views saved of it
  share that one result. The same ops on the same values give the same bits: a kept or spilled
  layer's gradients equal those of its graph saving the outputs themselves (tests/test_saved.py).
  A noted output changed in place after it was saved is a RuntimeError at the end of the layer's
  forward, never a wrong gradient. Fewer bytes a kept layer (more layers kept, more units pinned
  with the budget) and a spilled one (fewer bytes through the disk a step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
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

    def __init__(self, engine: Engine, res: Resident, inner=None, derived: Derived | None = None):
        self.engine = engine
        self.derived = derived  # the layer's noted outputs (saved as DerivedHandles), or None
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
        # (while dynamo traces a compiled layer nothing is noted, and storages are not traceable)
        recipe = None if self.derived is None or torch.compiler.is_compiling() else self.derived.find(t)
        if recipe is not None:
            return recipe.handle(t, self.pack)
        return t if self.inner is None else self.inner.pack(t)

    def unpack(self, h):
        if isinstance(h, DerivedHandle):
            return h.recipe.view(h, self.unpack)
        if not isinstance(h, WeightHandle):
            return h if self.inner is None else self.inner.unpack(h)
        w = self.engine.bound_weight(h.name)
        return w.as_strided(h.size, h.stride, w.storage_offset() + h.offset)


@dataclass(eq=False)
class Recipe:
    """A noted output: `fn(*args)`, computed again in backward from its inputs."""

    fn: Callable
    args: tuple  # as noted (tensors and constants); once saved, `packed` holds them as packed
    out: torch.Tensor | None  # the output, held while its layer's forward runs (None after)
    version: int  # out's version counter when noted
    size: tuple = ()
    stride: tuple = ()
    offset: int = 0  # out's storage offset (elements)
    packed: tuple | None = None  # args packed by the layer's hook, once a view of out was saved
    value: torch.Tensor | None = field(default=None, repr=False)  # computed again, shared by the views

    @torch.compiler.disable
    def handle(self, t: torch.Tensor, pack) -> DerivedHandle:
        if self.packed is None:
            self.packed = tuple(pack(a) if isinstance(a, torch.Tensor) else a for a in self.args)
            self.args = ()
        return DerivedHandle(self, tuple(t.shape), tuple(t.stride()), t.storage_offset() - self.offset)

    @torch.compiler.disable
    def view(self, h: DerivedHandle, unpack) -> torch.Tensor:
        if self.value is None:
            args = [unpack(a) for a in self.packed]  # (unpack passes constants through)
            with torch.no_grad():
                value = self.fn(*args)
            if tuple(value.shape) != self.size or tuple(value.stride()) != self.stride:
                raise RuntimeError("saved: a derived tensor came back in another geometry than it was saved in")
            self.value = value
        return self.value.as_strided(h.size, h.stride, self.value.storage_offset() + h.offset)


@dataclass(frozen=True)
class DerivedHandle:
    """What autograd holds in place of a noted output (or a view of it): its recipe and the view's
    geometry (offset relative to the output's)."""

    recipe: Recipe
    size: tuple
    stride: tuple
    offset: int


class Derived:
    """The outputs noted during one kept or spilled layer's forward, by their storage. Its methods
    and Recipe's run outside any compiled graph (torch.compiler.disable): where torch.compile wraps
    a layer, dynamo would otherwise compile each as a frame of its own when the hooks call it."""

    def __init__(self):
        self.recipes: dict[int, Recipe] = {}  # storage data_ptr -> recipe

    @torch.compiler.disable
    def note(self, out: torch.Tensor, fn: Callable, args: tuple) -> None:
        if out.layout != torch.strided or not out.is_contiguous():
            return
        self.recipes[out.untyped_storage().data_ptr()] = Recipe(
            fn, args, out, out._version, tuple(out.shape), tuple(out.stride()), out.storage_offset()
        )

    @torch.compiler.disable  # (run by autograd's hooks: never a frame dynamo compiles)
    def find(self, t: torch.Tensor) -> Recipe | None:
        """The recipe of the output `t` is a view of (same storage and dtype), or None."""
        if t.layout != torch.strided:
            return None
        r = self.recipes.get(t.untyped_storage().data_ptr())
        if r is None or r.out is None or t.dtype != r.out.dtype:
            return None
        return r

    @torch.compiler.disable
    def close(self) -> None:
        """The layer's forward is done: a saved output changed in place since it was noted is an
        error (its recomputed value would differ); the outputs are no longer held."""
        for r in self.recipes.values():
            if r.packed is not None and r.out._version != r.version:
                raise RuntimeError("saved: a tensor a layer saved for backward was changed in place afterwards")
            r.out = None
        self.recipes.clear()


_active: list[Derived] = []  # the registry of the layer whose forward runs now (engine.noting), if any


@contextlib.contextmanager
def noting(derived: Derived):
    """model.RMSNorm and model.glu note their outputs in `derived` while this runs."""
    _active.append(derived)
    try:
        yield derived
    finally:
        _active.pop()
    derived.close()


@torch.compiler.disable
def note(out: torch.Tensor, fn: Callable, *args) -> torch.Tensor:
    """Notes `out == fn(*args)` for the layer whose forward runs under `noting` (nothing otherwise);
    returns `out`. Never compiled: callers skip it while torch.compile traces (a call would break
    the graph), and where a compiled layer falls back to eager, dynamo would compile it as a frame
    of its own."""
    if _active:
        _active[-1].note(out, fn, args)
    return out


@contextlib.contextmanager
def saving(engine: Engine, res: Resident, inner=None, derive: bool = True):
    """`saved_tensors_hooks` for a kept or spilled layer's forward (engine.Engine._forward): the base
    weights bound for `res` saved as handles, rebuilt at backward from what is bound then
    (SavedWeights), and with `derive` the outputs the layer notes (its norms', its GLU's) as recipes
    computed again in backward (Derived); other saved tensors go to `inner` (a spill.LayerSpill)
    when given."""
    derived = Derived() if derive else None
    sw = SavedWeights(engine, res, inner, derived)
    with torch.autograd.graph.saved_tensors_hooks(sw.pack, sw.unpack):
        if derived is None:
            yield
        else:
            with noting(derived):
                yield
