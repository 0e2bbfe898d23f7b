"""GGUF export: a `gguf.GGUFReader` round trip on a tiny store with a trained tokenizer (metadata,
tensor names, shapes, types, values after undoing the Q/K permutation, tokenizer arrays), every
file type readable, the permutation checked against RoPE itself, and refusals that leave nothing
on disk. llama.cpp itself loads the file in tests/test_llamacpp.py (slow)."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from odyssey.data import prepare_data
from odyssey.errors import OdysseyError
from odyssey.export.gguf import gguf_bytes, write_gguf
from odyssey.export.gguf_layout import GGUF_TYPES, gguf_name, permute_qk, tensor_type, unpermute_qk
from odyssey.export.gguf_vocab import pre_tokenizer_name
from odyssey.model import rope_cos_sin, rotate_half
from odyssey.store import Store, init_store
from tests.conftest import tiny_config

Q = gguf.GGMLQuantizationType
MODEL_VOCAB, TOKENIZER_VOCAB = 320, 300  # the tokenizer is padded with 20 unused tokens


def make_store(tmp_path, name="store", **kw):
    """A tiny f32 store whose tokenizer was trained by prepare-data (--model places it in the store)."""
    cfg = tiny_config(vocab_size=MODEL_VOCAB, **kw)
    out = tmp_path / name
    init_store(cfg, out, dtype="f32", seed=1, progress=False)
    corpus = tmp_path / f"{name}-corpus.txt"
    corpus.write_text(
        "\n\n".join(f"once upon a time a cat named Tom {i} sat on mat number {i * 7}." for i in range(60)),
        encoding="utf-8",
    )
    prepare_data([corpus], tmp_path / f"{name}-data", vocab_size=TOKENIZER_VOCAB, model_store=out, progress=False)
    return Store.open(out)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("gguf")).root


@pytest.fixture
def store(built, tmp_path):
    """A private copy of the module's store (tests may patch or damage it)."""
    shutil.copytree(built, tmp_path / "store")
    return Store.open(tmp_path / "store")


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def values(t) -> np.ndarray:
    """A GGUFReader tensor as f32 in numpy (HF) order."""
    if t.tensor_type in (Q.F32, Q.F16):
        return np.asarray(t.data, dtype=np.float32)
    return gguf.quants.dequantize(t.data, t.tensor_type)


def hf_values(store, hf_name: str) -> np.ndarray:
    """The store's tensor as llama.cpp should hold it once un-permuted: here, the HF tensor."""
    unit = (
        "embed"
        if "embed" in hf_name
        else "head"
        if hf_name in ("model.norm.weight", "lm_head.weight")
        else int(hf_name.split(".")[2])
    )
    return store.load_tensors(unit, torch.float32)[hf_name].numpy()


def undo_permutation(name: str, w: np.ndarray, cfg) -> np.ndarray:
    if name.endswith("attn_q.weight"):
        return unpermute_qk(w, cfg.num_attention_heads)
    if name.endswith("attn_k.weight"):
        return unpermute_qk(w, cfg.num_key_value_heads)
    return w


