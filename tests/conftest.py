"""Shared fixtures: tiny model configs and stores built in milliseconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from odyssey.modelconfig import ModelConfig
from odyssey.runtime.allocator import quiet_threads

quiet_threads()  # as the odyssey commands do, before any test imports torch

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**kw) -> ModelConfig:
    """2 layers, width 64, GQA 4/2 heads: a whole forward takes milliseconds."""
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def tiny_store(tmp_path, tiny_cfg):
    """A tiny store in f32 (exact comparisons)."""
    from odyssey.store import init_store

    out = tmp_path / "store"
    init_store(tiny_cfg, out, dtype="f32", seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def train_dir(tmp_path_factory) -> Path:
    """For tests that run `odyssey train`: DIR/store, a tiny f32 store (2 layers, width 64, vocab
    512) holding a tokenizer, and DIR/tok, token data of generated stories (a step: milliseconds)."""
    from odyssey.data import prepare_data
    from odyssey.store import init_store

    d = tmp_path_factory.mktemp("train")
    load_tool("make_sample_corpus").write_corpus(d / "corpus", "stories", 80, seed=2)
    init_store(tiny_config(vocab_size=512), d / "store", dtype="f32", seed=1, progress=False)
    prepare_data([d / "corpus"], d / "tok", vocab_size=512, model_store=d / "store", progress=False)
    return d


@pytest.fixture(scope="session")
def model_tokenizers(tmp_path_factory) -> dict[str, Path]:
    """{style: directory} of tiny tokenizers in the styles of real checkpoints (Llama 3, Qwen,
    TinyLlama's SentencePiece): see tests/helpers_tokenizers.py. Read-only: copy before changing."""
    from tests.helpers_tokenizers import STYLES, make_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    for style in STYLES:
        make_tokenizer(root / style, style)
    return {style: root / style for style in STYLES}


def load_tool(name: str):
    """Import tools/NAME.py (tools/ is not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m odyssey ARGS` as a user would; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "odyssey", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=timeout,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, one line on stderr naming the cause, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = err.splitlines()[-1]
    for n in needles:
        assert n.lower() in last.lower(), (n, last)
