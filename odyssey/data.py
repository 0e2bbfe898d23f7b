"""Text corpus -> byte-level BPE tokenizer -> token files on disk -> memory-mapped training batches.

A prepared data directory (`odyssey prepare-data CORPUS --out DIR`) holds:

    tokenizer.json            HF `tokenizers` byte-level BPE (GPT-2 byte-to-unicode tokens + merges)
    tokenizer_config.json     so `transformers.AutoTokenizer.from_pretrained(DIR)` loads it,
    special_tokens_map.json   with <unk> = 0, <s> = 1 (bos), </s> = 2 (eos) for a trained tokenizer
    train.bin, val.bin        raw token ids, little-endian uint16 (vocab <= 65535) or uint32, no header:
                              every document is stored as  <s> tokens... </s>  and documents follow
                              each other, so a window that crosses documents sees the boundary
    manifest.json             written last: format, dtype, vocab, special ids, tokens and documents
                              per split, sources, sha256 of tokenizer.json

Documents go to train or val whole (a seeded random choice of documents, at least one in val).
Nothing holds all token ids in RAM: documents are encoded in batches and appended to the files,
and training reads them back through `np.memmap`. Every file is written under a temporary name
and renamed; the manifest comes last, so a directory without one is unfinished.

Corpus files: `.txt` (documents separated by lines `<|endoftext|>`, or by blank lines when the
file has no such line, TinyStories style) and `.jsonl` (one JSON object with a "text" per line).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from .atomic import atomic_open, write_bytes, write_json
from .errors import OdysseyError

if TYPE_CHECKING:  # imported lazily: `prepare-data` needs no torch, TokenData no tokenizers
    from tokenizers import Tokenizer

EOT_LINE = "<|endoftext|>"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # ids 0, 1, 2 in a tokenizer trained here
SPECIAL_TOKENS = [UNK, BOS, EOS]
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte is a token, plus the special tokens
FORMAT = "odyssey-tokens"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
OUTPUT_FILES = TOKENIZER_FILES + ("train.bin", "val.bin", "manifest.json")
SPLITS = ("train", "val")
_ENCODE_BATCH_DOCS = 1024  # documents per encode_batch call (the Rust side encodes them in parallel)
_ENCODE_BATCH_CHARS = 4_000_000  # ... or fewer, so a batch of long documents stays a few MB
_COUNT_CHUNK = 1 << 24  # tokens per np.bincount call in unigram_loss (16M -> 128 MB of int64)


# --------------------------------------------------------------------------------------------
# reading documents


def _corpus_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The .txt/.jsonl files named by `inputs` (files, or directories searched recursively)."""
    files: list[Path] = []
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise OdysseyError("no corpus given; name .txt/.jsonl files or directories holding them")
    for path in inputs:
        if not path.exists():
            raise OdysseyError(f"corpus path {path} does not exist; check the path given to prepare-data")
        if path.is_dir():
            found = sorted(
                f for f in path.rglob("*")
                if f.suffix in (".txt", ".jsonl") and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not found:
                raise OdysseyError(
                    f"directory {path} holds no .txt or .jsonl files; add text files (documents "
                    f"separated by {EOT_LINE} lines or blank lines) or .jsonl files with a \"text\" field")
            files.extend(found)
        elif path.suffix in (".txt", ".jsonl"):
            files.append(path)
        else:
            raise OdysseyError(
                f"corpus file {path} is neither .txt nor .jsonl; rename it (.txt: plain text, "
                f".jsonl: one JSON object with a \"text\" field per line)")
    unique, seen = [], set()
    for f in files:  # the same file named twice (or a file inside a named directory) counts once
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _txt_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:  # universal newlines: \r\n becomes \n
        # a file with any <|endoftext|> line is split on those only (stories keep their paragraphs)
        by_marker = any(line.strip() == EOT_LINE for line in f)
        f.seek(0)
        lines: list[str] = []
        for line in f:
            if (line.strip() == EOT_LINE) if by_marker else not line.strip():
                text = "".join(lines).strip()
                if text:
                    yield text
                lines = []
            else:
                lines.append(line)
        text = "".join(lines).strip()
        if text:
            yield text


def _jsonl_documents(path: Path) -> Iterator[str]:
    fix = 'each line of a .jsonl corpus must be one JSON object like {"text": "..."}'
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise OdysseyError(f"{path}:{lineno} is not valid JSON ({e.msg}); {fix}") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise OdysseyError(f"{path}:{lineno} has no \"text\" field; {fix}")
            if not isinstance(obj["text"], str):
                raise OdysseyError(f"{path}:{lineno}: \"text\" is {type(obj['text']).__name__}, not a string; {fix}")
            text = obj["text"].strip()
            if text:
                yield text


def _iter_files(files: list[Path], inputs_label: str) -> Iterator[str]:
    n = 0
    for path in files:
        reader = _jsonl_documents if path.suffix == ".jsonl" else _txt_documents
        try:
            for doc in reader(path):
                n += 1
                yield doc
        except UnicodeDecodeError as e:
            raise OdysseyError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                               f"convert it to UTF-8") from None
    if n == 0:
        raise OdysseyError(f"no documents found in {inputs_label}; the corpus files are empty or hold "
                           f"only separators and blank lines")


