"""The compute probe: which dtype multiplies faster on this machine, measured once and cached.

CPU flags do not tell (PITFALLS.md): an Intel Xeon reporting AVX512-BF16 ran the 1.2B's largest
projection at bf16 145 GFLOP/s and fp32 244; an AVX2 EPYC at bf16 20 and fp32 158. So `auto` times
one matmul in each dtype at the shape of the model's own largest projection, x (T, in) by W (out,
in) with T = 512 tokens (a training step's sequence; the default `--seq-len`), and keeps the faster.

Generating is another workload: a pass of one token multiplies a vector by every weight, so it is
bound by the bytes the weights stream from memory, not by arithmetic, and bf16 weights stream half
the bytes. `generate` and `chat` therefore decide at T = 1 (DECODE_TOKENS), over copies of W
multiplied in turn whose fp32 bytes reach the model's own fp32 weights or 64 MiB (DECODE_BYTES,
more than a last-level cache: 32 MiB on the EPYC below), whichever is less: a model that fits in
the cache is timed in the cache, as it decodes, and the probe's memory stays small (under a 400 MiB
cgroup the nano model's generate ran beside it). Measured 2026-12-02 on a 2-core AVX2-only AMD EPYC (no AVX-512): at
T = 512 bf16 17 GFLOP/s against fp32 88 (training computes in fp32), at T = 1 on SmolLM2-135M's
576x1536 bf16 8.9 against fp32 2.4, and greedy decoding of that model ran 18.4 tokens/s in bf16
against 9.7 in fp32 (benchmarks/generation.py), the same tokens.

The measurement: both dtypes' operands allocated (random, seeded), a warm-up of 16 rows in each
(oneDNN builds its kernels), then rounds that time one full matmul in each dtype in turn (so a
neighbour's load falls on both alike), until REPS rounds or ROUND_BUDGET_S have passed (at least
one round): GFLOP/s = 2 T in out / the median time. At the 1.2B's shape on 2 cores: 3 rounds in
about 1.2 s on a busy AMD EPYC with AVX512-BF16 (bf16 ~135 GFLOP/s, fp32 ~50); 5 rounds in about
0.7 s at the Xeon's 145 / 244; 2 rounds in about 1.5 s at the AVX2 EPYC's 20 / 158. A cache hit
costs under a millisecond. The measurement runs in a child process (about 1.5 s more, to import
torch): in the process that asked, the operands and oneDNN's kernels for them stayed as about 35 MiB
of anonymous memory at the 1.2B's shape, which the memory plan measured next as its runtime term.

fp16 is never considered: its 5 exponent bits overflow on activations and gradients without loss
scaling (which the engine does not do), and CPUs without AVX512-FP16 / AMX-FP16 emulate it
(measured on a 2-core AMD EPYC with AVX512-BF16: fp16 15 GFLOP/s against fp32 60, bf16 100). An
f16 store computes in fp32, which holds it exactly.

The cache: one JSON file per key under `ODYSSEY_CACHE_DIR`, else `$XDG_CACHE_HOME/odyssey`, else
`~/.cache/odyssey`, named `compute-probe-DIGEST.json`. The key is what decides the figures: the
CPU's model name and the flags that matter to matmul kernels, the architecture, the kernels torch
may use (ATen's CPU capability and any variable that limits the instruction set of ATen, oneDNN or
MKL: this AVX512-BF16 EPYC under `ONEDNN_MAX_CPU_ISA=AVX2` multiplies bf16 at 46 GFLOP/s, not 379),
torch's version, torch's thread count and the shape. A file that is missing, unreadable,
malformed or made for another key is measured again and rewritten atomically; concurrent
processes (data-parallel ranks) take an exclusive lock on the cache directory while one of them
measures, so they measure once and agree. A cache that cannot be written costs a measurement
per process, nothing else.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from odyssey.runtime.cpu import cpu_flags

CACHE_ENV = "ODYSSEY_CACHE_DIR"
PROBE_TOKENS = 512  # rows of x: a training step's sequence (the default --seq-len)
DECODE_TOKENS = 1  # rows of x when generating: one new token a pass
DECODE_BYTES = 64 * 2**20  # a decode probe's fp32 weights at most: more than a last-level cache
DEFAULT_SHAPE = (PROBE_TOKENS, 2048, 5632)  # the 1.2B's gate/up projection: `odyssey doctor` without a model
PROBE_DTYPES = ("bf16", "fp32")
REPS = 5  # timed rounds at most
ROUND_BUDGET_S = 0.8  # no round starts after this long (at least one runs)
WARMUP_ROWS = 16
VERSION = 1  # of the cache file's layout
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
MATMUL_FLAGS = (  # /proc/cpuinfo flags that change which matmul kernel oneDNN and ATen can use
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_fp16",
    "asimd",
    "asimdhp",
    "fphp",
    "bf16",
    "i8mm",
    "sve",
    "sve2",
)


def cache_dir() -> Path:
    """Where probe results live: ODYSSEY_CACHE_DIR, else $XDG_CACHE_HOME/odyssey (when absolute,
    as the XDG spec asks), else ~/.cache/odyssey."""
    forced = os.environ.get(CACHE_ENV)
    if forced:
        return Path(forced).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "odyssey"


def shape_of(config, tokens: int = PROBE_TOKENS) -> tuple[int, int, int]:
    """(tokens, in, out) of the largest projection of a decoder layer of `config` (a ModelConfig):
    the gate/up projection (hidden -> intermediate) in every family here; the first listed wins a tie."""
    weights = [s for s in config.layer_shapes(0).values() if len(s) == 2]
    out, inp = max(weights, key=lambda s: s[0] * s[1])
    return (tokens, inp, out)


def shape_text(shape) -> str:
    return "x".join(str(n) for n in shape)


def kernels_in_use() -> str:
    """ATen's CPU capability ("AVX512", "AVX2", ...) and the KERNEL_ENV variables that are set,
    e.g. "AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"."""
    import torch

    limits = [f"{name}={os.environ[name]}" for name in KERNEL_ENV if os.environ.get(name)]
    return " ".join([torch.backends.cpu.get_cpu_capability(), *limits])


@dataclass(frozen=True)
class ProbeKey:
    """What the figures depend on; a change in any field measures again."""

    cpu: str
    machine: str
    flags: tuple[str, ...]  # the MATMUL_FLAGS this CPU reports, sorted
    torch: str
    threads: int
    shape: tuple[int, int, int]  # (tokens, in, out)
    kernels: str = ""  # kernels_in_use()
    copies: int = 1  # of W, multiplied in turn (decode_copies); left out of the JSON when 1

    @classmethod
    def current(cls, shape, copies: int = 1) -> ProbeKey:
        import torch

        name, flags = cpu_flags()
        return cls(
            cpu=name,
            machine=platform.machine(),
            flags=tuple(sorted(f for f in MATMUL_FLAGS if f in flags)),
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            shape=tuple(int(n) for n in shape),
            kernels=kernels_in_use(),
            copies=int(copies),
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["flags"], d["shape"] = list(self.flags), list(self.shape)
        if self.copies == 1:  # as entries were written before decode probes existed
            del d["copies"]
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def path(self, directory: Path | None = None) -> Path:
        return (directory or cache_dir()) / f"compute-probe-{self.digest()}.json"


@dataclass
class Probe:
    """The figures of one key, measured now or read from the cache."""

    key: ProbeKey
    gflops: dict[str, float]  # dtype -> GFLOP/s of the median round
    measured: str  # when (UTC, ISO 8601, seconds)
    probe_s: float  # how long the measurement took, warm-up included
    rounds: int
    cached: bool = False  # read from the cache file, not measured by this process
    path: Path | None = None
    cache_error: str = field(default="")  # why the result could not be cached ("" when it was)

    @property
    def fastest(self) -> str:
        """ "bf16" or "fp32": the faster; a tie goes to bf16 (half the activation bytes)."""
        return "bf16" if self.gflops["bf16"] >= self.gflops["fp32"] else "fp32"

    def summary(self) -> str:
        """e.g. "measured bf16 399 GFLOP/s vs fp32 173 at 512x2048x5632, cached 2026-11-30"."""
        win = self.fastest
        lose = "fp32" if win == "bf16" else "bf16"
        when = f"cached {self.measured[:10]}" if self.cached else "measured now"
        if self.cache_error:
            when += " (not cached)"
        one = " (one token a pass)" if self.key.shape[0] <= DECODE_TOKENS else ""
        return (
            f"measured {win} {_figure(self.gflops[win])} GFLOP/s vs {lose} {_figure(self.gflops[lose])} "
            f"at {shape_text(self.key.shape)}{one}, {when}"
        )

    def to_json(self) -> dict:
        return {
            "version": VERSION,
            "key": self.key.to_json(),
            "gflops": {k: round(v, 1) for k, v in self.gflops.items()},
            "measured": self.measured,
            "probe_s": round(self.probe_s, 3),
            "rounds": self.rounds,
        }

    @classmethod
    def from_json(cls, d: dict, key: ProbeKey, path: Path) -> Probe | None:
        """The cached figures for `key`, or None when `d` is not a valid entry for it."""
        try:
            gflops = {k: float(d["gflops"][k]) for k in PROBE_DTYPES}
            ok = d["version"] == VERSION and d["key"] == key.to_json()
            ok = ok and all(math.isfinite(v) and v > 0 for v in gflops.values())
            if not ok:
                return None
            return cls(key, gflops, str(d["measured"]), float(d["probe_s"]), int(d["rounds"]), True, path)
        except (KeyError, TypeError, ValueError):
            return None


def measure(
    shape, reps: int = REPS, budget_s: float = ROUND_BUDGET_S, copies: int = 1
) -> tuple[dict[str, float], int, float]:
    """`measure_here` in a child process with this one's torch thread count: the operands and what
    oneDNN keeps after them (about 35 MiB at the 1.2B's shape, never given back) stay out of this
    process, whose memory the plan measures next (planner.measured_runtime). In this process when
    the child fails."""
    import subprocess
    import sys

    import torch

    code = (
        "import json, sys, torch; torch.set_num_threads(int(sys.argv[1])); from odyssey.probe import measure_here; "
        "print(json.dumps(measure_here(tuple(json.loads(sys.argv[2])), int(sys.argv[3]), float(sys.argv[4]), "
        "int(sys.argv[5]))))"
    )
    args = [str(torch.get_num_threads()), json.dumps(list(shape)), str(reps), str(budget_s), str(copies)]
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, check=True
        ).stdout
        gflops, rounds, seconds = json.loads(out.strip().splitlines()[-1])
        return {k: float(v) for k, v in gflops.items()}, int(rounds), float(seconds)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, TypeError):
        return measure_here(shape, reps, budget_s, copies)


def decode_copies(shape, weight_bytes: int | None = None) -> int:
    """How many copies of W a probe of `shape` multiplies in turn: 1 for a training shape; for one
    token a pass (DECODE_TOKENS) enough that the fp32 copies reach `weight_bytes` (the model's
    weights in fp32; None: no model, DECODE_BYTES) or DECODE_BYTES, whichever is less, since a
    token's pass streams every weight: one W alone would stay in the cache and time the arithmetic,
    not the memory the two dtypes differ in by half."""
    T, inp, out = shape
    if T > DECODE_TOKENS:
        return 1
    stream = min(DECODE_BYTES, weight_bytes or DECODE_BYTES)
    return max(1, math.ceil(stream / (4 * inp * out)))


def measure_here(
    shape, reps: int = REPS, budget_s: float = ROUND_BUDGET_S, copies: int = 1
) -> tuple[dict[str, float], int, float]:
    """Time F.linear(x (T, in), W (out, in)) in bf16 and fp32, rounds interleaved, over `copies`
    copies of W in turn (decode_copies). Returns (GFLOP/s by dtype, rounds, seconds taken)."""
    import torch
    import torch.nn.functional as F

    t_all = time.perf_counter()
    T, inp, out = shape
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(T, inp, generator=g)
    w32 = [torch.randn(out, inp, generator=g) / math.sqrt(inp) for _ in range(copies)]
    operands = {"fp32": (x32, w32), "bf16": (x32.to(torch.bfloat16), [w.to(torch.bfloat16) for w in w32])}
    times: dict[str, list[float]] = {d: [] for d in PROBE_DTYPES}
    with torch.inference_mode():
        for x, ws in operands.values():
            for w in ws:  # a warm-up pass (with one token: the whole pass, pages touched once)
                F.linear(x[:WARMUP_ROWS], w)
        t_rounds = time.perf_counter()
        while not times["fp32"] or (len(times["fp32"]) < reps and time.perf_counter() - t_rounds < budget_s):
            for d in PROBE_DTYPES:
                x, ws = operands[d]
                t0 = time.perf_counter()
                for w in ws:
                    F.linear(x, w)
                times[d].append((time.perf_counter() - t0) / copies)
    flop = 2.0 * T * inp * out
    gflops = {d: flop / max(_median(ts), 1e-9) / 1e9 for d, ts in times.items()}
    return gflops, len(times["fp32"]), time.perf_counter() - t_all


def _figure(gflops: float) -> str:
    """GFLOP/s as the summary writes them: whole numbers, one decimal under 10 (one token a pass)."""
    return f"{gflops:,.0f}" if gflops >= 10 else f"{gflops:.1f}"


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _read(path: Path, key: ProbeKey) -> Probe | None:
    try:
        return Probe.from_json(json.loads(path.read_text(encoding="utf-8")), key, path)
    except (OSError, UnicodeDecodeError, ValueError):
        return None


_UNCACHED: dict[Path, Probe] = {}


def probe(shape=DEFAULT_SHAPE, remeasure: bool = False, copies: int = 1) -> Probe:
    """The figures for `shape` (over `copies` copies of W, decode_copies) on this machine: from the
    cache when it holds a valid entry for the current key, else measured now and cached
    (`remeasure` measures in any case)."""
    from odyssey import atomic

    key = ProbeKey.current(shape, copies)
    directory = cache_dir()
    path = key.path(directory)
    if not remeasure and (hit := _read(path, key) or _UNCACHED.get(path)) is not None:
        return hit
    error = ""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error = f"{directory}: {e.strerror or e}"
    with atomic.flocked(directory) if not error else contextlib.nullcontext():
        if not remeasure and not error and (hit := _read(path, key)) is not None:
            return hit  # another process measured it while this one waited for the lock
        gflops, rounds, seconds = measure(key.shape, copies=key.copies)
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
        result = Probe(key, gflops, now, seconds, rounds, cached=False, path=path)
        if not error:
            try:
                atomic.write_json(path, result.to_json(), durable=False)
            except OSError as e:
                error = f"{path}: {e.strerror or e}"
    result.cache_error = error
    if error:
        _UNCACHED[path] = result  # measured once per process where the cache cannot be written
        result.path = None
    return result
