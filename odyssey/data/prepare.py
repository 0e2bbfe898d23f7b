"""`odyssey prepare-data`: a corpus -> a tokenizer and token files in a data directory (see the package).

Two passes over the corpus: the first trains the tokenizer (or loads one and counts the documents),
the second encodes the documents in batches and appends them to train.bin / val.bin. Everything
that can be refused is checked before the first byte is written (an --out apart from the inputs
among them); the manifest comes last, and a failure removes what this run wrote. A run killed at any
moment leaves no manifest (so no data directory) or a complete one; its temporary files are
recognised by name (the command and its pid) and removed by the next run, which needs no --force.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from odyssey import atomic
from odyssey.atomic import atomic_open, write_json
from odyssey.data.corpus import EOT_LINE, corpus_files, iter_documents
from odyssey.data.tokens import FORMAT, FORMAT_VERSION, SPLITS, TokenWriter, token_dtype
from odyssey.errors import OdysseyError
from odyssey.outputs import check_apart
from odyssey.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    WRITTEN_FILES,
    hf_side_files,
    load_tokenizer,
    special_ids,
    train_tokenizer,
    write_tokenizer_files,
)

if TYPE_CHECKING:  # imported lazily: `prepare-data` needs no torch, TokenData no tokenizers
    from tokenizers import Tokenizer

OUTPUT_FILES = WRITTEN_FILES + ("train.bin", "val.bin", "manifest.json")  # what a data directory holds
_ENCODE_BATCH_DOCS = 1024  # documents per encode_batch call (the Rust side encodes them in parallel)
_ENCODE_BATCH_CHARS = 4_000_000  # ... or fewer, so a batch of long documents stays a few MB


def prepare_data(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    vocab_size: int | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    model_store: str | os.PathLike | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize a corpus into `out` (see the package docstring for the layout); return a summary.

    Tokenizer: `tokenizer_dir`'s tokenizer.json if given; else the model store's tokenizer.json if
    it has one and no `vocab_size` is asked for (data for a model must use its tokenizer); else a
    byte-level BPE trained on the corpus with `vocab_size` (default: the store's vocab_size, or 8192).
    With `model_store`, a tokenizer larger than the model's vocab is refused, and the tokenizer files
    are copied into the store (which must not already hold a different one, unless `force`).
    `force` also allows an `out` that holds other files (they are left alone).
    Everything that can be refused is checked before the first byte is written.
    """
    t0 = time.perf_counter()
    atomic.set_command("prepare-data")
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    _check_options(vocab_size, tokenizer_dir, val_fraction)
    model = _ModelStore.open(Path(model_store), vocab_size) if model_store is not None else None
    tok_file = None  # the input is the tokenizer file (--tokenizer names it or its directory)
    if tokenizer_dir is not None:
        tok_file = Path(tokenizer_dir) / "tokenizer.json" if Path(tokenizer_dir).is_dir() else Path(tokenizer_dir)
    check_apart(
        out,
        [("corpus", None, p) for p in inputs]
        + [("tokenizer", "--tokenizer", tok_file), ("model", "--model", model_store)],
    )
    _check_out(out, force)
    files = corpus_files(inputs)
    label = ", ".join(str(p) for p in inputs)

    # --- pass 1: the tokenizer (trained, or loaded and the documents counted) ---
    chosen, n_docs = _choose_tokenizer(files, label, tokenizer_dir, vocab_size, model, progress)
    specials = special_ids(chosen.tok, chosen.origin)
    vocab = chosen.tok.get_vocab_size(with_added_tokens=True)
    if model is not None:
        model.check_tokenizer(vocab, chosen.tok_json, force)
    if n_docs < 2:
        raise OdysseyError(
            f"the corpus {label} has only {n_docs} document; prepare-data needs at least 2 "
            f"(one is held out for validation); add documents or separate them with "
            f"{EOT_LINE} lines"
        )
    is_val = _split(n_docs, val_fraction, seed)
    dtype = token_dtype(vocab)

    # --- pass 2: encode in batches, append to train.bin / val.bin; then tokenizer files, manifest ---
    tok_files = {"tokenizer.json": chosen.tok_json, **hf_side_files()}
    with _output_dir(out) as written:
        counts = _write_tokens(out, chosen.tok, iter_documents(files, label), label, is_val, dtype, specials, progress)
        written += [out / "train.bin", out / "val.bin"]
        write_tokenizer_files(tok_files, out, written)
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
            "tokenizer_sha256": hashlib.sha256(chosen.tok_json).hexdigest(),
            "tokenizer_origin": chosen.origin,
            "model_vocab_size": model.vocab_size if model is not None else None,
            "val_fraction": val_fraction,
            "seed": seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(out / "manifest.json", manifest)

    if model is not None:
        model.add_tokenizer(tok_files, specials)
    return _report(out, n_docs, counts, vocab, dtype, chosen.origin, seconds)


