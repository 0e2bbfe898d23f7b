"""llama.cpp loads Odyssey's GGUF and computes what the engine computes (slow: needs
llama-cpp-python, which `make test-slow` builds from its PyPI source package into .venv).

Next-token logits at every position of a 32-token prompt, llama.cpp against
`Engine(store, compute_dtype="fp32")`, on two small models (2 layers, hidden 256, head_dim 64,
GQA 4/2, vocab 512 with a 480-token tokenizer trained on the sample stories):
- "random": `init_store` with init std 0.2 and a tied head. Its attention logits are large, so a
  small error anywhere (RoPE layout, norms, scaling) is amplified: the f32 check is strict here.
- "peaked": untied, head = the embedding rolled by one row, layers at std 0.06. Every position has
  a clear winner (top-1/top-2 gap above 3 logit standard deviations), while the layers still move
  the logits by up to ~8 standard deviations. A random model's top two logits are often closer
  than q8_0's noise (measured: ~2% of the logit spread per logit; 87-97% argmax agreement over
  32 positions, seed-dependent), which would make the argmax check a coin toss; and since the
  argmax alone barely sees the layers here, the q8_0 logits must also stay within 0.3 standard
  deviations of the engine's (measured 0.07; 1.3-2.8 with the Q/K permutation left out).
llama.cpp keeps its KV cache in f16 by default; the comparisons ask for an f32 cache so that they
measure the file, not that rounding (measured on "random": 4e-2 with the f16 cache, 1e-4 without).

Every family (test_every_family_f32_logits_match_the_engine): a random model written by the
family's transformers class (llama with Llama 3.2's RoPE and biases, qwen2, qwen3, gemma3 with
llama.cpp's 5:1 local/global pattern and with another pattern), imported, exported to an f32 GGUF
of llama.cpp's architecture for it: max abs logit diff <= 1e-3 at every position, argmax 100%.
Measured: llama 9e-6, qwen2 8e-6, qwen3 7e-6 (logit std 1.3). Gemma 3: llama.cpp's CPU GELU is an
fp16 lookup table (ggml-cpu/vec.h, GGML_GELU_FP16), 2e-3 at this scale; with the MLP silenced
(down_proj zero) the two agree to 4e-6, and against the engine computing that table's GELU
(`ggml_cpu_gelu`) to 6e-4 (the rest: fp16 roundings that flip on f32 inputs differing by ~1e-6)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from odyssey.data import prepare_data
from odyssey.engine import Engine
from odyssey.export.gguf import write_gguf
from odyssey.store import Store, StoreWriter, init_store
from odyssey.tokenizer import copy_tokenizer, load_tokenizer
from tests.conftest import ROOT, tiny_config

pytestmark = pytest.mark.slow

PROMPT_TOKENS = 32
GGML_TYPE_F32 = 0  # llama.cpp's KV cache type for type_k / type_v
TEXT = (
    "Once upon a time, a little girl named Lily found 3 shiny stones by the river. "
    'She said: "Mom, look!" and ran home. 옛날 옛적에 작은 고양이가 살았어요.'
)


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail(
            "llama-cpp-python is not installed in this environment; run `make test-slow`, which "
            "builds it into .venv (5-7 minutes) before running the slow tests"
        )
    return llama_cpp


def small_config(**kw):
    return tiny_config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **kw,
    )


def write_peaked(out: Path, seed: int = 0, layer_std: float = 0.06) -> None:
    """Embedding rows N(0, 1), head row j = embedding row j-1 / sqrt(d) (so token t votes for
    t+1 by ~16 logit standard deviations), layers N(0, layer_std), norms one."""
    cfg = small_config()
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g)

    def producer(name, shape):
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name == "model.embed_tokens.weight":
            return embed
        if name == "lm_head.weight":
            return embed.roll(1, 0) / cfg.hidden_size**0.5
        return torch.randn(shape, generator=g) * layer_std

    w = StoreWriter(out, cfg, "f32", {"kind": "test-peaked", "seed": seed}, force=False)
    for unit in w.units:
        w.write_unit(unit, producer)
    w.finish()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """Token data whose tokenizer (480 tokens, byte-level BPE) the stores below take."""
    out = tmp_path_factory.mktemp("llamacpp-data") / "data"
    prepare_data([ROOT / "data" / "sample" / "stories_en.txt"], out, vocab_size=480, progress=False)
    return out  # 32 rows of the models' 512 stay padding


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """{"random" | "peaked": (store, {gguf_type: path})}, each with the trained tokenizer."""
    tmp = tmp_path_factory.mktemp("llamacpp")
    init_store(
        small_config(initializer_range=0.2, tie_word_embeddings=True),
        tmp / "random",
        dtype="f32",
        seed=3,
        progress=False,
    )
    write_peaked(tmp / "peaked")
    out = {}
    for name, gguf_types in (("random", ("f32",)), ("peaked", ("f32", "q8_0"))):
        copy_tokenizer(tokenizer_dir, tmp / name)
        store = Store.open(tmp / name)
        paths = {t: tmp / f"{name}-{t}.gguf" for t in gguf_types}
        for t, p in paths.items():
            write_gguf(store, p, t, progress=False)
        out[name] = store, paths
    return out


def prompt_ids(store) -> list[int]:
    ids = load_tokenizer(store.tokenizer_path()).encode(TEXT).ids  # starts with <s>
    assert len(ids) >= PROMPT_TOKENS
    return ids[:PROMPT_TOKENS]


def engine_logits(store, ids) -> np.ndarray:
    with Engine(store, compute_dtype="fp32") as eng:
        return eng.logits(torch.tensor([ids])).numpy()[0]  # (T, V)


def llama_logits(path: Path, ids, lora: Path | None = None) -> np.ndarray:
    """llama.cpp's logits (T, V) at every position, f32 KV cache; with `lora`, that adapter GGUF applied
    at scale 1 (llama-cpp-python's lora_path)."""
    n = max(64, len(ids))
    llm = llama_cpp().Llama(
        model_path=str(path),
        lora_path=str(lora) if lora else None,
        logits_all=True,
        n_ctx=n,
        n_batch=n,
        n_threads=2,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        verbose=False,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)
    finally:
        llm.close()


@pytest.mark.parametrize("name", ["random", "peaked"])
def test_f32_logits_match_the_engine(models, name):
    store, paths = models[name]
    ids = prompt_ids(store)
    want = engine_logits(store, ids)
    got = llama_logits(paths["f32"], ids)
    assert got.shape == want.shape == (PROMPT_TOKENS, store.config.vocab_size)
    assert want.std() > 0.5  # logits that discriminate, so the comparison means something
    diff = np.abs(got - want).max(axis=1)  # (T,) worst logit per position
    print(f"{name} f32: max abs diff {diff.max():.2e} (position {diff.argmax()}), logit std {want.std():.2f}")
    assert diff.max() < 1e-2, diff


def test_q8_0_argmax_and_logits_match_the_engine(models):
    store, paths = models["peaked"]
    ids = prompt_ids(store)
    want = engine_logits(store, ids)
    got = llama_logits(paths["q8_0"], ids)
    agree = float((got.argmax(axis=1) == want.argmax(axis=1)).mean())
    spread = float(np.abs(got - want).max() / want.std())
    print(
        f"q8_0: argmax agrees at {agree:.1%} of {PROMPT_TOKENS} positions; max abs diff "
        f"{np.abs(got - want).max():.3f} = {spread:.3f} logit std"
    )
    assert agree >= 0.95, (got.argmax(axis=1), want.argmax(axis=1))
    assert spread < 0.3


def test_llama_cpp_tokenizes_like_the_store_tokenizer(models):
    store, paths = models["peaked"]
    llm = llama_cpp().Llama(model_path=str(paths["q8_0"]), vocab_only=True, verbose=False)
    try:
        tok = load_tokenizer(store.tokenizer_path())
        for text in (TEXT, "hello  world\n\nThe end.", "It's 2024; they'll say 'hi'!"):
            assert llm.tokenize(text.encode("utf-8"), add_bos=True) == tok.encode(text).ids, text
            assert llm.detokenize(tok.encode(text, add_special_tokens=False).ids).decode("utf-8") == text
        assert (llm.token_bos(), llm.token_eos(), llm.n_vocab()) == (1, 2, store.config.vocab_size)
    finally:
        llm.close()


# --------------------------------------------------------------------------------------------
# every family: a random model written by the family's transformers class, imported, exported
# to an f32 GGUF of llama.cpp's architecture for it, run by llama.cpp


FAMILY_BASE = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
# Llama 3.2's RoPE: the three bands of llama3 frequencies are all present at head_dim 64
LLAMA32_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
FAMILY_CASES = {
    # Llama 3.x: rope_freqs.weight; biases everywhere, so the permutation of q/k biases is run too
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(
        rope_parameters=LLAMA32_ROPE, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    # linear RoPE scaling: rope.scaling.type / rope.scaling.factor
    "llama-linear": ("LlamaForCausalLM", "LlamaConfig", dict(
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True)),  # q/k/v biases, NEOX
    # q/k norms, head_dim explicit: 8 x 64 = 512 != hidden 256
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(num_attention_heads=8, num_key_value_heads=4)),
    # Gemma 3 1B's shape in small: 6 layers, llama.cpp's 5:1 local/global pattern, local base 10000,
    # query_pre_attn_scalar = head_dim, one KV head; a window of 8 so that 24 of 32 positions slide
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        num_hidden_layers=6, num_key_value_heads=1, sliding_window=8, query_pre_attn_scalar=64,
        rope_theta=1e6, rope_local_base_freq=10000.0, tie_word_embeddings=True)),
    # linear scaling of the global layers only (as Gemma 3 4B+), the local ones at their own base
    "gemma3-linear": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        num_hidden_layers=6, num_key_value_heads=1, sliding_window=8, query_pre_attn_scalar=64,
        rope_parameters=dict(full_attention=dict(rope_type="linear", rope_theta=1e6, factor=8.0),
                             sliding_attention=dict(rope_type="default", rope_theta=10000.0)))),
    # another pattern (local, global, local): written as llama.cpp's per-layer sliding_window_pattern
    "gemma3-pattern": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=8, query_pre_attn_scalar=64, rope_local_base_freq=10000.0)),
}  # fmt: skip


