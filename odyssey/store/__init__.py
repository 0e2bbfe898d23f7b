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
                                   shards: {file: {unit, bytes, sha256, xxh3_128,
                                                   [blocks: {rows, xxh3_128: [per block]}]}},
                                   index_xxh3_128}   (written last)
tokenizer.json ...                optional, copied by import / prepare-data --model
```
Shard bytes (safetensors): u64 little-endian N, N bytes of JSON header, then the tensors packed
with no gaps in header order. Odyssey pads the header with spaces so the data starts at a multiple
of 4096 bytes (PAGE_SIZE; the safetensors format allows trailing spaces): a layer's data is one
page-aligned contiguous range, read in one go (also with O_DIRECT). `data_offsets` are relative to
8 + N.

The embedding and an untied head keep their HF names and one tensor each, but the pager reads them
in row blocks (rows are contiguous: a block of rows is a byte range), no block larger than the
largest decoder layer, so the buffer pool is sized by layers whatever the vocabulary (`format`).

Writing is crash-safe: each shard goes to a temporary name and is renamed when complete; a journal
(`.odyssey-init.json`) records the checksum of every finished shard so that re-running `init` after
a crash keeps the complete shards and writes only the rest; the index is written last, so a
directory with an index is a complete store.

Corruption is caught where the bytes are used: every command that reads a shard (the pager, a row
block at a time against the block's own digest; the engine's embedding rows, the blocks holding
them; `load_tensors` for merge, export and full training) hashes the bytes it read with XXH3-128
and compares them with the index before trusting them (`checksum` explains the choice);
`Store.open` checks the index fields against the headers and the index's own seal.

Modules: `format` (names, units, the safetensors header codec), `checksum` (SHA-256, XXH3-128, the
index seal), `reader` (`Store`), `inspect` (the checks when a store is opened), `summary`
(`verify_store`, `describe`), `writer` (`StoreWriter` and its journal), `init` (random init), `importer` (HF import).
"""

from odyssey.store.format import (
    BLOCKED_TENSORS,
    FORMAT_VERSION,
    INDEX_NAME,
    JOURNAL_NAME,
    Block,
    Page,
    PageUnit,
    ShardInfo,
    StoreError,
    TensorSpan,
    Unit,
    build_header,
    drop_cache,
    file_sha256,
    read_header,
    shard_info,
    shard_name,
    unit_label,
    unit_shapes,
    units_of,
)
from odyssey.store.importer import import_hf
from odyssey.store.init import init_store, init_tensor, tensor_seed
from odyssey.store.reader import ChecksumMismatch, Store
from odyssey.store.summary import describe, verify_store
from odyssey.store.writer import StoreWriter


def tokenizer_dir(source):
    """The directory holding a model's tokenizer files: a store's own directory; for a GGUF file,
    the cache directory its tokenizer is written to from the metadata (the file's path when none)."""
    from pathlib import Path

    p = source.tokenizer_path()
    return p.parent if p is not None else Path(source.root)


def open_model(path):
    """What `--model PATH` names: a GGUF file (by its magic, or any file named .gguf) as an
    `odyssey.gguf.store.GGUFStore`, else a store directory (`Store.open`). Every command that opens
    a model calls this."""
    from odyssey.gguf.store import GGUFStore, names_gguf

    if names_gguf(path):
        return GGUFStore.open(path)  # a .gguf that is not one (text, empty, cut) is refused as a GGUF
    return Store.open(path)


__all__ = [
    "BLOCKED_TENSORS",
    "Block",
    "ChecksumMismatch",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "JOURNAL_NAME",
    "Page",
    "PageUnit",
    "ShardInfo",
    "Store",
    "StoreError",
    "StoreWriter",
    "TensorSpan",
    "Unit",
    "build_header",
    "describe",
    "drop_cache",
    "file_sha256",
    "import_hf",
    "init_store",
    "init_tensor",
    "open_model",
    "tokenizer_dir",
    "read_header",
    "shard_info",
    "shard_name",
    "tensor_seed",
    "unit_label",
    "unit_shapes",
    "units_of",
    "verify_store",
]
