"""odyssey.data and tools/make_sample_corpus.py: corpus reading, tokenizer, token files, batches."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from odyssey.data import BatchSampler, TokenData, eval_batches, prepare_data, read_documents, token_dtype, unigram_loss
from odyssey.errors import OdysseyError
from odyssey.tokenizer import load_tokenizer, train_tokenizer
from tests.conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
INSTRUCTIONS = ROOT / "data" / "sample-instructions"


corpus_tool = load_tool("make_sample_corpus")


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: to show that nothing was touched."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small bilingual corpus: 60 English + 60 Korean stories (.txt) and 15 mixed (.jsonl)."""
    d = tmp_path_factory.mktemp("corpus")
    corpus_tool.write_corpus(d, "stories", 60, seed=1)
    return d


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "tok"
    summary = prepare_data([corpus], out, vocab_size=400, progress=False)
    return out, summary


# --------------------------------------------------------------------------------------------
# reading documents


def test_read_documents_txt_jsonl_and_directories(tmp_path):
    (tmp_path / "sub" / ".hidden").mkdir(parents=True)
    # marker file: blank lines inside a document stay (paragraphs), CRLF is read as LF
    (tmp_path / "a.txt").write_bytes(b"one\r\n\r\npara two\r\n<|endoftext|>\r\n  \r\n<|endoftext|>\r\nthree\r\n")
    # no marker: blank lines separate documents (TinyStories style)
    (tmp_path / "sub" / "b.txt").write_text("four\nstill four\n\n\nfive\n", encoding="utf-8")
    (tmp_path / "sub" / "c.jsonl").write_text(
        '{"text": "여섯 번째 문서"}\n\n{"text": "  ", "id": 2}\n{"text": "seven", "lang": "en"}\n', encoding="utf-8"
    )
    (tmp_path / "notes.md").write_text("not a corpus file\n")
    (tmp_path / "sub" / ".hidden" / "x.txt").write_text("hidden, skipped\n")
    docs = list(read_documents([tmp_path]))
    assert docs == ["one\n\npara two", "three", "four\nstill four", "five", "여섯 번째 문서", "seven"]
    # a file named directly, and twice, counts once
    assert list(read_documents([tmp_path / "sub" / "c.jsonl", tmp_path / "sub" / "c.jsonl"])) == [
        "여섯 번째 문서",
        "seven",
    ]


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "does not exist"),
        ("empty_dir", "holds no .txt, .jsonl, .json, .parquet or .csv files"),
        ("only_separators", "no documents found"),
        ("jsonl_no_text", 'c.jsonl:2 has no "text" field'),
        ("jsonl_bad_json", "c.jsonl:1 is not valid JSON"),
        ("jsonl_text_not_str", '"text" is int, not a string'),
        ("not_utf8", "is not UTF-8 text"),
        ("wrong_suffix", "is not .txt, .jsonl, .json, .parquet or .csv"),
    ],
)
def test_read_documents_errors(tmp_path, case, expect):
    target = {
        "missing": tmp_path / "nope",
        "empty_dir": tmp_path / "empty",
        "only_separators": tmp_path / "e.txt",
        "not_utf8": tmp_path / "l.txt",
        "wrong_suffix": tmp_path / "x.tsv",
    }.get(case, tmp_path / "c.jsonl")
    if case == "empty_dir":
        target.mkdir()
        (target / "README.md").write_text("hi")
    elif case == "only_separators":
        target.write_text("<|endoftext|>\n\n<|endoftext|>\n")
    elif case == "jsonl_no_text":
        target.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    elif case == "jsonl_bad_json":
        target.write_text('{"text": "unterminated\n')
    elif case == "jsonl_text_not_str":
        target.write_text('{"text": 5}\n')
    elif case == "not_utf8":
        target.write_bytes("한국어".encode("euc-kr"))
    elif case == "wrong_suffix":
        target.write_text("a,b\n")
    with pytest.raises(OdysseyError) as e:
        list(read_documents([target]))
    msg = str(e.value)
    assert expect in msg and str(target) in msg and "\n" not in msg


# --------------------------------------------------------------------------------------------
# tokenizer


TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    '옛날 옛적에 지우라는 착한 여자아이가 있었어요. "고마워, 민준아!"',
    "  two  spaces,\ttab,\n\nnew lines and , odd . spacing  ",
    "emoji 🙂 café naïve 日本語 ㄱㄴㄷ 똠얌꿍 123456",
]


def test_tokenizer_round_trips_english_and_korean(corpus):
    tok = train_tokenizer(read_documents([corpus]), vocab_size=400)
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert 300 < tok.get_vocab_size() <= 400
    for s in TEXTS:
        enc = tok.encode(s)
        assert enc.ids[0] == 1  # <s> first, like Llama's tokenizer
        assert tok.decode(enc.ids) == s
        assert tok.decode(tok.encode(s, add_special_tokens=False).ids) == s
    model = json.loads(tok.to_str())["model"]
    assert model["type"] == "BPE" and len(model["merges"]) > 0
    # GPT-2 byte-to-unicode form: a space is "Ġ", and all 256 bytes have tokens
    assert "Ġ" in model["vocab"] and "Ġa" in model["vocab"]
    assert len([t for t in model["vocab"] if len(t) == 1]) >= 256
    with pytest.raises(OdysseyError, match="--vocab-size must be at least 261"):
        train_tokenizer(["x"], vocab_size=100)


def test_autotokenizer_loads_the_output(prepared):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out, _ = prepared
    tok = load_tokenizer(out)
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        hf = cls.from_pretrained(str(out))
        assert (hf.unk_token, hf.bos_token, hf.eos_token) == ("<unk>", "<s>", "</s>")
        assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
        for s in TEXTS:
            ids = hf(s)["input_ids"]
            assert ids == tok.encode(s).ids and ids[0] == 1
            assert hf.decode(ids, skip_special_tokens=True) == s


# --------------------------------------------------------------------------------------------
# prepare_data


