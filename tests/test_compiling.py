"""torch.compile of the decoder layers in training (odyssey/compiling.py): the choice, and the
eager fallback when no C++ compiler builds the kernels. Compiled steps equal to eager bit for bit:
tests/test_adapters.py (slow) and test_train_compiled_equals_eager below (slow)."""

import os
import stat

import pytest

from odyssey.compiling import choose, compiler_missing
from odyssey.config import TrainConfig
from odyssey.errors import OdysseyError
from tests.conftest import run_cli


def test_choose_on_and_off():
    assert choose("off") == choose("auto") and choose("off").on is False and choose("off").why == ""
    on = choose("on")
    assert on.on and "--compile on" in on.why


def test_no_compiler_means_eager_and_says_so(monkeypatch):
    monkeypatch.setattr("torch._inductor.config.cpp.cxx", (None, "no-such-cxx-odyssey"))
    assert "no-such-cxx-odyssey" in compiler_missing()
    c = choose("on")
    assert c.on is False and "torch.compile: off (no C++ compiler" in c.why and "install g++" in c.why


def test_config_checks_the_setting():
    assert TrainConfig(compile="off").compile == "off"
    assert TrainConfig(compile=True).compile == "on"  # YAML's on
    with pytest.raises(OdysseyError, match="compile .*--compile.* must be on or off"):
        TrainConfig(compile="auto")


def test_train_bad_compile_value_is_one_line(train_dir, tmp_path):
    p = run_cli(
        "train", "--no-guard", "--model", train_dir / "store", "--data", train_dir / "tok",
        "--out", tmp_path / "run", "--steps", "1", "compile=maybe",
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "compile (--compile) must be on or off" in p.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def _failing_cxx(tmp_path) -> str:
    """A C++ compiler on PATH that fails every build (as a broken toolchain would)."""
    cxx = tmp_path / "bin" / "broken-g++"
    cxx.parent.mkdir()
    cxx.write_text("#!/bin/sh\necho 'broken-g++: cannot build' >&2\nexit 1\n")
    cxx.chmod(cxx.stat().st_mode | stat.S_IXUSR)
    return str(cxx)


def _train(train_dir, out, *extra, env=None):
    from odyssey.runtime.runlog import RunDir

    p = run_cli(
        "train", "--no-guard", "--model", train_dir / "store", "--data", train_dir / "tok",
        "--out", out, "--ram-budget", "1GiB", "--steps", "2", "seq_len=32", "eval_every=0",
        "compute_dtype=fp32", *extra, env=env, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return p, RunDir(out).read_metrics("step")


def test_compile_on_with_a_broken_compiler_trains_eager_with_the_same_losses(train_dir, tmp_path):
    """--compile on where the C++ compiler fails: the run goes on eager, says so once in one
    line, and its losses are the eager run's bit for bit."""
    env = {**os.environ, "CXX": _failing_cxx(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    p, on = _train(train_dir, tmp_path / "on", "--compile", "on", env=env)
    _, off = _train(train_dir, tmp_path / "off", "--compile", "off")
    assert "torch.compile: on (--compile on" in p.stderr
    assert p.stderr.count("torch.compile compiled nothing") == 1
    assert "Traceback" not in p.stderr
    assert [r["loss"] for r in on] == [r["loss"] for r in off]


@pytest.mark.slow
def test_train_compiled_equals_eager(train_dir, tmp_path):
    """`odyssey train --compile on` (inductor builds the layers) gives the eager run's losses and
    gradient norms bit for bit, and compiles (no fallback line)."""
    p, on = _train(train_dir, tmp_path / "on", "--compile", "on")
    _, off = _train(train_dir, tmp_path / "off", "--compile", "off")
    assert "torch.compile: on" in p.stderr and "compiled nothing" not in p.stderr
    assert [r["loss"] for r in on] == [r["loss"] for r in off]
    assert [r["grad_norm"] for r in on] == [r["grad_norm"] for r in off]
