"""A new model from a config: `init_store` writes a store of random weights, deterministic per tensor.

Every tensor is drawn from its own generator seeded by (seed, tensor name), so a tensor can be
regenerated alone and an interrupted `odyssey init` resumed through the writer's journal with the
same bytes as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

from odyssey import atomic
from odyssey.dtypes import DTYPES, check_store_dtype
from odyssey.modelconfig import ModelConfig
from odyssey.store.writer import StoreWriter


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and the tensor name: any tensor can be regenerated alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def init_tensor(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int):
    """The usual scaled normal init: N(0, initializer_range), output projections (o_proj,
    down_proj) scaled by 1/sqrt(2L) as in GPT-2, norms the identity (weights one, or zero where the
    family scales by 1 + w), biases zero. Returns fp32 (or bf16) torch."""
    import torch

    if name.endswith("norm.weight"):
        return torch.zeros(shape) if cfg.family.gemma_norm else torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = cfg.initializer_range
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * cfg.num_hidden_layers)
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.randn(shape, generator=g).mul_(std)


def init_store(
    cfg: ModelConfig,
    out: str | os.PathLike,
    dtype: str = "bf16",
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    block_rows: int | None = None,
) -> dict:
    """Create a store from scratch, streaming one tensor at a time. Returns a summary.
    `block_rows`: rows per row block of the embedding and head (None: no block larger than a
    layer; tests force small blocks)."""

    atomic.set_command("init")
    check_store_dtype(dtype)
    key = {"config": cfg.to_hf_dict(DTYPES[dtype].hf_name), "dtype": dtype, "seed": seed, "kind": "init"}
    if block_rows is not None:
        key["block_rows"] = block_rows
    w = StoreWriter(Path(out), cfg, dtype, key, force, block_rows=block_rows)
    t0 = time.perf_counter()
    written, kept = w.write_all(lambda name, shape: init_tensor(cfg, name, shape, seed), "init", progress)
    w.finish()
    return w.summary(time.perf_counter() - t0, written, kept)
