"""The on-disk weight store: a standard Hugging Face sharded safetensors checkpoint, one shard per
decoder layer, so `transformers` loads it unchanged and the pager reads one layer with one read.

Layout of a store directory (L decoder layers, n = L + 2 shards):
```
config.json                       HF LlamaConfig keys (written first)
model-00001-of-0000n.safetensors  unit "embed": model.embed_tokens.weight
model-0000k-of-0000n.safetensors  unit k-2 (decoder layer k-2): its nine tensors, HF names
model-0000n-of-0000n.safetensors  unit "head": model.norm.weight [+ lm_head.weight unless tied]
model.safetensors.index.json      HF index (weight_map, metadata.total_size) + metadata.odyssey:
                                  {format_version, dtype, checksum: "sha256",
                                   shards: {file: {unit, bytes, sha256}}}   (written last)
tokenizer.json ...                optional, copied by import / prepare-data --model
```
Shard bytes (safetensors): u64 little-endian N, N bytes of JSON header, then the tensors packed
with no gaps in header order. Odyssey pads the header with spaces so the data starts at a multiple
of 4096 bytes (the safetensors format allows trailing spaces): a layer's data is one page-aligned
contiguous range, read in one go (also with O_DIRECT). `data_offsets` are relative to 8 + N.

Writing is crash-safe: each shard goes to a temporary name and is renamed when complete; a journal
(`.odyssey-init.json`) records the checksum of every finished shard so that re-running `init` after
a crash keeps the complete shards and writes only the rest; the index is written last, so a
directory with an index is a complete store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np

from odyssey import atomic
from odyssey.config import ModelConfig, format_bytes
from odyssey.errors import OdysseyError

FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
JOURNAL_NAME = ".odyssey-init.json"
ALIGN = 4096  # bytes: shard data starts page-aligned (O_DIRECT, zero-copy views)
MAX_HEADER = 100 << 20  # bytes: a larger header is corruption

# safetensors dtype name -> (bytes per element, our short name)
ST_DTYPES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1}
SHORT_TO_ST = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
ST_TO_SHORT = {v: k for k, v in SHORT_TO_ST.items()}
HF_DTYPE_NAMES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")

Unit = Union[str, int]  # "embed", a layer index, or "head"


class StoreError(OdysseyError):
    pass


def torch_dtype(short: str):
    import torch

    return {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[short]


def numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def unit_label(unit: Unit) -> str:
    return f"layer {unit}" if isinstance(unit, int) else str(unit)


def shard_name(k: int, n: int) -> str:
    """k is 0-based; names are HF's 1-based model-0000k-of-0000n.safetensors."""
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def units_of(cfg: ModelConfig) -> list[Unit]:
    return ["embed", *range(cfg.num_hidden_layers), "head"]


def unit_shapes(cfg: ModelConfig, unit: Unit) -> dict[str, tuple[int, ...]]:
    if unit == "embed":
        return cfg.embed_shapes()
    if unit == "head":
        return cfg.head_shapes()
    return cfg.layer_shapes(unit)


# --------------------------------------------------------------------------------------------
# safetensors headers


@dataclass
class TensorSpan:
    name: str
    dtype: str  # safetensors name: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int  # bytes, relative to the shard's data start
    nbytes: int


@dataclass
class ShardInfo:
    unit: Unit
    path: Path
    data_offset: int  # bytes from the start of the file to the first tensor byte (8 + N)
    data_bytes: int  # bytes of tensor data (the file is data_offset + data_bytes long)
    tensors: dict[str, TensorSpan]

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.data_bytes


