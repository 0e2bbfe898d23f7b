"""odyssey.tokenizer: a model's own tokenizer loaded as transformers loads it (the class AutoTokenizer
picks, its ids, its BOS/EOS rules), without torch; the files that travel with a model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from odyssey.errors import OdysseyError
from odyssey.tokenizer import (
    TOKENIZER_FILES,
    generation_eos_ids,
    hf_side_files,
    hf_tokenizer_class,
    load_model_tokenizer,
    train_tokenizer,
)
from tests.conftest import ROOT
from tests.helpers_tokenizers import SENTENCES, TEXTS

STYLES = ["llama3", "qwen", "sentencepiece"]
# what each style adds around a text, as transformers does: (BOS first?, EOS token)
RULES = {
    "llama3": (True, "<|eot_id|>"),
    "qwen": (False, "<|im_end|>"),
    "sentencepiece": (True, "</s>"),
    "odyssey": (True, "</s>"),
}


@pytest.fixture(scope="module")
def tokenizers(model_tokenizers, tmp_path_factory) -> dict:
    """The three model styles and a tokenizer trained here (as prepare-data writes it)."""
    d = tmp_path_factory.mktemp("own") / "odyssey"
    d.mkdir()
    (d / "tokenizer.json").write_text(train_tokenizer(SENTENCES * 5, vocab_size=300).to_str())
    for name, data in hf_side_files().items():
        (d / name).write_bytes(data)
    return {**model_tokenizers, "odyssey": d}


@pytest.mark.parametrize("style", [*STYLES, "odyssey"])
def test_loads_like_autotokenizer(tokenizers, style):
    from transformers import AutoTokenizer

    d = tokenizers[style]
    ref = AutoTokenizer.from_pretrained(d)
    tok = load_model_tokenizer(d)
    assert type(tok.hf) is type(ref) is hf_tokenizer_class(d)
    for text in TEXTS + [""]:
        assert tok.encode(text) == ref(text)["input_ids"], (style, text)
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    assert tok.encode_batch(TEXTS) == [ref(t)["input_ids"] for t in TEXTS]
    adds_bos, eos = RULES[style]
    assert tok.adds_bos == adds_bos and not tok.adds_eos
    assert (tok.encode("a")[0] == ref.bos_token_id) == adds_bos
    assert tok.token(tok.eos_id) == eos == ref.eos_token
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (ref.bos_token_id, ref.eos_token_id, ref.unk_token_id)
    assert tok.vocab_size == len(ref)
    assert tok.chat_template == ref.chat_template


def test_bos_rules_of_each_style(tokenizers):
    """Llama 3 and TinyLlama start with their BOS; Qwen has none at all."""
    tok = {s: load_model_tokenizer(tokenizers[s]) for s in STYLES}
    first = {s: tok[s].encode("once upon a time")[0] for s in STYLES}
    assert tok["llama3"].token(first["llama3"]) == "<|begin_of_text|>"
    assert tok["sentencepiece"].token(first["sentencepiece"]) == "<s>"
    assert tok["qwen"].bos_id is None and tok["qwen"].token(first["qwen"]) == "once"
    assert tok["qwen"].document_layout() == "tokens <|im_end|>"
    assert tok["llama3"].document_layout() == "<|begin_of_text|> tokens <|eot_id|>"


def test_stop_ids_include_generation_config(tokenizers, tmp_path):
    llama3 = load_model_tokenizer(tokenizers["llama3"])
    end, eot = llama3.hf.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    assert llama3.stop_ids() == [eot, end]  # the tokenizer's EOS first, then generation_config's others
    assert load_model_tokenizer(tokenizers["sentencepiece"]).stop_ids() == [2]  # no generation_config.json
    d = shutil.copytree(tokenizers["sentencepiece"], tmp_path / "sp")
    (d / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert generation_eos_ids(d) == [7] and load_model_tokenizer(d).stop_ids() == [2, 7]
    (d / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(OdysseyError, match="eos_token_id must be an integer or a list of integers"):
        generation_eos_ids(d)


def test_autotokenizer_corrections_are_followed(tokenizers, tmp_path):
    """Where AutoTokenizer does not use the declared class, neither does Odyssey."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # a Mistral checkpoint declaring LlamaTokenizer: the model type's tokenizer (tokenizer.json as is)
    d = shutil.copytree(tokenizers["sentencepiece"], tmp_path / "mistral")
    (d / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": 600}))
    # a byte-level tokenizer.json declared as LlamaTokenizer (as some Llama 3 fine-tunes are)
    b = shutil.copytree(tokenizers["llama3"], tmp_path / "bytelevel")
    cfg = json.loads((b / "tokenizer_config.json").read_text())
    (b / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "LlamaTokenizerFast"}))
    # an unknown class name
    u = shutil.copytree(tokenizers["qwen"], tmp_path / "unknown")
    cfg = json.loads((u / "tokenizer_config.json").read_text())
    (u / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "NoSuchTokenizer"}))
    for directory in (d, b, u):
        ref = AutoTokenizer.from_pretrained(directory)
        assert type(ref) is PreTrainedTokenizerFast is hf_tokenizer_class(directory), directory
        tok = load_model_tokenizer(directory)
        assert [tok.encode(t) for t in TEXTS] == [ref(t)["input_ids"] for t in TEXTS]


