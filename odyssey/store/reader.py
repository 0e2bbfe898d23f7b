"""Reading a store: `Store.open` parses the config, the index and every shard's header and checks
the index fields against the headers, so a missing, truncated or corrupt shard or a damaged index is
reported before any work starts; the bytes themselves are checked against the index's checksums
where they are used (`load_tensors`, `check_buffer`, `check_file`: once per shard per opened store);
`verify` checks every checksum.

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
from odyssey.store.checksum import FAST, SEAL, SHA256, buffer_digest, file_digests, index_seal, is_hex, new_hasher
from odyssey.store.format import (
    FORMAT_VERSION,
    INDEX_NAME,
    JOURNAL_NAME,
    ShardInfo,
    StoreError,
    Unit,
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
        self._verified: set = set()  # units whose bytes were checked in this process

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

    def _check_digest(self, unit: Unit, algo: str, digest: str) -> None:
        if digest != self.expected_digest(unit)[1]:
            raise ChecksumMismatch(
                f"store {self.root}: shard {self.files[unit]} ({unit_label(unit)}) does not match its checksum "
                f"(damaged or changed on disk); run `odyssey verify {self.root}` and re-create or re-import the store"
            )
        self._verified.add(unit)

    def check_buffer(self, unit: Unit, data) -> None:
        """Check a unit's whole shard file, read into `data` (bytes-like), against the index; once
        per unit. Raises ChecksumMismatch naming the shard."""
        if unit in self._verified:
            return
        algo, _ = self.expected_digest(unit)
        self._check_digest(unit, algo, buffer_digest(algo, data))

    def check_file(self, unit: Unit) -> None:
        """Check a unit's shard on disk (one streaming read) against the index; once per unit. For
        bytes used through a memory map (the engine's embedding rows)."""
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
        """Every shard's checksums (SHA-256, and the fast hash where recorded), one read per shard.
        -> (one problem line per bad file, {file: fast digest} of the shards read)."""
        from tqdm import tqdm

        problems, fast = [], {}
        bar = tqdm(
            total=self.total_bytes(), unit="B", unit_scale=True, desc="verify", disable=not progress, leave=False
        )
        for unit in self.units:
            fname, si = self.files[unit], self.shards[unit]
            rec = self.meta["shards"][fname]
            path = self.root / fname
            try:
                digests = file_digests(path, (SHA256, FAST))
            except OSError as e:
                problems.append(f"{path}: cannot read ({e.strerror or e}); {repair_hint(path)}")
                continue
            fast[fname] = digests[FAST]
            # .get: a record without a sha256 (inspect reports it too) is a mismatch, not a KeyError
            if digests[SHA256] != rec.get(SHA256) or (FAST in rec and digests[FAST] != rec[FAST]):
                problems.append(
                    f"{path}: checksum mismatch ({unit_label(unit)}): the shard is corrupted or changed; "
                    f"{repair_hint(path)}"
                )
            else:
                self._verified.add(unit)
            bar.update(si.file_bytes)
        bar.close()
        return problems, fast


def verify_store(root: str | os.PathLike, progress: bool = True) -> tuple[Store | None, list[str], str | None]:
    """`odyssey verify`: (the store or None, every problem one line, a note). Checks the config, the
    index fields against the shards' headers, each shard's size, header, shapes and checksums. A
    store without fast checksums or seal (written before them) gets them, when everything verifies,
    by an atomic rewrite of the index that only adds those fields."""
    store, problems = Store.inspect(root)
    if store is None:
        return None, problems, None
    shard_problems, fast = store.verify_shards(progress=progress)
    problems += shard_problems
    note = None
    recs = store.meta["shards"]
    if not problems and (not store.sealed or any(FAST not in r for r in recs.values())):
        index = json.loads(json.dumps(store.index))  # a copy: the opened store keeps its own
        for fname, rec in index["metadata"]["odyssey"]["shards"].items():
            rec.setdefault(FAST, fast[fname])
        index["metadata"]["odyssey"][SEAL] = index_seal(index)
        try:
            atomic.write_json(store.root / INDEX_NAME, index)
            note = f"added fast checksums ({FAST}) and the index seal to {INDEX_NAME}"
        except OSError as e:
            note = (
                f"could not add fast checksums to {INDEX_NAME} ({e.strerror or e}); "
                f"commands check this store with SHA-256 (slower)"
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
        f"tokenizer    {'yes' if store.tokenizer_path() else 'none (add one with `odyssey prepare-data --model`)'}",
    ]
    return "\n".join(lines)
