"""odyssey.dtypes: the compute dtype `auto` picks never computes below the store's precision; the
environment and an explicit option still win; the rule is said in one line."""

from __future__ import annotations

import pytest

from odyssey import dtypes
from odyssey.dtypes import COMPUTE_ENV, compute_dtype_info, compute_dtype_line, compute_dtype_name, compute_dtype_source
from odyssey.errors import OdysseyError


@pytest.fixture(params=[True, False], ids=["bf16-faster", "fp32-faster"])
def cpu(request, probe_cache):
    """A planted compute probe (at the 1.2B's shape, what `auto` measures without a model) saying
    bf16 (or fp32) multiplies faster here; no override in the environment. True: bf16 faster."""
    from odyssey.probe import DEFAULT_SHAPE

    fast, slow = 300.0, 100.0
    probe_cache(DEFAULT_SHAPE, bf16=fast if request.param else slow, fp32=slow if request.param else fast)
    return request.param


def test_auto_never_computes_below_the_store(cpu):
    assert compute_dtype_name("auto", "f32") == "fp32" and compute_dtype_source("auto", "f32") == "store"
    assert compute_dtype_name("auto", "f16") == "fp32"  # bf16 keeps fewer mantissa bits than f16
    assert compute_dtype_name("auto", "bf16") == ("bf16" if cpu else "fp32")
    assert compute_dtype_source("auto", "bf16") == "probe"
    assert compute_dtype_name("auto") == ("bf16" if cpu else "fp32")  # no store known (doctor)
    assert compute_dtype_info("auto", "f32").itemsize == 4
    assert "the store is f32, never computed below its precision" in compute_dtype_line("auto", "f32")
    line = compute_dtype_line("auto", "bf16")
    win, lose = ("bf16", "fp32") if cpu else ("fp32", "bf16")
    assert line == (
        f"compute dtype: {win} (auto: measured {win} 300 GFLOP/s vs {lose} 100 at 512x2048x5632, cached 2026-01-02)"
    )
    assert compute_dtype_line("auto").startswith(f"compute dtype: {win} (auto for bf16 stores (f32 and f16: fp32)")


def test_environment_and_option_win(cpu, monkeypatch):
    monkeypatch.setenv(COMPUTE_ENV, "bf16")
    assert compute_dtype_name("auto", "f32") == "bf16" and compute_dtype_source("auto", "f32") == "environment"
    assert f"{COMPUTE_ENV}=bf16 overrides auto" in compute_dtype_line("auto", "f32")
    assert compute_dtype_name("fp32", "bf16") == "fp32" and compute_dtype_source("fp32", "bf16") == "option"
    monkeypatch.setenv(COMPUTE_ENV, "fp32")
    assert compute_dtype_name("auto", "bf16") == "fp32"
    assert compute_dtype_name("bf16", "f32") == "bf16"  # the user's explicit choice
    assert compute_dtype_line("bf16", "f32") == "compute dtype: bf16 (--compute-dtype bf16)"
    monkeypatch.setenv(COMPUTE_ENV, "fp8")
    with pytest.raises(OdysseyError, match=f"{COMPUTE_ENV} must be bf16 or fp32"):
        compute_dtype_name("auto", "bf16")
    with pytest.raises(OdysseyError, match="--compute-dtype must be auto, bf16 or fp32"):
        compute_dtype_name("fp16")


@pytest.mark.parametrize("bf16_faster", [True, False], ids=["bf16-faster", "fp32-faster"])
def test_engine_and_planner_follow_the_store_and_the_probe(tiny_store, probe_cache, bf16_faster):
    """An f32 store computes in fp32 with `auto` whatever the probe says; a bf16 store in what the
    probe measured faster at its model's largest projection (planted: no measurement here). The
    planner counts the same itemsize, and the line says the figures."""
    import torch

    from odyssey.engine import Engine
    from odyssey.planner import plan_for_store
    from odyssey.probe import shape_of
    from odyssey.store import Store, init_store
    from tests.conftest import tiny_config

    f32 = Store.open(tiny_store)
    bf16_dir = tiny_store.parent / "bf16"
    init_store(tiny_config(), bf16_dir, dtype="bf16", seed=1, progress=False)
    bf16 = Store.open(bf16_dir)
    assert shape_of(bf16.config) == (512, 64, 160)  # hidden -> intermediate
    probe_cache(shape_of(bf16.config), bf16=90.0 if bf16_faster else 10.0, fp32=50.0)
    with Engine(f32) as eng:
        assert eng.dtype == torch.float32
    with Engine(bf16) as eng:
        assert eng.dtype == (torch.bfloat16 if bf16_faster else torch.float32)
    plans = {s.dtype: plan_for_store(s, mode="lora", seq_len=64, runtime=0).terms for s in (f32, bf16)}
    assert plans["f32"]["activations"] == (2 if bf16_faster else 1) * plans["bf16"]["activations"]
    assert dtypes.compute_dtype_name("auto", f32.dtype, f32.config) == "fp32"
    line = dtypes.compute_dtype_line("auto", bf16.dtype, bf16.config)
    figures = "bf16 90 GFLOP/s vs fp32 50" if bf16_faster else "fp32 50 GFLOP/s vs bf16 10"
    assert f"(auto: measured {figures} at 512x64x160, cached 2026-01-02)" in line
    assert len(list(probe_cache.directory.iterdir())) == 1  # the planted entry used: nothing measured