def family_model(case: str):
    """The case's random model, fp32: matrices N(0, 0.08), norms N(1, 0.2) (Gemma: N(0, 0.2), its
    norms scale by 1 + w), biases N(0, 0.1), so that every tensor matters."""
    import transformers

    cls_name, cfg_name, keys = FAMILY_CASES[case]
    cfg = getattr(transformers, cfg_name)(**{**FAMILY_BASE, **keys})
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("norm.weight"):
                p.normal_(0.0 if case.startswith("gemma") else 1.0, 0.2)
            else:
                p.normal_(0, 0.1)
    return model


def ggml_cpu_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU as llama.cpp's CPU backend computes it in an f32 graph (ggml-cpu/vec.h, GGML_GELU_FP16,
    always defined): the tanh approximation looked up in an fp16 table at fp16(x), x <= -10 -> 0,
    x >= 10 -> x. Its relative error (fp16 rounding of input and output, ~5e-4) is llama.cpp's own,
    not the export's; this emulation shows it (`approximate` is ignored: Gemma uses tanh)."""
    table = TORCH_GELU(x.to(torch.float16).float(), approximate="tanh").to(torch.float16).float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table)).to(x.dtype)


TORCH_GELU = torch.nn.functional.gelu


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_every_family_f32_logits_match_the_engine(tmp_path, tokenizer_dir, case, monkeypatch):
    """llama.cpp's logits at every position of a 32-token prompt equal the engine's (f32 GGUF, f32
    KV cache): max abs diff <= 1e-3, the same argmax everywhere. Gemma 3's GeGLU: llama.cpp's CPU
    GELU is an fp16 table (`ggml_cpu_gelu`), which alone moves these logits by ~2e-3; the 1e-3
    bound holds against the engine computing that same GELU, the argmax against the exact one,
    and the exact logits stay within 5e-3."""
    from odyssey.store import import_hf

    model = family_model(case)
    model.save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "store", progress=False)
    copy_tokenizer(tokenizer_dir, tmp_path / "store")
    store = Store.open(tmp_path / "store")
    write_gguf(store, tmp_path / "m.gguf", "f32", progress=False)

    ids = torch.randint(3, 480, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(7)).tolist()
    exact = engine_logits(store, ids)
    with torch.no_grad():  # the engine is transformers' model (tests/test_families.py), here too
        np.testing.assert_allclose(model(input_ids=torch.tensor([ids])).logits[0].numpy(), exact, atol=1e-4)
    got = llama_logits(tmp_path / "m.gguf", ids)
    assert got.shape == exact.shape == (PROMPT_TOKENS, store.config.vocab_size)
    assert exact.std() > 0.5  # logits that discriminate, so the comparison means something
    gemma = store.config.family.name == "gemma3"
    if gemma:
        monkeypatch.setattr(torch.nn.functional, "gelu", ggml_cpu_gelu)
        want = engine_logits(store, ids)
        monkeypatch.undo()
    else:
        want = exact
    diff = np.abs(got - want).max(axis=1)  # (T,) worst logit per position
    agree = float((got.argmax(axis=1) == exact.argmax(axis=1)).mean())
    line = f"\n{case} ({store.config.family.gguf_arch}) f32: max abs diff {diff.max():.2e} (position {diff.argmax()})"
    if gemma:
        line += f" against the engine with llama.cpp's fp16-table GELU, {np.abs(got - exact).max():.2e} against exact"
    print(f"{line}; argmax agrees at {agree:.0%} of {PROMPT_TOKENS} positions, logit std {exact.std():.2f}")
    assert diff.max() <= 1e-3, diff
    assert agree == 1.0
    if gemma:
        assert np.abs(got - exact).max() <= 5e-3  # what the table costs at this logit scale


