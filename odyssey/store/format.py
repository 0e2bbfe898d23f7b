"""The store's file format: names, units, row blocks, and the safetensors header codec.

A shard is a safetensors file: u64 little-endian N, N bytes of JSON header, then the tensors packed
with no gaps in header order. `build_header` pads the header with spaces so the data starts at a
multiple of `align` (PAGE_SIZE for store shards); `read_header` checks a shard against its header
(length, entries, sizes) and raises `StoreError` naming the file and how to repair it.

Row blocks: the embedding (`model.embed_tokens.weight`, shard "embed") and an untied head
(`lm_head.weight`, shard "head") are (V, d) matrices whose rows are contiguous, so rows r0..r1 are
one byte range of the shard. The pager reads such a shard in `Block`s of `rows` rows, so that no
read is larger than the largest decoder layer's shard (`block_rows_rule`) and the buffer pool is
sized by decoder layers, not by a 128k-262k vocabulary. The blocks partition the file: block 0
starts at byte 0 (header, and the final norm in the head shard), the last ends at the file's end,
so a checksum per block (recorded in the index, see reader/writer) covers every byte once. A shard
whose matrix fits one block is paged whole, as before.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from odyssey.dtypes import PAGE_SIZE, ST_CODES, numel
from odyssey.errors import OdysseyError
from odyssey.modelconfig import ModelConfig

FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
JOURNAL_NAME = ".odyssey-init.json"
MAX_HEADER = 100 << 20  # bytes: a larger header is corruption

Unit = str | int  # "embed", a layer index, or "head": one shard
BLOCKED_TENSORS = {"embed": "model.embed_tokens.weight", "head": "lm_head.weight"}  # paged in row blocks


class StoreError(OdysseyError):
    pass


@dataclass(frozen=True)
class Block:
    """Rows [row_start, row_end) of a shard's row-blocked matrix (BLOCKED_TENSORS): block `index`
    (0-based) of `count`. A pager unit, like a layer index; shown as `head[3/5]` (1-based)."""

    unit: str  # the shard: "embed" | "head"
    index: int
    count: int
    row_start: int
    row_end: int

    def __str__(self) -> str:
        return f"{self.unit}[{self.index + 1}/{self.count}]"


PageUnit = Unit | Block  # what the pager reads: a whole shard, or a row block of one


def unit_label(unit: PageUnit) -> str:
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


def blocked_tensor(info: ShardInfo) -> TensorSpan | None:
    """The shard's matrix paged in row blocks (the embedding, an untied head), or None."""
    name = BLOCKED_TENSORS.get(info.unit) if isinstance(info.unit, str) else None
    return info.tensors.get(name) if name else None


