"""The examples layout: conversations -> token ids, loss masks and example offsets (prepare-data).

Per split S (train, val), beside the manifest (format version FORMAT_VERSION, "layout": "examples"):

    S.bin    token ids of the examples back to back (uint16, or uint32 for a vocabulary over 65535),
             each example exactly as its chat template renders and tokenizes it (odyssey.data.templates;
             with --chat-template none: the prompt's ids, the completion's, EOS)
    S.mask   uint8, one byte per token of S.bin: 1 where the token is a trained target (the loss of
             predicting it from the token before counts), else 0; the first token of an example is 0
    S.idx    int64, examples + 1 offsets into S.bin: example k is tokens[idx[k]:idx[k+1]], idx[0] = 0

An example longer than seq_len + 1 tokens is truncated to its first seq_len + 1 (`too_long`
"truncate") or dropped ("drop"); an example left with no trained token is dropped. Examples go to
train or val whole (a seeded random choice among those kept, at least one in val). Two passes: the
first validates every record, chooses (or trains) the tokenizer and the template, encodes every
example and counts; nothing is written before it ends. The second encodes again and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from odyssey import atomic
from odyssey.atomic import atomic_open, write_json
from odyssey.data.formats import Example, iter_examples
from odyssey.data.prepare import (
    Job,
    _ChosenTokenizer,
    _loaded,
    _output_dir,
    _source_dir,
    _split,
    _trained,
)
from odyssey.data.templates import DEFAULT_ORIGIN, OWN_ORIGIN, TRAIN_ON, ChatTemplate, load_chat_template
from odyssey.data.tokens import FORMAT, FORMAT_VERSION, SPLITS, token_dtype
from odyssey.errors import OdysseyError
from odyssey.tokenizer import (
    CHAT_TOKENS,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    hf_side_files,
    train_tokenizer,
    write_tokenizer_files,
)

TOO_LONG = ("truncate", "drop")


def check_options(train_on: str, too_long: str, seq_len: int) -> None:
    if train_on not in TRAIN_ON:
        raise OdysseyError(f"--train-on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if too_long not in TOO_LONG:
        raise OdysseyError(f"--too-long must be one of {', '.join(TOO_LONG)}, got {too_long!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise OdysseyError(f"--seq-len must be a positive integer, got {seq_len!r}")


class ExampleWriter:
    """Appends examples (ids and mask) to the open S.bin, S.mask and S.idx files of each split."""

    def __init__(self, sinks: dict[str, dict[str, BinaryIO]], dtype: np.dtype):
        self.sinks, self.dtype = sinks, dtype
        self.counts = {s: {"tokens": 0, "documents": 0, "trained_tokens": 0} for s in SPLITS}
        for s in SPLITS:
            np.zeros(1, dtype=np.int64).tofile(sinks[s]["idx"])  # idx[0] = 0

    def append(self, split: str, ids: list[int], mask: list[int]) -> None:
        sink, c = self.sinks[split], self.counts[split]
        np.asarray(ids, dtype=self.dtype).tofile(sink["bin"])
        np.asarray(mask, dtype=np.uint8).tofile(sink["mask"])
        c["tokens"] += len(ids)
        c["documents"] += 1
        c["trained_tokens"] += sum(mask)
        np.asarray([c["tokens"]], dtype=np.int64).tofile(sink["idx"])


def prepare_examples(
    job: Job,
    common: dict,
    chat_template: str | Path | None,
    mask_prompt: bool,
    train_on: str,
    seq_len: int,
    too_long: str,
    t0: float,
) -> dict:
    """prepare-data for chat, completions and alpaca data (`job` as prepare_data found it; `common`:
    val_fraction, seed, progress, replace_tokenizer); returns the summary it prints."""
    check_options(train_on, too_long, seq_len)
    model, progress = job.model, common["progress"]

    def examples() -> Iterator[Example]:
        for path in job.files:
            yield from iter_examples(path, job.file_formats[path], job.keys)

    # --- pass 1: every record valid; the tokenizer and template; every example encoded and counted ---
    n_records = sum(1 for _ in examples())
    if n_records == 0:
        raise OdysseyError(f"no examples found in {job.label}; the files hold no records")
    with _tokenizer(job, examples, chat_template, progress) as chosen:
        model_vocab = model.vocab_size if model is not None else None
        template = load_chat_template(chosen.tok.directory, chat_template, model_vocab, tok=chosen.tok)
        tok = template.tok  # the chosen one (checked against the model), or it with the ChatML tokens that fit
        encode = _encoder(template, train_on, mask_prompt, seq_len, too_long)
        keep, stats = _count(examples(), encode, n_records, progress)
        n = int(keep.sum())
        if stats["trained_tokens"] == 0:
            raise OdysseyError(
                f"no example of {job.label} keeps a trained token (the mask leaves nothing to train on; "
                f"{stats['dropped']} of {n_records} dropped at --seq-len {seq_len}); raise --seq-len or use "
                f"--too-long truncate"
            )
        if n < 2:
            raise OdysseyError(
                f"{job.label} has only {n} usable example (of {n_records}); prepare-data needs at least 2 "
                f"(one is held out for validation); add examples or raise --seq-len"
            )
        is_val = _split(n, common["val_fraction"], common["seed"])
        dtype = token_dtype(tok.vocab_size)
        files_out = dict(template.tokenizer_files or chosen.files)
        if not template.is_none and template.origin != OWN_ORIGIN:
            files_out["chat_template.jinja"] = template.source.encode()
        chosen_out = _ChosenTokenizer(tok, files_out, chosen.origin, chosen.trained)

        # --- pass 2: encode again, write S.bin / S.mask / S.idx; then tokenizer files, manifest ---
        out = job.out
        with _output_dir(out, files_out) as written:
            counts = _write(out, examples(), encode, keep, is_val, dtype, progress, job.label)
            written += [out / f"{s}.{ext}" for s in SPLITS for ext in ("bin", "mask", "idx")]
            write_tokenizer_files(files_out, out, written)
            seconds = time.perf_counter() - t0
            opts = {"mask_prompt": mask_prompt, "train_on": train_on, "seq_len": seq_len, "too_long": too_long}
            manifest = _manifest(job, common, opts, chosen_out, template, counts, dtype, stats, n)
            write_json(out / "manifest.json", manifest)
            if template.added_tokens and model is None:
                print(f"added {_added(template)} to the tokenizer written to {out} (the default ChatML template's)")
        if model is not None:
            _update_store(job, chosen, chosen_out, template)
        return _report(out, n, counts, tok.vocab_size, dtype, chosen.origin, template, stats, seconds, job)


# --------------------------------------------------------------------------------------------
# pass 1


@contextlib.contextmanager
def _tokenizer(
    job: Job, examples: Callable[[], Iterator[Example]], override: str | Path | None, progress: bool
) -> Iterator[_ChosenTokenizer]:
    """The tokenizer to load (see prepare_data), or one trained on the rendered examples."""
    source = _source_dir(job.tokenizer_dir, job.vocab_size, job.model)
    if source is not None:
        yield _loaded(source, job.check)
        return
    with _trained(_rendered(examples, override), job.vocab_size, job.model, progress, job.check) as chosen:
        yield chosen


def _rendered(examples: Callable[[], Iterator[Example]], override: str | Path | None) -> Iterator[str]:
    """The examples as the template renders them, with the special tokens' text left out: the text
    a new tokenizer is trained on (rendered with a bare tokenizer that has the same special tokens)."""
    with tempfile.TemporaryDirectory(prefix="odyssey-renderer-") as tmp:
        train_tokenizer([], MIN_VOCAB_SIZE).save(str(Path(tmp) / "tokenizer.json"))
        for name, data in hf_side_files().items():
            (Path(tmp) / name).write_bytes(data)
        renderer = load_chat_template(tmp, override)
        for ex in examples():
            if renderer.is_none:
                yield from (m["content"] for m in ex.messages)
                continue
            text = renderer.render(ex.messages)
            for special in CHAT_TOKENS + SPECIAL_TOKENS:
                text = text.replace(special, "\n")
            yield text


def _encoder(
    template: ChatTemplate, train_on: str, mask_prompt: bool, seq_len: int, too_long: str
) -> Callable[[Example], tuple[list[int], list[int], str]]:
    """example -> (ids, mask, "kept" | "truncated" | "dropped")."""
    limit = seq_len + 1  # a window of seq_len inputs holds seq_len + 1 tokens

    def encode(ex: Example) -> tuple[list[int], list[int], str]:
        try:
            ids, mask = template.encode_example(ex.messages, train_on, mask_prompt)
        except OdysseyError as e:
            raise OdysseyError(f"{ex.where}: {e}") from None
        status = "kept"
        if len(ids) > limit:
            if too_long == "drop":
                return ids, mask, "dropped"
            ids, mask, status = ids[:limit], mask[:limit], "truncated"
        if not any(mask):
            return ids, mask, "dropped"  # nothing left to train on
        return ids, mask, status

    return encode


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=" examples", leave=False)


def _count(examples: Iterator[Example], encode, n_records: int, progress: bool) -> tuple[np.ndarray, dict]:
    """keep[k] (bool) for each example, and the counts: tokens, trained tokens, truncated, dropped."""
    keep = np.zeros(n_records, dtype=bool)
    stats = {"tokens": 0, "trained_tokens": 0, "truncated": 0, "dropped": 0}
    with _bar(n_records, "encoding (pass 1 of 2)", progress) as bar:
        for k, ex in enumerate(examples):
            if k >= n_records:
                raise OdysseyError(f"{ex.where}: the data changed while it was read; run again")
            ids, mask, status = encode(ex)
            if status == "dropped":
                stats["dropped"] += 1
            else:
                keep[k] = True
                stats["truncated"] += status == "truncated"
                stats["tokens"] += len(ids)
                stats["trained_tokens"] += sum(mask)
            if bar is not None:
                bar.update(1)
    return keep, stats


# --------------------------------------------------------------------------------------------
# pass 2 and the outputs


def _write(
    out: Path,
    examples: Iterator[Example],
    encode,
    keep: np.ndarray,
    is_val: np.ndarray,
    dtype: np.dtype,
    progress: bool,
    label: str,
) -> dict:
    changed = OdysseyError(f"the data {label} changed while it was read; run again")
    with contextlib.ExitStack() as stack, _bar(len(keep), "encoding (pass 2 of 2)", progress) as bar:
        sinks = {
            s: {ext: stack.enter_context(atomic_open(out / f"{s}.{ext}")) for ext in ("bin", "mask", "idx")}
            for s in SPLITS
        }
        writer = ExampleWriter(sinks, dtype)
        kept = 0
        for k, ex in enumerate(examples):
            if k >= len(keep):
                raise changed
            if keep[k]:
                ids, mask, status = encode(ex)
                if status == "dropped":
                    raise changed
                writer.append("val" if is_val[kept] else "train", ids, mask)
                kept += 1
            if bar is not None:
                bar.update(1)
        if kept != len(is_val):
            raise changed
    return writer.counts


def _manifest(job: Job, common: dict, opts: dict, chosen: _ChosenTokenizer, template: ChatTemplate, *rest) -> dict:
    counts, dtype, stats, n = rest
    tok = chosen.tok
    formats = sorted(set(job.file_formats.values()))
    source = template.source
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": "examples",
        "data_format": "+".join(formats),  # one of chat, completions, alpaca (files may mix them: "alpaca+chat")
        "mask_prompt": opts["mask_prompt"],
        "train_on": opts["train_on"],
        "chat_template": template.origin,
        "chat_template_sha256": None if source is None else hashlib.sha256(source.encode()).hexdigest(),
        "eot_ids": template.eot_ids,
        "prepared_seq_len": opts["seq_len"],
        "too_long": opts["too_long"],
        "truncated": stats["truncated"],
        "dropped": stats["dropped"],
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "unk_id": tok.unk_id,
        "adds_bos": tok.adds_bos,
        "document_layout": "examples as the chat template renders them, each whole (S.idx), with a loss mask (S.mask)",
        "splits": {
            s: {"file": f"{s}.bin", "mask_file": f"{s}.mask", "index_file": f"{s}.idx", **counts[s]} for s in SPLITS
        },
        "documents": n,
        "sources": [str(p) for p in job.inputs],
        "source_files": len(job.files),
        "tokenizer_sha256": hashlib.sha256(chosen.files["tokenizer.json"]).hexdigest(),
        "tokenizer_origin": chosen.origin,
        "tokenizer_class": type(tok.hf).__name__,
        "model_vocab_size": job.model.vocab_size if job.model is not None else None,
        "val_fraction": common["val_fraction"],
        "seed": common["seed"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _added(template: ChatTemplate) -> str:
    ids = [template.tok.hf.convert_tokens_to_ids(t) for t in template.added_tokens]
    return ", ".join(f"{t} (id {i})" for t, i in zip(template.added_tokens, ids, strict=True))


def _update_store(job: Job, chosen: _ChosenTokenizer, chosen_out: _ChosenTokenizer, template: ChatTemplate) -> None:
    """Give the --model store the tokenizer and template the data was made with: all of it where it
    has no tokenizer (or replaces its own); else the ChatML tokens appended to its tokenizer and the
    default template where it has no template. A template given with --chat-template goes only into
    the data directory of a store that has a template of its own."""
    model = job.model
    if model.gguf is not None:  # a GGUF's tokenizer is its metadata's: the data directory holds what changed
        return
    if not model.has_tokenizer or not model.holds(chosen):
        model.add_tokenizer(chosen_out, chosen_out.tok)
        return
    files = {}
    if template.added_tokens:
        files["tokenizer.json"] = chosen_out.files["tokenizer.json"]
    if template.origin != OWN_ORIGIN and not template.is_none and not (model.root / "chat_template.jinja").is_file():
        if template.origin == DEFAULT_ORIGIN or chosen.tok.chat_template is None:
            files["chat_template.jinja"] = chosen_out.files["chat_template.jinja"]
    if not files:
        return
    atomic.remove_stale_temps(model.root, TOKENIZER_FILES)  # left by a killed prepare-data
    write_tokenizer_files(files, model.root, [])
    what = [f"added {_added(template)} to its tokenizer"] if template.added_tokens else []
    if "chat_template.jinja" in files:
        what.append(f"wrote the chat template ({template.origin}) as chat_template.jinja")
    print(f"model store {model.root}: {' and '.join(what)}")


def _report(out, n, counts, vocab, dtype, origin, template, stats, seconds, job) -> dict:
    summary = {
        "out": str(out),
        "layout": "examples",
        "documents": n,
        "examples": n,
        "train_documents": counts["train"]["documents"],
        "val_documents": counts["val"]["documents"],
        "train_tokens": counts["train"]["tokens"],
        "val_tokens": counts["val"]["tokens"],
        "tokens": counts["train"]["tokens"] + counts["val"]["tokens"],
        "trained_tokens": counts["train"]["trained_tokens"] + counts["val"]["trained_tokens"],
        "truncated": stats["truncated"],
        "dropped": stats["dropped"],
        "vocab_size": vocab,
        "dtype": dtype.name,
        "tokenizer": origin,
        "chat_template": template.origin,
        "seconds": round(seconds, 2),
    }
    print(
        f"prepared {out}: {n:,} examples ({summary['train_documents']:,} train, {summary['val_documents']:,} val), "
        f"{summary['tokens']:,} tokens of which {summary['trained_tokens']:,} trained, "
        f"{stats['truncated']:,} truncated, {stats['dropped']:,} dropped; vocab {vocab:,} [{origin}], "
        f"template [{template.origin}], {dtype.name}, {seconds:.1f} s"
    )
    return summary