def read_documents(inputs: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Yield the documents (stripped, non-empty strings) of `inputs` in a fixed order.

    Paths are checked now (missing path, directory without corpus files -> OdysseyError); file
    contents as the iterator goes (bad .jsonl line, not UTF-8, no document at all -> OdysseyError).
    """
    inputs = list(inputs)
    files = _corpus_files(inputs)
    return _iter_files(files, ", ".join(str(p) for p in inputs))


# --------------------------------------------------------------------------------------------
# tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype of the token files for `vocab_size` ids: uint16 up to 65535, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def train_tokenizer(documents: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    progress: bool = False) -> "Tokenizer":
    """Train a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, no normalizer).

    Ids 0, 1, 2 are <unk>, <s>, </s>; then the 256 byte tokens, then merges, up to `vocab_size`
    (fewer if the corpus has no more pairs to merge). Any text round-trips exactly, Korean included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise OdysseyError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
                           f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())  # byte-level: every byte has a token, so no <unk> is ever produced
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes, seen or not
    tok.train_from_iterator(documents, trainer)
    # Like Llama's tokenizer, plain `encode(text)` (and HF `tokenizer(text)`) starts with <s>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def _special_ids(tok: "Tokenizer", source: str) -> dict:
    ids = {"bos_id": tok.token_to_id(BOS), "eos_id": tok.token_to_id(EOS), "unk_id": tok.token_to_id(UNK)}
    for key, name in (("bos_id", BOS), ("eos_id", EOS)):
        if ids[key] is None:
            raise OdysseyError(f"tokenizer {source} has no {name} token; Odyssey needs {BOS} and {EOS}: "
                               f"let prepare-data train one (drop --tokenizer)")
    return ids


