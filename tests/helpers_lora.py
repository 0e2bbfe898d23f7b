"""A LoRA skeleton for gradient tests: the meta model of a store with adapters injected (r 4, alpha 8),
lora_B drawn at random (it is zero at init) so every path carries gradient, optionally saved; and a
pager that poisons the slots it releases (tests of what autograd keeps from a layer's forward)."""

from __future__ import annotations

from pathlib import Path

import torch

from odyssey.adapters import inject, lora_parameters, save_adapter
from odyssey.config import LoraSettings
from odyssey.model import CausalLM
from odyssey.store import Store


def lora_skeleton(store: Store, out: Path | None = None, std: float = 0.05, settings: LoraSettings | None = None):
    """The skeleton (PEFT-wrapped CausalLM on meta; LoRA r=4 alpha 8 unless `settings`); with
    `out`, its adapter saved to out/adapter."""
    settings = settings or LoraSettings(r=4, alpha=8)
    with torch.device("meta"):
        skel = CausalLM(store.config)
    inject(skel, settings, seed=5)
    torch.manual_seed(0)
    for k, p in lora_parameters(skel).items():
        if "lora_B" in k:
            torch.nn.init.normal_(p, std=std)  # B is zero at init: make every path carry gradient
    if out is not None:
        save_adapter(skel, settings, out / "adapter", store)
    return skel


def poison_released_slots(monkeypatch) -> list:
    """Make every Pager scribble over a slot's buffer (0xFF bytes: NaN in every float dtype) as
    soon as its unit is released and no get is scheduled from it, and give the slot a new buffer
    (the unit is read again, elsewhere, when next asked for). A tensor still pointing at a
    released slot then reads NaNs for good, even when its unit is read again into the same slot.
    Returns the list the poisoned units are appended to."""
    import mmap
    import time

    from odyssey.pager import Pager

    poisoned: list = []

    def release(self, res) -> None:
        with self._cv:
            slot = self._slots[res.slot]
            slot.refs -= 1
            slot.released_at = time.perf_counter()
            if not slot.pinned and slot.refs == 0 and slot.pending == 0:
                slot.buf[:] = b"\xff" * len(slot.buf)  # left mapped: views of it may still exist
                slot.buf = mmap.mmap(-1, len(slot.buf))
                slot.unit, slot.ready = None, False
                poisoned.append(res.unit)
            self._cv.notify_all()

    monkeypatch.setattr(Pager, "release", release)
    return poisoned
