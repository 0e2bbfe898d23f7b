"""Dtypes and the constants every layer shares, in one torch-free place.

The compute dtype: `--compute-dtype auto` (the default) picks bf16 where the CPU multiplies bf16
natively and fp32 elsewhere. The environment variable `ODYSSEY_COMPUTE_DTYPE` (bf16 or fp32)
overrides what `auto` picks, on every command and in every test: the suite can be run both ways on
one machine. An explicit `--compute-dtype bf16|fp32` always wins.
"""

from __future__ import annotations

import os

from odyssey.errors import OdysseyError

COMPUTE_DTYPES = ("auto", "bf16", "fp32")
COMPUTE_ENV = "ODYSSEY_COMPUTE_DTYPE"


def compute_dtype_name(name: str = "auto") -> str:
    """"bf16" or "fp32": what `--compute-dtype NAME` computes in on this machine."""
    if name in ("fp32", "f32"):
        return "fp32"
    if name == "bf16":
        return "bf16"
    if name != "auto":
        raise OdysseyError(f"--compute-dtype must be auto, bf16 or fp32, got {name!r}")
    forced = os.environ.get(COMPUTE_ENV, "").strip().lower()
    if forced:
        if forced not in ("bf16", "fp32"):
            raise OdysseyError(f"{COMPUTE_ENV} must be bf16 or fp32, got {forced!r}; unset it to let "
                               f"`auto` decide")
        return forced
    from odyssey.runtime.cpu import native_bf16

    return "bf16" if native_bf16() else "fp32"


def compute_dtype_source(name: str = "auto") -> str:
    """Why `compute_dtype_name(name)` answers what it does: "option", "environment" or "cpu"."""
    if name != "auto":
        return "option"
    return "environment" if os.environ.get(COMPUTE_ENV, "").strip() else "cpu"