def test_f32_round_trip_metadata_tensors_and_tokenizer(store, tmp_path):
    cfg = store.config
    path = tmp_path / "m.gguf"
    summary = write_gguf(store, path, "f32", progress=False)
    assert summary["bytes"] == path.stat().st_size and summary["mb_s"] > 0 and summary["seconds"] > 0
    r = gguf.GGUFReader(path)
    f = fields(r)
    expected = {
        "general.architecture": "llama",
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_hidden_layers,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.rope.freq_base": cfg.rope_theta,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }
    assert {k: f[k] for k in expected} == expected
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)

    # tensors: llama.cpp names (as gguf's own name map gives them), shapes, f32 values equal
    names = list(cfg.all_shapes())
    name_map = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    assert [t.name for t in r.tensors] == [gguf_name(n) for n in names]
    for n in names:
        assert gguf_name(n) == name_map.get_name(n, try_suffixes=(".weight",)), n
    for hf_name, t in zip(names, r.tensors, strict=True):
        assert t.tensor_type == Q.F32
        assert tuple(int(s) for s in t.shape) == tuple(reversed(cfg.all_shapes()[hf_name]))  # GGUF: ne0 first
        got = undo_permutation(t.name, values(t), cfg)
        np.testing.assert_array_equal(got, hf_values(store, hf_name), err_msg=t.name)
    # the permutation really moved Q and K rows (else the check above proves nothing about it)
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    assert not np.array_equal(values(q), hf_values(store, "model.layers.0.self_attn.q_proj.weight"))

    # tokenizer: tokens by id, types, merges, padded to the model's vocabulary
    tok = json.loads(store.tokenizer_path().read_text())
    by_id = {i: t for t, i in tok["model"]["vocab"].items()} | {a["id"]: a["content"] for a in tok["added_tokens"]}
    assert len(by_id) == TOKENIZER_VOCAB
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == MODEL_VOCAB
    assert tokens[:TOKENIZER_VOCAB] == [by_id[i] for i in range(TOKENIZER_VOCAB)]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and "Ġ" in tokens  # GPT-2 byte-to-unicode form
    assert tokens[TOKENIZER_VOCAB:] == [f"[PAD{i}]" for i in range(TOKENIZER_VOCAB, MODEL_VOCAB)]
    T = gguf.TokenType
    # <unk> <s> </s>, the BPE, then the chat template's <|im_start|> <|im_end|> (special: CONTROL too)
    assert tokens[TOKENIZER_VOCAB - 2 : TOKENIZER_VOCAB] == ["<|im_start|>", "<|im_end|>"]
    assert types == [T.CONTROL] * 3 + [T.NORMAL] * (TOKENIZER_VOCAB - 5) + [T.CONTROL] * 2 + [T.UNUSED] * (
        MODEL_VOCAB - TOKENIZER_VOCAB
    )
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert merges and f["tokenizer.ggml.merges"] == merges


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_every_type_is_readable_and_close(store, tmp_path, gguf_type):
    cfg = store.config
    path = tmp_path / f"m-{gguf_type}.gguf"
    write_gguf(store, path, gguf_type, progress=False)
    r = gguf.GGUFReader(path)
    assert fields(r)["general.file_type"] == int(
        {
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[gguf_type]
    )
    matrix_type = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]
    rtol = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2}[gguf_type]  # relative to each tensor's max |w|
    for hf_name, t in zip(cfg.all_shapes(), r.tensors, strict=True):
        assert t.tensor_type == (Q.F32 if t.name.endswith("norm.weight") else matrix_type), t.name
        got = undo_permutation(t.name, values(t), cfg)
        want = hf_values(store, hf_name)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= rtol * np.abs(want).max(), t.name
    assert 0 < gguf_bytes(store, gguf_type) - path.stat().st_size < 2 << 20  # the free-disk estimate bounds it


def test_q8_0_bytes_equal_gguf_quants(store, tmp_path):
    """Chunked quantization writes exactly what gguf.quants gives for the whole tensor."""
    import odyssey.gguf.quantize as qz

    g_chunk = qz.GGUF_CHUNK_ELEMENTS
    qz.GGUF_CHUNK_ELEMENTS = 64 * 3  # 3 rows per call: several chunks per tensor
    try:
        write_gguf(store, tmp_path / "m.gguf", "q8_0", progress=False)
    finally:
        qz.GGUF_CHUNK_ELEMENTS = g_chunk
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_up.weight")
    want = gguf.quants.quantize(hf_values(store, "model.layers.1.mlp.up_proj.weight"), Q.Q8_0)
    np.testing.assert_array_equal(np.asarray(t.data), want)


def test_permutation_turns_rotate_half_into_adjacent_pairs():
    """RoPE as HF applies it (halves of a head rotate together) on q, then permuted, equals RoPE
    as llama.cpp applies it (adjacent pairs rotate together) on the permuted q."""
    H, hd, pos = 3, 8, 5
    torch.manual_seed(0)
    q = torch.randn(H * hd)
    cos, sin = (x.reshape(hd) for x in rope_cos_sin(torch.tensor([pos]), hd, 10000.0, torch.float32))
    hf = (q.view(H, hd) * cos + rotate_half(q.view(H, hd)) * sin).reshape(-1)
    p = permute_qk(q, H).view(H, hd // 2, 2)  # (head, pair, 2)
    theta = pos / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)  # (pair,)
    x, y = p[..., 0], p[..., 1]
    llama = torch.stack((x * theta.cos() - y * theta.sin(), x * theta.sin() + y * theta.cos()), -1).reshape(-1)
    np.testing.assert_allclose(llama.numpy(), permute_qk(hf, H).numpy(), atol=1e-5)
    assert torch.equal(unpermute_qk(permute_qk(q, H), H), q)


