"""llama.cpp loads Odyssey's GGUF and computes what the engine computes (slow: needs
llama-cpp-python, which `make test-slow` builds from its PyPI source package into .venv).

A small random model (2 layers, hidden 256, head_dim 64, GQA 4/2, init std 0.2 so logits are not
flat) with a tokenizer trained by prepare-data on the sample stories; next-token logits at every
position of a 32-token prompt: f32 GGUF within 1e-2 of the engine's fp32 logits, q8_0 GGUF with
the same argmax at >= 95% of positions; llama.cpp's tokenizer gives the HF tokenizer's ids."""

from pathlib import Path

import numpy as np
import pytest
import torch

from odyssey.data import load_tokenizer, prepare_data
from odyssey.engine import Engine
from odyssey.export.gguf import write_gguf
from odyssey.store import Store, init_store
from tests.conftest import ROOT, tiny_config

pytestmark = pytest.mark.slow

PROMPT_TOKENS = 32
TEXT = ("Once upon a time, a little girl named Lily found 3 shiny stones by the river. "
        "She said: \"Mom, look!\" and ran home. 옛날 옛적에 작은 고양이가 살았어요.")


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed in this environment; run `make test-slow`, which "
                    "builds it into .venv (5-7 minutes) before running the slow tests")
    return llama_cpp


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(store, {gguf_type: path}) for a small random model with a trained tokenizer."""
    tmp = tmp_path_factory.mktemp("llamacpp")
    cfg = tiny_config(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=256)
    init_store(cfg, tmp / "store", dtype="f32", seed=3, progress=False)
    prepare_data([ROOT / "data" / "sample" / "stories_en.txt"], tmp / "data", vocab_size=480,
                 model_store=tmp / "store", progress=False)  # 32 padded rows
    store = Store.open(tmp / "store")
    paths = {t: tmp / f"model-{t}.gguf" for t in ("f32", "q8_0")}
    for t, p in paths.items():
        write_gguf(store, p, t, progress=False)
    return store, paths


def prompt_ids(store) -> list[int]:
    ids = load_tokenizer(store.tokenizer_path()).encode(TEXT).ids  # starts with <s>
    assert len(ids) >= PROMPT_TOKENS
    return ids[:PROMPT_TOKENS]


def engine_logits(store, ids) -> np.ndarray:
    with Engine(store, compute_dtype="fp32") as eng:
        return eng.logits(torch.tensor([ids])).numpy()[0]  # (T, V)


def llama_logits(path: Path, ids) -> np.ndarray:
    llm = llama_cpp().Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, n_threads=2,
                            verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)  # (T, V)
    finally:
        llm.close()


def test_f32_logits_match_the_engine(model):
    store, paths = model
    ids = prompt_ids(store)
    want = engine_logits(store, ids)
    got = llama_logits(paths["f32"], ids)
    assert got.shape == want.shape == (PROMPT_TOKENS, store.config.vocab_size)
    assert want.std() > 1.0  # logits that discriminate, so the comparison means something
    diff = np.abs(got - want).max(axis=1)  # per position
    print(f"f32: max abs diff {diff.max():.2e} (position {diff.argmax()}), logits std {want.std():.2f}")
    assert diff.max() < 1e-2, diff


def test_q8_0_argmax_matches_the_engine(model):
    store, paths = model
    ids = prompt_ids(store)
    want = engine_logits(store, ids).argmax(axis=1)
    got = llama_logits(paths["q8_0"], ids).argmax(axis=1)
    agree = float((got == want).mean())
    print(f"q8_0: argmax agrees at {agree:.1%} of {PROMPT_TOKENS} positions")
    assert agree >= 0.95, (got, want)


def test_llama_cpp_tokenizes_like_the_store_tokenizer(model):
    store, paths = model
    llm = llama_cpp().Llama(model_path=str(paths["q8_0"]), vocab_only=True, verbose=False)
    try:
        tok = load_tokenizer(store.tokenizer_path())
        for text in (TEXT, "hello  world\n\nThe end.", "It's 2024; they'll say 'hi'!"):
            assert llm.tokenize(text.encode("utf-8"), add_bos=True) == tok.encode(text).ids, text
            assert llm.detokenize(tok.encode(text, add_special_tokens=False).ids).decode("utf-8") == text
        assert (llm.token_bos(), llm.token_eos(), llm.n_vocab()) == (1, 2, store.config.vocab_size)
    finally:
        llm.close()
