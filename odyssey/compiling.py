"""torch.compile of the decoder layers for training steps (`compile: auto|on|off`, `--compile`).

Each decoder layer of the skeleton goes through `nn.Module.compile` (inductor, static shapes: a
training step has one shape; generation's growing cache would recompile every token, so only
training engines compile). One graph serves every layer (parameters are graph inputs, bound per
use as in eager), one more for the no-grad forward; the first step pays the compilation
(`COMPILE_S`, less when inductor's on-disk cache already holds the graphs).

Exactness: inductor keeps bf16 intermediates in fp32 unless told to round them where eager does
(`emulate_precision_casts`); with it a step's loss and LoRA gradients equal eager's bit for bit
(tests/test_adapters.py). Eager fallback: no C++ compiler on PATH means no compilation (said in
the run's start line); a graph that still fails to compile runs eager (`suppress_errors`), and the
trainer says so after the first step (`fell_back`).

`auto` compiles when the step time it is expected to save over the run pays for the compilation
twice over: saved = `SAVED_SHARE` x the step's matmul time at the probe's rate x the steps to go
(figures: benchmarks/results/profile-1.2b-compiled.md and the README's "Speed" section).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

COMPILE_S = 120.0
"""Seconds the first step spends compiling a 1.2B model's layer graphs on a 2-core machine (idle;
about twice that under load; a few seconds with inductor's cache warm)."""
SAVED_SHARE = 0.15
"""Share of a step's time compilation saves (measured at the 1.2B: 14-17 %)."""


@dataclass(frozen=True)
class CompileChoice:
    on: bool
    why: str  # the start line's note, e.g. "torch.compile: on (--compile on)"


def compiler_missing() -> str | None:
    """Why inductor cannot build its CPU kernels here (no C++ compiler on PATH), or None."""
    import torch._inductor.config as inductor_config

    cxx = inductor_config.cpp.cxx
    names = [n for n in (cxx if isinstance(cxx, tuple) else (cxx,)) if n]
    if any(shutil.which(n) for n in names):
        return None
    return f"no C++ compiler ({' or '.join(names) or 'g++'}) on PATH"


def choose(setting: str, *, flop_per_step: float, gflops: float, steps: int) -> CompileChoice:
    """Whether a training run compiles its layers: `setting` off/on/auto, the step's FLOP (6 x
    parameters x tokens), the machine's matmul rate (GFLOP/s, the probe's) and the steps to run."""
    if setting == "off":
        return CompileChoice(False, "")
    missing = compiler_missing()
    if missing:
        return CompileChoice(False, f"torch.compile: off ({missing}; install g++ to compile)")
    if setting == "on":
        return CompileChoice(True, f"torch.compile: on (--compile on; the first step compiles, ~{COMPILE_S:.0f} s)")
    saved_s = SAVED_SHARE * flop_per_step / max(gflops * 1e9, 1.0) * steps
    if saved_s < 2 * COMPILE_S:
        return CompileChoice(False, "")  # auto and not worth it: nothing to say
    return CompileChoice(
        True,
        f"torch.compile: on (auto: ~{saved_s / 60:.0f} min to save over {steps} steps; "
        f"the first step compiles, ~{COMPILE_S:.0f} s; --compile off to skip)",
    )


def compile_layers(layers) -> None:
    """Compile each decoder layer (see the module's docstring)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True
    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eager
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # the fallback is said once, by us
    for layer in layers:
        layer.compile(dynamic=False)


def graphs() -> int:
    """Graphs compiled in this process so far."""
    import torch._dynamo

    return int(torch._dynamo.utils.counters["stats"].get("unique_graphs", 0))


def fell_back() -> bool:
    """After a compiled step: True when no graph was compiled (every layer ran eager)."""
    return graphs() == 0
