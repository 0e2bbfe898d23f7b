"""`odyssey prepare-data`: a corpus -> a tokenizer and token files in a data directory (see the package).

Two passes over the corpus: the first trains the tokenizer (or loads one and counts the documents),
the second encodes the documents in batches and appends them to train.bin / val.bin. Everything
that can be refused is checked before the first byte is written (an --out apart from the inputs
among them); the manifest comes last, and a failure removes what this run wrote. A run killed at any
moment leaves no manifest (so no data directory) or a complete one; its temporary files are
recognised by name (the command and its pid) and removed by the next run, which needs no --force.

The tokenizer is the model's own where there is one (`--tokenizer DIR`, or the `--model` store's),
used as `transformers` uses it: each document is `tokenizer(text)["input_ids"]` (a BOS only where
that tokenizer adds one) followed by that tokenizer's EOS. A store that has a tokenizer is never
given another one silently: a different tokenizer (given, or trained with --vocab-size) goes into
it only with `replace_tokenizer` (--replace-tokenizer), and only when its vocabulary fits the model.
No torch is imported (transformers' tokenizer classes do not need it).

Conversations (chat, completions, alpaca records; odyssey.data.formats) take the same checks and
the same tokenizer choice, then odyssey.data.examples writes the examples layout (a tokenizer
trained here is trained on the examples as their chat template renders them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from odyssey import atomic
from odyssey.atomic import atomic_open, write_json
from odyssey.data.corpus import EOT_LINE, corpus_files, iter_documents
from odyssey.data.formats import Keys, resolve_formats
from odyssey.data.modelstore import ModelStore
from odyssey.data.tokens import FORMAT, FORMAT_VERSION, SPLITS, TokenWriter, token_dtype
from odyssey.errors import OdysseyError
from odyssey.outputs import check_apart
from odyssey.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    TOKENIZER_FILES,
    ModelTokenizer,
    hf_side_files,
    load_model_tokenizer,
    read_tokenizer_files,
    tokenizer_dir,
    train_tokenizer,
    write_tokenizer_files,
)

EXAMPLE_FILES = ("train.mask", "val.mask", "train.idx", "val.idx")  # the examples layout's, beside S.bin
OUTPUT_FILES = (
    TOKENIZER_FILES + ("train.bin", "val.bin", "manifest.json") + EXAMPLE_FILES
)  # what a data directory holds
_ENCODE_BATCH_DOCS = 1024  # documents per encode call (the Rust side encodes them in parallel)
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
    replace_tokenizer: bool = False,
    data_format: str = "auto",
    chat_template: str | os.PathLike | None = None,
    mask_prompt: bool = True,
    train_on: str = "all",
    seq_len: int = 512,
    too_long: str = "truncate",
    prompt_key: str = "prompt",
    completion_key: str = "completion",
) -> dict:
    """Tokenize a corpus into `out` (see the package docstring for the layout); return a summary.

    Conversations (chat, completions, alpaca data; `data_format` auto-detects them per file) go
    to the examples layout through odyssey.data.examples, with the options after `replace_tokenizer`
    (see `prepare_examples`); text keeps the stream layout.

    Tokenizer: `tokenizer_dir`'s (any Hugging Face fast tokenizer: a checkpoint folder, a store, a
    data directory) if given; else the model store's if it has one and no `vocab_size` is asked
    for; else a byte-level BPE trained on the corpus with `vocab_size` (default: the store's
    vocab_size, or 8192). With `model_store`, a tokenizer larger than the model's vocab is refused,
    and a store without a tokenizer gets this one's files; a store whose tokenizer differs is
    refused unless `replace_tokenizer`. `force` allows an `out` that holds other files (they are
    left alone). Everything that can be refused is checked before the first byte is written.
    """
    t0 = time.perf_counter()
    atomic.set_command("prepare-data")
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    _check_options(vocab_size, tokenizer_dir, val_fraction, model_store, replace_tokenizer)
    model = ModelStore.open(Path(model_store), vocab_size) if model_store is not None else None
    if model is not None:
        model.check_request(vocab_size, replace_tokenizer)
    tok_file = None  # the input is the tokenizer file (--tokenizer names it or its directory)
    if tokenizer_dir is not None:
        tok_file = _tokenizer_source(Path(tokenizer_dir)) / "tokenizer.json"
    check_apart(
        out,
        [("corpus", None, p) for p in inputs]
        + [("tokenizer", "--tokenizer", tok_file), ("model", "--model", model_store)],
    )
    _check_out(out, force)
    files = corpus_files(inputs)
    label = ", ".join(str(p) for p in inputs)
    keys = Keys(prompt_key, completion_key)
    file_formats = resolve_formats(files, data_format, keys, chat_template)

    def check(chosen: _ChosenTokenizer) -> None:  # as soon as the tokenizer exists, before reading on
        if chosen.tok.eos_id is None:
            raise OdysseyError(
                f"the tokenizer {chosen.origin} has no EOS token, which separates documents; set "
                f"eos_token in its tokenizer_config.json, or let prepare-data train one (--vocab-size)"
            )
        if model is not None:
            model.check_tokenizer(chosen.tok.vocab_size, chosen, replace_tokenizer)

    if set(file_formats.values()) != {"text"}:
        from odyssey.data.examples import prepare_examples

        return prepare_examples(
            Job(inputs, out, files, label, file_formats, keys, tokenizer_dir, vocab_size, model, check),
            dict(val_fraction=val_fraction, seed=seed, progress=progress, replace_tokenizer=replace_tokenizer),
            chat_template=chat_template,
            mask_prompt=mask_prompt,
            train_on=train_on,
            seq_len=seq_len,
            too_long=too_long,
            t0=t0,
        )

    # --- pass 1: the tokenizer (trained, or loaded and the documents counted) ---
    docs = lambda: iter_documents(files, label)  # noqa: E731
    with _choose_tokenizer(docs, tokenizer_dir, vocab_size, model, progress, check) as (chosen, n_docs):
        tok = chosen.tok
        vocab = tok.vocab_size
        if n_docs < 2:
            raise OdysseyError(
                f"the corpus {label} has only {n_docs} document; prepare-data needs at least 2 "
                f"(one is held out for validation); add documents or separate them with "
                f"{EOT_LINE} lines"
            )
        is_val = _split(n_docs, val_fraction, seed)
        dtype = token_dtype(vocab)

        # --- pass 2: encode in batches, append to train.bin / val.bin; then tokenizer files, manifest ---
        with _output_dir(out, chosen.files) as written:
            counts = _write_tokens(out, tok, iter_documents(files, label), label, is_val, dtype, progress)
            written += [out / "train.bin", out / "val.bin"]
            write_tokenizer_files(chosen.files, out, written)
            seconds = time.perf_counter() - t0
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "layout": "stream",
                "dtype": dtype.name,
                "vocab_size": vocab,
                "bos_id": tok.bos_id,
                "eos_id": tok.eos_id,
                "unk_id": tok.unk_id,
                "adds_bos": tok.adds_bos,
                "document_layout": f"{tok.document_layout()}, documents concatenated",
                "splits": {s: {"file": f"{s}.bin", **counts[s]} for s in SPLITS},
                "documents": n_docs,
                "sources": [str(p) for p in inputs],
                "source_files": len(files),
                "tokenizer_sha256": hashlib.sha256(chosen.files["tokenizer.json"]).hexdigest(),
                "tokenizer_origin": chosen.origin,
                "tokenizer_class": type(tok.hf).__name__,
                "model_vocab_size": model.vocab_size if model is not None else None,
                "val_fraction": val_fraction,
                "seed": seed,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_json(out / "manifest.json", manifest)

        if model is not None:
            model.add_tokenizer(chosen, tok)
    return _report(out, n_docs, counts, vocab, dtype, chosen.origin, seconds)


# --------------------------------------------------------------------------------------------
# checks before any work


def _check_options(
    vocab_size: int | None,
    tokenizer_dir: str | os.PathLike | None,
    val_fraction: float,
    model_store: str | os.PathLike | None,
    replace_tokenizer: bool,
) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise OdysseyError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise OdysseyError(
            f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
            f"{MIN_VOCAB_SIZE - 256} special tokens), got {vocab_size}"
        )
    if vocab_size is not None and tokenizer_dir is not None:
        raise OdysseyError("--vocab-size trains a new tokenizer and --tokenizer reuses one; give only one")
    if replace_tokenizer and model_store is None:
        raise OdysseyError("--replace-tokenizer replaces the tokenizer of a model store; name it with --model STORE")
    if replace_tokenizer and vocab_size is None and tokenizer_dir is None:
        raise OdysseyError(
            "--replace-tokenizer needs the new tokenizer: --tokenizer DIR (an existing one) "
            "or --vocab-size N (train one)"
        )


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


def _tokenizer_source(path: Path) -> Path:
    """The directory --tokenizer names, refused in one line when it holds no tokenizer: a model store
    without one is named as such."""
    directory = tokenizer_dir(path)
    if not path.exists():
        raise OdysseyError(f"--tokenizer {path} does not exist; name a directory that holds tokenizer.json")
    if directory.is_dir() and not (directory / "tokenizer.json").is_file():
        if (directory / "config.json").is_file():
            raise OdysseyError(
                f"model store {directory} has no tokenizer (no tokenizer.json); give --tokenizer the "
                f"checkpoint folder the model came from, or import the model again with its tokenizer files"
            )
        raise OdysseyError(
            f"--tokenizer {directory} holds no tokenizer.json; name a checkpoint folder, a model store "
            f"or a data directory that has one"
        )
    return directory


# --------------------------------------------------------------------------------------------
# pass 1: the tokenizer


@dataclass(frozen=True)
class _ChosenTokenizer:
    tok: ModelTokenizer
    files: dict[str, bytes]  # the tokenizer files as they are written: a loaded tokenizer's bytes as is
    origin: str  # the file it was loaded from, or how it was trained
    trained: bool = False


class _Counted:
    """Iterates `docs` once, counting them in `n`."""

    def __init__(self, docs: Iterator[str]):
        self.docs, self.n = docs, 0

    def __iter__(self) -> Iterator[str]:
        for d in self.docs:
            self.n += 1
            yield d


@dataclass(frozen=True)
class Job:
    """What prepare_data has checked and found, handed to the examples layout's driver."""

    inputs: list[Path]
    out: Path
    files: list[Path]
    label: str
    file_formats: dict[Path, str]
    keys: Keys
    tokenizer_dir: str | os.PathLike | None
    vocab_size: int | None
    model: ModelStore | None
    check: Callable[[_ChosenTokenizer], None]


