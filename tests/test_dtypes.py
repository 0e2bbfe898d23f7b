"""odyssey.dtypes: the compute dtype `auto` picks never computes below the store's precision; the
environment and an explicit option still win; the rule is said in one line."""

from __future__ import annotations

import pytest

from odyssey import dtypes
from odyssey.dtypes import COMPUTE_ENV, compute_dtype_info, compute_dtype_line, compute_dtype_name, compute_dtype_source
from odyssey.errors import OdysseyError


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-bf16"])
def cpu(request, monkeypatch):
    """Pretend the CPU does (or does not) multiply bf16 natively; no override in the environment."""
    import odyssey.runtime.cpu

    monkeypatch.setattr(odyssey.runtime.cpu, "native_bf16", lambda: request.param)
    monkeypatch.delenv(COMPUTE_ENV, raising=False)
    return request.param


def test_auto_never_computes_below_the_store(cpu):
    assert compute_dtype_name("auto", "f32") == "fp32" and compute_dtype_source("auto", "f32") == "store"
    assert compute_dtype_name("auto", "f16") == "fp32"  # bf16 keeps fewer mantissa bits than f16
    assert compute_dtype_name("auto", "bf16") == ("bf16" if cpu else "fp32")
    assert compute_dtype_source("auto", "bf16") == "cpu"
    assert compute_dtype_name("auto") == ("bf16" if cpu else "fp32")  # no store known (doctor)
    assert compute_dtype_info("auto", "f32").itemsize == 4
    assert "the store is f32, never computed below its precision" in compute_dtype_line("auto", "f32")
    line = compute_dtype_line("auto", "bf16")
    assert line.startswith(f"compute dtype: {'bf16' if cpu else 'fp32'} (auto: a bf16 store")
    assert ("natively" in line) == cpu


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


def test_engine_and_planner_follow_the_store(tiny_store, monkeypatch):
    """An f32 store computes in fp32 with `auto` even on a CPU with native bf16; a bf16 store there
    in bf16. The planner counts the same itemsize."""
    import torch

    import odyssey.runtime.cpu
    from odyssey.engine import Engine
    from odyssey.planner import plan_for_store
    from odyssey.store import Store, init_store
    from tests.conftest import tiny_config

    monkeypatch.setattr(odyssey.runtime.cpu, "native_bf16", lambda: True)
    monkeypatch.delenv(COMPUTE_ENV, raising=False)
    f32 = Store.open(tiny_store)
    bf16_dir = tiny_store.parent / "bf16"
    init_store(tiny_config(), bf16_dir, dtype="bf16", seed=1, progress=False)
    bf16 = Store.open(bf16_dir)
    with Engine(f32) as eng:
        assert eng.dtype == torch.float32
    with Engine(bf16) as eng:
        assert eng.dtype == torch.bfloat16
    plans = {s.dtype: plan_for_store(s, mode="lora", seq_len=64, runtime=0).terms for s in (f32, bf16)}
    assert plans["f32"]["activations"] == 2 * plans["bf16"]["activations"]
    assert dtypes.compute_dtype_name("auto", f32.dtype) == "fp32"
