"""Token files: the binary format of a prepared data directory, its writer and its reader.

Two layouts, named by the manifest's "layout" (a version 2 manifest, without the key, is "stream"):

- stream (text data): `train.bin` and `val.bin` hold raw token ids, little-endian uint16 (vocab <=
  65535) or uint32, no header; every document is stored as its tokenizer encodes it (a BOS first
  where the tokenizer adds one), then that tokenizer's EOS, and documents follow each other.
  Training windows run across documents and every target is trained.
- examples (chat, completions, alpaca data; written by `odyssey.data.examples`), per split S:
  `S.bin` the token ids of the examples back to back (same dtype rule), each as rendered and
  tokenized; `S.mask` uint8, one byte per token, 1 where that token is a trained target (the loss
  of predicting it from the token before counts; the first token of every example is 0); `S.idx`
  int64, examples + 1 offsets into S.bin: example k is tokens[idx[k]:idx[k+1]], idx[0] = 0,
  idx[-1] = the tokens of S.bin. The sampler packs whole examples into windows.

`manifest.json` (format FORMAT, version FORMAT_VERSION) names the dtype, vocabulary, special ids
(bos_id null for a tokenizer without one, as Qwen's), the layout and per split its file, tokens and
documents (= examples), and for the examples layout its "mask_file", "index_file" and
"trained_tokens" (plus the data format, template and too-long counts of prepare-data). `TokenWriter`
appends documents to open stream token files; `TokenData` reads a finished directory of either
layout back through read-only `np.memmap`s, checking that every file's size agrees with the manifest
(and that the offsets rise from 0 to the token count) before anything uses it.
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
FORMAT_VERSION = 3  # 2: bos_id may be null, documents end with their own EOS; 3: "layout", examples
LAYOUTS = ("stream", "examples")
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
            self.layout = m.get("layout", "stream")
            if self.layout not in LAYOUTS:
                raise ValueError(f"layout {self.layout!r}")
            examples = self.layout == "examples"
            keys = ("file", "tokens", "mask_file", "index_file", "documents") if examples else ("file", "tokens")
            for info in splits.values():
                missing = [k for k in keys if k not in info]
                if missing:
                    raise KeyError(missing[0])
                info["tokens"] = int(info["tokens"])
                if examples:
                    info["documents"] = int(info["documents"])
        except (KeyError, TypeError, ValueError) as e:
            raise OdysseyError(f"{mpath} is damaged (bad or missing {e}); {redo} again") from None
        self.manifest = m
        self._files: dict[str, Path] = {}
        self._lengths: dict[str, int] = {}
        self._masks: dict[str, Path] = {}
        self._indexes: dict[str, Path] = {}
        self._examples: dict[str, int] = {}
        for split, info in splits.items():
            path = self.directory / info["file"]
            n = info["tokens"]
            self._check_size(path, n * self.dtype.itemsize, f"{n} {self.dtype.name} tokens", redo, allow_empty=False)
            self._files[split], self._lengths[split] = path, n
            if examples:
                k = info["documents"]
                mask, index = self.directory / info["mask_file"], self.directory / info["index_file"]
                self._check_size(mask, n, f"{n} tokens (one mask byte each)", redo)
                self._check_size(index, (k + 1) * 8, f"{k} examples ({k + 1} int64 offsets)", redo)
                self._check_offsets(index, n, redo)
                self._masks[split], self._indexes[split], self._examples[split] = mask, index, k
        self._maps: dict[tuple[str, str], np.memmap] = {}

    @staticmethod
    def _check_size(path: Path, expect: int, what: str, redo: str, allow_empty: bool = True) -> None:
        if not path.is_file():
            raise OdysseyError(f"{path} is missing; {redo} again")
        size = path.stat().st_size
        if size != expect or (expect == 0 and not allow_empty):
            raise OdysseyError(
                f"{path} holds {size} bytes but manifest.json says {what}; "
                f"the directory is damaged or from another run; {redo} again"
            )

    @staticmethod
    def _check_offsets(path: Path, tokens: int, redo: str) -> None:
        """idx[0] = 0, idx rises (never falls), idx[-1] = tokens; read in chunks."""
        idx = np.memmap(path, dtype="<i8", mode="r")
        ok = int(idx[0]) == 0 and int(idx[-1]) == tokens
        for i in range(0, len(idx), _COUNT_CHUNK):
            if not ok:
                break
            part = np.asarray(idx[i : i + _COUNT_CHUNK + 1])
            ok = bool((np.diff(part) >= 0).all())
        if not ok:
            raise OdysseyError(
                f"{path} does not hold rising offsets from 0 to {tokens} (the tokens of the split); "
                f"the directory is damaged or from another run; {redo} again"
            )

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"

    def num_tokens(self, split: str) -> int:
        self._check_split(split)
        return self._lengths[split]

    def tokens(self, split: str) -> np.memmap:
        """(N,) uint16/uint32 read-only memory map of `split`'s token ids (pages load on touch)."""
        self._check_split(split)
        return self._map(split, "tokens", self._files[split], self.dtype)

    def num_examples(self, split: str) -> int | None:
        """Examples in `split` (examples layout); None for the stream layout."""
        self._check_split(split)
        return self._examples.get(split)

    def mask(self, split: str) -> np.memmap | None:
        """(N,) uint8 read-only memory map: 1 where token j of `split` is a trained target; None for
        the stream layout (every target trained)."""
        self._check_split(split)
        return self._map(split, "mask", self._masks[split], np.dtype(np.uint8)) if split in self._masks else None

    def offsets(self, split: str) -> np.memmap | None:
        """(examples + 1,) int64 read-only memory map: example k is tokens[idx[k]:idx[k+1]]; None for
        the stream layout."""
        self._check_split(split)
        if split not in self._indexes:
            return None
        return self._map(split, "index", self._indexes[split], np.dtype("<i8"))

    def _map(self, split: str, kind: str, path: Path, dtype: np.dtype) -> np.memmap:
        key = (split, kind)
        if key not in self._maps:
            self._maps[key] = np.memmap(path, dtype=dtype, mode="r")
        return self._maps[key]

    def load_tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def __repr__(self):
        return (
            f"TokenData({str(self.directory)!r}, {self.layout}, vocab={self.vocab_size}, "
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