def _source_dir(
    tokenizer_dir: str | os.PathLike | None, vocab_size: int | None, model: ModelStore | None
) -> Path | None:
    """The directory of the tokenizer to load (see `prepare_data`), None to train one."""
    if tokenizer_dir is not None:
        return _tokenizer_source(Path(tokenizer_dir))
    if vocab_size is None and model is not None and model.has_tokenizer:
        return model.root
    return None


def _loaded(source: Path, check: Callable[[_ChosenTokenizer], None]) -> _ChosenTokenizer:
    tok = load_model_tokenizer(source)
    chosen = _ChosenTokenizer(tok, read_tokenizer_files(source), str(tok.path))
    check(chosen)
    return chosen


@contextlib.contextmanager
def _choose_tokenizer(
    documents: Callable[[], Iterator[str]],
    tokenizer_dir: str | os.PathLike | None,
    vocab_size: int | None,
    model: ModelStore | None,
    progress: bool,
    check: Callable[[_ChosenTokenizer], None],
) -> Iterator[tuple[_ChosenTokenizer, int]]:
    """The tokenizer (see `prepare_data`), given to `check` as soon as it exists, and the number of
    documents in the corpus: one pass over `documents()`."""
    source = _source_dir(tokenizer_dir, vocab_size, model)
    if source is not None:
        chosen = _loaded(source, check)
        docs = _Counted(documents())
        for _ in docs:
            pass
        yield chosen, docs.n
        return
    docs = _Counted(documents())
    with _trained(docs, vocab_size, model, progress, check) as chosen:
        yield chosen, docs.n


