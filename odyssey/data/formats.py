"""Data formats: records of .jsonl, .json, .parquet and .csv files as conversations or documents.

A record is one JSON object (a .jsonl line, an element of a .json array) or one row (.parquet,
.csv; read with pyarrow, imported only for those files). Its format is one of:

    chat         {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
                 (OpenAI / Hugging Face style; content a string or a list of {"type": "text",
                 "text": ...} parts), or ShareGPT's {"conversations": [{"from": "human"|"gpt"|
                 "system", "value": ...}]}; an optional system turn first, then user and assistant
                 turns alternating from a user turn, ending with an assistant turn
    completions  {"prompt": ..., "completion": ...} (the keys renamed by --prompt-key/--completion-key):
                 one user turn and one assistant turn
    alpaca       {"instruction": ..., "input": ... (optional), "output": ...}: one user turn
                 "instruction\\n\\ninput" (the instruction alone when input is empty), one assistant turn
    text         {"text": ...}: a document (and every .txt file)

`--format auto` (the default) takes each file's format from its first record, and every later
record of the file must have the same one. In a .csv file, a messages/conversations cell holds
that list as JSON. Every refusal is one line naming the file and the line (.jsonl, .json) or the
row (.parquet, .csv: row 1 is the first after the header) and what is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from odyssey.errors import OdysseyError

FORMATS = ("chat", "completions", "alpaca", "text")
EXAMPLE_FORMATS = ("chat", "completions", "alpaca")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_ROWS_PER_BATCH = 1024  # rows per pyarrow batch: a parquet/csv file streams through


@dataclass(frozen=True)
class Keys:
    """The record keys of the completions format (--prompt-key, --completion-key)."""

    prompt: str = "prompt"
    completion: str = "completion"


@dataclass(frozen=True)
class Example:
    """A conversation ready for the chat template, and where it came from ("FILE:LINE", "FILE row N")."""

    messages: list[dict]
    where: str
    format: str


# --------------------------------------------------------------------------------------------
# records


def iter_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) of each record of `path` (.jsonl, .json, .parquet, .csv), in order."""
    suffix = path.suffix
    try:
        if suffix == ".jsonl":
            yield from _jsonl_records(path)
        elif suffix == ".json":
            yield from _json_records(path)
        elif suffix == ".parquet":
            yield from _parquet_records(path)
        elif suffix == ".csv":
            yield from _csv_records(path)
        else:
            raise OdysseyError(f"{path}: records are read from {', '.join(RECORD_SUFFIXES)} files, not {suffix!r}")
    except UnicodeDecodeError as e:
        raise OdysseyError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise OdysseyError(
                    f"{path}:{lineno} is not valid JSON ({e.msg}); each line of a .jsonl file must be one JSON object"
                ) from None


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    """The elements of a JSON array, each with the line it starts on (the file is read whole)."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    fix = "a .json file must hold one array of JSON objects (use .jsonl for one object per line)"

    def bad(pos: int, what: str) -> OdysseyError:
        return OdysseyError(f"{path}:{text.count(chr(10), 0, pos) + 1} {what}; {fix}")

    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise bad(pos, "does not start a JSON array")
    pos = _skip_space(text, pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise bad(e.pos, f"is not valid JSON ({e.msg})") from None
        yield f"{path}:{text.count(chr(10), 0, pos) + 1}", obj
        pos = _skip_space(text, end)
        if text.startswith("]", pos):
            if _skip_space(text, pos + 1) != len(text):
                raise bad(pos, "has more after the array's end")
            return
        if not text.startswith(",", pos):
            raise bad(pos, "is not valid JSON (expected ',' or ']' between elements)")
        pos = _skip_space(text, pos + 1)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parquet_records(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
        row = 0
        for batch in reader.iter_batches(batch_size=_ROWS_PER_BATCH):
            for rec in batch.to_pylist():
                row += 1
                yield f"{path} row {row}", rec
    except (pa.ArrowException, OSError) as e:
        raise OdysseyError(f"{path} cannot be read as Parquet ({_first_line(e)}); write it again") from None


def _csv_records(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    from pyarrow import csv

    parse = csv.ParseOptions(newlines_in_values=True)
    try:  # every column read as text: a column of numbers is still the strings the file holds
        names = csv.open_csv(path, parse_options=parse).schema.names
        convert = csv.ConvertOptions(column_types={n: pa.string() for n in names})
        reader = csv.open_csv(path, parse_options=parse, convert_options=convert)
        row = 0
        for batch in reader:
            for rec in batch.to_pylist():
                row += 1
                yield f"{path} row {row}", rec
    except (pa.ArrowException, OSError) as e:
        raise OdysseyError(f"{path} cannot be read as CSV ({_first_line(e)}); write it again") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --------------------------------------------------------------------------------------------
# formats


def fits(record: object, fmt: str, keys: Keys) -> bool:
    """The record has the keys of format `fmt`."""
    if not isinstance(record, dict):
        return False
    return {
        "chat": lambda: "messages" in record or "conversations" in record,
        "completions": lambda: keys.prompt in record and keys.completion in record,
        "alpaca": lambda: "instruction" in record and "output" in record,
        "text": lambda: "text" in record,
    }[fmt]()


def detect(record: object, keys: Keys) -> str | None:
    """The format a record has by its keys (the first of FORMATS it fits), None if none."""
    return next((fmt for fmt in FORMATS if fits(record, fmt, keys)), None)


def _needs(fmt: str, keys: Keys) -> str:
    return {
        "chat": '"messages" (or ShareGPT "conversations")',
        "completions": f'"{keys.prompt}" and "{keys.completion}"',
        "alpaca": '"instruction" and "output"',
        "text": '"text"',
    }[fmt]


def _keys_found(record: object) -> str:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    return "keys found: " + (", ".join(repr(k) for k in list(record)[:8]) or "none")


def file_format(path: Path, forced: str, keys: Keys) -> str:
    """The format of `path`: "text" for .txt, `forced` unless "auto", else its first record's."""
    if path.suffix == ".txt":
        if forced not in ("auto", "text"):
            raise OdysseyError(f"{path} is plain text, which is --format text, not {forced}; give {forced} data")
        return "text"
    if forced != "auto":
        return forced
    for where, record in iter_records(path):
        fmt = detect(record, keys)
        if fmt is None:
            raise _fits_none(where, record, keys)
        return fmt
    raise OdysseyError(f"{path} holds no records; remove it or add data")


