"""Checksums of a store: SHA-256 per shard (the store's identity), a fast hash per shard (checked
where the bytes are used), and a seal over the index itself.

- `sha256`: written since format 1; `odyssey verify` checks it, adapters record a fingerprint of
  these digests. About 1.8 GB/s here: too slow to repeat on every use of a 2.4 GB model.
- `xxh3_128` (the `xxhash` package, XXH3 128-bit): about 23 GB/s on one core of this machine
  against 4.2 GB/s for `zlib.crc32` and 1.8 GB/s for SHA-256 (a 90 MiB buffer, best of 3); both
  release the GIL. 128 bits make a random damage that keeps the digest practically impossible
  (CRC32 lets one in 4 billion through). Commands hash the bytes they have just read (the pager's
  slot, `load_tensors`' copies, the embedding file once) and compare with the index before the
  bytes are trusted.
- row blocks (`blocks`: {"rows": R, "xxh3_128": [one digest per block]}) of a shard paged in row
  blocks (the embedding, an untied head; see format.py): XXH3-128 of each block's byte range (the
  ranges partition the file), so the pager checks a block it has just read without reading the
  rest of the shard. Recorded only where a shard has more than one block, trusted only in a sealed
  index; a store written before them is checked a whole shard at a time until `odyssey verify` adds
  them.
- the seal (`index_xxh3_128`): XXH3-128 of the index's canonical JSON without the seal, so damage
  to the index itself (a changed SHA-256, size or unit) is caught when a store is opened. A fast
  hash is trusted only in a sealed index; an unsealed one (written before the fast hash existed)
  is checked with SHA-256 until `odyssey verify` adds the fast hashes and the seal.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import xxhash

SHA256 = "sha256"
FAST = "xxh3_128"  # key of the fast digest in metadata.odyssey.shards[file]
SEAL = "index_xxh3_128"  # key of the index seal in metadata.odyssey
BLOCKS = "blocks"  # key of the row-block digests in metadata.odyssey.shards[file]
HEX_LEN = {SHA256: 64, FAST: 32}
CHUNK = 4 << 20  # bytes per read when a file is hashed from disk


def new_hasher(algo: str):
    """A hashlib-style object (update, hexdigest) for `algo` ("sha256" or "xxh3_128")."""
    if algo == SHA256:
        return hashlib.sha256()
    if algo == FAST:
        return xxhash.xxh3_128()
    raise ValueError(f"unknown checksum {algo!r}")


def buffer_digest(algo: str, data) -> str:
    """Digest of a bytes-like object (a memoryview of a pager slot: no copy)."""
    if algo == FAST:
        return xxhash.xxh3_128_hexdigest(data)
    h = new_hasher(algo)
    h.update(data)
    return h.hexdigest()


class BlockHasher:
    """XXH3-128 of consecutive byte ranges of one stream: `ends` are the ranges' end offsets
    (increasing; the first range starts at 0). `update` splits what it is given at the ends. A
    stream shorter or longer than the ranges gives a list that matches no recorded one (the
    unfinished range's digest, or one more digest for the bytes past the end)."""

    def __init__(self, ends: list[int]):
        self.ends = list(ends)
        self.pos = 0
        self._h = xxhash.xxh3_128()
        self.digests: list[str] = []

    def update(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            k = len(self.digests)
            n = min(len(data), self.ends[k] - self.pos) if k < len(self.ends) else len(data)
            self._h.update(data[:n])
            self.pos += n
            data = data[n:]
            if k < len(self.ends) and self.pos == self.ends[k]:
                self.digests.append(self._h.hexdigest())
                self._h = xxhash.xxh3_128()

    def hexdigests(self) -> list[str]:
        done = len(self.digests) == len(self.ends) and self.pos == (self.ends[-1] if self.ends else 0)
        return list(self.digests) if done else [*self.digests, self._h.hexdigest()]


def file_digests(
    path: str | os.PathLike,
    algos=(SHA256, FAST),
    chunk: int = CHUNK,
    drop: bool = True,
    block_ends: list[int] | None = None,
    start: int = 0,
    stop: int | None = None,
) -> dict:
    """{algo: hex digest} of a file (or of its bytes [start, stop)), all algorithms in one streaming
    read (`chunk` bytes resident); with `block_ends`, also {"blocks": [XXH3-128 of each range]} of
    the same read. `drop`: drop the file's pages from the page cache afterwards (read once)."""
    from odyssey.store.format import drop_cache

    hashers = {a: new_hasher(a) for a in algos}
    blocks = BlockHasher(block_ends) if block_ends is not None else None
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = None if stop is None else stop - start
        while left is None or left > 0:
            n = f.readinto(view if left is None or left >= chunk else view[:left])
            if not n:
                break
            if left is not None:
                left -= n
            for h in hashers.values():
                h.update(view[:n])
            if blocks is not None:
                blocks.update(view[:n])
    view.release()
    if drop:
        drop_cache(Path(path))
    out = {a: h.hexdigest() for a, h in hashers.items()}
    if blocks is not None:
        out[BLOCKS] = blocks.hexdigests()
    return out


def index_seal(index: dict) -> str:
    """XXH3-128 of the index without its seal, as canonical JSON (sorted keys, no spaces): the
    seal does not depend on how the file was indented."""
    meta = index["metadata"]["odyssey"]
    unsealed = {**index, "metadata": {**index["metadata"], "odyssey": {k: v for k, v in meta.items() if k != SEAL}}}
    text = json.dumps(unsealed, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return xxhash.xxh3_128_hexdigest(text.encode("ascii"))


def is_hex(value, algo: str) -> bool:
    return isinstance(value, str) and len(value) == HEX_LEN[algo] and all(c in "0123456789abcdef" for c in value)