@pytest.mark.parametrize(
    "style, model_type, declared",
    [
        ("qwen", "qwen2", "PreTrainedTokenizerFast"),  # transformers' table wins for Qwen2
        ("qwen", "qwen3", None),  # no class declared: the model type's
        ("qwen", "qwen3", "PreTrainedTokenizerFast"),
        ("sentencepiece", "gemma3_text", None),
        ("sentencepiece", "llama", None),
        ("llama3", "llama", "PreTrainedTokenizerFast"),
    ],
)
def test_model_type_decides_as_in_autotokenizer(tokenizers, tmp_path, style, model_type, declared):
    from transformers import AutoTokenizer

    d = shutil.copytree(tokenizers[style], tmp_path / "t")
    (d / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 600}))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("tokenizer_class")
    if declared:
        cfg["tokenizer_class"] = declared
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref = AutoTokenizer.from_pretrained(d)
    assert hf_tokenizer_class(d) is type(ref)
    tok = load_model_tokenizer(d)
    assert [tok.encode(t) for t in TEXTS] == [ref(t)["input_ids"] for t in TEXTS]


def test_loading_is_torch_free():
    """prepare-data tokenizes without torch: the tokenizer classes come from transformers without
    AutoTokenizer (which imports torch)."""
    code = (
        "import sys, tempfile\n"
        "from pathlib import Path\n"
        "from tests.helpers_tokenizers import STYLES\n"
        "from odyssey.tokenizer import load_model_tokenizer\n"
        "root = Path(tempfile.mkdtemp())\n"
        "for style, write in STYLES.items():\n"
        "    (root / style).mkdir()\n"
        "    write(root / style)\n"
        "    tok = load_model_tokenizer(root / style)\n"
        "    assert tok.encode('hello world'), style\n"
        "print('torch' in sys.modules, type(tok.hf).__name__)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "LlamaTokenizer"]


def test_errors_are_one_line(tokenizers, tmp_path):
    with pytest.raises(OdysseyError, match="has no tokenizer.json; fix it"):
        load_model_tokenizer(tmp_path, fix="fix it")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("[1, 2")
    with pytest.raises(OdysseyError, match="is not a valid tokenizers file"):
        load_model_tokenizer(bad)
    cfg = shutil.copytree(tokenizers["llama3"], tmp_path / "cfg")
    (cfg / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(OdysseyError, match=r"tokenizer_config.json cannot be read as JSON") as e:
        load_model_tokenizer(cfg)
    assert "\n" not in str(e.value)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(OdysseyError, match="is not a tokenizer.json"):
        load_model_tokenizer(other)
    # a tokenizer.json named directly stands for its directory
    assert load_model_tokenizer(tokenizers["qwen"] / "tokenizer.json").directory == tokenizers["qwen"]


def test_every_tokenizer_file_is_listed():
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert name in TOKENIZER_FILES
    assert {"tokenizer.model", "generation_config.json", "added_tokens.json"} <= set(TOKENIZER_FILES)