# --------------------------------------------------------------------------------------------
# checks before any work


def _check_options(vocab_size: int | None, tokenizer_dir: str | os.PathLike | None, val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise OdysseyError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise OdysseyError(
            f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    if vocab_size is not None and tokenizer_dir is not None:
        raise OdysseyError("--vocab-size trains a new tokenizer and --tokenizer reuses one; give only one")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OdysseyError(f"--out {out} is a file; choose a directory path")
    if out.is_dir() and not force:
        others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES and not _own_temp(p.name))
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise OdysseyError(
                f"output directory {out} already holds other files ({shown}); choose a new --out or pass --force"
            )


def _own_temp(name: str) -> bool:
    """A temporary file of one of prepare-data's outputs (the next run removes it once its process is gone)."""
    parsed = atomic.parse_temp_name(name)
    return parsed is not None and parsed[0] in OUTPUT_FILES


def _too_big(tok_vocab: int, model_vocab: int) -> OdysseyError:
    return OdysseyError(
        f"tokenizer vocabulary {tok_vocab} is larger than the model's {model_vocab}; use --vocab-size <= {model_vocab}"
    )


@dataclass
class _ModelStore:
    """The model store the data is prepared for (`--model`): its config.json, and its tokenizer.json
    if it has one already."""

    root: Path
    config: dict
    tokenizer_json: Path | None

    @classmethod
    def open(cls, root: Path, vocab_size: int | None) -> _ModelStore:
        """Read `root`'s config.json; refuse an asked `vocab_size` larger than the model's."""
        config = _read_model_config(root)
        if vocab_size is not None and vocab_size > config["vocab_size"]:
            raise _too_big(vocab_size, config["vocab_size"])
        tok = root / "tokenizer.json"
        return cls(root, config, tok if tok.is_file() else None)

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    def check_tokenizer(self, vocab: int, tok_json: bytes, force: bool) -> None:
        """Refuse a tokenizer larger than the model's vocabulary, or (unless `force`) one that
        differs from the tokenizer.json the store already has."""
        if vocab > self.vocab_size:
            raise _too_big(vocab, self.vocab_size)
        if self.tokenizer_json is not None and not force:
            if json.loads(self.tokenizer_json.read_bytes()) != json.loads(tok_json):
                raise OdysseyError(
                    f"model store {self.root} already has a different tokenizer.json; "
                    f"drop --vocab-size/--tokenizer to reuse it, or pass --force to replace it"
                )

    def add_tokenizer(self, tok_files: dict[str, bytes], specials: dict) -> None:
        """Copy the tokenizer files into the store, so it can tokenize (generate, export to GGUF)
        with exactly the data's tokenizer; warn where config.json's bos/eos ids differ from it."""
        atomic.remove_stale_temps(self.root, tok_files)  # left by a killed prepare-data
        write_tokenizer_files(tok_files, self.root, [])
        for key, name in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id")):
            if self.config.get(key) is not None and self.config[key] != specials[name]:
                print(
                    f"warning: {self.root}/config.json has {key}={self.config[key]}, the tokenizer has {specials[name]}"
                )


def _read_model_config(store: Path) -> dict:
    cfg = store / "config.json"
    if not cfg.is_file():
        raise OdysseyError(
            f"model store {store} has no config.json; create it with `odyssey init` or pass the right --model"
        )
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OdysseyError(f"{cfg} is not valid JSON ({e}); recreate the store with `odyssey init`") from None
    if not isinstance(config, dict) or not isinstance(config.get("vocab_size"), int):
        raise OdysseyError(f"{cfg} has no integer vocab_size; recreate the store with `odyssey init`")
    return config


# --------------------------------------------------------------------------------------------
# pass 1: the tokenizer


@dataclass(frozen=True)
class _ChosenTokenizer:
    tok: Tokenizer
    tok_json: bytes  # tokenizer.json as it is written: a loaded file's bytes as is (so the sha256 matches)
    origin: str  # the file it was loaded from, or how it was trained


class _Counted:
    """Iterates `docs` once, counting them in `n`."""

    def __init__(self, docs: Iterator[str]):
        self.docs, self.n = docs, 0

    def __iter__(self) -> Iterator[str]:
        for d in self.docs:
            self.n += 1
            yield d


def _choose_tokenizer(
    files: list[Path],
    label: str,
    tokenizer_dir: str | os.PathLike | None,
    vocab_size: int | None,
    model: _ModelStore | None,
    progress: bool,
) -> tuple[_ChosenTokenizer, int]:
    """The tokenizer (see `prepare_data`) and the number of documents in the corpus: one pass over it."""
    store_tok = model.tokenizer_json if model is not None else None
    source = tokenizer_dir if tokenizer_dir is not None else (store_tok if vocab_size is None else None)
    if source is not None:
        tok = load_tokenizer(source)
        tok_file = Path(source) / "tokenizer.json" if Path(source).is_dir() else Path(source)
        chosen = _ChosenTokenizer(tok, tok_file.read_bytes(), str(tok_file))
        docs = _Counted(iter_documents(files, label))
        for _ in docs:
            pass
        return chosen, docs.n
    target = vocab_size or (model.vocab_size if model is not None else None) or DEFAULT_VOCAB_SIZE
    docs = _Counted(iter_documents(files, label))
    shown: Iterable[str] = docs
    if progress:
        from tqdm import tqdm

        shown = tqdm(docs, desc="training tokenizer", unit=" docs", leave=False)
    tok = train_tokenizer(shown, target, progress=False)
    tok_json = (tok.to_str(pretty=True) + "\n").encode()
    return _ChosenTokenizer(tok, tok_json, f"trained (byte-level BPE, asked {target})"), docs.n


# --------------------------------------------------------------------------------------------
# pass 2: the token files


def _split(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """(n_docs,) bool, True for a val document: whole documents, a seeded random choice, at least
    one on each side."""
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    is_val = np.zeros(n_docs, dtype=bool)  # 1 byte per document
    is_val[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True
    return is_val


@contextlib.contextmanager
def _output_dir(out: Path) -> Iterator[list[Path]]:
    """Create `out` if needed and remove its stale manifest; yield a list for the paths the caller
    writes. If the block fails, those paths are removed (and `out`, if created here)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out, OUTPUT_FILES)  # left by a killed prepare-data
    with contextlib.suppress(FileNotFoundError):
        (out / "manifest.json").unlink()  # a stale manifest must not vouch for new token files
    written: list[Path] = []
    try:
        yield written
    except BaseException:
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    """`docs` in batches of _ENCODE_BATCH_DOCS documents or _ENCODE_BATCH_CHARS characters."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _ENCODE_BATCH_DOCS or chars >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_tokens(
    out: Path,
    tok: Tokenizer,
    docs: Iterator[str],
    label: str,
    is_val: np.ndarray,
    dtype: np.dtype,
    specials: dict,
    progress: bool,
) -> dict:
    """Encode `docs` (the corpus again, len(is_val) documents) into out/train.bin and out/val.bin,
    each written under a temporary name and renamed; return the tokens and documents per split."""
    n_docs = len(is_val)
    bar = None
    try:
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n_docs, desc="encoding", unit=" docs")
        with atomic_open(out / "train.bin") as f_train, atomic_open(out / "val.bin") as f_val:
            writer = TokenWriter(
                {"train": f_train, "val": f_val}, is_val, dtype, specials["bos_id"], specials["eos_id"]
            )
            for batch in _batches(docs):
                encs = tok.encode_batch(batch, add_special_tokens=False)
                if writer.documents + len(encs) > n_docs:
                    raise OdysseyError(f"the corpus {label} changed while it was read; run again")
                writer.append(enc.ids for enc in encs)
                if bar is not None:
                    bar.update(len(batch))
            if writer.documents != n_docs:
                raise OdysseyError(f"the corpus {label} changed while it was read; run again")
    finally:
        if bar is not None:
            bar.close()
    return writer.counts


def _report(out: Path, n_docs: int, counts: dict, vocab: int, dtype: np.dtype, origin: str, seconds: float) -> dict:
    """Print the one-line summary of a finished run and return it as a dict."""
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
    print(
        f"prepared {out}: {n_docs:,} documents ({summary['train_documents']:,} train, "
        f"{summary['val_documents']:,} val), {total:,} tokens ({summary['train_tokens']:,} train, "
        f"{summary['val_tokens']:,} val), vocab {vocab:,} [{origin}], {dtype.name}, {seconds:.1f} s"
    )
    return summary
