"""A LoRA skeleton for gradient tests: the meta model of a store with adapters injected (r 4, alpha 8),
lora_B drawn at random (it is zero at init) so every path carries gradient, optionally saved."""

from __future__ import annotations

from pathlib import Path

import torch

from odyssey.adapters import inject, lora_parameters, save_adapter
from odyssey.config import LoraSettings
from odyssey.model import CausalLM
from odyssey.store import Store


def lora_skeleton(store: Store, out: Path | None = None, std: float = 0.05):
    """The skeleton (PEFT-wrapped CausalLM on meta); with `out`, its adapter saved to out/adapter."""
    settings = LoraSettings(r=4, alpha=8)
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
