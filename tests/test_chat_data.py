"""prepare-data on conversations: chat, completions and alpaca records from .jsonl, .json, .parquet
and .csv files into the examples layout (S.bin, S.mask, S.idx), checked against transformers'
apply_chat_template; key remapping, detection, truncate/drop, and the bad inputs (exit 2, one line
naming file and line, nothing written)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from odyssey import cli
from odyssey.data import prepare_data
from odyssey.data.prepare import _split
from odyssey.errors import OdysseyError
from tests.conftest import assert_user_error, run_cli

QA = [(f"What does cat {i} eat?", f"Cat {i} eats {['fish', 'rice', '김치'][i % 3]}.") for i in range(12)]


def _records(fmt: str) -> list[dict]:
    if fmt == "chat":
        return [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            if i % 2
            else {
                "messages": [
                    {"role": "system", "content": "Answer in one sentence."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                    {"role": "user", "content": "And then?"},
                    {"role": "assistant", "content": "It sleeps."},
                ]
            }
            for i, (q, a) in enumerate(QA)
        ]
    if fmt == "completions":
        return [{"prompt": q, "completion": a} for q, a in QA]
    return [{"instruction": q, "input": "" if i % 2 else "Be brief.", "output": a} for i, (q, a) in enumerate(QA)]


def _messages(fmt: str, rec: dict) -> list[dict]:
    """The conversation a record stands for, as the formats' documentation says."""
    if fmt == "chat":
        return rec["messages"]
    if fmt == "completions":
        return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]
    question = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": rec["output"]}]