def _fits_none(where: str, record: object, keys: Keys) -> OdysseyError:
    return OdysseyError(
        f"{where} fits no data format ({_keys_found(record)}); a record needs {_needs('chat', keys)}, "
        f"{_needs('completions', keys)}, {_needs('alpaca', keys)}, or {_needs('text', keys)}"
    )


def iter_examples(path: Path, fmt: str, keys: Keys) -> Iterator[Example]:
    """The examples of `path` (of format `fmt`, not "text"), each validated (one line naming the
    record where one is refused)."""
    for where, record in iter_records(path):
        got = fmt if fits(record, fmt, keys) else detect(record, keys)
        if got is None:
            raise OdysseyError(
                f"{where} fits no data format ({_keys_found(record)}); {path} holds {fmt} data, "
                f"which needs {_needs(fmt, keys)}"
            )
        if got != fmt:
            raise OdysseyError(
                f"{where} is {got} data but {path} holds {fmt} data (its first record, or --format); "
                f"a file must hold one format: put the {got} records in a file of their own"
            )
        yield Example(_messages(record, fmt, keys, where), where, fmt)


def iter_texts(path: Path, keys: Keys) -> Iterator[str]:
    """The documents ("text" records, stripped, non-empty) of a .json/.parquet/.csv file."""
    for where, record in iter_records(path):
        got = "text" if fits(record, "text", keys) else detect(record, keys)
        if got != "text":
            if got is None:
                raise OdysseyError(f'{where} has no "text" field ({_keys_found(record)}); give text records')
            raise OdysseyError(
                f"{where} is {got} data but {path} holds text; a file must hold one format: "
                f"put the {got} records in a file of their own"
            )
        text = record["text"]
        if not isinstance(text, str):
            raise OdysseyError(f'{where}: "text" is {type(text).__name__}, not a string')
        if text.strip():
            yield text.strip()