def test_prepare_data_outputs_and_manifest(corpus, prepared):
    out, summary = prepared
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin"]
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "odyssey-tokens" and m["format_version"] == 3
    assert m["dtype"] == "uint16" and m["vocab_size"] == summary["vocab_size"] <= 400
    assert (m["unk_id"], m["bos_id"], m["eos_id"], m["adds_bos"]) == (0, 1, 2, True)
    assert m["document_layout"].startswith("<s> tokens </s>")
    docs = list(read_documents([corpus]))
    assert m["documents"] == len(docs) == 60 + 60 + 15
    assert m["splits"]["val"]["documents"] == round(len(docs) * 0.05) >= 1
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(docs)
    assert m["sources"] == [str(corpus)]
    assert m["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    for split in ("train", "val"):
        assert (out / f"{split}.bin").stat().st_size == 2 * m["splits"][split]["tokens"]
        assert summary[f"{split}_tokens"] == m["splits"][split]["tokens"] > 0
    # the files are exactly  <s> doc </s>  per document, and the split is by whole document
    tok = load_tokenizer(out)
    seen = []
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        ends = np.flatnonzero(ids == 2)
        assert ends[-1] == len(ids) - 1 and len(ends) == m["splits"][split]["documents"]
        for start, end in zip(np.r_[0, ends[:-1] + 1], ends, strict=True):
            assert ids[start] == 1
            seen.append(tok.decode(ids[start + 1 : end].tolist()))
    assert sorted(seen) == sorted(docs)
    assert any("어요" in d for d in seen) and any("Once upon a time" in d for d in seen)


def test_prepare_data_is_deterministic_per_seed(corpus, prepared, tmp_path):
    out, _ = prepared
    again = tmp_path / "again"
    prepare_data([corpus], again, vocab_size=400, progress=False)
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    other = tmp_path / "other"
    prepare_data([corpus], other, vocab_size=400, seed=1, progress=False)
    assert (other / "val.bin").read_bytes() != (out / "val.bin").read_bytes()


def test_token_dtype_choice_and_uint32_files(tmp_path):
    assert token_dtype(8192) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32
    # a tokenizer with 70,000 ids (3 special + bytes + filler): the token files must be uint32
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    merges = [("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o"), ("Ġ", "hello")]
    merged = [a + b for a, b in merges]  # placed last, so "hello" and "Ġhello" get ids above 65535
    head = ["<unk>", "<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = head + [f"filler{i}" for i in range(70_000 - len(head) - len(merged))] + merged
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>", "unk_token": "<unk>"}')
    (tmp_path / "c.txt").write_text("say hello\n\nhello hello\n\n안녕 hello\n")
    summary = prepare_data([tmp_path / "c.txt"], tmp_path / "out", tokenizer_dir=tmp_path, progress=False)
    assert summary["dtype"] == "uint32" and summary["vocab_size"] > 65535
    data = TokenData(tmp_path / "out")
    assert data.tokens("train").dtype == np.uint32
    all_ids = np.concatenate([np.asarray(data.tokens("train")), np.asarray(data.tokens("val"))])
    assert vocab["Ġhello"] == 69_999 and 69_999 in all_ids and vocab["hello"] in all_ids


def test_refuses_an_out_with_other_files_unless_forced(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(
        OdysseyError, match=r"already holds other files \(mine.txt\); choose a new --out or pass --force"
    ):
        prepare_data([corpus], out, vocab_size=300, progress=False)
    assert snapshot(out) == {"mine.txt": b"keep me"}
    prepare_data([corpus], out, vocab_size=300, force=True, progress=False)
    assert (out / "mine.txt").read_text() == "keep me" and (out / "manifest.json").is_file()
    # a directory holding only an earlier prepare-data's files may be written again
    clean = tmp_path / "clean"
    prepare_data([corpus], clean, vocab_size=300, progress=False)
    prepare_data([corpus], clean, vocab_size=320, progress=False)
    assert TokenData(clean).vocab_size <= 320
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OdysseyError, match="is a file"):
        prepare_data([corpus], tmp_path / "afile", progress=False)


@pytest.mark.parametrize("pre_existing", [False, True])
def test_errors_leave_no_partial_output(tmp_path, pre_existing):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "c" / "b.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    out = tmp_path / "out"
    if pre_existing:
        out.mkdir()
    with pytest.raises(OdysseyError, match=r'b.jsonl:2 has no "text" field'):
        prepare_data([tmp_path / "c"], out, vocab_size=300, progress=False)
    assert out.exists() == pre_existing and snapshot(out) == {}
    # one document cannot be split into train and val
    (tmp_path / "one.txt").write_text("just one document\n")
    with pytest.raises(OdysseyError, match="has only 1 document; prepare-data needs at least 2"):
        prepare_data([tmp_path / "one.txt"], out, vocab_size=300, progress=False)
    assert out.exists() == pre_existing and snapshot(out) == {}
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(OdysseyError, match="--val-fraction must be between 0 and 1"):
            prepare_data([tmp_path / "c"], out, val_fraction=bad, progress=False)
    with pytest.raises(OdysseyError, match="does not exist"):
        prepare_data([tmp_path / "missing"], out, progress=False)
    assert out.exists() == pre_existing and snapshot(out) == {}


def _store(tmp_path: Path, vocab: int) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    (store / "config.json").write_text(json.dumps({"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2}))
    (store / "layer-000.bin").write_bytes(b"\0" * 64)  # stands in for weights
    return store


def test_model_store_vocab_limit_and_store_untouched(corpus, tmp_path):
    store = _store(tmp_path, 300)
    before = snapshot(store)
    out = tmp_path / "out"
    with pytest.raises(
        OdysseyError, match=r"tokenizer vocabulary 400 is larger than the model's 300; use --vocab-size <= 300"
    ):
        prepare_data([corpus], out, vocab_size=400, model_store=store, progress=False)
    assert snapshot(store) == before and not out.exists()
    # a tokenizer given with --tokenizer is measured after loading
    big = tmp_path / "big"
    prepare_data([corpus], big, vocab_size=400, progress=False)
    n = TokenData(big).vocab_size
    with pytest.raises(OdysseyError, match=rf"tokenizer vocabulary {n} is larger than the model's 300"):
        prepare_data([corpus], out, tokenizer_dir=big, model_store=store, progress=False)
    assert snapshot(store) == before and not out.exists()
    (tmp_path / "nostore").mkdir()
    with pytest.raises(OdysseyError, match="has no config.json"):
        prepare_data([corpus], out, model_store=tmp_path / "nostore", progress=False)


def test_model_store_gets_the_tokenizer_and_keeps_it(corpus, tmp_path):
    store = _store(tmp_path, 350)
    s1 = prepare_data([corpus], tmp_path / "d1", model_store=store, progress=False)
    assert s1["vocab_size"] <= 350 and "asked 350" in s1["tokenizer"]  # the store's vocab is the default
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (store / name).read_bytes() == (tmp_path / "d1" / name).read_bytes()
    # later data for this store (another corpus) is tokenized with the store's tokenizer
    letters = tmp_path / "letters"
    corpus_tool.write_corpus(letters, "letters", 20, seed=0)
    prepare_data([letters], tmp_path / "d2", model_store=store, progress=False)

    def sha(d):
        return json.loads((d / "manifest.json").read_text())["tokenizer_sha256"]

    assert sha(tmp_path / "d2") == sha(tmp_path / "d1")
    # asking for a new tokenizer would change the store's: refused, --force (about --out) or not
    before = snapshot(store)
    for force in (False, True):
        with pytest.raises(OdysseyError, match="already has a tokenizer, and its data must use it: drop --vocab-size"):
            prepare_data([letters], tmp_path / "d3", vocab_size=300, model_store=store, force=force, progress=False)
        assert snapshot(store) == before and not (tmp_path / "d3").exists()
    # ... and a different existing one too (here: the data directory of another corpus)
    prepare_data([letters], tmp_path / "other", vocab_size=300, progress=False)
    with pytest.raises(OdysseyError, match="already has a different tokenizer.*pass --replace-tokenizer"):
        prepare_data([letters], tmp_path / "d3", tokenizer_dir=tmp_path / "other", model_store=store, progress=False)
    assert snapshot(store) == before and not (tmp_path / "d3").exists()
    # replacing asks for the flag, and then still for a vocabulary that fits the model
    with pytest.raises(OdysseyError, match="tokenizer vocabulary 400 is larger than the model's 350"):
        prepare_data(
            [letters], tmp_path / "d3", vocab_size=400, model_store=store, replace_tokenizer=True, progress=False
        )
    assert snapshot(store) == before and not (tmp_path / "d3").exists()
    prepare_data([letters], tmp_path / "d3", vocab_size=300, model_store=store, replace_tokenizer=True, progress=False)
    assert (
        sha(tmp_path / "d3")
        == hashlib.sha256((store / "tokenizer.json").read_bytes()).hexdigest()
        != sha(tmp_path / "d1")
    )
    # the flag alone means nothing
    with pytest.raises(OdysseyError, match="--replace-tokenizer needs the new tokenizer"):
        prepare_data([letters], tmp_path / "d4", model_store=store, replace_tokenizer=True, progress=False)
    with pytest.raises(OdysseyError, match="name it with --model STORE"):
        prepare_data([letters], tmp_path / "d4", vocab_size=300, replace_tokenizer=True, progress=False)


@pytest.mark.parametrize("style", ["llama3", "qwen", "sentencepiece"])
def test_prepare_data_tokenizes_as_transformers(model_tokenizers, corpus, tmp_path, style):
    """Each document is AutoTokenizer(dir)(text)["input_ids"] (a BOS only where the tokenizer adds
    one), then the tokenizer's EOS; every tokenizer file comes along byte for byte."""
    from transformers import AutoTokenizer

    from odyssey.data.prepare import _split

    src = model_tokenizers[style]
    out = tmp_path / "out"
    summary = prepare_data([corpus], out, tokenizer_dir=src, progress=False)
    ref = AutoTokenizer.from_pretrained(src)
    docs = list(read_documents([corpus]))
    is_val = _split(len(docs), 0.05, 0)
    want = {"train": [], "val": []}
    for doc, val in zip(docs, is_val, strict=True):
        want["val" if val else "train"] += ref(doc)["input_ids"] + [ref.eos_token_id]
    for split in ("train", "val"):
        assert TokenData(out).tokens(split).tolist() == want[split], split
    m = json.loads((out / "manifest.json").read_text())
    assert (m["bos_id"], m["eos_id"], m["vocab_size"]) == (ref.bos_token_id, ref.eos_token_id, len(ref))
    assert m["adds_bos"] == (style != "qwen") and summary["vocab_size"] == len(ref)
    for p in src.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    # a second run with another tokenizer leaves none of the first one's files behind
    prepare_data([corpus], out, vocab_size=300, progress=False)
    assert not (out / "chat_template.jinja").exists() and not (out / "generation_config.json").exists()


def _bare_store(tmp_path: Path, vocab: int, name: str = "store") -> Path:
    store = tmp_path / name
    store.mkdir()
    (store / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    (store / "layer-000.bin").write_bytes(b"\0" * 64)  # stands in for weights
    return store


def test_model_store_takes_a_model_tokenizer_and_replaces_it_only_when_asked(model_tokenizers, corpus, tmp_path):
    from tests.conftest import assert_user_error, run_cli

    store = _bare_store(tmp_path, 500)
    prep = ["prepare-data", corpus, "--quiet", "--model", store]
    # a store without a tokenizer given as --tokenizer: one line, nothing written
    p = run_cli(*prep, "--out", tmp_path / "d0", "--tokenizer", store)
    assert_user_error(p, f"model store {store} has no tokenizer", "checkpoint folder")
    assert not (tmp_path / "d0").exists() and sorted(x.name for x in store.iterdir()) == [
        "config.json",
        "layer-000.bin",
    ]
    # the store gets the SentencePiece-style tokenizer's files as they are, and later data uses them
    p = run_cli(*prep, "--out", tmp_path / "d1", "--tokenizer", model_tokenizers["sentencepiece"])
    assert p.returncode == 0, p.stderr
    for f in model_tokenizers["sentencepiece"].iterdir():
        assert (store / f.name).read_bytes() == f.read_bytes()
    p = run_cli(*prep, "--out", tmp_path / "d2")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "d2" / "train.bin").read_bytes() == (tmp_path / "d1" / "train.bin").read_bytes()
    # another tokenizer is refused (--force is about --out, not the store), then replaces it when asked
    before = snapshot(store)
    for extra in ([], ["--force"]):
        p = run_cli(*prep, "--out", tmp_path / "d3", "--tokenizer", model_tokenizers["llama3"], *extra)
        assert_user_error(p, "already has a different tokenizer", "--replace-tokenizer")
        p = run_cli(*prep, "--out", tmp_path / "d3", "--vocab-size", "300", *extra)
        assert_user_error(p, "already has a tokenizer", "--replace-tokenizer")
        assert snapshot(store) == before and not (tmp_path / "d3").exists()
    p = run_cli(*prep, "--out", tmp_path / "d3", "--tokenizer", model_tokenizers["llama3"], "--replace-tokenizer")
    assert p.returncode == 0, p.stderr
    assert "replaced the tokenizer" in p.stdout
    assert snapshot(store) == {
        **snapshot(model_tokenizers["llama3"]),
        **{k: before[k] for k in ("config.json", "layer-000.bin")},
    }
    # a tokenizer larger than the model: one line, nothing written (the store keeps its own)
    small = _bare_store(tmp_path, 450, "small")
    p = run_cli(*prep[:-1], small, "--out", tmp_path / "d4", "--tokenizer", model_tokenizers["sentencepiece"])
    assert_user_error(
        p, "tokenizer vocabulary 487 is larger than the model's 450", "the tokenizer the model was made for"
    )
    assert not (tmp_path / "d4").exists() and not (small / "tokenizer.json").exists()


def test_a_tokenizer_without_eos_is_refused(model_tokenizers, corpus, tmp_path):
    src = tmp_path / "noeos"
    src.mkdir()
    (src / "tokenizer.json").write_bytes((model_tokenizers["qwen"] / "tokenizer.json").read_bytes())
    (src / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(OdysseyError, match="has no EOS token, which separates documents; set eos_token"):
        prepare_data([corpus], tmp_path / "out", tokenizer_dir=src, progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# TokenData


def test_token_data_opens_and_validates(prepared, tmp_path):
    out, summary = prepared
    data = TokenData(out)
    assert (data.vocab_size, data.bos_id, data.eos_id) == (summary["vocab_size"], 1, 2)
    assert data.tokenizer_path == out / "tokenizer.json"
    train = data.tokens("train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and len(train) == summary["train_tokens"]
    assert not train.flags.writeable
    with pytest.raises(
        OdysseyError,
        match=rf"data directory {tmp_path / 'nope'} has no manifest.json; "
        rf"run `odyssey prepare-data .* --out {tmp_path / 'nope'}`",
    ):
        TokenData(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in out.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    with open(broken / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(OdysseyError, match="val.bin holds 10 bytes but manifest.json says"):
        TokenData(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(OdysseyError, match="is not valid JSON"):
        TokenData(broken)


# --------------------------------------------------------------------------------------------
# batches


def _rows(x) -> list[tuple]:
    return [tuple(r) for r in x.tolist()]


def test_sampler_shapes_and_shift(prepared):
    import torch

    data = TokenData(prepared[0])
    s = BatchSampler(data, "train", seq_len=32, batch_size=4, seed=0)
    tokens = np.asarray(data.tokens("train"), dtype=np.int64)
    starts = set(range(0, (len(tokens) - 1) // 32 * 32, 32))
    for _ in range(3):
        x, y = next(s)
        assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            hits = [st for st in starts if np.array_equal(tokens[st : st + 32], row_x)]
            assert hits and np.array_equal(tokens[hits[0] + 1 : hits[0] + 33], row_y)


def test_sampler_determinism_and_epoch_coverage(prepared):
    data = TokenData(prepared[0])
    a = BatchSampler(data, "train", 64, 1, seed=3)
    b = BatchSampler(data, "train", 64, 1, seed=3)
    c = BatchSampler(data, "train", 64, 1, seed=4)
    W = a.num_windows
    ra = [_rows(next(a)[0])[0] for _ in range(W)]
    assert ra == [_rows(next(b)[0])[0] for _ in range(W)]
    rc = [_rows(next(c)[0])[0] for _ in range(W)]
    assert rc != ra and sorted(rc) == sorted(ra)  # another order of the same windows
    tokens = np.asarray(data.tokens("train"))
    assert sorted(ra) == sorted(tuple(tokens[w * 64 : w * 64 + 64].tolist()) for w in range(W))
    assert a.epoch == 1 and a.cursor == 0
    second = [_rows(next(a)[0])[0] for _ in range(W)]
    assert second != ra and sorted(second) == sorted(ra)  # a new permutation each epoch


def test_sampler_rank_shards_are_disjoint(prepared):
    data = TokenData(prepared[0])
    shards = []
    for rank in range(3):
        s = BatchSampler(data, "train", 48, 1, seed=0, rank=rank, world_size=3)
        assert s.windows_per_epoch == s.num_windows // 3
        shards.append(Counter(_rows(next(s)[0])[0] for _ in range(s.windows_per_epoch)))
    assert all(sh.total() == shards[0].total() for sh in shards)
    # disjoint: no window drawn by two ranks (counted by content: the corpus may repeat a window)
    tokens = np.asarray(data.tokens("train"))
    windows = Counter(tuple(tokens[w * 48 : w * 48 + 48].tolist()) for w in range(tokens.size // 48))
    assert shards[0] + shards[1] + shards[2] <= windows
    with pytest.raises(OdysseyError, match="rank must be in"):
        BatchSampler(data, "train", 48, 1, rank=3, world_size=3)


@pytest.mark.parametrize("taken", [0, 5, 37])
def test_sampler_resumes_exactly(prepared, taken):
    import torch

    data = TokenData(prepared[0])
    s = BatchSampler(data, "train", 40, 7, seed=11, rank=1, world_size=2)  # 7 does not divide an epoch
    assert s.windows_per_epoch % 7
    for _ in range(taken):
        next(s)
    state = json.loads(json.dumps(s.state_dict()))  # must survive a JSON checkpoint
    resumed = BatchSampler(data, "train", 40, 7, seed=11, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for _ in range(2 * math.ceil(s.batches_per_epoch)):  # across at least one epoch boundary
        (x1, y1), (x2, y2) = next(s), next(resumed)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert s.state_dict() == resumed.state_dict()
    other = BatchSampler(data, "train", 41, 7, seed=11, rank=1, world_size=2)
    with pytest.raises(OdysseyError, match="saved data position has seq_len=40 but this run has 41"):
        other.load_state_dict(state)


def test_sampler_refuses_data_smaller_than_a_window(prepared):
    data = TokenData(prepared[0])
    n = data.num_tokens("val")
    with pytest.raises(
        OdysseyError,
        match=rf"has {n} tokens, too few for one window of seq_len \+ 1 = {n + 1}; "
        r"use a smaller --seq-len",
    ):
        BatchSampler(data, "val", seq_len=n, batch_size=1)
    BatchSampler(data, "val", seq_len=n - 1, batch_size=1)  # exactly one window fits


def test_eval_batches_are_fixed_and_wrap(prepared):
    import torch

    data = TokenData(prepared[0])
    windows = (data.num_tokens("val") - 1) // 64
    batches = eval_batches(data, 64, 4, n=windows)  # 4x more windows than there are: wraps
    assert len(batches) == windows and all(x.shape == (4, 64) for x, _ in batches)
    again = eval_batches(data, 64, 4, n=windows)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(batches, again, strict=True))
    val = np.asarray(data.tokens("val"), dtype=np.int64)
    assert np.array_equal(batches[0][0][0].numpy(), val[:64]) and np.array_equal(batches[0][1][0].numpy(), val[1:65])
    flat = torch.cat([x for x, _ in batches])
    assert torch.equal(flat[windows], flat[0])  # window `windows` wraps to window 0


def test_unigram_loss_is_the_smoothed_baseline(prepared):
    data = TokenData(prepared[0])
    loss = unigram_loss(data)
    V = data.vocab_size
    counts = np.bincount(np.asarray(data.tokens("train")), minlength=V)
    p = (counts + 1) / (counts.sum() + V)
    expect = -np.mean(np.log(p[np.asarray(data.tokens("val"))[1:]]))
    assert math.isfinite(loss) and 0 < loss < math.log(V)
    assert loss == pytest.approx(expect, rel=1e-9)


# --------------------------------------------------------------------------------------------
# the shipped sample corpus and its generator


def test_shipped_sample_is_reproducible_and_prepares(tmp_path):
    regenerated = tmp_path / "regen"
    corpus_tool.write_corpus(regenerated, "stories", 900, seed=0)
    for name in ("stories_en.txt", "stories_ko.txt", "stories_mixed.jsonl"):
        assert (SAMPLE / name).read_bytes() == (regenerated / name).read_bytes(), name
    total = sum(p.stat().st_size for p in SAMPLE.iterdir())
    assert 1_000_000 < total < 2_000_000
    summary = prepare_data([SAMPLE], tmp_path / "tok", vocab_size=512, progress=True)
    assert summary["documents"] == 900 + 900 + 225 and summary["vocab_size"] == 512
    data = TokenData(tmp_path / "tok")
    tok = data.load_tokenizer()
    val_text = tok.decode(np.asarray(data.tokens("val")).tolist())
    assert any("\uac00" <= ch <= "\ud7a3" for ch in val_text) and "the" in val_text
    x, y = next(BatchSampler(data, "train", 128, 2, seed=0))
    assert x.shape == (2, 128) and int(x.max()) < 512
    assert unigram_loss(data) < math.log(512)


def _korean_particle_fits(word: str) -> bool:
    """을/이에요/이었어요 follow a final consonant, 를/예요/였어요 a vowel (the word's particle)."""
    for after_final, after_vowel in (("을", "를"), ("이에요", "예요"), ("이었어요", "였어요")):
        for ending, final in ((after_final, True), (after_vowel, False)):
            if word.endswith(ending) and len(word) > len(ending):
                return (corpus_tool._batchim(word[: -len(ending)]) != 0) == final
    return True


def test_shipped_instructions_are_reproducible_and_answered_by_their_stories(tmp_path):
    sizes = corpus_tool.write_instructions(tmp_path, 200, seed=0)
    assert set(sizes) == {p.name for p in INSTRUCTIONS.glob("*.jsonl")}
    for name in sizes:
        assert (INSTRUCTIONS / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert 200_000 < sum(sizes.values()) < 320_000
    en, ko, held = corpus_tool.generate_instructions(200, seed=0)
    shipped = [json.loads(line) for line in (INSTRUCTIONS / "instructions_ko.jsonl").read_text("utf-8").splitlines()]
    assert shipped == [{"messages": r["messages"], "lang": "ko"} for r in ko]
    assert (len(en), len(ko), len(held)) == (200, 200, 80)
    kinds = set()
    for records, langs in ((en, {"en"}), (ko, {"ko"}), (held, {"en", "ko"})):
        assert {r["lang"] for r in records} == langs
        for r in records:
            roles = [m["role"] for m in r["messages"]]
            assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
            assert r["story"] in r["messages"][0]["content"] and len(r["spans"]) == len(roles) // 2
            for question, answer, spans in zip(r["messages"][::2], r["messages"][1::2], r["spans"], strict=True):
                # the answer's key words are in the quoted story, and the answer gives the asked field
                assert all(sp in r["story"] for sp in spans), (spans, r["story"])
                assert spans[-1].lower() in answer["content"].lower(), (spans, answer)
                kinds.add(question["content"].split("\n\n")[-1].split()[0])
                if r["lang"] == "ko":
                    words = answer["content"].rstrip(".").split()  # "... X이에요." or "... X을 VERB."
                    copula = words[-1].endswith(("예요", "에요", "였어요", "이었어요"))
                    checked = words[-1:] if copula else [] if words[-1].endswith("에서요") else words[-2:-1]
                    assert all(_korean_particle_fits(w) for w in checked), answer
    assert len(kinds) >= 10  # several kinds of question in both languages (first words differ)
    # held-out stories are not training stories
    train_stories = {r["story"] for r in en + ko}
    assert not any(r["story"] in train_stories for r in held)
    assert sum(len(r["messages"]) > 2 for r in en + ko) > 100  # multi-turn records too


def test_corpus_generator_styles_and_seeds():
    en0, ko0, mix0 = corpus_tool.generate("stories", 30, seed=0)
    en0b, ko0b, _ = corpus_tool.generate("stories", 30, seed=0)
    en1, ko1, _ = corpus_tool.generate("stories", 30, seed=1)
    assert (en0, ko0) == (en0b, ko0b) and en0 != en1 and ko0 != ko1
    assert len(set(en0)) == 30 and len(set(ko0)) == 30
    assert all(any("\uac00" <= ch <= "\ud7a3" for ch in d) for d in ko0)
    assert all(d.isascii() for d in en0)
    assert {r["lang"] for r in mix0} <= {"en", "ko", "en+ko"} and len(mix0) == 7
    # the letters corpus is clearly another distribution: few of its words occur in the stories
    l_en, l_ko, _ = corpus_tool.generate("letters", 30, seed=0)

    def words(docs):
        return {w for d in docs for w in d.split()}

    story_words = words(corpus_tool.generate("stories", 300, seed=0)[0])
    letter_words = words(l_en)
    assert len(letter_words - story_words) > 0.4 * len(letter_words)
    assert any(d.startswith("Dear ") for d in l_en) and any("날씨:" in d for d in l_ko)


@pytest.mark.parametrize(
    "word, person, attr, expect",
    [
        ("민준", True, "eun", "민준이는"),
        ("민준", True, "a", "민준아"),
        ("지우", True, "a", "지우야"),
        ("지우", True, "i", "지우가"),
        ("민준", True, "ra", "민준이라는"),
        ("공", False, "eul", "공을"),
        ("사과", False, "eul", "사과를"),
        ("연필", False, "euro", "연필로"),
        ("집", False, "euro", "집으로"),
        ("바다", False, "euro", "바다로"),
        ("곰", False, "ieosseoyo", "곰이었어요"),
        ("토끼", False, "gwa", "토끼와"),
    ],
)
def test_korean_particles(word, person, attr, expect):
    assert getattr(corpus_tool.Ko(word, person=person), attr) == expect
