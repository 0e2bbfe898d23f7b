"""torch.compile of the decoder layers for training steps (`compile: on|off`, `--compile`).

Each decoder layer of the skeleton goes through `nn.Module.compile` (inductor, static shapes: a
training step has one shape; generation's growing cache would recompile every token, so only
training engines compile). One graph serves every layer (parameters are graph inputs, bound per
use as in eager), one more for the no-grad forward; the first step pays the compilation (minutes
on 2 cores; seconds when inductor's on-disk cache already holds the graphs).

Off by default: on the 1.2B LoRA step (bf16, 2-core AMD EPYC, idle, 2026-11-30) compiled steps
took 13.9 s at 1 GiB and 9.9 s at 4 GiB against eager's 13.9 and 9.5 s. Before the bf16 LoRA path
(adapters.lora_forward) removed the fp32 copies of activations, compiling saved 17 % of a step's
CPU time by fusing those copies; with them gone, what is left is matmul and attention, which
inductor calls as eager does.

Exactness: inductor keeps bf16 intermediates in fp32 unless told to round them where eager does
(`emulate_precision_casts`); with it the loss is eager's bit for bit on the tests' small stores
(not at the 1.2B: at 1 GiB in bf16, 2026-12-02, step 1's loss was 10.80714 against eager's
10.807096 and later steps within 1e-3; where that rounding differs is not traced), LoRA gradients
within bf16 rounding (inductor sums the input gradient's matmuls in its own order;
tests/test_adapters.py), and fp32 steps equal eager's (tests/test_compiling.py, slow). Eager
fallback: no C++ compiler on PATH means no compilation (said in the run's start line); a graph that
still fails to compile runs eager (`suppress_errors`), and the trainer says so after the first
step (`fell_back`).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class CompileChoice:
    on: bool
    why: str  # the start line's note, e.g. "torch.compile: on (--compile on)"; "" when off by default


def compiler_missing() -> str | None:
    """Why inductor cannot build its CPU kernels here (no C++ compiler on PATH), or None."""
    import torch._inductor.config as inductor_config

    cxx = inductor_config.cpp.cxx
    names = [n for n in (cxx if isinstance(cxx, tuple) else (cxx,)) if n]
    if any(shutil.which(n) for n in names):
        return None
    return f"no C++ compiler ({' or '.join(names) or 'g++'}) on PATH"


def choose(setting: str) -> CompileChoice:
    """Whether a training run compiles its layers (`setting` on or off)."""
    if setting != "on":
        return CompileChoice(False, "")
    missing = compiler_missing()
    if missing:
        return CompileChoice(False, f"torch.compile: off ({missing}; install g++ to compile)")
    return CompileChoice(True, "torch.compile: on (--compile on; the first step compiles)")


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
