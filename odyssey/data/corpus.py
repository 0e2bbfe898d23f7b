"""Reading a corpus: the documents of .txt and .jsonl files, in a fixed order, one at a time.

Corpus files: `.txt` (documents separated by lines `<|endoftext|>`, or by blank lines when the
file has no such line, TinyStories style) and `.jsonl` (one JSON object with a "text" per line).
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


def corpus_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
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
                f
                for f in path.rglob("*")
                if f.suffix in (".txt", ".jsonl")
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                raise OdysseyError(
                    f"directory {path} holds no .txt or .jsonl files; add text files (documents "
                    f'separated by {EOT_LINE} lines or blank lines) or .jsonl files with a "text" field'
                )
            files.extend(found)
        elif path.suffix in (".txt", ".jsonl"):
            files.append(path)
        else:
            raise OdysseyError(
                f"corpus file {path} is neither .txt nor .jsonl; rename it (.txt: plain text, "
                f'.jsonl: one JSON object with a "text" field per line)'
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


def iter_documents(files: list[Path], inputs_label: str) -> Iterator[str]:
    """Yield the documents of `files` (from `corpus_files`) in order; `inputs_label` names the corpus
    in the error raised when it holds no document at all. Each call reads the files again."""
    n = 0
    for path in files:
        reader = _jsonl_documents if path.suffix == ".jsonl" else _txt_documents
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
