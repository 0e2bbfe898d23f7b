"""`odyssey doctor`'s cpu and compute facts: the CPU as /proc/cpuinfo describes it, and the compute
probe's figures with the dtype `--compute-dtype auto` picks from them.

The compute fact runs the probe at the 1.2B's largest projection (odyssey.probe.DEFAULT_SHAPE;
training measures at its own model's shape), for a training step's 512 tokens and for one token a
pass (what `generate` and `chat` decide by), from the cache when this machine measured it before
(under a second otherwise; `--remeasure` measures again). It imports torch when it runs.
"""

from __future__ import annotations

import os
import platform

from odyssey.runtime.cpu import cpu_flags
from odyssey.runtime.fact import Fact


def cpu_fact() -> Fact:
    name, flags = cpu_flags()
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    x86 = platform.machine() in ("x86_64", "AMD64")
    if x86:
        has = {
            "AVX2": "avx2" in flags,
            "AVX512": "avx512f" in flags,
            "AVX512-BF16": "avx512_bf16" in flags,
            "AMX": "amx_bf16" in flags,
        }
    else:
        has = {"BF16": "bf16" in flags, "SVE": "sve" in flags}
    listed = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in has.items())
    summary = f"{name}, {cores} cores ({usable} usable by this process); {listed}"
    data = {
        "model": name,
        "cores": cores,
        "usable_cores": usable,
        "machine": platform.machine(),
        "flags": {k.lower().replace("-", "_"): v for k, v in has.items()},
    }
    if x86 and not has["AVX2"]:
        return Fact("cpu", "cpu", False, summary, "no AVX2: torch's matmuls run several times slower here", data)
    return Fact("cpu", "cpu", True, summary, "", data)


def compute_fact(remeasure: bool = False) -> Fact:
    from odyssey.dtypes import COMPUTE_ENV, compute_dtype_name, compute_dtype_source, probe_for
    from odyssey.probe import DECODE_TOKENS, shape_text
    from odyssey.runtime.cpu import native_bf16

    p = probe_for(None, remeasure=remeasure)  # what training decides by
    decode = probe_for(None, DECODE_TOKENS, remeasure=remeasure)  # what generate and chat decide by
    name, source = compute_dtype_name("auto"), compute_dtype_source("auto")
    generating = compute_dtype_name("auto", tokens=DECODE_TOKENS)
    data = {
        "compute_dtype": name,  # for a bf16 store
        "f32_store_compute_dtype": compute_dtype_name("auto", "f32"),
        "native_bf16": native_bf16(),
        "source": source,
        "probe": {
            "gflops": {k: round(v, 1) for k, v in p.gflops.items()},
            "fastest": p.fastest,
            "shape": list(p.key.shape),  # (tokens, in, out)
            "threads": p.key.threads,
            "kernels": p.key.kernels,
            "measured": p.measured,
            "probe_s": round(p.probe_s, 3),
            "rounds": p.rounds,
            "cached": p.cached,
            "cache_file": str(p.path) if p.path else None,
            "cache_error": p.cache_error or None,
        },
        "generate_compute_dtype": generating,  # generate and chat, a bf16 store: one token a pass
        "decode_probe": {
            "gflops": {k: round(v, 1) for k, v in decode.gflops.items()},
            "fastest": decode.fastest,
            "shape": list(decode.key.shape),
            "copies": decode.key.copies,
            "cached": decode.cached,
        },
    }
    figures = p.summary()
    gen = f"; generating (generate, chat): {generating}, {decode.summary()}"
    where = f"cache: {p.path}" if p.path else f"not cached: {p.cache_error}"
    if source == "environment":
        return Fact(
            "compute",
            "compute",
            True,
            f"{name} (`--compute-dtype auto`, forced by {COMPUTE_ENV}); the probe {figures}{gen}",
            f"unset {COMPUTE_ENV} to let the measurement decide ({where})",
            data,
        )
    shape = shape_text(p.key.shape)
    hint = (
        f"each model is measured once at its largest projection ({shape} here), {p.key.threads} threads, "
        f"kernels {p.key.kernels}; "
        f"`odyssey doctor --remeasure` measures again ({where})"
    )
    if name == "bf16":
        summary = f"bf16 for bf16 stores (`--compute-dtype auto`): {figures}; f32 and f16 stores in fp32{gen}"
    else:
        summary = f"fp32 (`--compute-dtype auto`): {figures}; weights stay in the store's dtype on disk{gen}"
    return Fact("compute", "compute", True, summary, hint, data)