@pytest.mark.parametrize("style", ["llama3", "qwen", "sentencepiece"])
def test_llama_cpp_tokenizes_model_tokenizers_like_transformers(model_tokenizers, tmp_path, style):
    """The GGUF's tokenizer (gpt2 with the pre-tokenizer's name, or llama with merge-ordered scores
    and byte tokens) makes llama.cpp tokenize as transformers does, BOS rule included. One known
    difference is left out: for a text that starts with a space, llama.cpp's SentencePiece
    tokenizer adds its "▁" prefix anyway (as the sentencepiece library does), transformers'
    Metaspace (prepend_scheme "first") does not; GGUF has no key for that rule."""
    from transformers import AutoTokenizer

    from odyssey.tokenizer import copy_tokenizer
    from tests.helpers_tokenizers import TEXTS

    src = model_tokenizers[style]
    ref = AutoTokenizer.from_pretrained(src)
    init_store(tiny_config(vocab_size=len(ref)), tmp_path / "store", dtype="f32", seed=1, progress=False)
    copy_tokenizer(src, tmp_path / "store")
    write_gguf(Store.open(tmp_path / "store"), tmp_path / "m.gguf", "f32", progress=False)
    llm = llama_cpp().Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        for text in TEXTS + [TEXT]:
            if style == "sentencepiece" and text.startswith(" "):
                continue
            want = ref(text)["input_ids"]
            assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == want, (style, text)
        plain = "Once upon a time, 3 cats sat.\nThe end."
        ids = ref(plain)["input_ids"]  # with its BOS: after one, SentencePiece drops the "▁" prefix
        assert llm.detokenize(ids).decode("utf-8") == ref.decode(ids, skip_special_tokens=True) == plain
        assert llm.token_eos() == ref.eos_token_id
    finally:
        llm.close()
