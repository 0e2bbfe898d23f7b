"""Token files: the binary format of a prepared data directory, its writer and its reader.

`train.bin` and `val.bin` hold raw token ids, little-endian uint16 (vocab <= 65535) or uint32, no
header; every document is stored as its tokenizer encodes it (a BOS first where the tokenizer adds
one), then that tokenizer's EOS, and documents follow each other. `manifest.json` (format FORMAT,
version FORMAT_VERSION) names the dtype, vocabulary, special ids (bos_id null for a tokenizer
without one, as Qwen's), the layout and the tokens and documents per split. `TokenWriter` appends
documents to open token files; `TokenData` reads a finished directory back through read-only `np.memmap`s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from odyssey.errors import OdysseyError
from odyssey.tokenizer import load_tokenizer

if TYPE_CHECKING:  # imported lazily: TokenData needs no tokenizers
    from tokenizers import Tokenizer

FORMAT = "odyssey-tokens"
FORMAT_VERSION = 2  # 2: bos_id may be null, documents end with the tokenizer's own EOS
SPLITS = ("train", "val")
_COUNT_CHUNK = 1 << 24  # tokens per np.bincount call in unigram_loss (16M -> 128 MB of int64)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype of the token files for `vocab_size` ids: uint16 up to 65535, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


class TokenWriter:
    """Appends documents, each as its tokenizer's ids followed by `eos`, to the open train and val
    token files (no second `eos` where the tokenizer already ended the document with one).

    Document k (counted over all `append` calls) goes to val if `is_val[k]`, else to train; the
    caller appends at most len(is_val) documents. `counts` holds the tokens and documents written
    per split. Only one call's ids are held in RAM, never the whole corpus.
    """

    def __init__(self, sinks: dict[str, BinaryIO], is_val: np.ndarray, dtype: np.dtype, eos: int):
        self.sinks, self.is_val, self.dtype = sinks, is_val, dtype
        self.eos = eos
        self.documents = 0  # documents appended so far (the index of the next one)
        self.counts = {s: {"tokens": 0, "documents": 0} for s in SPLITS}

    def append(self, docs: Iterable[list[int]]) -> None:
        """Append a batch of documents, each given by the ids its tokenizer gives it (a BOS included
        where the tokenizer adds one)."""
        flat: dict[str, list[int]] = {"train": [], "val": []}  # ids of this batch only
        for ids in docs:
            split = "val" if self.is_val[self.documents] else "train"
            flat[split].extend(ids)
            if not ids or ids[-1] != self.eos:
                flat[split].append(self.eos)
            self.counts[split]["documents"] += 1
            self.documents += 1
        for split, ids in flat.items():
            if ids:
                np.asarray(ids, dtype=self.dtype).tofile(self.sinks[split])
                self.counts[split]["tokens"] += len(ids)


class TokenData:
    """A prepared data directory: its manifest, and the token files as read-only memory maps."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        mpath = self.directory / "manifest.json"
        redo = f"run `odyssey prepare-data CORPUS --out {self.directory}`"
        if not mpath.is_file():
            raise OdysseyError(f"data directory {self.directory} has no manifest.json; {redo}")
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OdysseyError(f"{mpath} is not valid JSON ({e}); {redo} again") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise OdysseyError(f"{mpath} is not an Odyssey token manifest; {redo}")
        if m.get("format_version", 0) > FORMAT_VERSION:
            raise OdysseyError(
                f"{mpath} has format version {m.get('format_version')}, newer than this "
                f"Odyssey reads ({FORMAT_VERSION}); upgrade Odyssey or {redo}"
            )
        try:
            self.dtype = np.dtype(m["dtype"])
            if self.dtype not in (np.uint16, np.uint32):
                raise ValueError(m["dtype"])
            self.vocab_size = int(m["vocab_size"])
            self.bos_id = None if m.get("bos_id") is None else int(m["bos_id"])
            self.eos_id = int(m["eos_id"])
            self.unk_id = m.get("unk_id")
            splits = {s: m["splits"][s] for s in SPLITS}
        except (KeyError, TypeError, ValueError) as e:
            raise OdysseyError(f"{mpath} is damaged (bad or missing {e}); {redo} again") from None
        self.manifest = m
        self._files: dict[str, Path] = {}
        self._lengths: dict[str, int] = {}
        for split, info in splits.items():
            path = self.directory / info["file"]
            if not path.is_file():
                raise OdysseyError(f"{path} is missing; {redo} again")
            n = int(info["tokens"])
            size = path.stat().st_size
            if size != n * self.dtype.itemsize or n == 0:
                raise OdysseyError(
                    f"{path} holds {size} bytes but manifest.json says {n} {self.dtype.name} "
                    f"tokens; the directory is damaged or from another run; {redo} again"
                )
            self._files[split], self._lengths[split] = path, n
        self._maps: dict[str, np.memmap] = {}

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"

    def num_tokens(self, split: str) -> int:
        self._check_split(split)
        return self._lengths[split]

    def tokens(self, split: str) -> np.memmap:
        """(N,) uint16/uint32 read-only memory map of `split`'s token ids (pages load on touch)."""
        self._check_split(split)
        if split not in self._maps:
            self._maps[split] = np.memmap(self._files[split], dtype=self.dtype, mode="r")
        return self._maps[split]

    def load_tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def __repr__(self):
        return (
            f"TokenData({str(self.directory)!r}, vocab={self.vocab_size}, "
            f"train={self._lengths['train']}, val={self._lengths['val']})"
        )


def unigram_loss(data: TokenData) -> float:
    """Cross-entropy (nats/token) on val targets of a unigram model fitted on train (add-one smoothing).

    The floor a trained model must beat; log(vocab_size) is the loss of a uniform guess.
    """
    V = data.vocab_size
    counts = np.zeros(V, dtype=np.int64)
    train = data.tokens("train")
    for i in range(0, len(train), _COUNT_CHUNK):
        c = np.bincount(train[i : i + _COUNT_CHUNK], minlength=V)
        if len(c) > V:
            raise OdysseyError(
                f"{data.directory}/train.bin holds id {len(c) - 1} >= vocab_size {V}; "
                f"the directory is damaged; run prepare-data again"
            )
        counts += c
    logp = np.log(counts + 1.0) - np.log(counts.sum() + V)  # (V,) log-probabilities
    val = data.tokens("val")[1:]  # targets: every val token that has a predecessor
    if len(val) == 0:
        raise OdysseyError(f"the val split of {data.directory} has one token; run prepare-data with more data")
    total = 0.0
    for i in range(0, len(val), _COUNT_CHUNK):
        chunk = np.asarray(val[i : i + _COUNT_CHUNK])
        if chunk.max() >= V:
            raise OdysseyError(f"{data.directory}/val.bin holds ids >= vocab_size {V}; run prepare-data again")
        total += float(logp[chunk].sum())
    return -total / len(val)