def test_tensor_types():
    """Norms stay f32; q8_0 needs rows of whole 32-element blocks, else f16 (as llama.cpp's converter).
    (The quantized mixes: tests/test_gguf_quant.py.)"""
    assert tensor_type("q8_0", (64,)) == Q.F32 and tensor_type("bf16", (64,)) == Q.F32
    assert tensor_type("q8_0", (10, 64)) == Q.Q8_0 and tensor_type("q8_0", (10, 48)) == Q.F16
    assert [tensor_type(t, (4, 32)) for t in GGUF_TYPES[:4]] == [Q.F32, Q.F16, Q.BF16, Q.Q8_0]


def test_tied_head_has_no_output_tensor(tmp_path):
    store = make_store(tmp_path, tie_word_embeddings=True)
    write_gguf(store, tmp_path / "t.gguf", "f16", progress=False)
    names = [t.name for t in gguf.GGUFReader(tmp_path / "t.gguf").tensors]
    assert "output.weight" not in names and names[0] == "token_embd.weight" and names[-1] == "output_norm.weight"


def test_streams_one_unit_at_a_time(store, tmp_path):
    """Each unit is loaded once, in order, and the file is declared before any unit is loaded."""
    calls = []
    load = store.load_tensors

    def recording(unit, dtype=None):
        calls.append((unit, (tmp_path / "m.gguf").exists()))
        return load(unit, dtype)

    store.load_tensors = recording
    write_gguf(store, tmp_path / "m.gguf", "q8_0", progress=False)
    assert [u for u, _ in calls] == store.units
    assert not any(done for _, done in calls)  # the final name appears only at the end


def test_pre_tokenizer_names():
    assert pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    assert pre_tokenizer_name({"type": "Metaspace"}) is None
    assert pre_tokenizer_name(None) is None
    from odyssey.export.gguf_vocab import LLAMA3_REGEX

    llama3 = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ],
    }
    assert pre_tokenizer_name(llama3) == "llama-bpe"


# --- refusals: one line, nothing left under the final name or as a temporary -------------------


def assert_nothing_written(directory, name="m.gguf"):
    assert not (directory / name).exists()
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_unsupported_type_is_refused(store, tmp_path):
    valid = "f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k"
    with pytest.raises(OdysseyError, match=rf"--gguf-type must be one of {valid}, got 'q3_k_m'"):
        write_gguf(store, tmp_path / "m.gguf", "q3_k_m", progress=False)
    assert_nothing_written(tmp_path)
    assert GGUF_TYPES == tuple(valid.split(", "))