def _write(path: Path, records: list[dict]) -> Path:
    """`records` as a .jsonl, .json (array), .parquet or .csv (lists as JSON text in their cells) file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    else:
        import pyarrow as pa

        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records), path)
        else:
            from pyarrow import csv

            rows = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records]
            csv.write_csv(pa.Table.from_pylist(rows), path)
    return path


def _expected(ref, messages: list[dict]) -> tuple[list[int], list[int]]:
    """ids by apply_chat_template; mask by hand: each assistant turn's tokens after its prompt's
    (apply_chat_template of the turns before, with the generation prompt) through <|im_end|>."""
    ids = list(ref.apply_chat_template(messages, tokenize=True, return_dict=False))
    mask = [0] * len(ids)
    end = ref.convert_tokens_to_ids("<|im_end|>")
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            p = len(ref.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True, return_dict=False))
            e = ids.index(end, p)
            mask[p : e + 1] = [1] * (e + 1 - p)
    return ids, mask


def _read_examples(out: Path, split: str, dtype=np.uint16) -> list[tuple[list[int], list[int]]]:
    ids = np.fromfile(out / f"{split}.bin", dtype=dtype)
    mask = np.fromfile(out / f"{split}.mask", dtype=np.uint8)
    idx = np.fromfile(out / f"{split}.idx", dtype=np.int64)
    assert idx[0] == 0 and idx[-1] == len(ids) == len(mask) and np.all(np.diff(idx) > 0)
    return [(ids[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(idx[:-1], idx[1:], strict=True)]


def _by_split(examples: list, n: int) -> dict[str, list]:
    is_val = _split(n, 0.05, 0)
    return {s: [e for e, v in zip(examples, is_val, strict=True) if v == (s == "val")] for s in ("train", "val")}


@pytest.fixture(scope="module")
def chatml(model_tokenizers) -> Path:
    return model_tokenizers["qwen"]  # a ChatML template of its own, EOS <|im_end|>


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_each_format_from_each_file_type_equals_apply_chat_template(tmp_path, chatml, suffix):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(chatml)
    for fmt in ("chat", "completions", "alpaca"):
        records = _records(fmt)
        src = _write(tmp_path / fmt / f"data{suffix}", records)
        out = tmp_path / f"out-{fmt}"
        summary = prepare_data([src], out, tokenizer_dir=chatml, progress=False)
        want = _by_split([_expected(ref, _messages(fmt, r)) for r in records], len(records))
        m = json.loads((out / "manifest.json").read_text())
        for split in ("train", "val"):
            assert _read_examples(out, split) == want[split], (fmt, suffix, split)
            info = m["splits"][split]
            assert info["trained_tokens"] == sum(sum(mk) for _, mk in want[split])
            assert info["documents"] == len(want[split]) and info["tokens"] == sum(len(i) for i, _ in want[split])
        assert m["layout"] == "examples" and m["data_format"] == fmt and summary["examples"] == len(records)
        assert m["eot_ids"][0] == ref.convert_tokens_to_ids("<|im_end|>")


def test_manifest_keys_and_sizes(tmp_path, chatml):
    src = _write(tmp_path / "c.jsonl", _records("chat"))
    out = tmp_path / "out"
    prepare_data([src], out, tokenizer_dir=chatml, progress=False, train_on="last", seq_len=64)
    m = json.loads((out / "manifest.json").read_text())
    for key in ("layout", "data_format", "mask_prompt", "train_on", "chat_template", "chat_template_sha256"):
        assert key in m, key
    assert (m["mask_prompt"], m["train_on"], m["prepared_seq_len"], m["too_long"]) == (True, "last", 64, "truncate")
    assert m["chat_template"] == "the store's own (tokenizer_config.json)" and len(m["chat_template_sha256"]) == 64
    for split in ("train", "val"):
        info = m["splits"][split]
        n = info["tokens"]
        assert (out / info["file"]).stat().st_size == 2 * n and (out / info["mask_file"]).stat().st_size == n
        assert (out / info["index_file"]).stat().st_size == 8 * (info["documents"] + 1)
        # train_on last: one trained run per example (the last answer, through <|im_end|>)
        for _, mask in _read_examples(out, split):
            starts = sum(1 for a, b in zip([0, *mask], mask, strict=False) if b and not a)
            assert starts == 1


def test_sharegpt_parts_and_remapped_keys_give_the_same_examples(tmp_path, chatml):
    plain = _records("chat")
    who = {"user": "human", "assistant": "gpt", "system": "system"}
    share = [{"conversations": [{"from": who[t["role"]], "value": t["content"]} for t in r["messages"]]} for r in plain]
    parts = [
        {"messages": [{**t, "content": [{"type": "text", "text": t["content"]}]} for t in r["messages"]]} for r in plain
    ]
    outs = {}
    for name, records in (("plain", plain), ("share", share), ("parts", parts)):
        prepare_data(
            [_write(tmp_path / f"{name}.jsonl", records)], tmp_path / name, tokenizer_dir=chatml, progress=False
        )
        outs[name] = _read_examples(tmp_path / name, "train")
    assert outs["plain"] == outs["share"] == outs["parts"]
    qa = [{"question": q, "answer": a} for q, a in QA]
    src = _write(tmp_path / "qa.jsonl", qa)
    with pytest.raises(OdysseyError, match=r"qa.jsonl:1 fits no data format \(keys found: 'question', 'answer'\)"):
        prepare_data([src], tmp_path / "qa", tokenizer_dir=chatml, progress=False)
    assert not (tmp_path / "qa").exists()
    prepare_data(
        [src], tmp_path / "qa", tokenizer_dir=chatml, progress=False, prompt_key="question", completion_key="answer"
    )
    prepare_data(
        [_write(tmp_path / "pc.jsonl", _records("completions"))], tmp_path / "pc", tokenizer_dir=chatml, progress=False
    )
    assert _read_examples(tmp_path / "qa", "train") == _read_examples(tmp_path / "pc", "train")


def test_default_template_trained_tokenizer_and_the_store(tmp_path):
    """No tokenizer anywhere: one is trained on the rendered examples, with the default ChatML; the
    store gets the tokenizer and the template, so `load_chat_template(store)` is the same."""
    from odyssey.data.templates import DEFAULT_TEMPLATE, load_chat_template
    from odyssey.store import init_store
    from tests.conftest import tiny_config

    init_store(tiny_config(vocab_size=400), tmp_path / "store", dtype="f32", progress=False)
    src = _write(tmp_path / "a.json", _records("alpaca"))
    summary = prepare_data([src], tmp_path / "out", model_store=tmp_path / "store", progress=False)
    assert summary["chat_template"] == "default ChatML" and summary["vocab_size"] <= 400
    for d in (tmp_path / "out", tmp_path / "store"):
        assert (d / "chat_template.jinja").read_text() == DEFAULT_TEMPLATE
    t = load_chat_template(tmp_path / "store")
    records = _records("alpaca")
    got = _read_examples(tmp_path / "out", "train") + _read_examples(tmp_path / "out", "val")
    want = [t.encode_example(_messages("alpaca", r)) for r in records]
    assert sorted(got) == sorted(want)
    assert all(
        t.tok.hf.decode([i for i, k in zip(ids, mk, strict=True) if k]).endswith("<|im_end|>") for ids, mk in got
    )


def test_template_none_and_no_mask_prompt(tmp_path, chatml):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(chatml)
    records = _records("completions")
    src = _write(tmp_path / "c.csv", records)
    prepare_data([src], tmp_path / "none", tokenizer_dir=chatml, chat_template="none", progress=False)
    want = []
    for r in records:
        p, c = ref(r["prompt"])["input_ids"], ref(r["completion"], add_special_tokens=False)["input_ids"]
        want.append((p + c + [ref.eos_token_id], [0] * len(p) + [1] * (len(c) + 1)))
    assert _read_examples(tmp_path / "none", "train") == _by_split(want, len(records))["train"]
    prepare_data([src], tmp_path / "all", tokenizer_dir=chatml, mask_prompt=False, progress=False)
    for ids, mask in _read_examples(tmp_path / "all", "train"):
        assert mask == [0] + [1] * (len(ids) - 1)


def test_truncate_and_drop(tmp_path, chatml):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(chatml)
    records = [{"prompt": "q " * (4 * i), "completion": "answer " * 3} for i in range(10)]
    lengths = [len(_expected(ref, _messages("completions", r))[0]) for r in records]
    prompts = [
        len(ref.apply_chat_template(_messages("completions", r)[:1], add_generation_prompt=True, return_dict=False))
        for r in records
    ]
    seq_len = 40
    src = _write(tmp_path / "c.jsonl", records)
    longer = sum(n > seq_len + 1 for n in lengths)
    nothing_left = sum(p >= seq_len + 1 for p in prompts)  # truncated into the prompt: no answer token
    assert longer > nothing_left > 0
    s = prepare_data([src], tmp_path / "t", tokenizer_dir=chatml, seq_len=seq_len, progress=False)
    assert (s["truncated"], s["dropped"], s["examples"]) == (longer - nothing_left, nothing_left, 10 - nothing_left)
    got = _read_examples(tmp_path / "t", "train") + _read_examples(tmp_path / "t", "val")
    assert max(len(i) for i, _ in got) == seq_len + 1 and all(any(m) for _, m in got)
    s = prepare_data([src], tmp_path / "d", tokenizer_dir=chatml, seq_len=seq_len, too_long="drop", progress=False)
    assert (s["truncated"], s["dropped"], s["examples"]) == (0, longer, 10 - longer)
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert (m["truncated"], m["dropped"], m["too_long"]) == (0, longer, "drop")


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _turn(role: str, content) -> dict:
    return {"role": role, "content": content}


def _chat(*turns: tuple[str, object]) -> list[dict]:
    return [{"messages": [_turn(r, c) for r, c in turns]}]


U, A, S = "user", "assistant", "system"
BAD = {  # name: (file, records put second, extra argv, what the line must name)
    "no-assistant": ("c.jsonl", _chat((U, "hi")), [], "c.jsonl:2: the conversation has no assistant"),
    "roles-out-of-order": ("c.json", _chat((A, "a"), (U, "q")), [], "c.json:26: roles out of order at turn 1"),
    "system-later": ("c.jsonl", _chat((U, "q"), (S, "s"), (A, "a")), [], "c.jsonl:2: roles out of order at turn 2"),
    "ends-with-user": (
        "c.jsonl",
        _chat((U, "q"), (A, "a"), (U, "q")),
        [],
        "c.jsonl:2: the conversation ends with a user",
    ),
    "empty-completion": ("p.csv", [{"prompt": "q", "completion": " "}], [], 'p.csv row 2: "completion" is empty'),
    "empty-output": (
        "a.parquet",
        [{"instruction": "q", "input": "", "output": ""}],
        [],
        'a.parquet row 2: "output" is',
    ),
    "content-not-string": ("c.jsonl", _chat((U, 5), (A, "a")), [], "c.jsonl:2: the content of turn 1 (user) is int"),
    "unknown-role": ("c.jsonl", _chat(("tool", "x"), (A, "a")), [], "c.jsonl:2: turn 1 has role 'tool'"),
    "fits-no-format": ("c.jsonl", [{"question": "q", "reply": "a"}], [], "c.jsonl:2 fits no data format (keys found:"),
    "mixing-formats": ("c.jsonl", [{"prompt": "q", "completion": "a"}], [], "c.jsonl:2 is completions data but"),
    "template-fails": ("c.jsonl", [], ["--chat-template", "{bad}"], "fails to render"),
    "no-trained-token": ("c.jsonl", [], ["--seq-len", "4"], "no example of"),
    "chat-with-none": ("c.jsonl", [], ["--chat-template", "none"], "holds conversations, which need a chat template"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, chatml, capsys, case):
    name, extra_records, extra_argv, needle = BAD[case]
    good = _records("chat")[:3] if not name.endswith((".csv", ".parquet")) else None
    if name.startswith("p."):
        good = _records("completions")[:3]
    elif name.startswith("a."):
        good = _records("alpaca")[:3]
    records = good[:1] + extra_records + good[1:]
    src = _write(tmp_path / "in" / name, records)
    tok = tmp_path / "tok"
    shutil.copytree(chatml, tok)
    bad = tmp_path / "in" / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }{% endfor %}")
    argv = [a.replace("{bad}", str(bad)) for a in extra_argv]
    before = _tree(tmp_path)
    code = cli.main(
        ["prepare-data", str(src), "--out", str(tmp_path / "out"), "--tokenizer", str(tok), "--quiet", *argv]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert needle in err[0] and "Traceback" not in err[0], err[0]
    if needle.startswith(("c.", "p.", "a.")) or case == "template-fails":
        assert str(tmp_path / "in") in err[0]
    assert not (tmp_path / "out").exists() and _tree(tmp_path) == before


def test_a_bad_record_through_the_real_cli(tmp_path, chatml):
    src = _write(tmp_path / "c.jsonl", _records("chat")[:2] + [{"messages": [{"role": "user", "content": "q"}]}])
    p = run_cli("prepare-data", src, "--out", tmp_path / "out", "--tokenizer", chatml, "--quiet")
    assert_user_error(p, f"{src}:3", "no assistant turn")
    assert not (tmp_path / "out").exists()


def _old_store(root: Path, extra_rows: int) -> tuple[Path, int]:
    """A store whose tokenizer was trained before <|im_start|>/<|im_end|> were reserved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from odyssey.store import init_store
    from odyssey.tokenizer import hf_side_files
    from tests.conftest import tiny_config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([q + " " + a for q, a in QA] * 3, trainer)
    n = tok.get_vocab_size()
    init_store(tiny_config(vocab_size=n + extra_rows), root, dtype="f32", progress=False)
    tok.save(str(root / "tokenizer.json"))
    for name, data in hf_side_files().items():
        (root / name).write_bytes(data)
    return root, n


