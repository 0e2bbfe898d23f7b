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
measure the file, not that rounding (measured on "random": 4e-2 with the f16 cache, 1e-4 without)."""

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
def models(tmp_path_factory):
    """{"random" | "peaked": (store, {gguf_type: path})}, each with the trained tokenizer."""
    tmp = tmp_path_factory.mktemp("llamacpp")
    prepare_data(
        [ROOT / "data" / "sample" / "stories_en.txt"], tmp / "data", vocab_size=480, progress=False
    )  # 32 model rows stay padding
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
        copy_tokenizer(tmp / "data", tmp / name)
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


def llama_logits(path: Path, ids) -> np.ndarray:
    llm = llama_cpp().Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=64,
        n_batch=64,
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
