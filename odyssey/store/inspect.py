"""Opening a store: its config, index and shard headers read and checked against each other, every
problem one line (`Store.inspect`, `Store.open`); the row-block records of the index checked."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from odyssey.dtypes import DTYPES, STORE_DTYPES
from odyssey.errors import OdysseyError
from odyssey.modelconfig import ModelConfig
from odyssey.store.checksum import (
    BLOCKS,
    FAST,
    SEAL,
    SHA256,
    index_seal,
    is_hex,
)
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


if TYPE_CHECKING:  # for annotations only: reader imports this module
    from odyssey.store.reader import Store


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


def inspect_store(cls, root: Path) -> tuple[Store | None, list[str]]:
    """(cls(...) for the store at `root`, or None where it cannot be read; every problem, one line
    each). `cls` is `Store` (passed in: this module is imported by its own)."""
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
