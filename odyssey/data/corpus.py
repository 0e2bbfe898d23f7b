"""Reading a corpus: the documents of .txt, .jsonl, .json, .parquet and .csv files, in a fixed order.

Corpus files: `.txt` (documents separated by lines `<|endoftext|>`, or by blank lines when the
file has no such line, TinyStories style), `.jsonl` (one JSON object with a "text" per line), and
`.json`, `.parquet`, `.csv` records with a "text" (odyssey.data.formats, which also reads the
conversation formats of these files).
Named directories are searched recursively (hidden entries skipped). Documents are yielded as
the files are read, so a corpus larger than RAM streams through.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from odyssey.errors import OdysseyError

EOT_LINE = "<|endoftext|>"  # a .txt line that separates documents
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
_NAMES = ".txt, .jsonl, .json, .parquet or .csv"


def corpus_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The corpus files (SUFFIXES) named by `inputs` (files, or directories searched recursively)."""
    files: list[Path] = []
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise OdysseyError(f"no corpus given; name {_NAMES} files or directories holding them")
    for path in inputs:
        if not path.exists():
            raise OdysseyError(f"corpus path {path} does not exist; check the path given to prepare-data")
        if path.is_dir():
            found = sorted(
                f
                for f in path.rglob("*")
                if f.suffix in SUFFIXES
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                raise OdysseyError(
                    f"directory {path} holds no {_NAMES} files; add text files (documents "
                    f"separated by {EOT_LINE} lines or blank lines) or .jsonl/.json/.parquet/.csv records"
                )
            files.extend(found)
        elif path.suffix in SUFFIXES:
            files.append(path)
        else:
            raise OdysseyError(
                f"corpus file {path} is not {_NAMES}; rename it (.txt: plain text, .jsonl: one JSON "
                f"object per line, .json: an array of objects, .parquet/.csv: one record per row)"
            )
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
                raise OdysseyError(f'{path}:{lineno} has no "text" field; {fix}')
            if not isinstance(obj["text"], str):
                raise OdysseyError(f'{path}:{lineno}: "text" is {type(obj["text"]).__name__}, not a string; {fix}')
            text = obj["text"].strip()
            if text:
                yield text


def _record_documents(path: Path) -> Iterator[str]:
    from odyssey.data.formats import Keys, iter_texts

    return iter_texts(path, Keys())


def iter_documents(files: list[Path], inputs_label: str) -> Iterator[str]:
    """Yield the documents of `files` (from `corpus_files`) in order; `inputs_label` names the corpus
    in the error raised when it holds no document at all. Each call reads the files again."""
    n = 0
    for path in files:
        reader = {".jsonl": _jsonl_documents, ".txt": _txt_documents}.get(path.suffix, _record_documents)
        try:
            for doc in reader(path):
                n += 1
                yield doc
        except UnicodeDecodeError as e:
            raise OdysseyError(
                f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8"
            ) from None
    if n == 0:
        raise OdysseyError(
            f"no documents found in {inputs_label}; the corpus files are empty or hold only separators and blank lines"
        )


def read_documents(inputs: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Yield the documents (stripped, non-empty strings) of `inputs` in a fixed order.

    Paths are checked now (missing path, directory without corpus files -> OdysseyError); file
    contents as the iterator goes (bad .jsonl line, not UTF-8, no document at all -> OdysseyError).
    """
    inputs = list(inputs)
    files = corpus_files(inputs)
    return iter_documents(files, ", ".join(str(p) for p in inputs))
