"""Writing a store, crash-safe: `StoreWriter` writes one shard per unit and a journal, then the index.

Each shard goes to a temporary name and is renamed when complete; the journal (`JOURNAL_NAME`,
`.odyssey-init.json`) records the size and checksum of every finished shard under a key naming what
is being written (config, dtype, seed or source), so re-running the same command after a crash
keeps the complete shards and writes only the rest. The index is written last and the journal then
removed: a directory with an index is a complete store.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from odyssey import atomic
from odyssey.config import ModelConfig, format_bytes
from odyssey.dtypes import DTYPES, numel
from odyssey.errors import OdysseyError
from odyssey.store.checksum import FAST, SEAL, SHA256, file_digests, index_seal, new_hasher
from odyssey.store.format import (
    FORMAT_VERSION,
    INDEX_NAME,
    JOURNAL_NAME,
    TensorSpan,
    Unit,
    build_header,
    drop_cache,
    shard_name,
    unit_label,
    unit_shapes,
    units_of,
)


class StoreWriter:
    """Writes a store shard by shard: `write_unit(unit, producer)` for each unit, then `finish()`.

    `producer(name, shape) -> np.ndarray | torch.Tensor` returns one tensor at a time in the
    store dtype (or any dtype, cast here), so peak memory is one tensor plus the write buffer.
    """

    def __init__(
        self, root: Path, config: ModelConfig, dtype: str, journal_key: dict, force: bool, extra_bytes: int = 0
    ):
        self.root, self.config, self.dtype = Path(root), config, dtype
        self.units = units_of(config)
        self.n = len(self.units)
        self.journal_key = journal_key
        self.journal: dict = {"key": journal_key, "done": {}}
        self._headers = {u: self._header(u) for u in self.units}  # (header bytes, spans) per unit
        self._written: list[str] = []  # shard files written by this run
        self._fresh = False  # whether this run started the output (nothing to resume)
        self.file_bytes = {u: len(h) + sum(s.nbytes for s in spans) for u, (h, spans) in self._headers.items()}
        self._prepare(force, extra_bytes)

    def _header(self, unit: Unit) -> tuple[bytes, list[TensorSpan]]:
        st = DTYPES[self.dtype].st
        return build_header([(n, st, s) for n, s in unit_shapes(self.config, unit).items()], metadata=self._meta(unit))

    # --- sizes ---
    def unit_file_bytes(self, unit: Unit) -> int:
        return self.file_bytes[unit]

    def total_file_bytes(self) -> int:
        return sum(self.file_bytes.values())

    def _meta(self, unit: Unit) -> dict:
        return {"format": "pt", "odyssey_unit": unit_label(unit)}

    # --- directory state ---
    def _prepare(self, force: bool, extra_bytes: int) -> None:
        root = self.root
        journal_path = root / JOURNAL_NAME
        if root.exists() and not root.is_dir():
            raise OdysseyError(f"--out {root} is a file; choose a directory path")
        existing = list(root.iterdir()) if root.is_dir() else []
        resumable = False
        if journal_path.is_file():
            try:
                old = json.loads(journal_path.read_text())
            except json.JSONDecodeError:
                old = None
            if old and old.get("key") == self.journal_key and not (root / INDEX_NAME).exists():
                self.journal = old
                resumable = True
        if existing and not resumable:
            if not force:
                raise OdysseyError(
                    f"output directory {root} is not empty; choose an empty --out or pass --force to overwrite it"
                )
            for p in existing:  # --force: remove what a store consists of, keep anything else
                if (
                    p.name in ("config.json", INDEX_NAME, JOURNAL_NAME)
                    or (p.name.startswith(("model-", ".model-")) and ".safetensors" in p.name)
                    or p.name.endswith(".tmp")
                ):
                    p.unlink()
            self.journal = {"key": self.journal_key, "done": {}}
        self._fresh = not resumable
        # Free disk, checked before anything is written: what remains to write, plus a margin.
        remaining = (
            sum(
                self.unit_file_bytes(u)
                for u in self.units
                if shard_name(self.units.index(u), self.n) not in self.journal["done"]
            )
            + extra_bytes
        )
        probe = root if root.is_dir() else atomic.existing_parent(root)
        free = shutil.disk_usage(probe).free
        if free < remaining + (64 << 20):
            raise OdysseyError(
                f"not enough free disk at {probe}: the store needs {format_bytes(remaining)}, "
                f"{format_bytes(free)} is free; free some space or choose another --out"
            )
        root.mkdir(parents=True, exist_ok=True)
        atomic.write_json(root / "config.json", self.config.to_hf_dict(DTYPES[self.dtype].hf_name))
        atomic.write_json(journal_path, self.journal)

    def is_done(self, unit: Unit) -> bool:
        """A shard recorded in the journal whose file still has the recorded checksum (its fast
        checksum is added to the record if a journal written before it lacks one)."""
        fname = shard_name(self.units.index(unit), self.n)
        rec = self.journal["done"].get(fname)
        path = self.root / fname
        if not rec or not path.is_file() or path.stat().st_size != rec["bytes"]:
            return False
        digests = file_digests(path, (SHA256, FAST))
        if digests[SHA256] == rec[SHA256] and rec.get(FAST, digests[FAST]) == digests[FAST]:
            rec[FAST] = digests[FAST]
            return True
        del self.journal["done"][fname]
        return False

    def write_unit(self, unit: Unit, producer: Callable) -> int:
        """Write one shard; returns its byte size."""
        import torch

        fname = shard_name(self.units.index(unit), self.n)
        header, spans = self._headers[unit]
        hashers = [new_hasher(SHA256), new_hasher(FAST)]
        with atomic.atomic_open(self.root / fname, "wb") as f:
            f.write(header)
            for h in hashers:
                h.update(header)
            for span in spans:
                t = producer(span.name, span.shape)
                if isinstance(t, np.ndarray):
                    t = torch.from_numpy(t)
                t = t.to(DTYPES[self.dtype].torch()).contiguous()
                if tuple(t.shape) != span.shape:
                    raise OdysseyError(f"{span.name}: got shape {list(t.shape)}, expected {list(span.shape)}")
                raw = memoryview(t.view(torch.uint8).numpy()).cast("B")
                f.write(raw)
                for h in hashers:
                    h.update(raw)
                del t, raw
            size = f.tell()
        drop_cache(self.root / fname)  # written once, read later by the pager: keep RAM free
        self._written.append(fname)
        sha, fast = (h.hexdigest() for h in hashers)
        self.journal["done"][fname] = {"unit": str(unit), "bytes": size, SHA256: sha, FAST: fast}
        atomic.write_json(self.root / JOURNAL_NAME, self.journal)
        return size

    def abandon(self) -> None:
        """Remove what this run wrote, when its input turned out damaged: the shards it wrote and,
        if this run started the output, its config.json, journal and (then empty) directory. An
        output resumed from an earlier run keeps that run's shards and journal."""
        for fname in self._written:
            (self.root / fname).unlink(missing_ok=True)
            self.journal["done"].pop(fname, None)
        if self._fresh:
            for name in (JOURNAL_NAME, "config.json"):
                (self.root / name).unlink(missing_ok=True)
            try:
                self.root.rmdir()
            except OSError:  # not empty: files the user keeps there
                pass
        elif self.root.is_dir():
            atomic.write_json(self.root / JOURNAL_NAME, self.journal)

    def finish(self) -> None:
        shards, weight_map, total = {}, {}, 0
        for k, unit in enumerate(self.units):
            fname = shard_name(k, self.n)
            rec = self.journal["done"][fname]
            if FAST not in rec:  # a journal written before the fast checksum
                rec[FAST] = file_digests(self.root / fname, (FAST,))[FAST]
            shards[fname] = {"unit": str(unit), "bytes": rec["bytes"], SHA256: rec[SHA256], FAST: rec[FAST]}
            for name, shape in unit_shapes(self.config, unit).items():
                weight_map[name] = fname
                total += numel(shape) * DTYPES[self.dtype].itemsize
        index = {
            "metadata": {
                "total_size": total,
                "odyssey": {
                    "format_version": FORMAT_VERSION,
                    "dtype": self.dtype,
                    "checksum": "sha256",
                    "shards": shards,
                },
            },
            "weight_map": weight_map,
        }
        index["metadata"]["odyssey"][SEAL] = index_seal(index)
        atomic.write_json(self.root / INDEX_NAME, index)
        (self.root / JOURNAL_NAME).unlink(missing_ok=True)