def load_tokenizer(path: str | os.PathLike) -> "Tokenizer":
    """Load `path` (a tokenizer.json, or a directory holding one) as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise OdysseyError(f"{path} has no tokenizer.json; pass a directory written by "
                           f"`odyssey prepare-data` or a model store that has one")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception with serde's message
        raise OdysseyError(f"{file} is not a valid tokenizers file ({str(e).splitlines()[0]}); "
                           f"write it again with prepare-data") from None


def _tokenizer_side_files() -> dict[str, bytes]:
    """tokenizer_config.json and special_tokens_map.json for `AutoTokenizer.from_pretrained`."""
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        # HF's cleanup turns "a , b" into "a, b": off, so decode(encode(s)) == s
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,  # no limit from the tokenizer; the model config has one
    }
    dump = lambda obj: (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
    return {"tokenizer_config.json": dump(config), "special_tokens_map.json": dump(specials)}


def _write_tokenizer_files(files: dict[str, bytes], directory: Path, written: list[Path]) -> None:
    for name in TOKENIZER_FILES:
        write_bytes(directory / name, files[name])
        written.append(directory / name)  # for the cleanup if a later step fails


# --------------------------------------------------------------------------------------------
# prepare_data


def _read_model_config(store: Path) -> dict:
    cfg = store / "config.json"
    if not cfg.is_file():
        raise OdysseyError(f"model store {store} has no config.json; create it with `odyssey init` "
                           f"or pass the right --model")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OdysseyError(f"{cfg} is not valid JSON ({e}); recreate the store with `odyssey init`") from None
    if not isinstance(config, dict) or not isinstance(config.get("vocab_size"), int):
        raise OdysseyError(f"{cfg} has no integer vocab_size; recreate the store with `odyssey init`")
    return config


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OdysseyError(f"--out {out} is a file; choose a directory path")
    if out.is_dir() and not force:
        others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise OdysseyError(f"output directory {out} already holds other files ({shown}); "
                               f"choose a new --out or pass --force")


def _too_big(tok_vocab: int, model_vocab: int) -> OdysseyError:
    return OdysseyError(f"tokenizer vocabulary {tok_vocab} is larger than the model's {model_vocab}; "
                        f"use --vocab-size <= {model_vocab}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare_data(inputs: Iterable[str | os.PathLike], out: str | os.PathLike, vocab_size: int | None = None,
                 tokenizer_dir: str | os.PathLike | None = None, model_store: str | os.PathLike | None = None,
                 val_fraction: float = 0.05, seed: int = 0, force: bool = False,
                 progress: bool = True) -> dict:
    """Tokenize a corpus into `out` (see the module docstring for the layout); return a summary.

    Tokenizer: `tokenizer_dir`'s tokenizer.json if given; else the model store's tokenizer.json if
    it has one and no `vocab_size` is asked for (data for a model must use its tokenizer); else a
    byte-level BPE trained on the corpus with `vocab_size` (default: the store's vocab_size, or 8192).
    With `model_store`, a tokenizer larger than the model's vocab is refused, and the tokenizer files
    are copied into the store (which must not already hold a different one, unless `force`).
    `force` also allows an `out` that holds other files (they are left alone).
    Everything that can be refused is checked before the first byte is written.
    """
    t0 = time.perf_counter()
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    if not 0.0 < val_fraction < 1.0:
        raise OdysseyError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise OdysseyError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
                           f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    if vocab_size is not None and tokenizer_dir is not None:
        raise OdysseyError("--vocab-size trains a new tokenizer and --tokenizer reuses one; give only one")
    model_vocab = model_config = store_tok = None
    if model_store is not None:
        model_store = Path(model_store)
        model_config = _read_model_config(model_store)
        model_vocab = model_config["vocab_size"]
        if vocab_size is not None and vocab_size > model_vocab:
            raise _too_big(vocab_size, model_vocab)
        if (model_store / "tokenizer.json").is_file():
            store_tok = model_store / "tokenizer.json"
    _check_out(out, force)
    files = _corpus_files(inputs)
    label = ", ".join(str(p) for p in inputs)

    # --- pass 1: the tokenizer (trained, or loaded and the documents counted) ---
    n_docs = 0

    def counted(docs: Iterator[str]) -> Iterator[str]:
        nonlocal n_docs
        for d in docs:
            n_docs += 1
            yield d

    source = tokenizer_dir if tokenizer_dir is not None else (store_tok if vocab_size is None else None)
    if source is not None:
        tok = load_tokenizer(source)
        tok_file = Path(source) / "tokenizer.json" if Path(source).is_dir() else Path(source)
        tok_json = tok_file.read_bytes()  # copied as is, so the sha256 matches the original
        origin = str(tok_file)
        for _ in counted(_iter_files(files, label)):
            pass
    else:
        target = vocab_size or model_vocab or DEFAULT_VOCAB_SIZE
        docs = counted(_iter_files(files, label))
        if progress:
            from tqdm import tqdm
            docs = tqdm(docs, desc="training tokenizer", unit=" docs", leave=False)
        tok = train_tokenizer(docs, target, progress=False)
        tok_json = (tok.to_str(pretty=True) + "\n").encode()
        origin = f"trained (byte-level BPE, asked {target})"
    specials = _special_ids(tok, origin)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if model_vocab is not None and vocab > model_vocab:
        raise _too_big(vocab, model_vocab)
    tok_sha = _sha256(tok_json)
    if store_tok is not None and not force:
        if json.loads(store_tok.read_bytes()) != json.loads(tok_json):
            raise OdysseyError(f"model store {model_store} already has a different tokenizer.json; "
                               f"drop --vocab-size/--tokenizer to reuse it, or pass --force to replace it")
    if n_docs < 2:
        raise OdysseyError(f"the corpus {label} has only {n_docs} document; prepare-data needs at least 2 "
                           f"(one is held out for validation); add documents or separate them with "
                           f"{EOT_LINE} lines")

    # --- the split: whole documents, a seeded random choice, at least one on each side ---
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    is_val = np.zeros(n_docs, dtype=bool)  # 1 byte per document
    is_val[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True
    dtype = token_dtype(vocab)
    bos, eos = specials["bos_id"], specials["eos_id"]

    # --- pass 2: encode in batches, append to train.bin / val.bin ---
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / "manifest.json").unlink()  # a stale manifest must not vouch for new token files
    written: list[Path] = []
    counts = {s: {"tokens": 0, "documents": 0} for s in SPLITS}
    bar = None
    try:
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=n_docs, desc="encoding", unit=" docs")
        with atomic_open(out / "train.bin") as f_train, atomic_open(out / "val.bin") as f_val:
            sinks = {"train": f_train, "val": f_val}
            index = 0
            batch: list[str] = []
            chars = 0

            def flush() -> None:
                nonlocal index, batch, chars
                encs = tok.encode_batch(batch, add_special_tokens=False)
                flat = {"train": [], "val": []}  # ids of this batch only, never the whole corpus
                for enc in encs:
                    if index >= n_docs:
                        raise OdysseyError(f"the corpus {label} changed while it was read; run again")
                    split = "val" if is_val[index] else "train"
                    flat[split].append(bos)
                    flat[split].extend(enc.ids)
                    flat[split].append(eos)
                    counts[split]["documents"] += 1
                    index += 1
                for split, ids in flat.items():
                    if ids:
                        np.asarray(ids, dtype=dtype).tofile(sinks[split])
                        counts[split]["tokens"] += len(ids)
                if bar is not None:
                    bar.update(len(batch))
                batch, chars = [], 0

            for doc in _iter_files(files, label):
                batch.append(doc)
                chars += len(doc)
                if len(batch) >= _ENCODE_BATCH_DOCS or chars >= _ENCODE_BATCH_CHARS:
                    flush()
            if batch:
                flush()
            if index != n_docs:
                raise OdysseyError(f"the corpus {label} changed while it was read; run again")
        written += [out / "train.bin", out / "val.bin"]
        if bar is not None:
            bar.close()
        tok_files = {"tokenizer.json": tok_json, **_tokenizer_side_files()}
        _write_tokenizer_files(tok_files, out, written)
        seconds = time.perf_counter() - t0
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": vocab,
            **specials,
            "document_layout": "<s> tokens </s>, documents concatenated",
            "splits": {s: {"file": f"{s}.bin", **counts[s]} for s in SPLITS},
            "documents": n_docs,
            "sources": [str(p) for p in inputs],
            "source_files": len(files),
            "tokenizer_sha256": tok_sha,
            "tokenizer_origin": origin,
            "model_vocab_size": model_vocab,
            "val_fraction": val_fraction,
            "seed": seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(out / "manifest.json", manifest)
    except BaseException:
        if bar is not None:
            bar.close()
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise

    if model_store is not None:
        # the store can tokenize (generate, export to GGUF) with exactly the data's tokenizer
        _write_tokenizer_files(tok_files, model_store, [])
        for key, name in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id")):
            if model_config.get(key) is not None and model_config[key] != specials[name]:
                print(f"warning: {model_store}/config.json has {key}={model_config[key]}, "
                      f"the tokenizer has {specials[name]}")

    total = counts["train"]["tokens"] + counts["val"]["tokens"]
    summary = {
        "out": str(out),
        "documents": n_docs,
        "train_documents": counts["train"]["documents"],
        "val_documents": counts["val"]["documents"],
        "train_tokens": counts["train"]["tokens"],
        "val_tokens": counts["val"]["tokens"],
        "tokens": total,
        "vocab_size": vocab,
        "dtype": dtype.name,
        "tokenizer": origin,
        "seconds": round(seconds, 2),
    }
    print(f"prepared {out}: {n_docs:,} documents ({summary['train_documents']:,} train, "
          f"{summary['val_documents']:,} val), {total:,} tokens ({summary['train_tokens']:,} train, "
          f"{summary['val_tokens']:,} val), vocab {vocab:,} [{origin}], {dtype.name}, {seconds:.1f} s")
    return summary


# --------------------------------------------------------------------------------------------
# reading a prepared directory


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
            raise OdysseyError(f"{mpath} has format version {m.get('format_version')}, newer than this "
                               f"Odyssey reads ({FORMAT_VERSION}); upgrade Odyssey or {redo}")
        try:
            self.dtype = np.dtype(m["dtype"])
            if self.dtype not in (np.uint16, np.uint32):
                raise ValueError(m["dtype"])
            self.vocab_size = int(m["vocab_size"])
            self.bos_id, self.eos_id = int(m["bos_id"]), int(m["eos_id"])
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
                raise OdysseyError(f"{path} holds {size} bytes but manifest.json says {n} {self.dtype.name} "
                                   f"tokens; the directory is damaged or from another run; {redo} again")
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

    def load_tokenizer(self) -> "Tokenizer":
        return load_tokenizer(self.tokenizer_path)

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def __repr__(self):
        return (f"TokenData({str(self.directory)!r}, vocab={self.vocab_size}, "
                f"train={self._lengths['train']}, val={self._lengths['val']})")


# --------------------------------------------------------------------------------------------
# batches


def _num_windows(data: TokenData, split: str, seq_len: int) -> int:
    """Non-overlapping windows of seq_len+1 tokens with stride seq_len (x and its shifted y)."""
    if seq_len < 1:
        raise OdysseyError(f"--seq-len must be >= 1, got {seq_len}")
    n = data.num_tokens(split)
    windows = (n - 1) // seq_len
    if windows == 0:
        raise OdysseyError(f"the {split} split of {data.directory} has {n} tokens, too few for one window "
                           f"of seq_len + 1 = {seq_len + 1}; use a smaller --seq-len or more data")
    return windows


def _gather(tokens: np.ndarray, windows: np.ndarray, seq_len: int):
    """(B,) window indices -> x, y: (B, T) int64 torch tensors; y[:, t] is the token after x[:, t]."""
    import torch

    buf = np.empty((len(windows), seq_len + 1), dtype=np.int64)  # (B, T+1)
    for row, w in enumerate(windows):
        start = int(w) * seq_len
        buf[row] = tokens[start:start + seq_len + 1]  # one contiguous read from the memory map
    x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
    return x, y


class BatchSampler:
    """Endless, resumable, shardable stream of (x, y) batches from one split.

    Windows w = 0..W-1 cover tokens [w*T, w*T + T + 1). Epoch e visits them in the permutation
    `default_rng([seed, e]).permutation(W)`; rank r of world_size n takes entries r, r+n, r+2n, ...
    of it (disjoint shards), cut to W // n so every rank has the same count. Batches are the next
    B windows of that stream and may span an epoch boundary, so no window is skipped.
    `state_dict()` is (epoch, cursor) plus the settings it is valid for.
    """

    def __init__(self, data: TokenData, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise OdysseyError(f"--batch-size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise OdysseyError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.data, self.split = data, split
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_windows = _num_windows(data, split, seq_len)
        self.windows_per_epoch = self.num_windows // world_size  # per rank
        if self.windows_per_epoch == 0:
            raise OdysseyError(f"the {split} split has {self.num_windows} windows of seq_len {seq_len}, fewer "
                               f"than the {world_size} ranks; use a smaller --seq-len or more data")
        self.epoch = 0
        self.cursor = 0  # windows of this epoch's shard already given out
        self._order_epoch, self._order = -1, None

    def _shard(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order = perm[self.rank::self.world_size][:self.windows_per_epoch]
            self._order_epoch = epoch
        return self._order

    @property
    def batches_per_epoch(self) -> float:
        return self.windows_per_epoch / self.batch_size

    def next_batch(self):
        """x, y: (B, T) int64 tensors; advances the position."""
        picked = []
        need = self.batch_size
        while need:
            shard = self._shard(self.epoch)
            take = shard[self.cursor:self.cursor + need]
            picked.append(take)
            need -= len(take)
            self.cursor += len(take)
            if self.cursor == len(shard):
                self.epoch, self.cursor = self.epoch + 1, 0
        return _gather(self.data.tokens(self.split), np.concatenate(picked), self.seq_len)

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "split": self.split, "seed": self.seed,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "rank": self.rank,
                "world_size": self.world_size, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (same data, seq_len, seed, rank and world_size)."""
        for key in ("split", "seed", "seq_len", "rank", "world_size", "num_windows"):
            if key in state and state[key] != getattr(self, key):
                raise OdysseyError(
                    f"the saved data position has {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                    f"resume with the same data and settings, or start a new run")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.windows_per_epoch:
            raise OdysseyError(f"the saved data position (epoch {epoch}, cursor {cursor}) is out of range "
                               f"for {self.windows_per_epoch} windows per epoch; start a new run")
        self.epoch, self.cursor = epoch, cursor


def eval_batches(data: TokenData, seq_len: int, batch_size: int, n: int, split: str = "val") -> list:
    """The first `n` batches of `split` in window order 0, 1, 2, ... (wrapping): a fixed eval set.

    Returns a list of (x, y), each (B, T) int64; the same arguments always give the same tensors.
    """
    windows = _num_windows(data, split, seq_len)
    tokens = data.tokens(split)
    return [_gather(tokens, (np.arange(batch_size) + k * batch_size) % windows, seq_len) for k in range(n)]


def unigram_loss(data: TokenData) -> float:
    """Cross-entropy (nats/token) on val targets of a unigram model fitted on train (add-one smoothing).

    The floor a trained model must beat; log(vocab_size) is the loss of a uniform guess.
    """
    V = data.vocab_size
    counts = np.zeros(V, dtype=np.int64)
    train = data.tokens("train")
    for i in range(0, len(train), _COUNT_CHUNK):
        c = np.bincount(train[i:i + _COUNT_CHUNK], minlength=V)
        if len(c) > V:
            raise OdysseyError(f"{data.directory}/train.bin holds id {len(c) - 1} >= vocab_size {V}; "
                               f"the directory is damaged; run prepare-data again")
        counts += c
    logp = np.log(counts + 1.0) - np.log(counts.sum() + V)  # (V,) log-probabilities
    val = data.tokens("val")[1:]  # targets: every val token that has a predecessor
    if len(val) == 0:
        raise OdysseyError(f"the val split of {data.directory} has one token; run prepare-data with more data")
    total = 0.0
    for i in range(0, len(val), _COUNT_CHUNK):
        chunk = np.asarray(val[i:i + _COUNT_CHUNK])
        if chunk.max() >= V:
            raise OdysseyError(f"{data.directory}/val.bin holds ids >= vocab_size {V}; run prepare-data again")
        total += float(logp[chunk].sum())
    return -total / len(val)