def _text(value: object, where: str, what: str) -> str:
    """A content value as a string: a string, or a list of OpenAI-style text parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for p in value:
            if p.get("type", "text") != "text" or not isinstance(p.get("text"), str):
                raise OdysseyError(
                    f"{where}: {what} has a part of type {p.get('type')!r}; only text parts "
                    f'({{"type": "text", "text": "..."}}) can be trained on'
                )
            parts.append(p["text"])
        return "".join(parts)
    shown = "null" if value is None else type(value).__name__
    raise OdysseyError(f"{where}: {what} is {shown}, not a string; give it as text")


def _messages(record: dict, fmt: str, keys: Keys, where: str) -> list[dict]:
    if fmt == "completions":
        prompt = _text(record[keys.prompt], where, f'"{keys.prompt}"')
        answer = _text(record[keys.completion], where, f'"{keys.completion}"')
        if not answer.strip():
            raise OdysseyError(f'{where}: "{keys.completion}" is empty; every example needs an answer to train on')
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if fmt == "alpaca":
        instruction = _text(record["instruction"], where, '"instruction"')
        extra = record.get("input")
        extra = "" if extra is None else _text(extra, where, '"input"')
        answer = _text(record["output"], where, '"output"')
        if not instruction.strip():
            raise OdysseyError(f'{where}: "instruction" is empty; every example needs a question')
        if not answer.strip():
            raise OdysseyError(f'{where}: "output" is empty; every example needs an answer to train on')
        question = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return _chat_messages(record, where)


def _chat_messages(record: dict, where: str) -> list[dict]:
    sharegpt = "messages" not in record
    key = "conversations" if sharegpt else "messages"
    turns = record[key]
    if isinstance(turns, str):  # a .csv cell holds the list as JSON
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise OdysseyError(
                f'{where}: "{key}" is text but not a JSON list ({e.msg}); give it as a JSON list'
            ) from None
    if not isinstance(turns, list) or not turns:
        raise OdysseyError(f'{where}: "{key}" must be a non-empty list of turns')
    messages = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise OdysseyError(f'{where}: turn {n} of "{key}" is {type(turn).__name__}, not an object')
        if sharegpt:
            role = SHAREGPT_ROLES.get(turn.get("from"))
            if role is None:
                raise OdysseyError(
                    f'{where}: turn {n} has "from": {turn.get("from")!r}; ShareGPT turns are from '
                    f"{', '.join(repr(r) for r in SHAREGPT_ROLES)}"
                )
            content = turn.get("value")
        else:
            role = turn.get("role")
            if role not in ROLES:
                raise OdysseyError(f"{where}: turn {n} has role {role!r}; roles are {', '.join(ROLES)}")
            content = turn.get("content")
        messages.append({"role": role, "content": _text(content, where, f"the content of turn {n} ({role})")})
    _check_order(messages, where)
    return messages


def _check_order(messages: list[dict], where: str) -> None:
    """An optional system turn first, then user/assistant alternating from user, ending with assistant."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise OdysseyError(f"{where}: the conversation has no assistant turn, so nothing to train on; add the answer")
    body = roles[1:] if roles[0] == "system" else roles
    for n, role in enumerate(body):
        want = "user" if n % 2 == 0 else "assistant"
        if role != want:
            at = n + 1 + (roles[0] == "system")
            raise OdysseyError(
                f"{where}: roles out of order at turn {at} ({role}, expected {want}): a conversation is an "
                f"optional system turn, then user and assistant turns alternating from a user turn"
            )
    if body[-1] != "assistant":
        raise OdysseyError(f"{where}: the conversation ends with a {body[-1]} turn; it must end with the assistant's")
    for n, m in enumerate(messages, 1):
        if m["role"] == "assistant" and not m["content"].strip():
            raise OdysseyError(f"{where}: turn {n} (assistant) is empty; every answer needs text to train on")


def resolve_formats(
    files: list[Path], forced: str, keys: Keys, chat_template: str | os.PathLike | None = None
) -> dict[Path, str]:
    """{file: format} of a corpus (see `file_format`): text in every file, or examples in every
    file (chat, completions and alpaca files may be mixed). Refused in one line: a corpus mixing
    text with examples, --chat-template for text, chat data with --chat-template none."""
    if forced not in ("auto", *FORMATS):
        raise OdysseyError(f"--format must be one of auto, {', '.join(FORMATS)}; got {forced!r}")
    if not keys.prompt or not keys.completion or keys.prompt == keys.completion:
        raise OdysseyError(
            f"--prompt-key and --completion-key must be two different names, "
            f"got {keys.prompt!r} and {keys.completion!r}"
        )
    formats = {f: file_format(f, forced, keys) for f in files}
    text = [f for f, fmt in formats.items() if fmt == "text"]
    examples = [f for f, fmt in formats.items() if fmt != "text"]
    if text and examples:
        raise OdysseyError(
            f"{examples[0]} holds {formats[examples[0]]} data but {text[0]} holds text; prepare text and "
            f"conversations into separate data directories (name the files, or use --format)"
        )
    if text and chat_template is not None:
        raise OdysseyError(f"--chat-template applies to chat, completions and alpaca data; {text[0]} holds text")
    chat = [f for f in examples if formats[f] == "chat"]
    if chat and chat_template is not None and str(chat_template) == "none":
        raise OdysseyError(
            f"{chat[0]} holds conversations, which need a chat template; drop --chat-template none "
            f"(none is for prompt/completion and alpaca data)"
        )
    return formats
