"""What `odyssey verify` and `odyssey info` say about a store: `verify_store` (every checksum, the
fast checksums, seal and row-block digests added to an older store) and `describe`."""

from __future__ import annotations

import json
import os
import re

from odyssey import atomic
from odyssey.config import format_bytes
from odyssey.modelconfig import ModelConfig
from odyssey.store.checksum import (
    BLOCKS,
    FAST,
    SEAL,
    index_seal,
)
from odyssey.store.format import (
    INDEX_NAME,
)
from odyssey.store.reader import Store

SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def verify_store(root: str | os.PathLike, progress: bool = True) -> tuple[Store | None, list[str], str | None]:
    """`odyssey verify`: (the store or None, every problem one line, a note). Checks the config, the
    index fields against the shards' headers, each shard's size, header, shapes and checksums. A
    store without fast checksums or seal (written before them) gets them, when everything verifies,
    by an atomic rewrite of the index that only adds those fields."""
    store, problems = Store.inspect(root)
    if store is None:
        return None, problems, None
    shard_problems, found = store.verify_shards(progress=progress)
    problems += shard_problems
    note = None
    recs = store.meta["shards"]
    add_fast = not store.sealed or any(FAST not in r for r in recs.values())
    add_blocks = any(BLOCKS in found[f] and BLOCKS not in recs[f] for f in found)
    if not problems and (add_fast or add_blocks):
        index = json.loads(json.dumps(store.index))  # a copy: the opened store keeps its own
        for fname, rec in index["metadata"]["odyssey"]["shards"].items():
            rec.setdefault(FAST, found[fname][FAST])
            if BLOCKS in found[fname]:
                rec.setdefault(BLOCKS, found[fname][BLOCKS])
        index["metadata"]["odyssey"][SEAL] = index_seal(index)
        what = " and ".join(
            w
            for w, wanted in (
                (f"fast checksums ({FAST}) and the index seal", add_fast),
                ("row-block checksums (the embedding and head are checked a block at a time)", add_blocks),
            )
            if wanted
        )
        try:
            atomic.write_json(store.root / INDEX_NAME, index)
            note = f"added {what} to {INDEX_NAME}"
        except OSError as e:
            slower = "SHA-256" if add_fast else "a whole shard at a time"
            note = (
                f"could not add {'fast' if add_fast else 'row-block'} checksums to {INDEX_NAME} "
                f"({e.strerror or e}); commands check this store with {slower} (slower)"
            )
    return store, problems, note


def paging_summary(store: Store) -> str:
    """One line: how the embedding and head are paged, and the largest unit a pager slot holds."""
    cfg = store.config
    parts = []
    for unit in ("embed", "head"):
        blocks = store.blocks(unit)
        if unit == "head" and cfg.tie_word_embeddings:
            parts.append("head tied (reads the embedding's blocks)")
        elif len(blocks) > 1:
            parts.append(f"{unit} in {len(blocks)} row blocks of {store.block_rows[unit]:,} rows")
        else:
            parts.append(f"{unit} whole")
    return f"{', '.join(parts)}; largest unit {format_bytes(store.max_page_bytes())} (a pager slot)"


def _family_notes(cfg: ModelConfig) -> str:
    """What the family and config add to a plain Llama layer, for `info` (e.g. ', RoPE llama3')."""
    notes = []
    if cfg.rope_scaling:
        notes.append(f"RoPE {cfg.rope_scaling['rope_type']} x{cfg.rope_scaling['factor']:g}")
    kinds = [cfg.layer_type(i) for i in range(cfg.num_hidden_layers)]
    if "sliding_attention" in kinds:
        notes.append(
            f"sliding window {cfg.sliding_window} on {kinds.count('sliding_attention')} of {len(kinds)} layers"
        )
    if any(name.endswith(".bias") for name in cfg.layer_shapes(0)):
        notes.append("projection biases")
    return "".join(", " + n for n in notes)


def describe(store: Store) -> str:
    """Human summary for `odyssey info`."""
    cfg = store.config
    layer_bytes = store.unit_bytes(0)
    lines = [
        f"model        {store.root}",
        f"family       {cfg.family.name} ({cfg.family.architecture}){_family_notes(cfg)}",
        f"architecture {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"FFN {cfg.intermediate_size}, heads {cfg.num_attention_heads} (KV {cfg.num_key_value_heads}, "
        f"head_dim {cfg.head_dim}), vocab {cfg.vocab_size}, "
        f"{'tied' if cfg.tie_word_embeddings else 'untied'} head",
        f"rope_theta   {cfg.rope_theta:g}   rms_norm_eps {cfg.rms_norm_eps:g}   "
        f"max positions {cfg.max_position_embeddings}",
        f"parameters   {cfg.num_parameters():,} ({cfg.num_parameters() / 1e9:.3f} B)",
        f"dtype        {store.dtype}",
        f"bytes        {format_bytes(store.total_bytes())} on disk in {len(store.shards)} shards",
        f"per layer    {format_bytes(layer_bytes)} (embed {format_bytes(store.unit_bytes('embed'))}, "
        f"head {format_bytes(store.unit_bytes('head'))})",
        f"paging       {paging_summary(store)}",
        f"tokenizer    {'yes' if store.tokenizer_path() else 'none (add one with `odyssey prepare-data --model`)'}",
    ]
    return "\n".join(lines)
