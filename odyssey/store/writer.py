"""Writing a store, crash-safe: `StoreWriter` writes one shard per unit and a journal, then the index.

Each shard goes to a temporary name and is renamed when complete; the journal (`JOURNAL_NAME`,
`.odyssey-init.json`) records the size and checksum of every finished shard under a key naming what
is being written (config, dtype, seed or source), so re-running the same command after a crash
keeps the complete shards and writes only the rest. The journal is written before anything else
and the index last (recording which key wrote it, `written_by`), then the journal is removed: a
directory with an index is a complete store, and the same command run again finds it complete and
writes nothing. Temporary files of a killed run are removed by the next one. `--force` replaces
another store (or anything not this command's): it removes only the files a store consists of
(and the caller's `extra_names`), never other files in the directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from odyssey import atomic
from odyssey.config import format_bytes
from odyssey.dtypes import DTYPES, numel
from odyssey.errors import OdysseyError
from odyssey.modelconfig import ModelConfig
from odyssey.store.checksum import BLOCKS, FAST, SEAL, SHA256, BlockHasher, file_digests, index_seal, new_hasher
from odyssey.store.format import (
    FORMAT_VERSION,
    INDEX_NAME,
    JOURNAL_NAME,
    ShardInfo,
    TensorSpan,
    Unit,
    block_bounds,
    block_rows_rule,
    blocked_tensor,
    build_header,
    drop_cache,
    shard_name,
    unit_label,
    unit_shapes,
    units_of,
)

STORE_FILES = ("config.json", INDEX_NAME, JOURNAL_NAME)
SHARD_RE = re.compile(r"^model-[0-9]{5}-of-[0-9]{5}\.safetensors$")
# temporary names made before they named their process (`.NAME.RANDOM.tmp`)
LEGACY_TMP_RE = re.compile(
    r"^\.(config\.json|model\.safetensors\.index\.json|\.odyssey-init\.json|model-[0-9]{5}-of-[0-9]{5}"
    r"\.safetensors)\.[a-z0-9_]+\.tmp$"
)


def key_digest(key) -> str:
    """sha256 of a journal key as canonical JSON (what identifies "the same command")."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class StoreWriter:
    """Writes a store shard by shard: `write_unit(unit, producer)` for each unit, then `finish()`.

    `producer(name, shape) -> np.ndarray | torch.Tensor` returns one tensor at a time in the
    store dtype (or any dtype, cast here), so peak memory is one tensor plus the write buffer.

    The embedding and an untied head are hashed per row block as they are written (`block_rows`
    rows a block; None: `format.block_rows_rule`, blocks no larger than the largest layer) and the
    digests recorded in the index where a shard has more than one block.
    """

    def __init__(
        self,
        root: Path,
        config: ModelConfig,
        dtype: str,
        journal_key: dict,
        force: bool,
        extra_bytes: int = 0,
        extra_names: tuple[str, ...] = (),
        block_rows: int | None = None,
    ):
        if block_rows is not None and block_rows <= 0:
            raise OdysseyError(f"block_rows must be > 0, got {block_rows}")
        self.root, self.config, self.dtype = Path(root), config, dtype
        self.extra_names = tuple(extra_names)
        self.complete = False  # a finished store of the same key: nothing to write
        self.units = units_of(config)
        self.n = len(self.units)
        self.journal_key = journal_key
        self.journal: dict = {"key": journal_key, "done": {}}
        self._headers = {u: self._header(u) for u in self.units}  # (header bytes, spans) per unit
        self._written: list[str] = []  # shard files written by this run
        self._fresh = False  # whether this run started the output (nothing to resume)
        self.file_bytes = {u: len(h) + sum(s.nbytes for s in spans) for u, (h, spans) in self._headers.items()}
        self.block_rows = self._block_rows(block_rows)  # unit -> rows a block, for shards paged in blocks
        self._prepare(force, extra_bytes)

    def _header(self, unit: Unit) -> tuple[bytes, list[TensorSpan]]:
        st = DTYPES[self.dtype].st
        return build_header([(n, st, s) for n, s in unit_shapes(self.config, unit).items()], metadata=self._meta(unit))

    def _info(self, unit: Unit) -> ShardInfo:
        header, spans = self._headers[unit]
        path = self.root / shard_name(self.units.index(unit), self.n)
        return ShardInfo(unit, path, len(header), sum(s.nbytes for s in spans), {s.name: s for s in spans})

    def _block_rows(self, forced: int | None) -> dict:
        largest = max(self.file_bytes[u] for u in self.units if isinstance(u, int))
        out = {}
        for unit in self.units:
            info = self._info(unit)
            span = blocked_tensor(info)
            if span is not None and span.shape[0] > 0:
                row_bytes = span.nbytes // span.shape[0]
                out[unit] = forced or block_rows_rule(largest, info.data_offset + span.start, row_bytes)
        return out

    def block_ends(self, unit: Unit) -> list[int] | None:
        """End offsets of the unit's row blocks when it has more than one, else None."""
        if unit not in self.block_rows:
            return None
        bounds = block_bounds(self._info(unit), self.block_rows[unit])
        return [end for _, _, _, end in bounds] if len(bounds) > 1 else None

    # --- sizes ---
    def unit_file_bytes(self, unit: Unit) -> int:
        return self.file_bytes[unit]

    def total_file_bytes(self) -> int:
        return sum(self.file_bytes.values())

    def write_all(self, producer, desc: str, progress: bool = True, after_unit=None) -> tuple[int, int]:
        """Write every unit not finished by an earlier run (tensors from `producer(name, shape)`),
        with a progress bar; `after_unit()` runs after each unit. Returns (bytes written, shards
        kept from an earlier run). `finish()` is the caller's, once its other files are in place."""
        from tqdm import tqdm

        written = kept = 0
        with tqdm(total=self.total_file_bytes(), unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
            for unit in self.units:
                bar.set_postfix_str(unit_label(unit))
                if self.is_done(unit):
                    kept += 1
                else:
                    written += self.write_unit(unit, producer)
                bar.update(self.unit_file_bytes(unit))
                if after_unit is not None:
                    after_unit()
        return written, kept

    def summary(self, seconds: float, written: int, kept: int, **extra) -> dict:
        """The figures init, import and merge report: parameters, bytes, what this run wrote, speed."""
        return {
            "parameters": self.config.num_parameters(),
            "bytes": self.total_file_bytes(),
            "written_bytes": written,
            "kept_shards": kept,
            "seconds": seconds,
            "mb_s": written / 1e6 / max(seconds, 1e-9),
            "out": str(self.root),
            "dtype": self.dtype,
            **extra,
        }

    def _meta(self, unit: Unit) -> dict:
        return {"format": "pt", "odyssey_unit": unit_label(unit)}

    # --- directory state ---
    def is_own_file(self, name: str) -> bool:
        """A file this writer writes (and --force may remove): the store's config, index, journal
        and shards (of any layer count), and the caller's `extra_names` (tokenizer files, a record)."""
        return name in (STORE_FILES + self.extra_names) or SHARD_RE.match(name) is not None

    def _prepare(self, force: bool, extra_bytes: int) -> None:
        """Decide what the directory holds before touching it: nothing (or only leftovers of a
        killed run), this writer's unfinished store (journal with the same key: resume), this
        writer's finished store (index written by the same key: complete, nothing to write) or
        anything else (refused unless --force, which then removes only `is_own_file` files)."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise OdysseyError(f"--out {root} is a file; choose a directory path")
        stale = atomic.stale_temps(root, self.is_own_file) + [
            p for p in (root.iterdir() if root.is_dir() else ()) if LEGACY_TMP_RE.match(p.name)
        ]
        stale_names = {p.name for p in stale}
        present = sorted(p for p in (root.iterdir() if root.is_dir() else ()) if p.name not in stale_names)
        digest = key_digest(self.journal_key)
        resumable = False
        if not force and self._complete_store(digest):
            self.complete = True
        elif not (root / INDEX_NAME).exists():
            old = _read_json(root / JOURNAL_NAME)
            if isinstance(old, dict) and isinstance(old.get("done"), dict) and key_digest(old.get("key")) == digest:
                self.journal = {"key": self.journal_key, "done": old["done"]}
                resumable = True
        remove: list[Path] = []
        if present and not (resumable or self.complete):
            if not force:
                if (root / INDEX_NAME).exists() or (root / JOURNAL_NAME).exists():
                    what = "a finished" if (root / INDEX_NAME).exists() else "an unfinished"
                    held = f"{what} store made by another command or other arguments"
                else:
                    held = f"{present[0].name}" + (f" and {len(present) - 1} more" if len(present) > 1 else "")
                raise OdysseyError(
                    f"output directory {root} is not empty (it holds {held}); choose an empty --out "
                    f"or pass --force to replace the store files in it (other files are left alone)"
                )
            remove = [p for p in present if self.is_own_file(p.name) and (p.is_file() or p.is_symlink())]
            self.journal = {"key": self.journal_key, "done": {}}
        self._fresh = not (resumable or self.complete)  # abandon() may remove config.json and the journal
        # Free disk, checked before anything is written: what remains to write, plus a margin
        # (files --force removes count as free).
        remaining = 0
        if not self.complete:
            remaining = extra_bytes + sum(
                self.unit_file_bytes(u)
                for k, u in enumerate(self.units)
                if shard_name(k, self.n) not in self.journal["done"]
            )
        probe = root if root.is_dir() else atomic.existing_parent(root)
        free = shutil.disk_usage(probe).free + sum(p.lstat().st_size for p in remove)
        if free < remaining + (64 << 20):
            raise OdysseyError(
                f"not enough free disk at {probe}: the store needs {format_bytes(remaining)}, "
                f"{format_bytes(free)} is free; free some space or choose another --out"
            )
        # Everything checked: now the directory may be touched.
        for p in remove + stale:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if self.complete:
            return
        root.mkdir(parents=True, exist_ok=True)
        # The journal first: whatever of this store is on disk after a kill, the journal that
        # lets the same command resume it is there too.
        atomic.write_json(root / JOURNAL_NAME, self.journal)
        atomic.write_json(root / "config.json", self.config.to_hf_dict(DTYPES[self.dtype].hf_name))

    def _complete_store(self, digest: str) -> bool:
        """Whether `root` holds a finished store written with this writer's key (the same command
        run before), its config and every shard present with the recorded size."""
        index = _read_json(self.root / INDEX_NAME)
        try:
            meta = index["metadata"]["odyssey"]
            if meta["written_by"]["key_sha256"] != digest or meta["dtype"] != self.dtype:
                return False
            shards = meta["shards"]
            for k in range(self.n):
                fname = shard_name(k, self.n)
                if (self.root / fname).stat().st_size != shards[fname]["bytes"]:
                    return False
        except (TypeError, KeyError, OSError):
            return False
        return (self.root / "config.json").is_file()

    def is_done(self, unit: Unit) -> bool:
        """A shard recorded in the journal whose file still has the recorded checksum (its fast
        checksum is added to the record if a journal written before it lacks one); every shard of a
        complete store (see `_prepare`)."""
        if self.complete:
            return True
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
        ends = self.block_ends(unit)
        hashers = [new_hasher(SHA256), new_hasher(FAST)] + ([BlockHasher(ends)] if ends else [])
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
        sha, fast = (h.hexdigest() for h in hashers[:2])
        self.journal["done"][fname] = {"unit": str(unit), "bytes": size, SHA256: sha, FAST: fast}
        if ends:
            self.journal["done"][fname][BLOCKS] = {"rows": self.block_rows[unit], FAST: hashers[2].hexdigests()}
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
        if self.complete:  # finished before; only a journal left by a kill just after the index may remain
            (self.root / JOURNAL_NAME).unlink(missing_ok=True)
            return
        shards, weight_map, total = {}, {}, 0
        for k, unit in enumerate(self.units):
            fname = shard_name(k, self.n)
            rec = self.journal["done"][fname]
            if FAST not in rec:  # a journal written before the fast checksum
                rec[FAST] = file_digests(self.root / fname, (FAST,))[FAST]
            shards[fname] = {"unit": str(unit), "bytes": rec["bytes"], SHA256: rec[SHA256], FAST: rec[FAST]}
            ends = self.block_ends(unit)
            if ends:
                blocks = rec.get(BLOCKS)
                if not (isinstance(blocks, dict) and blocks.get("rows") == self.block_rows[unit]):
                    # a journal written before row blocks (or with other rows): hash them from the file
                    digests = file_digests(self.root / fname, (), block_ends=ends)[BLOCKS]
                    blocks = {"rows": self.block_rows[unit], FAST: digests}
                shards[fname][BLOCKS] = blocks
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
                    # which command wrote it: a re-run of the same command finds it complete
                    "written_by": {"kind": self.journal_key.get("kind"), "key_sha256": key_digest(self.journal_key)},
                },
            },
            "weight_map": weight_map,
        }
        index["metadata"]["odyssey"][SEAL] = index_seal(index)
        atomic.write_json(self.root / INDEX_NAME, index)
        (self.root / JOURNAL_NAME).unlink(missing_ok=True)
