"""Reading a store: `Store.open` parses the config, the index and every shard's header, so a missing,
truncated or corrupt shard is reported before any work starts; `verify` checks every checksum.

`Store` is the reading API the pager, engine, merge and exporters use (`config`, `units`, `shards`,
`load_tensors`, `tokenizer_path`, `root`, `dtype`); `describe` is its summary for `odyssey info`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from odyssey.config import ModelConfig, format_bytes
from odyssey.dtypes import ST_CODES
from odyssey.store.format import (
    FORMAT_VERSION,
    INDEX_NAME,
    JOURNAL_NAME,
    ShardInfo,
    StoreError,
    Unit,
    file_sha256,
    repair_hint,
    shard_info,
    unit_label,
    unit_shapes,
    units_of,
)


class Store:
    """An opened store: config, index, and the header of every shard (parsed at open, so a
    truncated or corrupt shard is reported before any work starts)."""

    def __init__(self, root: Path, config: ModelConfig, index: dict, shards: dict):
        self.root = root
        self.config = config
        self.index = index
        self.meta = index["metadata"]["odyssey"]
        self.dtype: str = self.meta["dtype"]  # "bf16" | "f16" | "f32"
        self.shards: dict[Unit, ShardInfo] = shards

    @classmethod
    def open(cls, root: str | os.PathLike) -> Store:
        root = Path(root)
        if not root.is_dir():
            raise StoreError(f"model directory {root} not found; create one with `odyssey init` or `odyssey import`")
        cfg_path, index_path = root / "config.json", root / INDEX_NAME
        if not cfg_path.is_file():
            raise StoreError(
                f"{root} has no config.json: not a model store; create one with `odyssey init` or `odyssey import`"
            )
        if not index_path.is_file():
            hint = (
                "an interrupted `odyssey init`: re-run it with the same arguments to finish"
                if (root / JOURNAL_NAME).exists()
                else "a Hugging Face checkpoint? convert it with `odyssey import`"
            )
            raise StoreError(f"{root} has no {INDEX_NAME}: {hint}")
        try:
            hf = json.loads(cfg_path.read_text())
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(
                f"{root}: config.json or the index is not valid JSON ({e.msg}); re-create the store"
            ) from None
        if not isinstance(hf, dict) or not isinstance(index, dict):
            raise StoreError(f"{root}: config.json and the index must each hold a JSON object; re-create the store")
        meta = index.get("metadata")
        meta = meta.get("odyssey") if isinstance(meta, dict) else None
        if not isinstance(meta, dict):
            raise StoreError(
                f"{root} is a Hugging Face checkpoint, not an Odyssey store; convert it with "
                f"`odyssey import {root} --out DIR`"
            )
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{root}: store format version {version!r} is not supported (this Odyssey reads "
                f"version {FORMAT_VERSION}); upgrade Odyssey or re-import the model"
            )
        config = ModelConfig.from_hf_dict(hf, source=str(cfg_path))
        by_unit = {}
        try:
            for fname, info in meta["shards"].items():
                unit = info["unit"]
                by_unit[unit if unit in ("embed", "head") else int(unit)] = root / fname
        except (KeyError, TypeError, ValueError, AttributeError):
            raise StoreError(f"{root}: the index's shard list is damaged; re-create the store") from None
        shards = {}
        for unit in units_of(config):
            if unit not in by_unit:
                raise StoreError(f"{root}: the index lists no shard for {unit_label(unit)}; re-create the store")
            shards[unit] = shard_info(by_unit[unit], unit)
            _check_shapes(config, unit, shards[unit])
        return cls(root, config, index, shards)

    @property
    def units(self) -> list[Unit]:
        return units_of(self.config)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def unit_bytes(self, unit: Unit) -> int:
        return self.shards[unit].file_bytes

    def max_unit_bytes(self) -> int:
        return max(s.file_bytes for s in self.shards.values())

    def total_bytes(self) -> int:
        return sum(s.file_bytes for s in self.shards.values())

    def fingerprint(self) -> str:
        """Identity of the weights (not of the path): sha256 over the shard checksums in the index,
        16 hex digits. Adapters record it, so one made for another base is refused."""
        h = hashlib.sha256()
        for fname in sorted(self.meta["shards"]):
            h.update(f"{fname}:{self.meta['shards'][fname]['sha256']};".encode())
        return h.hexdigest()[:16]

    def tokenizer_path(self) -> Path | None:
        p = self.root / "tokenizer.json"
        return p if p.is_file() else None

    def load_tensors(self, unit: Unit, dtype=None) -> dict:
        """A unit's tensors as torch tensors (copies, `dtype` if given). For tests, merge and
        export; the training path uses the pager instead."""
        import torch

        info = self.shards[unit]
        out = {}
        with open(info.path, "rb") as f:
            for name, span in info.tensors.items():
                f.seek(info.data_offset + span.start)
                raw = bytearray(f.read(span.nbytes))
                t = torch.frombuffer(raw, dtype=ST_CODES[span.dtype].torch()).reshape(span.shape)
                out[name] = t.to(dtype) if dtype is not None else t
        return out

    def state_dict(self, dtype=None) -> dict:
        sd = {}
        for unit in self.units:
            sd.update(self.load_tensors(unit, dtype))
        return sd

    def verify(self, progress: bool = True) -> list[str]:
        """Every shard's size, header, shapes and checksum; one problem line per bad file."""
        from tqdm import tqdm

        problems = []
        files = self.meta["shards"]
        bar = tqdm(
            total=sum(v["bytes"] for v in files.values()),
            unit="B",
            unit_scale=True,
            desc="verify",
            disable=not progress,
            leave=False,
        )
        for fname, info in files.items():
            path = self.root / fname
            unit = info["unit"] if info["unit"] in ("embed", "head") else int(info["unit"])
            try:
                si = self.shards[unit]  # header parsed and shapes checked by Store.open
                if si.file_bytes != info["bytes"]:
                    raise StoreError(f"{path}: {si.file_bytes} bytes, the index says {info['bytes']}")
                digest = file_sha256(path)
                if digest != info["sha256"]:
                    raise StoreError(
                        f"{path}: checksum mismatch ({unit_label(unit)}): the shard is corrupted; {repair_hint(path)}"
                    )
            except StoreError as e:
                problems.append(str(e))
            bar.update(info["bytes"])
        bar.close()
        return problems


def _check_shapes(cfg: ModelConfig, unit: Unit, info: ShardInfo) -> None:
    want = unit_shapes(cfg, unit)
    have = {n: s.shape for n, s in info.tensors.items()}
    if set(want) != set(have):
        missing = sorted(set(want) - set(have)) or sorted(set(have) - set(want))
        raise StoreError(
            f"{info.path}: tensors do not match config.json ({unit_label(unit)}: "
            f"{missing[0]}); {repair_hint(info.path)}"
        )
    for name, shape in want.items():
        if tuple(shape) != tuple(have[name]):
            raise StoreError(
                f"{info.path}: {name} has shape {list(have[name])}, config.json implies "
                f"{list(shape)}; {repair_hint(info.path)}"
            )


def describe(store: Store) -> str:
    """Human summary for `odyssey info`."""
    cfg = store.config
    layer_bytes = store.unit_bytes(0)
    lines = [
        f"model        {store.root}",
        f"architecture Llama decoder: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
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
        f"tokenizer    {'yes' if store.tokenizer_path() else 'none (add one with `odyssey prepare-data --model`)'}",
    ]
    return "\n".join(lines)
