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
import json
import math
import os
import re
from pathlib import Path

from odyssey import atomic
from odyssey.config import ModelConfig, format_bytes
from odyssey.dtypes import DTYPES, ST_CODES, STORE_DTYPES
from odyssey.errors import OdysseyError
from odyssey.store.checksum import (
    BLOCKS,
    FAST,
    SEAL,
    SHA256,
    buffer_digest,
    file_digests,
    index_seal,
    is_hex,
    new_hasher,
)
from odyssey.store.format import (
    FORMAT_VERSION,
    INDEX_NAME,
    JOURNAL_NAME,
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
    shard_info,
    shard_name,
    unit_label,
    unit_shapes,
    units_of,
)

SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class ChecksumMismatch(StoreError):
    """A shard's bytes differ from the checksum the index records for it."""


def _journal_kind(root: Path) -> str:
    """The command whose unfinished store `root` is, as its journal's key names it (init, import,
    merge; `train --mode full` writes RUN/model)."""
    try:
        key = json.loads((root / JOURNAL_NAME).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return "init"
    if not isinstance(key, dict):
        return "init"
    if key.get("kind") in ("init", "import", "merge"):
        return key["kind"]
    return "train" if "run" in key else "init"


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
            return _inspect(cls, root)
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


# --------------------------------------------------------------------------------------------
# opening: the config, the index and the headers, every problem one line


def _index_fix(root: Path) -> str:
    return (
        f"the index was damaged or edited: re-create the store (`odyssey init` or `odyssey import` "
        f"with --force) or restore {root / INDEX_NAME} from a copy"
    )


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = getattr(e, "msg", None) or "not UTF-8"
        raise StoreError(f"{path}: {what} is not valid JSON ({msg}); re-create the store") from None
    except RecursionError:
        raise StoreError(f"{path}: {what} is not valid JSON (nested too deeply); re-create the store") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot read {what} ({e.strerror or e}); check its permissions") from None


def _parse_config(hf, cfg_path: Path) -> ModelConfig:
    if not isinstance(hf, dict):
        raise StoreError(f"{cfg_path}: not a JSON object of config keys; re-create the store")
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise StoreError(f"{cfg_path}: {key} must be an object or null; re-create the store")
    try:
        cfg = ModelConfig.from_hf_dict(hf, source=str(cfg_path))
    except OdysseyError as e:
        raise StoreError(f"{e}; fix config.json or re-create the store") from None
    for key in ("rms_norm_eps", "rope_theta", "initializer_range"):
        if not math.isfinite(getattr(cfg, key)):
            raise StoreError(f"{cfg_path}: {key} must be a finite number, got {getattr(cfg, key)}; fix config.json")
    return cfg


def blocks_problem(value, unit: Unit, cfg: ModelConfig) -> str | None:
    """What is wrong with a shard record's `blocks` field ({"rows": R, "xxh3_128": [one digest per
    block]}), or None when it is well-formed for this unit. Recorded only for a shard holding a
    matrix read in row blocks (the embedding, an untied head) that has more than one block."""
    if unit != "embed" and (unit != "head" or cfg.tie_word_embeddings):
        return f"{BLOCKS} recorded for {unit_label(unit)}, which is not read in row blocks"
    if not isinstance(value, dict) or set(value) != {"rows", FAST}:
        return f"{BLOCKS} is not an object of rows and {FAST}"
    rows, digests = value["rows"], value[FAST]
    if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
        return f"{BLOCKS}.rows {rows!r} is not a row count"
    count = -(-cfg.vocab_size // rows)
    if count < 2:
        return f"{BLOCKS}.rows {rows} makes one block of {cfg.vocab_size} rows (recorded only for several)"
    if not isinstance(digests, list) or len(digests) != count:
        return f"{BLOCKS}.{FAST} is not a list of {count} digests ({cfg.vocab_size} rows in blocks of {rows})"
    if not all(is_hex(d, FAST) for d in digests):
        return f"{BLOCKS}.{FAST} holds a value that is not an {FAST} digest"
    return None


def _parse_unit(value, num_layers: int) -> Unit | None:
    if value in ("embed", "head"):
        return value
    if isinstance(value, str) and re.fullmatch(r"\d{1,9}", value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_layers:
        return value
    return None


def _inspect(cls, root: Path) -> tuple[Store | None, list[str]]:
    if not root.is_dir():
        raise StoreError(f"model directory {root} not found; create one with `odyssey init` or `odyssey import`")
    cfg_path, index_path = root / "config.json", root / INDEX_NAME
    if not cfg_path.is_file():
        raise StoreError(
            f"{root} has no config.json: not a model store; create one with `odyssey init` or `odyssey import`"
        )
    if not index_path.is_file():
        hint = (
            f"an interrupted `odyssey {_journal_kind(root)}`: re-run it with the same arguments to finish"
            if (root / JOURNAL_NAME).exists()
            else "a Hugging Face checkpoint? convert it with `odyssey import`"
        )
        raise StoreError(f"{root} has no {INDEX_NAME}: {hint}")
    hf = _read_json(cfg_path, "config.json")
    index = _read_json(index_path, "the index")
    if not isinstance(index, dict) or not isinstance(index.get("metadata"), dict):
        raise StoreError(f"{index_path}: not an index (no metadata object); {_index_fix(root)}")
    meta = index["metadata"].get("odyssey")
    if not isinstance(meta, dict):
        raise StoreError(
            f"{root} is a Hugging Face checkpoint, not an Odyssey store; convert it with "
            f"`odyssey import {root} --out DIR`"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise StoreError(
            f"{root}: store format version {version!r} is not supported (this Odyssey reads "
            f"version {FORMAT_VERSION}); upgrade Odyssey or re-import the model"
        )
    config = _parse_config(hf, cfg_path)
    table = meta.get("shards")
    if not isinstance(table, dict) or not all(isinstance(r, dict) for r in table.values()):
        raise StoreError(f"{index_path}: metadata.odyssey.shards is not a table of shards; {_index_fix(root)}")
    L = config.num_hidden_layers
    if len(table) != L + 2:
        raise StoreError(
            f"{index_path}: the index lists {len(table)} shards, config.json ({L} layers) needs {L + 2}; "
            f"{_index_fix(root)}"
        )
    problems: list[str] = []

    def bad(what: str) -> None:
        problems.append(f"{index_path}: {what}; {_index_fix(root)}")

    # The seal first: when the index was damaged, that is the cause of whatever follows.
    if SEAL in meta:
        try:
            ok = meta[SEAL] == index_seal(index)
        except (ValueError, TypeError):  # NaN or a non-string key somewhere
            ok = False
        if not ok:
            bad(f"the index does not match its own checksum ({SEAL})")
    dtype = meta.get("dtype")
    if dtype not in STORE_DTYPES:
        bad(f"store dtype {dtype!r} is not one of {', '.join(STORE_DTYPES)}")
        dtype = None
    if meta.get("checksum", SHA256) != SHA256:
        bad(f"checksum {meta.get('checksum')!r} is not supported (sha256)")

    # The shard table: every unit once, under its own name, with its size and checksums.
    units = units_of(config)
    n = len(units)
    files: dict[Unit, str] = {}
    for fname, rec in table.items():
        unit = _parse_unit(rec.get("unit"), L)
        if unit is None:
            bad(f"shard {fname} has unit {rec.get('unit')!r}, not embed, head or a layer below {L}")
            continue
        if unit in files:
            bad(f"{unit_label(unit)} is listed twice ({files[unit]} and {fname})")
            continue
        want = shard_name(units.index(unit), n)
        if fname != want:
            bad(f"{unit_label(unit)} is listed as {fname!r}, its shard is named {want}")
            continue
        size = rec.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            bad(f"shard {fname}: bytes {size!r} is not a size")
        if not is_hex(rec.get(SHA256), SHA256):
            bad(f"shard {fname}: sha256 {rec.get(SHA256)!r} is not a SHA-256 digest")
        if FAST in rec and not is_hex(rec[FAST], FAST):
            bad(f"shard {fname}: {FAST} {rec[FAST]!r} is not an {FAST} digest")
        if BLOCKS in rec:
            why = blocks_problem(rec[BLOCKS], unit, config)
            if why:
                bad(f"shard {fname}: {why}")
        files[unit] = fname
    missing = [u for u in units if u not in files]
    if missing:
        bad(f"no shard is listed for {unit_label(missing[0])}")

    # Headers: parsed, shapes as config.json implies, dtype the store's, size the index's.
    shards: dict[Unit, ShardInfo] = {}
    for unit in units:
        if unit not in files:
            continue
        fname = files[unit]
        try:
            si = shard_info(root / fname, unit)
            _check_shapes(config, unit, si)
        except StoreError as e:
            problems.append(str(e))
            continue
        shards[unit] = si
        if dtype is not None:
            other = sorted({s.dtype for s in si.tensors.values()} - {DTYPES[dtype].st})
            if other:
                bad(f"store dtype is {dtype} ({DTYPES[dtype].st}) but {fname} holds {other[0]} tensors")
        size = table[fname].get("bytes")
        if isinstance(size, int) and size != si.file_bytes:
            bad(f"shard {fname} is {si.file_bytes} bytes on disk, the index says {size}")
    listed = set(table)
    stray = sorted(p.name for p in root.iterdir() if SHARD_FILE.fullmatch(p.name) and p.name not in listed)
    if stray:
        problems.append(
            f"{root / stray[0]}: a shard file the index does not list ({len(stray)} such file(s)); "
            f"remove it or re-create the store"
        )

    # total_size and weight_map, against the headers (HF loaders rely on both).
    if len(shards) == n:
        total = sum(span.nbytes for si in shards.values() for span in si.tensors.values())
        ts = index["metadata"].get("total_size")
        if not isinstance(ts, int) or isinstance(ts, bool) or ts != total:
            bad(f"metadata.total_size is {ts!r}, the shards hold {total} bytes of tensors")
        wm = index.get("weight_map")
        if not isinstance(wm, dict):
            bad("weight_map is missing or not an object")
        else:
            where = {name: files[u] for u, si in shards.items() for name in si.tensors}
            wrong = sorted(k for k in where if wm.get(k) != where[k])
            extra = sorted(k for k in wm if k not in where)
            if wrong:
                bad(
                    f"weight_map puts {wrong[0]} in {wm.get(wrong[0])!r}, it is in {where[wrong[0]]} "
                    f"({len(wrong)} tensor(s) wrong or missing)"
                )
            if extra:
                bad(f"weight_map lists {extra[0]}, which no shard holds ({len(extra)} such name(s))")
    if len(shards) < n or dtype is None:
        return None, problems
    return cls(root, config, index, shards, files), problems


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