def test_store_without_tokenizer_is_refused(tmp_path):
    init_store(tiny_config(), tmp_path / "bare", dtype="f32", seed=1, progress=False)
    bare = Store.open(tmp_path / "bare")
    with pytest.raises(OdysseyError, match="no tokenizer.json"):
        gguf_bytes(bare, "f16")  # the driver's check before any format is written
    with pytest.raises(OdysseyError) as e:
        write_gguf(bare, tmp_path / "m.gguf", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "no tokenizer.json" in msg and f"--model {tmp_path / 'bare'}" in msg
    assert "odyssey prepare-data" in msg
    assert_nothing_written(tmp_path)


def test_tokenizer_larger_than_the_model_is_refused(store, tmp_path):
    cfg_path = store.root / "config.json"
    hf = json.loads(cfg_path.read_text())
    hf["vocab_size"] = 290  # fewer rows than the tokenizer's 300 tokens (shards kept: only read_vocab runs)
    store.config = type(store.config).from_hf_dict(hf)
    with pytest.raises(OdysseyError, match="has 300 tokens, the model only 290"):
        write_gguf(store, tmp_path / "m.gguf", progress=False)
    assert_nothing_written(tmp_path)


def test_a_tokenizer_llama_cpp_cannot_load_is_refused(store, tmp_path):
    """A BPE split on whitespace is neither byte-level (gpt2) nor SentencePiece-style (llama)."""
    path = store.tokenizer_path()
    tok = json.loads(path.read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    path.write_text(json.dumps(tok))
    with pytest.raises(OdysseyError, match="neither a byte-level BPE .* nor a SentencePiece-style tokenizer"):
        write_gguf(store, tmp_path / "m.gguf", progress=False)
    assert_nothing_written(tmp_path)


def test_failure_midway_leaves_no_file(store, tmp_path):
    load = store.load_tensors

    def failing(unit, dtype=None):
        if unit == 1:
            raise OSError("disk went away")
        return load(unit, dtype)

    store.load_tensors = failing
    with pytest.raises(OSError, match="disk went away"):
        write_gguf(store, tmp_path / "m.gguf", progress=False)
    assert_nothing_written(tmp_path)


def test_not_enough_disk_is_refused_before_writing(store, tmp_path, monkeypatch):
    import odyssey.export.gguf as g

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(g.shutil, "disk_usage", lambda p: usage._replace(free=10 << 20))
    with pytest.raises(OdysseyError, match="not enough free disk .* free some space or choose another --out"):
        write_gguf(store, tmp_path / "m.gguf", progress=False)
    assert_nothing_written(tmp_path)


# --- the model's own tokenizer: gpt2 (Llama 3, Qwen) or llama (SentencePiece) -------------------


def store_with_tokenizer(tmp_path, directory, vocab: int) -> Store:
    """A tiny f32 store of `vocab` rows holding the tokenizer files of `directory`."""
    from odyssey.tokenizer import copy_tokenizer

    out = tmp_path / "store"
    init_store(tiny_config(vocab_size=vocab), out, dtype="f32", seed=1, progress=False)
    copy_tokenizer(directory, out)
    return Store.open(out)


@pytest.mark.parametrize("style", ["llama3", "qwen", "sentencepiece"])
def test_model_tokenizers_keep_their_rules(model_tokenizers, tmp_path, style):
    """What llama.cpp's converter writes for each kind: the tokenizer model, pre-tokenizer name,
    special ids and whether a BOS is added (as transformers adds one), the chat template; tokens by
    id; for SentencePiece, byte tokens, scores ordering the merges and the space prefix."""
    from transformers import AutoTokenizer

    src = model_tokenizers[style]
    ref = AutoTokenizer.from_pretrained(src)
    store = store_with_tokenizer(tmp_path, src, len(ref) + 3)  # 3 padding rows
    write_gguf(store, tmp_path / "m.gguf", "f32", progress=False)
    f = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    expected = {
        "llama3": ("gpt2", "llama-bpe", True),
        "qwen": ("gpt2", "qwen2", False),
        "sentencepiece": ("llama", "default", True),
    }[style]
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"], f["tokenizer.ggml.add_bos_token"]) == expected
    assert f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.ggml.eos_token_id"] == ref.eos_token_id
    if ref.bos_token_id is not None:
        assert f["tokenizer.ggml.bos_token_id"] == ref.bos_token_id
    assert f.get("tokenizer.chat_template") == ref.chat_template
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    vocab = {i: t for t, i in ref.get_vocab().items()}
    assert tokens[: len(ref)] == [vocab[i] for i in range(len(ref))]
    assert tokens[len(ref) :] == [f"[PAD{i}]" for i in range(len(ref), len(ref) + 3)]
    T = gguf.TokenType
    assert all(types[i] == T.CONTROL for i in ref.all_special_ids if i != ref.unk_token_id)
    if style == "sentencepiece":
        assert f["tokenizer.ggml.add_space_prefix"] is True
        assert types[0] == T.UNKNOWN and types[3:259] == [T.BYTE] * 256
        assert tokens[3] == "<0x00>" and "▁t" in tokens  # SentencePiece's space, not GPT-2's "Ġ"
        scores = f["tokenizer.ggml.scores"]
        merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
        made = [ref.convert_tokens_to_ids("".join(m.split(" ") if isinstance(m, str) else m)) for m in merges]
        first = list(dict.fromkeys(made))  # each merged token at the rank of its first merge
        assert [scores[i] for i in first] == sorted((scores[i] for i in first), reverse=True)
        assert scores[first[0]] > scores[first[-1]] and "tokenizer.ggml.merges" not in f
    else:
        assert "tokenizer.ggml.scores" not in f and f["tokenizer.ggml.merges"]
        assert types[: min(ref.all_special_ids)] == [T.NORMAL] * min(ref.all_special_ids)
