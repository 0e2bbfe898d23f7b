"""LoRA adapters folded into the base weights, one unit (embed, a decoder layer, head) at a time.

For every targeted Linear of decoder layer i:
    W' = W + scale * B @ A        W (out, in) store dtype, A (r, in) fp32, B (out, r) fp32,
                                  scale = alpha / r (alpha / sqrt(r) for rsLoRA)
computed in fp32 and cast back to the store dtype once (PEFT's `merge_and_unload` adds a delta
already rounded to bf16; one rounding is closer to the base-plus-adapter forward).

`MergedSource` presents a store and an adapter with the reading API of `Store` (`config`, `units`,
`load_tensors`, `tokenizer_path`, `root`, `dtype`), so the exporters stream merged weights without
ever writing a merged store; `merge` writes one through `StoreWriter` (atomic shards, checksums,
journal, resumable). Resident at any moment: one unit's tensors plus one fp32 matrix.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from odyssey import atomic
from odyssey.adapters import WEIGHTS_NAME, AdapterFile, read_adapter
from odyssey.dtypes import DTYPES, check_store_dtype
from odyssey.export.chat import copy_tokenizer_and_template
from odyssey.outputs import check_apart
from odyssey.store import ChecksumMismatch, Store, StoreWriter, Unit, file_sha256, open_model, tokenizer_dir, unit_label
from odyssey.tokenizer import TOKENIZER_FILES, tokenizer_files

MERGE_RECORD = "odyssey_merge.json"  # in the merged store: which base and adapter made it


def merge_weight(W, A, B, scale: float, dtype=None):
    """W (out, in) any float dtype, A (r, in), B (out, r) -> W + scale * B @ A in `dtype` (default
    W's). The sum is formed in fp32 (a copy of W: 4 bytes per weight of this one matrix) and
    rounded once, also when the output dtype differs from W's (`merge --dtype f32` of a bf16 base
    keeps the adapter's low bits)."""
    import torch

    acc = W.to(torch.float32, copy=True)
    acc.addmm_(B.float(), A.float(), alpha=scale)
    return acc.to(dtype or W.dtype)


class MergedSource:
    """`store` with `adapter` folded in: the Store reading API over merged weights.

    Refuses an adapter made for another base (fingerprint when recorded, shapes always) at
    construction, so callers fail before writing anything."""

    def __init__(self, store: Store, adapter: AdapterFile):
        adapter.check_base(store)
        self.store, self.adapter = store, adapter
        self.config = store.config
        self.root = store.root
        self.dtype = store.dtype  # "bf16" | "f16" | "f32", the dtype load_tensors returns by default

    @property
    def units(self) -> list[Unit]:
        return self.store.units

    def tokenizer_path(self) -> Path | None:
        return self.store.tokenizer_path()

    # No `shards`: a pager reading the base's bytes would silently skip the adapter.

    def load_tensors(self, unit: Unit, dtype=None) -> dict:
        """A unit's tensors, HF names, merged; store dtype unless `dtype` is given."""
        tensors = self.store.load_tensors(unit)
        merged = set()
        if isinstance(unit, int):
            for module, (A, B) in self.adapter.layer_pairs(unit).items():
                name = f"{module}.weight"
                tensors[name] = merge_weight(tensors[name], A, B, self.adapter.scale, dtype)
                merged.add(name)
        if dtype is not None:
            tensors = {k: v if k in merged else v.to(dtype) for k, v in tensors.items()}
        return tensors


def merge(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Write a new store at `out`: the base at `model_dir` with the adapter at `adapter_dir` folded
    in. Everything a user can get wrong (adapter for another base, bad dtype, --out not empty, not
    enough disk) is refused before the first shard is written. Returns a summary of figures."""
    import torch  # noqa: F401  (imported before the clock starts: MB/s measures the merge)
    from tqdm import tqdm

    from odyssey.runtime.memory import PeakSampler

    atomic.set_command("merge")
    model_dir, out = Path(model_dir), Path(out)
    store, adapter = open_model(model_dir), read_adapter(adapter_dir)
    source = MergedSource(store, adapter)
    # Before the writer touches --out: --force on the base would delete the shards being read.
    check_apart(out, [("base model", "--model", model_dir), ("adapter", "--adapter", adapter_dir)])
    dtype = dtype or store.dtype
    check_store_dtype(dtype)
    key = {
        "kind": "merge",
        "config": store.config.to_hf_dict(DTYPES[dtype].hf_name),
        "dtype": dtype,
        "base": store.fingerprint(),
        "adapter": file_sha256(adapter.path / WEIGHTS_NAME),
        "scale": adapter.scale,
    }
    tok_bytes = sum(p.stat().st_size for p in tokenizer_files(tokenizer_dir(store)))
    w = StoreWriter(
        out, store.config, dtype, key, force, extra_bytes=tok_bytes, extra_names=(*TOKENIZER_FILES, MERGE_RECORD)
    )

    t0 = time.perf_counter()
    written = kept = 0
    bar = tqdm(total=w.total_file_bytes(), unit="B", unit_scale=True, desc="merge", disable=not progress)
    with PeakSampler(interval_s=0.02) as mem:
        try:
            for unit in w.units:
                bar.set_postfix_str(unit_label(unit))
                if w.is_done(unit):  # a complete shard from an interrupted merge with the same inputs
                    kept += 1
                else:  # each base shard is checked against its checksum as it is read
                    written += _write_merged_unit(w, source, unit)
                bar.update(w.unit_file_bytes(unit))
        except ChecksumMismatch:  # a damaged base: nothing made from it stays under --out
            bar.close()
            w.abandon()
            raise
        bar.close()
        # Tokenizer and provenance before the index: a directory with an index is complete.
        copied = copy_tokenizer_and_template(tokenizer_dir(store), out, store.config.vocab_size)
        atomic.write_json(
            out / MERGE_RECORD,
            {
                "base": str(store.root.resolve()),
                "base_fingerprint": store.fingerprint(),
                "adapter": str(adapter.path.resolve()),
                "r": adapter.r,
                "alpha": adapter.alpha,
                "scale": adapter.scale,
                "targets": adapter.targets,
                "modules": len(adapter.pairs),
            },
        )
        w.finish()
    seconds = time.perf_counter() - t0
    return {
        "out": str(out),
        "base": str(model_dir),
        "adapter": str(adapter.path),
        "dtype": dtype,
        "modules": len(adapter.pairs),
        "layers": store.num_layers,
        "bytes": w.total_file_bytes(),
        "written_bytes": written,
        "kept_shards": kept,
        "seconds": seconds,
        "mb_s": written / 1e6 / max(seconds, 1e-9),
        "peak_anon_bytes": mem.peak_bytes,
        "tokenizer_files": copied,
    }


def _write_merged_unit(w: StoreWriter, source: MergedSource, unit: Unit) -> int:
    tensors = source.load_tensors(unit, DTYPES[w.dtype].torch())  # one unit, merged: about one layer resident
    # StoreWriter asks for tensors in header order; pop each so it is freed once written.
    return w.write_unit(unit, lambda name, shape: tensors.pop(name))