def block_rows_rule(largest_layer_bytes: int, prefix_bytes: int, row_bytes: int) -> int:
    """Rows per block: as many as fit, with the bytes before the first row (header; the final norm
    in the head shard), in the largest decoder layer's shard; at least one. So no block is larger
    than a layer (the last block also holds any tensor after the matrix: none in a store)."""
    return max(1, (largest_layer_bytes - prefix_bytes) // max(1, row_bytes))


def _rows_range(info: ShardInfo, r0: int, r1: int) -> tuple[int, int]:
    """File bytes [start, end) of the block of rows r0..r1 of the shard's blocked matrix: the first
    block starts at byte 0, the last ends at the file's end (the blocks partition the file)."""
    span = blocked_tensor(info)
    V = span.shape[0]
    row_bytes = span.nbytes // V
    base = info.data_offset + span.start
    return (0 if r0 == 0 else base + r0 * row_bytes), (info.file_bytes if r1 == V else base + r1 * row_bytes)


def block_bounds(info: ShardInfo, rows: int) -> list[tuple[int, int, int, int]]:
    """[(row_start, row_end, file start, file end)] of the blocks of `rows` rows of the shard's
    blocked matrix, in order; their byte ranges partition the file."""
    V = blocked_tensor(info).shape[0]
    return [(r0, min(V, r0 + rows), *_rows_range(info, r0, min(V, r0 + rows))) for r0 in range(0, V, rows)]


def blocks_of(info: ShardInfo, rows: int) -> list[Block]:
    """The Blocks of `rows` rows of the shard's blocked matrix."""
    bounds = block_bounds(info, rows)
    return [Block(info.unit, k, len(bounds), r0, r1) for k, (r0, r1, _, _) in enumerate(bounds)]


@dataclass
class Page:
    """The bytes the pager reads for a unit: file range [start, end) of `path`, and the tensors
    lying in it: name -> (byte offset from `start`, safetensors dtype, shape). A row block's matrix
    is the block's rows (shape (row_end - row_start, d))."""

    unit: PageUnit
    path: Path
    start: int
    end: int
    tensors: dict[str, tuple[int, str, tuple[int, ...]]]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def page_of(info: ShardInfo, unit: PageUnit) -> Page:
    """The Page of a whole shard (`unit` is its Unit) or of a Block of it."""
    if not isinstance(unit, Block):
        tensors = {n: (info.data_offset + s.start, s.dtype, s.shape) for n, s in info.tensors.items()}
        return Page(unit, info.path, 0, info.file_bytes, tensors)
    span = blocked_tensor(info)
    r0, r1 = unit.row_start, unit.row_end
    start, end = _rows_range(info, r0, r1)
    row_bytes = span.nbytes // span.shape[0]
    tensors = {}
    for name, s in info.tensors.items():
        at = info.data_offset + s.start  # file offset of the tensor
        if name == span.name:
            tensors[name] = (at + r0 * row_bytes - start, s.dtype, (r1 - r0, *s.shape[1:]))
        elif start <= at and at + s.nbytes <= end:  # a whole tensor inside the block (the final norm)
            tensors[name] = (at - start, s.dtype, s.shape)
    return Page(unit, info.path, start, end, tensors)


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None, align: int = PAGE_SIZE
) -> tuple[bytes, list[TensorSpan]]:
    """[(name, st_dtype, shape)] -> (the 8-byte length + JSON header padded so that the data starts
    at a multiple of `align`, the spans in order)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    spans, pos = [], 0
    for name, dt, shape in tensors:
        nbytes = numel(shape) * ST_CODES[dt].itemsize
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
                raise StoreError(f"{path}: truncated shard ({size} bytes); {repair_hint(path)}")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise StoreError(
                    f"{path}: corrupt or truncated header (length {n}, file {size} bytes); {repair_hint(path)}"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise StoreError(f"{path}: shard missing; {repair_hint(path)}") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot read the shard ({e.strerror or e}); check it is a readable file") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise StoreError(f"{path}: corrupt header (not JSON); {repair_hint(path)}") from None
    if not isinstance(header, dict):
        raise StoreError(f"{path}: corrupt header; {repair_hint(path)}")
    metadata = header.pop("__metadata__", {}) or {}
    end = 0
    for name, e in header.items():
        try:
            dt, shape, (s, t) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{path}: corrupt header entry {name!r}; {repair_hint(path)}") from None
        if (
            not isinstance(dt, str)
            or dt not in ST_CODES
            or not all(_is_count(v) for v in (*shape, s, t))
            or t - s != numel(shape) * ST_CODES[dt].itemsize
        ):
            raise StoreError(f"{path}: corrupt header entry {name!r}; {repair_hint(path)}")
        end = max(end, t)
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "has trailing bytes"
        raise StoreError(f"{path}: shard {what} ({size} bytes on disk, header says {8 + n + end}); {repair_hint(path)}")
    return 8 + n, header, metadata


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def repair_hint(path: Path) -> str:
    """How to repair the store that holds the bad shard `path` (the end of every shard error)."""
    return (
        f"re-run `odyssey init` with the same arguments (it rewrites bad shards) or re-import, "
        f"then `odyssey verify {path.parent}`"
    )


def shard_info(path: Path, unit: Unit) -> ShardInfo:
    data_offset, header, _ = read_header(path)
    spans = {}
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        s, t = e["data_offsets"]
        spans[name] = TensorSpan(name, e["dtype"], tuple(e["shape"]), s, t - s)
    pos = 0
    for span in spans.values():  # a store shard packs its tensors with no gaps in header order
        if span.start != pos:
            raise StoreError(
                f"{path}: corrupt header ({span.name} {'overlaps' if span.start < pos else 'leaves a gap'}); "
                f"{repair_hint(path)}"
            )
        pos += span.nbytes
    return ShardInfo(unit, path, data_offset, pos, spans)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, streamed (see checksum.file_digests)."""
    from odyssey.store.checksum import SHA256, file_digests

    return file_digests(path, (SHA256,))[SHA256]


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