@contextlib.contextmanager
def _trained(
    docs: Iterable[str],
    vocab_size: int | None,
    model: ModelStore | None,
    progress: bool,
    check: Callable[[_ChosenTokenizer], None],
) -> Iterator[_ChosenTokenizer]:
    """A byte-level BPE trained on `docs`, loaded back from its files (in a temporary directory,
    alive while the block runs), given to `check`."""
    target = vocab_size or (model.vocab_size if model is not None else None) or DEFAULT_VOCAB_SIZE
    shown: Iterable[str] = docs
    if progress:
        from tqdm import tqdm

        shown = tqdm(docs, desc="training tokenizer", unit=" docs", leave=False)
    trained = train_tokenizer(shown, target, progress=False)
    tok_files = {"tokenizer.json": (trained.to_str(pretty=True) + "\n").encode(), **hf_side_files()}
    # loaded back from its files, exactly as every later reader (train, generate, export) loads it
    with tempfile.TemporaryDirectory(prefix="odyssey-tokenizer-") as tmp:
        for name, data in tok_files.items():
            (Path(tmp) / name).write_bytes(data)
        chosen = _ChosenTokenizer(
            load_model_tokenizer(tmp), tok_files, f"trained (byte-level BPE, asked {target})", True
        )
        check(chosen)
        yield chosen


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
def _output_dir(out: Path, tok_files: dict[str, bytes]) -> Iterator[list[Path]]:
    """Create `out` if needed and remove its stale manifest (and tokenizer files of an earlier run
    that this tokenizer lacks); yield a list for the paths the caller writes. If the block fails,
    those paths are removed (and `out`, if created here)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out, OUTPUT_FILES)  # left by a killed prepare-data
    with contextlib.suppress(FileNotFoundError):
        (out / "manifest.json").unlink()  # a stale manifest must not vouch for new token files
    for name in TOKENIZER_FILES + EXAMPLE_FILES:  # EXAMPLE_FILES: the caller writes them again, or none
        if name not in tok_files:
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()  # e.g. the chat template of the tokenizer used last time
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
    tok: ModelTokenizer,
    docs: Iterator[str],
    label: str,
    is_val: np.ndarray,
    dtype: np.dtype,
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
            writer = TokenWriter({"train": f_train, "val": f_val}, is_val, dtype, tok.eos_id)
            for batch in _batches(docs):
                encoded = tok.encode_batch(batch)  # as tokenizer(text)["input_ids"]: BOS where it adds one
                if writer.documents + len(encoded) > n_docs:
                    raise OdysseyError(f"the corpus {label} changed while it was read; run again")
                writer.append(encoded)
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
