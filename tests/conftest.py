"""Shared fixtures: tiny model configs and stores built in milliseconds."""

from __future__ import annotations

import os
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


@pytest.fixture(autouse=True, scope="session")
def _session_probe_cache(tmp_path_factory):
    """The compute probe's cache (odyssey.probe) in a directory of this session, for this process
    and every command it starts: tests never read or write the user's ~/.cache/odyssey, and a
    machine measures once per session."""
    from odyssey.probe import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("probe-cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


def plant_probe(directory: Path, shape, *, bf16: float, fp32: float, **key) -> Path:
    """Write a compute-probe cache entry for this machine's current key at `shape` (fields of the
    key replaced by `key`, e.g. threads=1) saying bf16 and fp32 run at these GFLOP/s."""
    import dataclasses

    from odyssey import atomic
    from odyssey.probe import Probe, ProbeKey

    k = dataclasses.replace(ProbeKey.current(shape), **key)
    entry = Probe(k, {"bf16": bf16, "fp32": fp32}, "2026-01-02T03:04:05+00:00", 0.5, 3)
    path = k.path(Path(directory))
    atomic.write_json(path, entry.to_json(), durable=False)
    return path


@pytest.fixture
def probe_cache(tmp_path, monkeypatch):
    """A fresh, empty probe cache for one test (ODYSSEY_CACHE_DIR) and no ODYSSEY_COMPUTE_DTYPE;
    returns a function that plants an entry: `probe_cache(shape, bf16=100, fp32=200)` -> path."""
    from odyssey.dtypes import COMPUTE_ENV
    from odyssey.probe import CACHE_ENV

    directory = tmp_path / "probe-cache"
    monkeypatch.setenv(CACHE_ENV, str(directory))
    monkeypatch.delenv(COMPUTE_ENV, raising=False)

    def plant(shape, *, bf16: float, fp32: float, **key) -> Path:
        return plant_probe(directory, shape, bf16=bf16, fp32=fp32, **key)

    plant.directory = directory
    return plant


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


def cli_in_process(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`odyssey ARGS` through `odyssey.cli.main` in this process, as `run_cli` returns it (status,
    stdout, stderr): for tests of messages and exit statuses, without a new interpreter importing
    torch (seconds each on 2 cores). An exception that escapes main is raised here, so a traceback
    still fails the test. Process-level behaviour (the allocator re-exec, signals, kill -9, a
    Python warning printed once per process) needs `run_cli`."""
    import contextlib
    import io

    from odyssey.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_env, old_cwd = dict(os.environ), os.getcwd()
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(old_cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(old_env)
    return subprocess.CompletedProcess(["odyssey", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, one line on stderr naming the cause, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = err.splitlines()[-1]
    for n in needles:
        assert n.lower() in last.lower(), (n, last)
