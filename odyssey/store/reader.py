"""Reading a store: `Store.open` parses the config, the index and every shard's header and checks
the index fields against the headers, so a missing, truncated or corrupt shard or a damaged index is
reported before any work starts; the bytes themselves are checked against the index's checksums
where they are used (`load_tensors`, `check_page`, `check_rows`, `check_file`: once per shard or row
block per opened store); `verify` checks every checksum.

Row blocks (format.py): `blocks(unit)` are the pager units covering a shard (its row blocks, or the
shard itself), `page_units()` every pager unit in store order, `page(unit)` the bytes and tensor
views of one, `max_page_bytes()` the largest (what a pager slot holds). The rows a block comes from
the index (`blocks.rows`, with a digest per block) or, in a store written before row blocks, from
`block_rows_rule`; such a store's blocks are checked a whole shard at a time until `odyssey verify`
records their digests.

`Store` is the reading API the pager, engine, merge and exporters use (`config`, `units`, `shards`,
`load_tensors`, `tokenizer_path`, `root`, `dtype`); `describe` is its summary for `odyssey info`;
`verify_store` is `odyssey verify` (every problem one line; adds the fast checksums and the index seal
to a store written before them).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from odyssey.dtypes import ST_CODES
from odyssey.modelconfig import ModelConfig
from odyssey.store.checksum import (
    BLOCKS,
    FAST,
    SEAL,
    SHA256,
    buffer_digest,
    file_digests,
    new_hasher,
)
from odyssey.store.format import (
    Block,
    Page,
    PageUnit,
    ShardInfo,
    StoreError,
    Unit,
    block_bounds,
    block_rows_rule,
    blocked_tensor,
    blocks_of,
    page_of,
    repair_hint,
    unit_label,
    units_of,
)
from odyssey.store.inspect import blocks_problem, inspect_store

SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class ChecksumMismatch(StoreError):
    """A shard's bytes differ from the checksum the index records for it."""