def test_an_older_store_tokenizer_gets_the_chatml_tokens_or_a_refusal(tmp_path, capsys):
    from odyssey.data.templates import DEFAULT_TEMPLATE, load_chat_template

    src = _write(tmp_path / "c.jsonl", _records("chat"))
    full, n = _old_store(tmp_path / "full", 0)
    before = _tree(full)
    code = cli.main(["prepare-data", str(src), "--out", str(tmp_path / "o1"), "--model", str(full), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no room" in err[0] and "--chat-template FILE" in err[0], err
    assert _tree(full) == before and not (tmp_path / "o1").exists()

    roomy, n = _old_store(tmp_path / "roomy", 2)
    old = json.loads((roomy / "tokenizer.json").read_text())["model"]["vocab"]
    assert cli.main(["prepare-data", str(src), "--out", str(tmp_path / "o2"), "--model", str(roomy), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"added <|im_start|> (id {n}), <|im_end|> (id {n + 1}) to its tokenizer" in out
    t = load_chat_template(roomy)
    assert t.source == DEFAULT_TEMPLATE and not t.added_tokens and t.eot_ids[0] == n + 1
    assert json.loads((roomy / "tokenizer.json").read_text())["model"]["vocab"] == old  # every old id kept
    assert (tmp_path / "o2" / "tokenizer.json").read_bytes() == (roomy / "tokenizer.json").read_bytes()
    m = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert m["vocab_size"] == n + 2 and m["eot_ids"][0] == n + 1