def build_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: Optional[dict] = None,
                 align: int = ALIGN) -> tuple[bytes, list[TensorSpan]]:
    """[(name, st_dtype, shape)] -> (the 8-byte length + JSON header padded so that the data starts
    at a multiple of `align`, the spans in order)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    spans, pos = [], 0
    for name, dt, shape in tensors:
        nbytes = numel(shape) * ST_DTYPES[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        spans.append(TensorSpan(name, dt, tuple(shape), pos, nbytes))
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    total = 8 + len(raw)
    padded = -(-total // align) * align
    raw += b" " * (padded - total)
    return struct.pack("<Q", len(raw)) + raw, spans


def read_header(path: Path) -> tuple[int, dict, dict]:
    """-> (data_offset, tensors {name: entry}, metadata). Raises StoreError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StoreError(f"{path}: truncated shard ({size} bytes); {_refix(path)}")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise StoreError(f"{path}: corrupt or truncated header (length {n}, file {size} bytes); {_refix(path)}")
            raw = f.read(n)
    except FileNotFoundError:
        raise StoreError(f"{path}: shard missing; {_refix(path)}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StoreError(f"{path}: corrupt header (not JSON); {_refix(path)}") from None
    if not isinstance(header, dict):
        raise StoreError(f"{path}: corrupt header; {_refix(path)}")
    metadata = header.pop("__metadata__", {}) or {}
    end = 0
    for name, e in header.items():
        try:
            dt, shape, (s, t) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{path}: corrupt header entry {name!r}; {_refix(path)}") from None
        if dt not in ST_DTYPES or t - s != numel(shape) * ST_DTYPES[dt] or s < 0:
            raise StoreError(f"{path}: corrupt header entry {name!r}; {_refix(path)}")
        end = max(end, t)
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "has trailing bytes"
        raise StoreError(f"{path}: shard {what} ({size} bytes on disk, header says {8 + n + end}); {_refix(path)}")
    return 8 + n, header, metadata


def _refix(path: Path) -> str:
    return (f"re-run `odyssey init` with the same arguments (it rewrites bad shards) or re-import, "
            f"then `odyssey verify {path.parent}`")


def shard_info(path: Path, unit: Unit) -> ShardInfo:
    data_offset, header, _ = read_header(path)
    spans = {}
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        s, t = e["data_offsets"]
        spans[name] = TensorSpan(name, e["dtype"], tuple(e["shape"]), s, t - s)
    data_bytes = max((s.start + s.nbytes for s in spans.values()), default=0)
    return ShardInfo(unit, path, data_offset, data_bytes, spans)


def file_sha256(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    drop_cache(path)
    return h.hexdigest()


def drop_cache(path: Path) -> None:
    """Drop the file's pages from the page cache (they were read once; keep RAM for work)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# reading a store


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
    def open(cls, root: str | os.PathLike) -> "Store":
        root = Path(root)
        if not root.is_dir():
            raise StoreError(f"model directory {root} not found; create one with `odyssey init` or `odyssey import`")
        cfg_path, index_path = root / "config.json", root / INDEX_NAME
        if not cfg_path.is_file():
            raise StoreError(f"{root} has no config.json: not a model store; create one with `odyssey init` or `odyssey import`")
        if not index_path.is_file():
            hint = ("an interrupted `odyssey init`: re-run it with the same arguments to finish"
                    if (root / JOURNAL_NAME).exists() else
                    "a Hugging Face checkpoint? convert it with `odyssey import`")
            raise StoreError(f"{root} has no {INDEX_NAME}: {hint}")
        try:
            hf = json.loads(cfg_path.read_text())
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{root}: config.json or the index is not valid JSON ({e.msg}); re-create the store") from None
        meta = (index.get("metadata") or {}).get("odyssey")
        if not isinstance(meta, dict):
            raise StoreError(f"{root} is a Hugging Face checkpoint, not an Odyssey store; convert it with "
                             f"`odyssey import {root} --out DIR`")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{root}: store format version {version!r} is not supported (this Odyssey reads "
                             f"version {FORMAT_VERSION}); upgrade Odyssey or re-import the model")
        config = ModelConfig.from_hf_dict(hf, source=str(cfg_path))
        by_unit = {}
        for fname, info in meta["shards"].items():
            unit = info["unit"]
            by_unit[unit if unit in ("embed", "head") else int(unit)] = root / fname
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

    def tokenizer_path(self) -> Optional[Path]:
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
                t = torch.frombuffer(raw, dtype=_st_torch(span.dtype)).reshape(span.shape)
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
        bar = tqdm(total=sum(v["bytes"] for v in files.values()), unit="B", unit_scale=True,
                   desc="verify", disable=not progress, leave=False)
        for fname, info in files.items():
            path = self.root / fname
            unit = info["unit"] if info["unit"] in ("embed", "head") else int(info["unit"])
            try:
                si = self.shards[unit]  # header parsed and shapes checked by Store.open
                if si.file_bytes != info["bytes"]:
                    raise StoreError(f"{path}: {si.file_bytes} bytes, the index says {info['bytes']}")
                digest = file_sha256(path)
                if digest != info["sha256"]:
                    raise StoreError(f"{path}: checksum mismatch ({unit_label(unit)}): the shard is corrupted; "
                                     f"{_refix(path)}")
            except StoreError as e:
                problems.append(str(e))
            bar.update(info["bytes"])
        bar.close()
        return problems


def _st_torch(dt: str):
    import torch

    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}[dt]


def _check_shapes(cfg: ModelConfig, unit: Unit, info: ShardInfo) -> None:
    want = unit_shapes(cfg, unit)
    have = {n: s.shape for n, s in info.tensors.items()}
    if set(want) != set(have):
        missing = sorted(set(want) - set(have)) or sorted(set(have) - set(want))
        raise StoreError(f"{info.path}: tensors do not match config.json ({unit_label(unit)}: "
                         f"{missing[0]}); {_refix(info.path)}")
    for name, shape in want.items():
        if tuple(shape) != tuple(have[name]):
            raise StoreError(f"{info.path}: {name} has shape {list(have[name])}, config.json implies "
                             f"{list(shape)}; {_refix(info.path)}")


# --------------------------------------------------------------------------------------------
# writing a store


class StoreWriter:
    """Writes a store shard by shard: `write_unit(unit, producer)` for each unit, then `finish()`.

    `producer(name, shape) -> np.ndarray | torch.Tensor` returns one tensor at a time in the
    store dtype (or any dtype, cast here), so peak memory is one tensor plus the write buffer.
    """

    def __init__(self, root: Path, config: ModelConfig, dtype: str, journal_key: dict, force: bool,
                 extra_bytes: int = 0):
        self.root, self.config, self.dtype = Path(root), config, dtype
        self.units = units_of(config)
        self.n = len(self.units)
        self.journal_key = journal_key
        self.journal: dict = {"key": journal_key, "done": {}}
        self._headers = {u: self._header(u) for u in self.units}  # (header bytes, spans) per unit
        self.file_bytes = {u: len(h) + sum(s.nbytes for s in spans) for u, (h, spans) in self._headers.items()}
        self._prepare(force, extra_bytes)

    def _header(self, unit: Unit) -> tuple[bytes, list[TensorSpan]]:
        st = SHORT_TO_ST[self.dtype]
        return build_header([(n, st, s) for n, s in unit_shapes(self.config, unit).items()],
                            metadata=self._meta(unit))

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
        existing = [p for p in root.iterdir()] if root.is_dir() else []
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
                raise OdysseyError(f"output directory {root} is not empty; choose an empty --out or pass "
                                   f"--force to overwrite it")
            for p in existing:  # --force: remove what a store consists of, keep anything else
                if p.name in ("config.json", INDEX_NAME, JOURNAL_NAME) or (
                        p.name.startswith(("model-", ".model-")) and ".safetensors" in p.name) or p.name.endswith(".tmp"):
                    p.unlink()
            self.journal = {"key": self.journal_key, "done": {}}
        # Free disk, checked before anything is written: what remains to write, plus a margin.
        remaining = sum(self.unit_file_bytes(u) for u in self.units
                        if shard_name(self.units.index(u), self.n) not in self.journal["done"]) + extra_bytes
        probe = root if root.is_dir() else _existing_parent(root)
        free = shutil.disk_usage(probe).free
        if free < remaining + (64 << 20):
            raise OdysseyError(f"not enough free disk at {probe}: the store needs {format_bytes(remaining)}, "
                               f"{format_bytes(free)} is free; free some space or choose another --out")
        root.mkdir(parents=True, exist_ok=True)
        atomic.write_json(root / "config.json", self.config.to_hf_dict(HF_DTYPE_NAMES[self.dtype]))
        atomic.write_json(journal_path, self.journal)

    def is_done(self, unit: Unit) -> bool:
        """A shard recorded in the journal whose file still has the recorded checksum."""
        fname = shard_name(self.units.index(unit), self.n)
        rec = self.journal["done"].get(fname)
        path = self.root / fname
        if not rec or not path.is_file() or path.stat().st_size != rec["bytes"]:
            return False
        if file_sha256(path) == rec["sha256"]:
            return True
        del self.journal["done"][fname]
        return False

    def write_unit(self, unit: Unit, producer: Callable) -> int:
        """Write one shard; returns its byte size."""
        import torch

        fname = shard_name(self.units.index(unit), self.n)
        header, spans = self._headers[unit]
        h = hashlib.sha256()
        with atomic.atomic_open(self.root / fname, "wb") as f:
            f.write(header)
            h.update(header)
            for span in spans:
                t = producer(span.name, span.shape)
                if isinstance(t, np.ndarray):
                    t = torch.from_numpy(t)
                t = t.to(torch_dtype(self.dtype)).contiguous()
                if tuple(t.shape) != span.shape:
                    raise OdysseyError(f"{span.name}: got shape {list(t.shape)}, expected {list(span.shape)}")
                raw = memoryview(t.view(torch.uint8).numpy()).cast("B")
                f.write(raw)
                h.update(raw)
                del t, raw
            size = f.tell()
        drop_cache(self.root / fname)  # written once, read later by the pager: keep RAM free
        self.journal["done"][fname] = {"unit": str(unit), "bytes": size, "sha256": h.hexdigest()}
        atomic.write_json(self.root / JOURNAL_NAME, self.journal)
        return size

    def finish(self) -> None:
        shards, weight_map, total = {}, {}, 0
        for k, unit in enumerate(self.units):
            fname = shard_name(k, self.n)
            rec = self.journal["done"][fname]
            shards[fname] = {"unit": str(unit), "bytes": rec["bytes"], "sha256": rec["sha256"]}
            for name, shape in unit_shapes(self.config, unit).items():
                weight_map[name] = fname
                total += numel(shape) * ST_DTYPES[SHORT_TO_ST[self.dtype]]
        index = {"metadata": {"total_size": total,
                              "odyssey": {"format_version": FORMAT_VERSION, "dtype": self.dtype,
                                          "checksum": "sha256", "shards": shards}},
                 "weight_map": weight_map}
        atomic.write_json(self.root / INDEX_NAME, index)
        (self.root / JOURNAL_NAME).unlink(missing_ok=True)


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


# --------------------------------------------------------------------------------------------
# init: a new model from a config, deterministic per tensor


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and the tensor name: any tensor can be regenerated alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def init_tensor(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int):
    """The usual scaled normal init: N(0, initializer_range), output projections (o_proj,
    down_proj) scaled by 1/sqrt(2L) as in GPT-2, norm weights one. Returns fp32 (or bf16) torch."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape)
    std = cfg.initializer_range
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * cfg.num_hidden_layers)
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.randn(shape, generator=g).mul_(std)


def init_store(cfg: ModelConfig, out: str | os.PathLike, dtype: str = "bf16", seed: int = 0,
               force: bool = False, progress: bool = True) -> dict:
    """Create a store from scratch, streaming one tensor at a time. Returns a summary."""
    from tqdm import tqdm

    if dtype not in SHORT_TO_ST:
        raise OdysseyError(f"--dtype must be one of {', '.join(SHORT_TO_ST)}, got {dtype!r}")
    key = {"config": cfg.to_hf_dict(HF_DTYPE_NAMES[dtype]), "dtype": dtype, "seed": seed, "kind": "init"}
    w = StoreWriter(Path(out), cfg, dtype, key, force)
    t0 = time.perf_counter()
    written = kept = 0
    bar = tqdm(total=w.total_file_bytes(), unit="B", unit_scale=True, desc="init", disable=not progress)
    for unit in w.units:
        bar.set_postfix_str(unit_label(unit))
        if w.is_done(unit):
            kept += 1
            bar.update(w.unit_file_bytes(unit))
            continue
        written += w.write_unit(unit, lambda name, shape: init_tensor(cfg, name, shape, seed))
        bar.update(w.unit_file_bytes(unit))
    bar.close()
    w.finish()
    seconds = time.perf_counter() - t0
    return {"parameters": cfg.num_parameters(), "bytes": w.total_file_bytes(), "written_bytes": written,
            "kept_shards": kept, "seconds": seconds, "mb_s": written / 1e6 / max(seconds, 1e-9),
            "out": str(out), "dtype": dtype}


# --------------------------------------------------------------------------------------------
# import: an existing HF Llama checkpoint, layer by layer

SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM"}


def import_hf(src: str | os.PathLike, out: str | os.PathLike, dtype: Optional[str] = None,
              force: bool = False, progress: bool = True) -> dict:
    """Convert an HF Llama-family checkpoint (single or sharded safetensors) into a store, one
    layer at a time through memory maps (never the whole model in RAM)."""
    from safetensors import safe_open
    from tqdm import tqdm

    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise OdysseyError(f"{src} has no config.json; point `odyssey import` at a Hugging Face model directory")
    hf = json.loads(cfg_path.read_text())
    archs = hf.get("architectures") or []
    if not (set(archs) & SUPPORTED_ARCHS) and hf.get("model_type") not in ("llama", "mistral"):
        raise OdysseyError(f"{src}: architecture {archs or hf.get('model_type')} is not supported; "
                           f"Odyssey imports Llama-family checkpoints (LlamaForCausalLM)")
    if hf.get("sliding_window") not in (None, 0) and hf.get("model_type") == "mistral":
        raise OdysseyError(f"{src}: sliding-window attention is not supported; use a Llama checkpoint")
    cfg = ModelConfig.from_hf_dict(hf, source=str(cfg_path))

    # Where each tensor lives in the source.
    index_path = src / INDEX_NAME
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = {name: src / f for name, f in weight_map.items()}
    elif (src / "model.safetensors").is_file():
        with safe_open(src / "model.safetensors", "pt") as f:
            files = {name: src / "model.safetensors" for name in f.keys()}
    else:
        raise OdysseyError(f"{src} has no model.safetensors or {INDEX_NAME}; save the model with "
                           f"safe_serialization (safetensors) first")
    if cfg.tie_word_embeddings:
        files.pop("lm_head.weight", None)
    expected = cfg.all_shapes()
    missing = sorted(set(expected) - set(files))
    if missing:
        raise OdysseyError(f"{src}: checkpoint lacks {missing[0]} (and {len(missing) - 1} more); is it a complete Llama model?")
    # Keep the source dtype unless asked otherwise (f64 sources become f32).
    dtype = dtype or ST_TO_SHORT.get(_slice_dtype(files["model.embed_tokens.weight"],
                                                  "model.embed_tokens.weight"), "f32")
    if dtype not in SHORT_TO_ST:
        raise OdysseyError(f"--dtype must be one of {', '.join(SHORT_TO_ST)}, got {dtype!r}")

    key = {"config": cfg.to_hf_dict(HF_DTYPE_NAMES[dtype]), "dtype": dtype, "kind": "import",
           "source": str(src.absolute())}
    w = StoreWriter(Path(out), cfg, dtype, key, force)
    handles: dict[Path, object] = {}

    def producer(name, shape):
        path = files[name]
        if path not in handles:
            handles[path] = safe_open(path, "pt")
        t = handles[path].get_tensor(name)  # zero-copy view of a private mmap
        if tuple(t.shape) != tuple(shape):
            raise OdysseyError(f"{src}: {name} has shape {list(t.shape)}, its config.json implies {list(shape)}")
        return t

    t0 = time.perf_counter()
    bar = tqdm(total=w.total_file_bytes(), unit="B", unit_scale=True, desc="import", disable=not progress)
    written = 0
    for unit in w.units:
        if not w.is_done(unit):
            written += w.write_unit(unit, producer)
        bar.update(w.unit_file_bytes(unit))
        handles.clear()  # unmap source files we are done with
    bar.close()
    w.finish()
    copied = copy_tokenizer(src, Path(out))
    seconds = time.perf_counter() - t0
    return {"parameters": cfg.num_parameters(), "bytes": w.total_file_bytes(), "written_bytes": written,
            "seconds": seconds, "mb_s": written / 1e6 / max(seconds, 1e-9), "out": str(out),
            "dtype": dtype, "tokenizer_files": copied}


def _slice_dtype(path: Path, name: str) -> str:
    _, header, _ = read_header(path)
    return header[name]["dtype"]


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files (TOKENIZER_FILES) present in `directory`."""
    return [Path(directory) / n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()]


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> list[str]:
    copied = []
    for path in tokenizer_files(src_dir):
        atomic.write_bytes(Path(dst_dir) / path.name, path.read_bytes())
        copied.append(path.name)
    return copied


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
        f"rope_theta   {cfg.rope_theta:g}   rms_norm_eps {cfg.rms_norm_eps:g}   max positions {cfg.max_position_embeddings}",
        f"parameters   {cfg.num_parameters():,} ({cfg.num_parameters() / 1e9:.3f} B)",
        f"dtype        {store.dtype}",
        f"bytes        {format_bytes(store.total_bytes())} on disk in {len(store.shards)} shards",
        f"per layer    {format_bytes(layer_bytes)} (embed {format_bytes(store.unit_bytes('embed'))}, "
        f"head {format_bytes(store.unit_bytes('head'))})",
        f"tokenizer    {'yes' if store.tokenizer_path() else 'none (add one with `odyssey prepare-data --model`)'}",
    ]
    return "\n".join(lines)