class Store:
    """An opened store: config, index, and the header of every shard (parsed at open, so a
    truncated or corrupt shard is reported before any work starts)."""

    def __init__(self, root: Path, config: ModelConfig, index: dict, shards: dict, files: dict | None = None):
        self.root = root
        self.config = config
        self.index = index
        self.meta = index["metadata"]["odyssey"]
        self.dtype: str = self.meta["dtype"]  # "bf16" | "f16" | "f32"
        self.shards: dict[Unit, ShardInfo] = shards
        self.files: dict[Unit, str] = files or {u: s.path.name for u, s in shards.items()}
        # The fast hash is trusted only in a sealed index; an unsealed one (older stores) is
        # checked with SHA-256 until `odyssey verify` adds fast hashes and the seal.
        self.sealed = SEAL in self.meta
        self._verified: set = set()  # units and row blocks whose bytes were checked in this process
        self._init_blocks()

    @classmethod
    def open(cls, root: str | os.PathLike) -> Store:
        store, problems = cls.inspect(root)
        if problems:
            more = (
                f" ({len(problems) - 1} more problem(s): `odyssey verify {root}` lists them)"
                if len(problems) > 1
                else ""
            )
            raise StoreError(problems[0] + more)
        return store

    @classmethod
    def inspect(cls, root: str | os.PathLike) -> tuple[Store | None, list[str]]:
        """(the store, every problem found in its config, index and headers, one line each). The
        store is None when a problem keeps it from being read at all."""
        root = Path(root)
        try:
            return inspect_store(cls, root)
        except StoreError as e:
            return None, [str(e)]

    @property
    def units(self) -> list[Unit]:
        return units_of(self.config)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def unit_bytes(self, unit: Unit) -> int:
        return self.shards[unit].file_bytes

    def max_unit_bytes(self) -> int:
        """The largest shard, in bytes (the embedding or head of a large vocabulary)."""
        return max(s.file_bytes for s in self.shards.values())

    # --- row blocks: what the pager reads (format.py) ---
    def _init_blocks(self) -> None:
        largest = max(s.file_bytes for u, s in self.shards.items() if isinstance(u, int))
        self.block_rows: dict[Unit, int] = {}  # rows a block, for each shard with a blocked matrix
        self._block_digests: dict[Unit, list[str]] = {}  # trusted per-block XXH3-128 (sealed index)
        self._blocks: dict[Unit, list[PageUnit]] = {}
        for unit, info in self.shards.items():
            span = blocked_tensor(info)
            if span is None:
                continue
            rec = self.meta["shards"][self.files[unit]].get(BLOCKS)
            if blocks_problem(rec, unit, self.config) is None:  # recorded and well-formed
                self.block_rows[unit] = rec["rows"]
                if self.sealed:
                    self._block_digests[unit] = rec[FAST]
            else:
                row_bytes = span.nbytes // span.shape[0]
                self.block_rows[unit] = block_rows_rule(largest, info.data_offset + span.start, row_bytes)
            blocks = blocks_of(info, self.block_rows[unit])
            if len(blocks) > 1:
                self._blocks[unit] = blocks

    def blocks(self, unit: Unit) -> list[PageUnit]:
        """The pager units that cover shard `unit`: its row blocks, or [unit] when it is read whole."""
        return list(self._blocks.get(unit, [unit]))

    def page_units(self) -> list[PageUnit]:
        """Every pager unit, in store order: the embedding's blocks, the layers, the head's blocks."""
        return [p for u in self.units for p in self.blocks(u)]

    def page(self, unit: PageUnit) -> Page:
        """The file range and tensor views of a pager unit (a shard, or a row block of one)."""
        return page_of(self.shards[unit.unit if isinstance(unit, Block) else unit], unit)

    def max_page_bytes(self) -> int:
        """The largest pager unit, in bytes: the largest decoder layer, or a row block."""
        return max(self.page(u).nbytes for u in self.page_units())

    def block_bytes(self, unit: Unit) -> list[int]:
        """Bytes of each pager unit covering shard `unit`."""
        return [self.page(b).nbytes for b in self.blocks(unit)]

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

    # --- checksums where the bytes are used ---
    def expected_digest(self, unit: Unit) -> tuple[str, str]:
        """(algorithm, hex digest) a unit's shard is checked against: the fast hash when the index
        is sealed and records one, else SHA-256."""
        rec = self.meta["shards"][self.files[unit]]
        if self.sealed and FAST in rec:
            return FAST, rec[FAST]
        return SHA256, rec[SHA256]

    def is_verified(self, unit: Unit) -> bool:
        return unit in self._verified

    def _mismatch(self, unit: PageUnit) -> ChecksumMismatch:
        shard = unit.unit if isinstance(unit, Block) else unit
        what = unit_label(unit)
        if isinstance(unit, Block):
            what += f", rows {unit.row_start}-{unit.row_end - 1}"
        return ChecksumMismatch(
            f"store {self.root}: shard {self.files[shard]} ({what}) does not match its checksum "
            f"(damaged or changed on disk); run `odyssey verify {self.root}` and re-create or re-import the store"
        )

    def _check_digest(self, unit: Unit, algo: str, digest: str) -> None:
        if digest != self.expected_digest(unit)[1]:
            raise self._mismatch(unit)
        self._verified.add(unit)

    def check_buffer(self, unit: Unit, data) -> None:
        """Check a unit's whole shard file, read into `data` (bytes-like), against the index; once
        per unit. Raises ChecksumMismatch naming the shard."""
        if unit in self._verified:
            return
        algo, _ = self.expected_digest(unit)
        self._check_digest(unit, algo, buffer_digest(algo, data))

    def check_page(self, unit: PageUnit, data) -> None:
        """Check a pager unit's bytes, just read into `data` (bytes-like), against the index; once
        per unit. A row block is checked against its own digest; in a store without block digests
        (written before them, or an unsealed index) its whole shard is checked once, from disk."""
        if not isinstance(unit, Block):
            self.check_buffer(unit, data)
            return
        if unit.unit in self._verified or unit in self._verified:
            return
        digests = self._block_digests.get(unit.unit)
        if digests is None:
            self.check_file(unit.unit)
            return
        if buffer_digest(FAST, data) != digests[unit.index]:
            raise self._mismatch(unit)
        self._block_verified(unit)

    def _block_verified(self, block: Block) -> None:
        self._verified.add(block)
        if all(b in self._verified for b in self._blocks[block.unit]):
            self._verified.add(block.unit)

    def check_rows(self, unit: Unit, rows) -> None:
        """Check the row blocks of shard `unit` that hold `rows` (row indices), on disk: one
        streaming read of each block not checked yet. For rows used through a memory map (the
        engine's embedding lookup): a prompt of a few tokens reads a few blocks, not the shard. A
        shard read whole, or without block digests, is checked whole (`check_file`)."""
        if unit in self._verified:
            return
        digests = self._block_digests.get(unit)
        if digests is None or unit not in self._blocks:
            self.check_file(unit)
            return
        blocks = self._blocks[unit]
        for k in sorted({int(r) // self.block_rows[unit] for r in rows}):
            if not 0 <= k < len(blocks):  # not a row of this matrix: the lookup itself refuses it
                continue
            block = blocks[k]
            if block in self._verified:
                continue
            page = self.page(block)
            try:
                got = file_digests(page.path, (FAST,), start=page.start, stop=page.end)[FAST]
            except OSError as e:
                raise StoreError(f"store {self.root}: cannot read {self.files[unit]} ({e.strerror or e})") from None
            if got != digests[k]:
                raise self._mismatch(block)
            self._block_verified(block)

    def check_file(self, unit: Unit) -> None:
        """Check a unit's shard on disk (one streaming read) against the index; once per unit. For
        bytes used through a memory map, and row blocks of a store without block digests."""
        if unit in self._verified:
            return
        algo, _ = self.expected_digest(unit)
        try:
            digest = file_digests(self.shards[unit].path, (algo,))[algo]
        except OSError as e:
            raise StoreError(f"store {self.root}: cannot read {self.files[unit]} ({e.strerror or e})") from None
        self._check_digest(unit, algo, digest)

    def embedding_rows(self, ids):
        """Rows `ids` (int array) of the embedding, (len(ids), d) in the store dtype, gathered from
        the memory-mapped embed shard (only the rows needed), after checking the row blocks that
        hold them against the index (each block once per store; the whole shard where blocks have
        no digests)."""
        import numpy as np
        import torch

        ids = np.asarray(ids).reshape(-1)
        info = self.shards["embed"]
        span = info.tensors["model.embed_tokens.weight"]
        if getattr(self, "_embed_map", None) is None:
            self._embed_map = np.memmap(
                info.path,
                dtype=ST_CODES[span.dtype].numpy,
                mode="r",
                offset=info.data_offset + span.start,
                shape=span.shape,
            )
        self.check_rows("embed", np.unique(ids))  # no-op for blocks already checked
        rows = np.ascontiguousarray(self._embed_map[ids])
        return torch.from_numpy(rows).view(ST_CODES[span.dtype].torch())  # bf16 rows are read as uint16

    def load_tensors(self, unit: Unit, dtype=None) -> dict:
        """A unit's tensors as torch tensors (copies, `dtype` if given), checked against the index's
        checksum before they are returned (the first time in this store). For merge, export, full
        training and tests; the LoRA path uses the pager instead."""
        import torch

        info = self.shards[unit]
        hasher = None if unit in self._verified else new_hasher(self.expected_digest(unit)[0])
        raws = {}
        try:
            with open(info.path, "rb") as f:
                head = f.read(info.data_offset)
                if hasher is not None:
                    hasher.update(head)
                for name, span in info.tensors.items():  # file order, no gaps (shard_info checks)
                    f.seek(info.data_offset + span.start)
                    raw = bytearray(span.nbytes)
                    if f.readinto(raw) != span.nbytes:
                        raise StoreError(
                            f"store {self.root}: shard {info.path.name} is shorter than its header says "
                            f"(truncated on disk); run `odyssey verify {self.root}`"
                        )
                    if hasher is not None:
                        hasher.update(raw)
                    raws[name] = raw
        except OSError as e:  # gone or unreadable since the store was opened
            raise StoreError(
                f"store {self.root}: cannot read shard {info.path.name} ({e.strerror or e}); "
                f"run `odyssey verify {self.root}`"
            ) from None
        if hasher is not None:
            self._check_digest(unit, self.expected_digest(unit)[0], hasher.hexdigest())
        out = {}
        for name, raw in raws.items():
            span = info.tensors[name]
            t = torch.frombuffer(raw, dtype=ST_CODES[span.dtype].torch()).reshape(span.shape)
            out[name] = t.to(dtype) if dtype is not None else t
        return out

    def state_dict(self, dtype=None) -> dict:
        sd = {}
        for unit in self.units:
            sd.update(self.load_tensors(unit, dtype))
        return sd

    def verify(self, progress: bool = True) -> list[str]:
        """Every shard's checksums (SHA-256, and the fast hash where recorded); one problem line per
        bad file (sizes, headers, shapes and index fields were checked by `open`)."""
        return self.verify_shards(progress)[0]

    def verify_shards(self, progress: bool = True) -> tuple[list[str], dict]:
        """Every shard's checksums (SHA-256, the fast hash where recorded, each row block's where
        recorded), one read per shard. -> (one problem line per bad file, {file: {"xxh3_128":
        digest, "blocks": {"rows", "xxh3_128": [...]} for a shard read in row blocks}} of the shards
        read)."""
        from tqdm import tqdm

        problems, found = [], {}
        bar = tqdm(
            total=self.total_bytes(), unit="B", unit_scale=True, desc="verify", disable=not progress, leave=False
        )
        for unit in self.units:
            fname, si = self.files[unit], self.shards[unit]
            rec = self.meta["shards"][fname]
            path = self.root / fname
            blocks = self._blocks.get(unit)
            ends = [end for *_, end in block_bounds(si, self.block_rows[unit])] if blocks else None
            try:
                digests = file_digests(path, (SHA256, FAST), block_ends=ends)
            except OSError as e:
                problems.append(f"{path}: cannot read ({e.strerror or e}); {repair_hint(path)}")
                continue
            bar.update(si.file_bytes)
            found[fname] = {FAST: digests[FAST]}
            if blocks:
                found[fname][BLOCKS] = {"rows": self.block_rows[unit], FAST: digests[BLOCKS]}
            # .get: a record without a sha256 (inspect reports it too) is a mismatch, not a KeyError
            if digests[SHA256] != rec.get(SHA256) or (FAST in rec and digests[FAST] != rec[FAST]):
                problems.append(
                    f"{path}: checksum mismatch ({unit_label(unit)}): the shard is corrupted or changed; "
                    f"{repair_hint(path)}"
                )
                continue
            recorded = rec.get(BLOCKS)
            well_formed = blocks_problem(recorded, unit, self.config) is None  # else inspect reports it
            if blocks and well_formed and recorded[FAST] != digests[BLOCKS]:
                k = next(i for i, (a, b) in enumerate(zip(recorded[FAST], digests[BLOCKS], strict=False)) if a != b)
                problems.append(
                    f"{path}: checksum mismatch ({unit_label(blocks[k])}): the index's row-block checksum differs "
                    f"from the shard's bytes; {repair_hint(path)}"
                )
                continue
            self._verified.add(unit)
        bar.close()
        return problems, found
