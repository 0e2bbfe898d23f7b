"""Odyssey against what a user would reach for instead, on the same weights, the same batches and
the same LoRA, each inside its own memory cgroup, with the targets of issue 18 checked in one run.

Training (batch 1, seq_len 512, LoRA r=16, alpha 32 on q,k,v,o,gate,up,down, AdamW lr 2e-4, the
same token windows in the same order: `odyssey.data.BatchSampler` with seed 0 on the same token
data, so every run's first loss is the same number within its dtype's precision):
- Odyssey, `odyssey train --ram-budget B` in a cgroup of B: 1 GiB (the headline) and 4 GiB, each
  with `compute_dtype` auto and fp32 (an fp32 row is left out where auto picked fp32: same run).
- transformers + peft with the model in RAM, in every configuration a knowledgeable user would try
  here: fp32, or bf16 (weights loaded in bf16, LoRA in fp32 as peft keeps it, the step under
  `torch.autocast("cpu", torch.bfloat16)`; only where bf16 matmul measured at the start reaches
  half of fp32's: on a CPU without native bf16, bf16 matmul is several times slower than fp32
  and no user would pick it), each with gradient checkpointing off and on. Each runs
  once with memory no limit (a cap of --max-budget) for its step time and peak memory; the fastest
  is the peer to beat. Then the smallest cgroup each runs in is found by bisection (smallest.py):
  between the floor (its weights' bytes, raised to its peak anonymous memory where there is no
  swap) and the cap, to --resolution, the fastest first, while the time limit allows.
- transformers + peft + accelerate disk offload (`device_map="auto"`, `max_memory={"cpu": share}`,
  `offload_folder`), the same four configurations with --offload-share of the weights in RAM; it
  crashed at the first backward before: its row reports what it does, with its error line.
Generation (greedy, the same prompt ids, N new tokens): `odyssey generate --ram-budget B` against
transformers + accelerate disk offload `generate()` under the same cap, from --budget up.

The targets (targets.py): Odyssey's 1 GiB step / the fastest peer's step (<= 1.25), the 4 GiB
step / the fastest peer's (<= 1.0), and the 1 GiB step's tokens/s / the compute limit (>= 0.8),
the limit being the fastest matmul FLOP/s measured in this run at the model's largest projection
(odyssey.probe.measure, bf16 and fp32, at the start and the end of the run: the better of the two)
over 6 x parameters per token (4 x for layers Odyssey reports it did not recompute). The bench
reports pass or fail; it does not fail the build. The machine's speed drifts (tens of percent
within an hour on a shared VM), so after the timed runs --rounds (2) paired rounds run Odyssey at
1 GiB, the fastest peer and Odyssey at 4 GiB again, back to back, every other round in reverse
order; the two step targets are the median of the rounds' ratios, the timed runs being round 0.
Each round also measures the matmul just before its Odyssey 1 GiB run (round 0: the run's first
measurement), and the compute target is the median of the rounds' 1 GiB tokens/s against the limit
at that rate: the machine sped up 1.8x within one hour here (2026-12-02), and a step timed at the
slow start against the fastest matmul of the run compares two machines.

Step time is the median of the steps after the first (warm-up); "CPU s" is the CPU time of the
run's process in the same steps (wall time on a shared machine stretches with other work, CPU
time much less). Peak memory is the cgroup's peak (anonymous memory + page cache charged to the
group) and the process's peak anonymous RSS sampled every 0.05-0.1 s. Without the rights to make
cgroups, everything runs uncapped and nothing is bisected (said in the notes).

    .venv/bin/python benchmarks/peers.py [--model STORE] [--steps 4] [--time-limit-s 2400]

The workers are this file too: `peers.py worker --task train|generate --peer inram|offload ...`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import goals  # noqa: E402
import smallest  # noqa: E402
from common import GIB, MIB  # noqa: E402
from peer_report import (  # noqa: E402
    PEER_LABELS,
    _first_attempt,
    _gen_row,
    _ratio,
    markdown_sections,
    notes,
    png,
    smallest_text,
    train_row,
)
from peer_worker import LORA_ALPHA, LORA_R, LR, TARGETS, generation_summary, worker  # noqa: E402

TITLE = "Odyssey against transformers + peft (+ accelerate)"  # of peers.md and its README section
RUNGS_GIB = (2, 3, 4, 6, 8, 12, 16)
ODYSSEY_BUDGETS_GIB = (1, 4)  # the headline cgroup and the budget of the second target
BF16_PEER_MIN = 0.5  # bf16 peers run where bf16 matmul reaches this share of fp32's at the start


@dataclass(frozen=True)
class PeerConfig:
    """One way to run a peer: where the weights live, the compute dtype, gradient checkpointing."""

    peer: str  # "inram" | "offload"
    dtype: str  # "fp32" | "bf16" (bf16: weights in bf16, LoRA fp32, step under CPU autocast)
    checkpointing: bool

    @property
    def name(self) -> str:
        return f"{self.peer}-{self.dtype}" + ("-ckpt" if self.checkpointing else "")

    @property
    def compute(self) -> str:
        return "bf16 autocast" if self.dtype == "bf16" else "fp32"

    @property
    def label(self) -> str:
        where = "in RAM" if self.peer == "inram" else "accelerate disk offload"
        ckpt = "gradient checkpointing" if self.checkpointing else "no checkpointing"
        return f"transformers + peft, {where}, {self.compute}, {ckpt}"

    @property
    def short(self) -> str:
        where = "peft" if self.peer == "inram" else "offload"
        return f"{where}\n{self.dtype}" + (" ckpt" if self.checkpointing else "")


def peer_configs(peer: str) -> list[PeerConfig]:
    return [PeerConfig(peer, d, c) for d in ("fp32", "bf16") for c in (False, True)]


# --------------------------------------------------------------------------------------------
# the budget ladder (pure logic; tested with a fake runner)


@dataclass
class Attempt:
    budget_bytes: int
    ok: bool
    returncode: int | None = None
    oom_killed: bool = False
    peak_bytes: int | None = None  # the cgroup's peak charge
    error: str = ""  # last line of the log when it failed
    seconds: float = 0.0
    result: dict = field(default_factory=dict)  # what the worker (or metrics.jsonl) reported

    @property
    def budget_gib(self) -> float:
        return self.budget_bytes / GIB


def ladder(start_bytes: int, rungs_gib: Sequence[float] = RUNGS_GIB, cap_bytes: int | None = None) -> list[int]:
    """The budgets to try: the start, then every rung above it, up to `cap_bytes`."""
    out = [int(start_bytes)]
    for g in rungs_gib:
        b = int(g * GIB)
        if b > out[-1] and (cap_bytes is None or b <= cap_bytes):
            out.append(b)
    return out


def climb(
    runner: Callable[[int], Attempt],
    budgets: Sequence[int],
    same_error_stop: int = 2,
    deadline: float | None = None,
    progress=print,
    suggest: Callable[[Attempt], int | None] | None = None,
    cap_bytes: int | None = None,
    screen: Callable[[int], tuple[str, str] | None] | None = None,
) -> dict:
    """Run `runner(budget)` up the ladder until one attempt succeeds. Stops early when the last
    `same_error_stop` attempts failed without an OOM kill and with the same error (a bug, not a
    memory limit), or when `deadline` (time.monotonic) has passed. `suggest(attempt)` may name a
    budget to try next after a failure (the planner's "use --ram-budget N MiB or more"): the
    ladder then continues from there. `screen(budget)` may answer ("skip", why) for a rung that
    cannot work (it is listed, not run) or ("stop", why) to end the climb there; the first budget
    is always run.

    Returns {"attempts": [...], "budget_bytes": first budget, "ran_within_budget": bool,
    "smallest_ok_bytes": int | None, "status": "runs" | "does not run", "error": str, "stopped": why}."""
    attempts: list[Attempt] = []
    skipped: list[dict] = []
    stopped = ""
    todo = list(budgets)
    while todo:
        b = todo.pop(0)
        if deadline is not None and time.monotonic() > deadline and attempts:
            stopped = "time limit of the benchmark reached"
            break
        verdict = screen(b) if (screen and attempts) else None
        if verdict and verdict[0] == "skip":
            skipped.append({"budget_bytes": b, "why": verdict[1]})
            progress(f"    {b / GIB:5.2f} GiB: skipped ({verdict[1]})")
            continue
        if verdict and verdict[0] == "stop":
            stopped = verdict[1]
            progress(f"    {b / GIB:5.2f} GiB: stop climbing ({verdict[1]})")
            break
        a = runner(b)
        attempts.append(a)
        how = "ran" if a.ok else ("OOM-killed" if a.oom_killed else f"failed: {a.error}")
        progress(f"    {b / GIB:5.2f} GiB: {how}" + (f" (peak {a.peak_bytes / MIB:,.0f} MiB)" if a.peak_bytes else ""))
        if a.ok:
            break
        tail = attempts[-same_error_stop:]
        if (
            same_error_stop
            and len(tail) == same_error_stop
            and all(not t.oom_killed and t.error and t.error == tail[0].error for t in tail)
        ):
            stopped = f"same error at {same_error_stop} budgets: not a memory limit"
            break
        wanted = suggest(a) if suggest else None
        if wanted and wanted > b and (cap_bytes is None or wanted <= cap_bytes):
            todo = ladder(wanted, cap_bytes=cap_bytes)
    ok = next((a for a in attempts if a.ok), None)
    last_fail = next((a for a in reversed(attempts) if not a.ok), None)
    return {
        "attempts": [asdict(a) for a in attempts],
        "budget_bytes": budgets[0] if budgets else None,
        "ran_within_budget": bool(attempts) and attempts[0].ok,
        "smallest_ok_bytes": ok.budget_bytes if ok else None,
        "status": "runs" if ok else "does not run",
        "error": (last_fail.error or ("OOM-killed" if last_fail.oom_killed else "")) if last_fail else "",
        "stopped": stopped,
        "skipped": skipped,
        "ok_result": ok.result if ok else {},
        "ok_peak_bytes": ok.peak_bytes if ok else None,
    }


# --------------------------------------------------------------------------------------------
# running one attempt inside a memory cgroup


def peer_env(jemalloc: bool) -> dict:
    """The peers run as a user would run them: the system allocator unless asked."""
    env = dict(os.environ)
    env.pop("_ODYSSEY_REEXEC", None)
    if jemalloc:
        from odyssey.runtime.allocator import find_jemalloc

        lib = find_jemalloc()
        if lib:
            env["LD_PRELOAD"] = lib
    else:
        env.pop("LD_PRELOAD", None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def peer_runner(
    task: str,
    config: PeerConfig,
    model: Path,
    data: Path,
    work: Path,
    steps: int,
    seq_len: int,
    timeout_s,
    jemalloc: bool = False,
    reserve_bytes: int = 1 * GIB,
    prompt_ids: Sequence[int] = (0,),
    new_tokens: int = 1,
    cpu_weights: int = 0,
    capped: bool = True,
) -> Callable[[int], Attempt]:
    """Attempts of one peer worker in `config`; accelerate gets max_memory cpu = `cpu_weights` when
    given, else the budget less `reserve_bytes`. `capped` False runs without a cgroup (no rights)."""

    def run(budget: int) -> Attempt:
        tag = f"{task}-{config.name}-s{steps}-{budget // MIB}MiB" + (
            f"-cpu{cpu_weights // MIB}MiB" if cpu_weights else ""
        )
        result_file = work / f"{tag}.json"
        offload = work / f"offload-{tag}"
        result_file.unlink(missing_ok=True)
        shutil.rmtree(offload, ignore_errors=True)
        cmd = [common.PYTHON, str(Path(__file__).resolve()), "worker", "--task", task, "--peer", config.peer]
        cmd += ["--dtype", config.dtype, *(["--checkpointing"] if config.checkpointing else [])]
        for flag, value in (
            ("--model", model),
            ("--data", data),
            ("--result", result_file),
            ("--steps", steps),
            ("--seq-len", seq_len),
            ("--budget", budget),
            ("--reserve", reserve_bytes),
            ("--offload-folder", offload),
            ("--prompt-ids", ",".join(map(str, prompt_ids))),
            ("--new-tokens", new_tokens),
            ("--cpu-weights", cpu_weights),
        ):
            cmd += [flag, str(value)]
        rc, peak, oom, error, seconds = common.run_capped(
            cmd, budget if capped else None, work / f"{tag}.log", _seconds(timeout_s), peer_env(jemalloc)
        )
        shutil.rmtree(offload, ignore_errors=True)
        result = _read_json(result_file)
        ok = rc == 0 and bool(result.get("done"))
        if rc == 0 and not ok:
            error = "exited 0 without a result"
        return Attempt(budget, ok, rc, oom, peak, error, round(seconds, 1), result)

    return run


def odyssey_env() -> dict:
    """Odyssey's own environment, with ODYSSEY_COMPUTE_DTYPE removed: `auto` rows measure auto."""
    from odyssey.dtypes import COMPUTE_ENV

    env = dict(os.environ)
    env.pop(COMPUTE_ENV, None)
    return env


def odyssey_train_runner(
    model: Path,
    data: Path,
    work: Path,
    steps: int,
    seq_len: int,
    timeout_s: float,
    extra: Sequence[str] = (),
    name: str = "odyssey",
    capped: bool = True,
    num_layers: int | None = None,
) -> Callable[[int], Attempt]:
    """Attempts of `odyssey train` (the `extra` overrides added) in a cgroup of the budget; the
    result also names the compute dtype the run reported and, with `num_layers`, how many layers
    it kept rather than recomputed (None: it did not say)."""

    def run(budget: int) -> Attempt:
        tag = f"train-{name}-seq{seq_len}-{budget // MIB}MiB"
        run_dir = work / tag
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = common.train_cmd(model, data, run_dir, budget, steps, seq_len, extra)
        load0 = os.getloadavg()[0]
        with ChildCpu() as cpu:
            rc, peak, oom, error, seconds = common.run_capped(
                cmd, budget if capped else None, work / f"{tag}.log", _seconds(timeout_s), odyssey_env()
            )
        records = common.read_metrics(run_dir / "metrics.jsonl")
        summary = common.summarize_steps(records)
        summary["cpu_s_all"] = [None if c is None else round(c, 2) for c in step_cpu(records, cpu.samples)]
        summary["cpu_s"] = common.median(summary["cpu_s_all"][1:])
        summary["peak_anon_mib"] = round(cpu.peak_anon_bytes / MIB, 1) or None  # sampled every 0.1 s
        summary["loadavg"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        summary["compute_dtype"] = goals.compute_dtype_of(records)
        summary["page_in"] = goals.page_in_of(records)
        summary["pinned"] = goals.pinned_of(records)
        if num_layers is not None:
            summary["layers_kept"] = goals.layers_kept(records, num_layers)
        ok = rc == 0 and summary["measured_steps"] > 0
        if rc == 0 and not ok:
            error = f"exited 0 with {summary['steps']} step lines in metrics.jsonl (need at least 2)"
        if rc is None and summary["measured_steps"] > 0:  # timed out, but steps after the warm-up were done
            ok, error = True, ""
            summary["note"] = f"stopped by the time limit after {summary['steps']} steps"
        summary["command"] = " ".join(map(str, cmd[1:]))
        summary["done"] = ok
        return Attempt(budget, ok, rc, oom, peak, error, round(seconds, 1), summary)

    return run


def odyssey_generate_runner(
    model: Path, work: Path, prompt_ids: Sequence[int], new_tokens: int, timeout_s: float
) -> Callable[[int], Attempt]:
    """`odyssey generate` in a cgroup; its stdout (one flushed write per token) is tailed from a
    file to time each token's arrival."""

    def run(budget: int) -> Attempt:
        tag = f"generate-odyssey-{budget // MIB}MiB"
        out_file = work / f"{tag}.out"
        cmd = common.odyssey_cmd(
            "generate",
            "--model",
            model,
            "--prompt-ids",
            ",".join(map(str, prompt_ids)),
            "--max-new-tokens",
            new_tokens,
            "--ram-budget",
            f"{budget // MIB}MiB",
            "--temperature",
            0,
        )
        box = {}
        out_file.write_text("")
        limit = _seconds(timeout_s)
        th = threading.Thread(
            target=lambda: box.update(
                r=common.run_capped(cmd, budget, work / f"{tag}.log", limit, stdout_path=out_file)
            )
        )
        arrivals = []  # time.time() of each new token id appearing in stdout
        load0 = os.getloadavg()[0]
        with ChildCpu() as cpu:
            th.start()
            seen = 0
            while th.is_alive():
                seen = _count_new(out_file, seen, arrivals, time.time())
                time.sleep(0.01)
            th.join()
        rc, peak, oom, error, seconds = box["r"]
        text = out_file.read_text(errors="replace")
        tokens = [int(t) for t in text.split() if t.lstrip("-").isdigit()]
        result = generation_summary(arrivals, len(tokens))
        gaps_cpu = [cpu_between(cpu.samples, a, b) for a, b in pairwise(arrivals)]
        result["cpu_s_per_token"] = common.median(gaps_cpu)
        result["peak_anon_mib"] = round(cpu.peak_anon_bytes / MIB, 1) or None
        result["first_token_s"] = None  # from process start here: not comparable with the peer's
        result["loadavg"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        result["tokens"] = tokens
        result["reported"] = _parse_generate_stderr((work / f"{tag}.log").read_text(errors="replace"))
        result["done"] = rc == 0
        return Attempt(budget, rc == 0, rc, oom, peak, error, round(seconds, 1), result)

    return run


def _count_new(path: Path, seen: int, arrivals: list, now: float) -> int:
    """Append `now` to `arrivals` once per token id that appeared in `path` since `seen` were."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return seen
    # a token is complete once the space after it is written (`odyssey generate` writes "ID ")
    n = sum(1 for t in text.split(" ")[:-1] if t.strip().lstrip("-").isdigit())
    arrivals.extend([now] * (n - seen))
    return max(n, seen)


def _seconds(timeout_s) -> float:
    """A per-attempt time limit: a number, or a callable giving what is left now."""
    return float(timeout_s() if callable(timeout_s) else timeout_s)


def _parse_generate_stderr(text: str) -> dict:
    m = re.search(r"(\d+) tokens in ([\d.]+) s \(([\d.]+) s/token\)", text)
    return {"tokens": int(m.group(1)), "seconds": float(m.group(2)), "s_per_token": float(m.group(3))} if m else {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class ChildCpu:
    """Samples the CPU seconds (user + system, all threads) of this process's descendants every
    `interval_s` on a thread: wall time on a shared machine says how long a step took, CPU time
    how much work it was. `samples` are (time.time(), cpu_s). It also keeps the peak of their
    summed anonymous RSS (`peak_anon_bytes`), sampled like the peers' workers sample their own."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self.peak_anon_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-cpu", daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def read(self) -> float:
        from odyssey.runtime.memory import proc_stat, process_memory, tree_pids

        me, total, anon = os.getpid(), 0, 0
        for pid in tree_pids(me):
            if pid == me:
                continue
            try:
                stat = proc_stat(pid)
                if stat is None:  # gone
                    continue
                total += stat.cpu_ticks  # utime + stime
                anon += process_memory(pid).anon_bytes
            except Exception:  # gone between the listing and the reading (psutil.NoSuchProcess, OSError)
                continue
        self.peak_anon_bytes = max(self.peak_anon_bytes, anon)
        return total / self._tick

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append((time.time(), self.read()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ChildCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cpu_between(samples: Sequence[tuple[float, float]], t0: float, t1: float) -> float | None:
    """CPU seconds spent between wall times t0 and t1, interpolated linearly between samples
    (a process's CPU counter only grows); None when the samples do not cover [t0, t1]."""
    if len(samples) < 2 or t0 < samples[0][0] or t1 > samples[-1][0] or t1 < t0:
        return None

    def at(t):
        for (ta, ca), (tb, cb) in pairwise(samples):
            if ta <= t <= tb:
                return ca if tb == ta else ca + (cb - ca) * (t - ta) / (tb - ta)
        return samples[-1][1]

    return max(0.0, at(t1) - at(t0))


def step_cpu(records: list[dict], samples) -> list[float | None]:
    """CPU seconds of each `odyssey train` step line (it ends at `t`, lasted `step_s`)."""
    out = []
    for r in sorted((r for r in records if r.get("kind") == "step"), key=lambda r: r.get("step", 0)):
        t1, dt = r.get("t"), r.get("step_s")
        out.append(None if t1 is None or dt is None else cpu_between(samples, t1 - dt, t1))
    return out


# --------------------------------------------------------------------------------------------
# the benchmark: budgets, bounds and prompts


def weights_bytes(model: Path, dtype: str = "fp32") -> int:
    """The bytes of every weight of the store's model loaded in `dtype`."""
    from odyssey.store import Store

    return Store.open(model).config.num_parameters() * (2 if dtype == "bf16" else 4)


def weights_fp32_bytes(model: Path) -> int:
    return weights_bytes(model, "fp32")


def peer_screens(weights_bytes: int, reserve: int) -> dict:
    """Rungs not worth a run (minutes each): in RAM, a budget below the fp32 weights alone; with
    disk offload, a budget whose weights share (budget - reserve) holds every weight: nothing
    would be offloaded, so it is the in-RAM peer again (its row applies)."""

    def inram(b: int):
        if b < weights_bytes:
            return "skip", f"below the {weights_bytes / GIB:.2f} GiB of fp32 weights alone"
        return None

    def offload(b: int):
        if b - reserve >= weights_bytes:
            return "stop", "from here nothing is offloaded: the in-RAM row applies"
        return None

    return {"inram": inram, "offload": offload}


def attempt_timeout(timeout_s: float, deadline: float | None, floor_s: float = 180.0):
    """Per-attempt limit: `timeout_s`, shortened to the time left before `deadline` (but at least
    `floor_s`, so an attempt can still show something)."""
    if deadline is None:
        return timeout_s
    return lambda: min(timeout_s, max(floor_s, deadline - time.monotonic()))


def prompt_from(data: Path, n: int) -> list[int]:
    from odyssey.data import TokenData

    return [int(t) for t in TokenData(data).tokens("val")[:n]]


def not_measured(budget: int, why: str) -> dict:
    """A climb-shaped outcome for a run that was not started."""
    return {
        "attempts": [],
        "budget_bytes": budget,
        "ran_within_budget": False,
        "smallest_ok_bytes": None,
        "status": "not measured",
        "error": why,
        "stopped": why,
        "skipped": [],
        "ok_result": {},
        "ok_peak_bytes": None,
    }


# --------------------------------------------------------------------------------------------
# the benchmark: the runs


def measure_matmul(shape) -> dict:
    """bf16 and fp32 GFLOP/s of F.linear at `shape` (tokens, in, out), measured now (no cache)."""
    from odyssey.probe import measure

    gflops, rounds, seconds = measure(shape, reps=7, budget_s=2.0)
    return {"gflops": {k: float(f"{v:.4g}") for k, v in gflops.items()}, "rounds": rounds, "seconds": round(seconds, 2)}


def bf16_skip(gflops: dict) -> str:
    """Why the bf16 peers are not run ("" where they are): where bf16 matmul runs at under
    BF16_PEER_MIN of fp32's (a CPU without native bf16, e.g. AVX2-only, where bf16 falls back to a
    slow path: 46 GFLOP/s against fp32's 171 here with the kernels limited to AVX2), no user would
    train in bf16, and each of its runs would take several times an fp32 one."""
    bf16, fp32 = gflops.get("bf16"), gflops.get("fp32")
    if not bf16 or not fp32 or bf16 >= BF16_PEER_MIN * fp32:
        return ""
    return (
        f"not run: bf16 matmul {bf16:,.0f} GFLOP/s here against fp32 {fp32:,.0f} (under "
        f"{BF16_PEER_MIN:g}x): the fp32 peers are the ones a user would run"
    )


def best_gflops(measurements: Sequence[dict]) -> dict:
    """Per dtype, the best figure of the run's measurements."""
    out: dict = {}
    for m in measurements:
        for k, v in m["gflops"].items():
            out[k] = max(out.get(k, 0.0), v)
    return out


class TrainBench:
    """The training part: Odyssey's rows, every peer configuration timed once with memory no
    limit, then the smallest cgroup of each by bisection, all against one deadline."""

    def __init__(self, args, model: Path, data: Path, work: Path, deadline: float | None, capped: bool, skip_bf16: str):
        from odyssey.store import Store

        self.args, self.model, self.data, self.work = args, model, data, work
        self.deadline, self.capped = deadline, capped
        self.config = Store.open(model).config
        self.timeout = attempt_timeout(args.timeout_s, deadline)
        self.cap = common.parse_budget(args.max_budget)
        self.climbs: dict = {}
        self.rows: dict[str, dict] = {}
        self.swap = smallest.swap_present()
        self.train_ok: tuple[bool, str] | None = None  # `odyssey train` present? asked once
        self.rounds: list[dict] = []  # paired(): each round's step times, round 0 the timed runs
        self.skip_bf16 = skip_bf16  # bf16_skip(): why the bf16 peers are not run, "" where they are

    def out_of_time(self, need_s: float = 0.0) -> bool:
        return self.deadline is not None and time.monotonic() + need_s > self.deadline

    # --- Odyssey ---
    def odyssey(self, budget_gib: float, dtype: str, spill: str = "auto") -> dict:
        name = (
            "odyssey" if (budget_gib, dtype) == (ODYSSEY_BUDGETS_GIB[0], "auto") else f"odyssey-{budget_gib:g}g-{dtype}"
        )
        if spill != "auto":  # a variant of that row (spill: off recomputes what auto would spill)
            name += f"-spill-{spill}"
        budget = int(budget_gib * GIB)
        print(f"  train: Odyssey, {budget_gib:g} GiB cgroup, compute_dtype {dtype}, spill {spill}")
        self.train_ok = self.train_ok or common.train_available()
        ok, why = self.train_ok
        if not ok:
            res = not_measured(budget, why)
        elif self.out_of_time():
            res = not_measured(budget, "time limit of the benchmark reached")
        else:
            res = climb(self._odyssey_runner(name, dtype, spill, self.work), [budget])
        self.climbs[name] = res
        r = res.get("ok_result") or {}
        picked = r.get("compute_dtype")
        compute = f"auto ({picked})" if dtype == "auto" and picked else dtype
        self.rows[name] = train_row(
            name,
            f"Odyssey, {budget_gib:g} GiB"
            + (" (headline)" if name == "odyssey" else "")
            + (f", --spill {spill}" if spill != "auto" else ""),
            f"Odyssey\n{budget_gib:g}G {dtype}" + (f"\nspill {spill}" if spill != "auto" else ""),
            res,
            self.args.seq_len,
            kind="odyssey",
            dtype=picked or (dtype if dtype != "auto" else None),
            compute=compute,
            layers_kept=r.get("layers_kept"),
            page_in=r.get("page_in"),
            pinned=r.get("pinned"),
            uncapped=not self.capped,
            note=r.get("note", ""),
        )
        return self.rows[name]

    def _odyssey_runner(self, name: str, dtype: str, spill: str, work: Path):
        extra = [] if dtype == "auto" else [f"compute_dtype={dtype}"]
        extra += [f"compile={self.args.odyssey_compile}"] + [f"spill={spill}"] * (spill != "auto")
        return odyssey_train_runner(
            self.model,
            self.data,
            work,
            self.args.steps,
            self.args.seq_len,
            self.timeout,
            extra,
            name=name,
            capped=self.capped,
            num_layers=self.config.num_hidden_layers,
        )

    def odyssey_same_as_auto(self, budget_gib: float, auto_name: str) -> None:
        """An fp32 row where auto picked fp32: the auto row is that run."""
        name = f"odyssey-{budget_gib:g}g-fp32"
        res = not_measured(int(budget_gib * GIB), "")
        res["status"] = "same run"
        self.climbs[name] = res
        self.rows[name] = train_row(
            name,
            f"Odyssey, {budget_gib:g} GiB",
            f"Odyssey\n{budget_gib:g}G fp32",
            res,
            self.args.seq_len,
            kind="odyssey",
            dtype="fp32",
            compute="fp32",
            note=f"auto picked fp32 here: the row '{self.rows[auto_name]['label']}' is this configuration",
        )

    # --- peers ---
    def _peer_runner(self, config: PeerConfig, steps: int, cpu_weights: int = 0, work: Path | None = None):
        return peer_runner(
            "train",
            config,
            self.model,
            self.data,
            work or self.work,
            steps,
            self.args.seq_len,
            self.timeout,
            self.args.peer_jemalloc,
            reserve_bytes=common.parse_budget(self.args.offload_reserve),
            cpu_weights=cpu_weights,
            capped=self.capped,
        )

    def offload_share(self, config: PeerConfig) -> int:
        return max(int(weights_bytes(self.model, config.dtype) * self.args.offload_share), MIB)

    def peer(self, config: PeerConfig) -> dict:
        """One timed run with memory no limit (a cap of --max-budget)."""
        name = config.name
        cpu_weights = self.offload_share(config) if config.peer == "offload" else 0
        where = f", {cpu_weights / MIB:,.0f} MiB of weights in RAM" if cpu_weights else ""
        print(f"  train: {config.label}{where}, cap {self.cap / GIB:g} GiB")
        if self.out_of_time():
            res = not_measured(self.cap, "time limit of the benchmark reached")
        elif config.dtype == "bf16" and self.skip_bf16:
            res = not_measured(self.cap, self.skip_bf16)
        else:
            res = climb(self._peer_runner(config, self.args.steps, cpu_weights), [self.cap])
        self.climbs[name] = res
        r = res.get("ok_result") or {}
        self.rows[name] = train_row(
            name,
            config.label,
            config.short,
            res,
            self.args.seq_len,
            kind=config.peer,
            dtype=config.dtype,
            compute=config.compute,
            checkpointing=config.checkpointing,
            cpu_weights=cpu_weights,
            uncapped=not self.capped,
            device_map=r.get("device_map") or _first_attempt(res).get("result", {}).get("device_map"),
            seconds=_first_attempt(res).get("seconds"),
        )
        return self.rows[name]

    def search(self, config: PeerConfig) -> None:
        """The smallest cgroup the configuration runs in, by bisection below its timed run."""
        row = self.rows.get(config.name)
        if not row or row["status"] != "runs":
            return
        if not self.capped:
            row["search_skipped"] = "no cgroup: not searched"
            return
        weights = row["cpu_weights"] or weights_bytes(self.model, config.dtype)
        anon = (row.get("peak_anon_mib") or 0) * MIB
        lo = smallest.search_floor(weights, anon, self.swap)
        peak = (row.get("peak_cgroup_mib") or 0) * MIB
        guess = smallest.align_up(peak, self.args.resolution) if peak else None
        if self.cap - lo > self.args.resolution:
            print(f"  smallest cgroup: {config.label} (between {lo / GIB:.2f} and {self.cap / GIB:g} GiB)")
        s = smallest.bisect_budget(
            self._peer_runner(config, self.args.probe_steps, row["cpu_weights"]),
            lo,
            self.cap,
            resolution_bytes=self.args.resolution,
            deadline=self.deadline,
            first_guess=guess,
            last_seconds=row.get("seconds") or 0.0,
        )
        row["search"] = s
        self.climbs[config.name]["search"] = s

    def finish(self, order: Sequence[str]) -> tuple[list[dict], dict | None]:
        """The rows in table order, each with its ratio to the fastest peer, its smallest-cgroup
        cell and its loss checked against the fp32 reference; and the fastest peer's row."""
        rows = [self.rows[n] for n in order if n in self.rows]
        peers_ = [r for r in rows if r.get("kind") in ("inram", "offload")]
        best = smallest.fastest(peers_)
        for r in rows:
            r["x_fastest_peer"] = _ratio(r.get("step_s"), best["step_s"]) if best else None
            if r.get("kind") != "odyssey":
                r["smallest"] = smallest_text(r)
        ref_row = next(
            (r for r in rows if r["name"] == "inram-fp32" and r.get("first_loss") is not None),
            next((r for r in rows if r.get("dtype") == "fp32" and r.get("first_loss") is not None), None),
        )
        self.reference = ref_row
        self.loss_problems = goals.check_losses(rows, ref_row["first_loss"] if ref_row else None)
        return rows, best

    # --- the order of the runs ---
    def measure(self) -> None:
        """Every timed run, in order of what the targets need first: Odyssey's headline, every
        in-RAM peer (the fastest is the one to beat), Odyssey at 4 GiB, at 1 GiB with --spill off,
        the fp32 rows, the offload peers; then the smallest cgroup of the fastest peer."""
        peers_ = self.args.peers
        small, big = ODYSSEY_BUDGETS_GIB
        self.inram = peer_configs("inram") if "inram" in peers_ else []
        self.offload = peer_configs("offload") if "offload" in peers_ else []
        head = self.odyssey(small, "auto") if "odyssey" in peers_ else None
        for c in self.inram:
            self.peer(c)
        if "odyssey" in peers_:
            self.odyssey(big, "auto")
            self.odyssey(small, "auto", spill="off")  # what 1 GiB does recomputing instead of spilling
            auto_fp32 = bool(head and head.get("dtype") == "fp32")
            for b in (small, big):
                if auto_fp32:
                    self.odyssey_same_as_auto(b, "odyssey" if b == small else f"odyssey-{b:g}g-auto")
                else:
                    self.odyssey(b, "fp32")
        for c in self.offload:
            self.peer(c)
        self.ranked = sorted(
            (c for c in [*self.inram, *self.offload] if self.rows[c.name]["status"] == "runs"),
            key=lambda c: self.rows[c.name]["step_s"] or float("inf"),
        )
        if self.ranked:
            self.search(self.ranked[0])

    def paired(self, rounds: int, gflops0: dict | None = None) -> None:
        """`rounds` more rounds of the three runs the step targets compare: Odyssey at 1 GiB, the
        fastest peer (memory no limit), Odyssey at 4 GiB, back to back, every other round in
        reverse order; the measure() rows are round 0. The machine's speed drifts by tens of
        percent within an hour: each round's ratios come from runs minutes apart, and the targets
        take their median (goals.targets). Each round also measures the matmul just before its
        Odyssey 1 GiB run (round 0: `gflops0`, the run's first measurement, taken just before
        measure()'s first run, which is that one), for the compute target's ratio of the round."""
        from odyssey.probe import shape_of

        small, big = ODYSSEY_BUDGETS_GIB
        peer = self.ranked[0] if self.ranked else None
        rows = {"odyssey": "odyssey", "peer": peer.name if peer else "", "odyssey-4g": f"odyssey-{big:g}g-auto"}
        first = {key: (self.rows.get(name) or {}).get("step_s") for key, name in rows.items()}
        self.rounds = [{"round": 0, **first, **({"gflops": gflops0} if gflops0 else {})}]
        if peer is None or not (first["odyssey"] or first["odyssey-4g"]):
            return
        runs = [("odyssey", small), ("peer", None), ("odyssey-4g", big)]
        per_round = sum(_first_attempt(self.climbs.get(n) or {}).get("seconds") or 0.0 for n in rows.values())
        for i in range(1, rounds + 1):
            if self.out_of_time(per_round * 1.6):
                print(f"  paired round {i}: time limit of the benchmark reached")
                break
            work = self.work / f"round{i}"
            work.mkdir(parents=True, exist_ok=True)
            got: dict = {"round": i}
            for key, gib in runs if i % 2 == 0 else runs[::-1]:
                if not first[key]:
                    got[key] = None
                    continue
                print(f"  paired round {i}: {peer.label if key == 'peer' else f'Odyssey, {gib:g} GiB'}")
                if key == "odyssey":
                    got["gflops"] = measure_matmul(shape_of(self.config, self.args.seq_len))["gflops"]
                if key == "peer":
                    res = climb(self._peer_runner(peer, self.args.steps, work=work), [self.cap])
                else:
                    res = climb(self._odyssey_runner(f"{key}-round{i}", "auto", "auto", work), [int(gib * GIB)])
                got[key] = (res.get("ok_result") or {}).get("step_s")
            self.rounds.append(got)

    def search_rest(self) -> None:
        """The smallest cgroup of the other peers, fastest first, while time is left."""
        for c in self.ranked[1:]:
            self.search(c)

    def report(self, result: dict) -> None:
        """The rows, the fastest peer, the loss check and the compute limit's FLOP into `result`."""
        small, big = ODYSSEY_BUDGETS_GIB
        order = [
            "odyssey",
            "odyssey-spill-off",
            f"odyssey-{small:g}g-fp32",
            f"odyssey-{big:g}g-auto",
            f"odyssey-{big:g}g-fp32",
            *(c.name for c in self.inram),
            *(c.name for c in self.offload),
        ]
        rows, best = self.finish(order)
        cfg = self.config
        layer_params = sum(math.prod(s) for s in cfg.layer_shapes(0).values())
        kept = (self.rows.get("odyssey") or {}).get("layers_kept") or 0
        result["train"] = rows
        result["fastest_peer"] = best["name"] if best else None
        result["climbs"]["train"] = self.climbs
        result["compute_limit"] = {
            "parameters": cfg.num_parameters(),
            "layer_parameters": layer_params,
            "layers_kept": kept,
            "flop_per_token": goals.flop_per_token(cfg.num_parameters(), layer_params, kept),
        }
        result["rounds"] = self.rounds
        result["loss_reference"] = self.reference["label"] if self.reference else None
        result["loss_problems"] = self.loss_problems
        for line in self.loss_problems:
            print(f"  WARNING: {line}")


def run(args) -> dict:
    from odyssey.probe import shape_of, shape_text
    from odyssey.runtime import cgroup
    from odyssey.store import Store

    t_start = time.monotonic()
    model = Path(args.model) if args.model else common.ensure_store("odyssey-1.2b")
    data = Path(args.data) if args.data else common.ensure_data()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    budget = common.parse_budget(args.budget)
    budgets = ladder(budget, cap_bytes=common.parse_budget(args.max_budget))
    reserve = common.parse_budget(args.offload_reserve)
    deadline = t_start + args.time_limit_s if args.time_limit_s else None
    timeout = attempt_timeout(args.timeout_s, deadline)
    prompt = prompt_from(data, args.prompt_len)
    capped, where = cgroup.available()
    cfg = Store.open(model).config
    shape = shape_of(cfg, args.seq_len)
    import torch

    threads = torch.get_num_threads()
    matmul = [measure_matmul(shape)]
    settings = {
        "model": str(model),
        "model_label": common.model_label(model),
        "data": str(data),
        "seq_len": args.seq_len,
        "batch_size": 1,
        "lora_r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "targets": TARGETS,
        "optimizer": f"AdamW lr {LR}",
        "steps": args.steps,
        "measured_steps": args.steps - 1,
        "probe_steps": args.probe_steps,
        "budget_gib": budget / GIB,
        "odyssey_budgets_gib": list(ODYSSEY_BUDGETS_GIB),
        "odyssey_compile": args.odyssey_compile,
        "max_budget_gib": common.parse_budget(args.max_budget) / GIB,
        "resolution_mib": args.resolution // MIB,
        "ladder_gib": [b / GIB for b in budgets],
        "offload_reserve_gib": reserve / GIB,
        "offload_share": args.offload_share,
        "prompt_len": len(prompt),
        "new_tokens": args.new_tokens,
        "peer_allocator": "jemalloc" if args.peer_jemalloc else "system (glibc)",
        "cgroup": where if capped else f"unavailable: {where}",
        "threads": threads,
        "matmul_shape": shape_text(shape),
        "time_limit_s": args.time_limit_s,
    }
    print(
        f"peers on {model}: seq_len {args.seq_len}, batch 1, LoRA r={LORA_R} alpha {LORA_ALPHA}, AdamW; "
        f"{args.steps} steps a timed run (median of the last {args.steps - 1}), {args.probe_steps} a search "
        f"attempt; matmul {shape_text(shape)}: bf16 {matmul[0]['gflops']['bf16']:,.0f}, "
        f"fp32 {matmul[0]['gflops']['fp32']:,.0f} GFLOP/s"
        + ("" if capped else f"; no cgroups ({where}): nothing capped, nothing searched")
    )
    m = common.machine()
    from odyssey.probe import MATMUL_FLAGS
    from odyssey.runtime.cpu import cpu_flags

    m["matmul_flags"] = [f for f in MATMUL_FLAGS if f in set(cpu_flags()[1])]
    result = {"machine": m, "date": common.today(), "settings": settings, "climbs": {}, "train": [], "generate": []}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()] if isinstance(args.peers, str) else args.peers
    train = (
        TrainBench(args, model, data, work, deadline, capped, bf16_skip(matmul[0]["gflops"]))
        if "train" in tasks
        else None
    )
    if train is not None:
        train.measure()  # every timed run, and the search of the fastest peer
        train.paired(args.rounds, matmul[0]["gflops"])
    if "generate" in tasks:
        screens = peer_screens(weights_fp32_bytes(model), reserve)
        climbs = {}
        for peer in [p for p in args.peers if p in ("odyssey", "offload")]:
            print(f"  generate: {PEER_LABELS[peer]}")
            if peer == "odyssey":
                runner = odyssey_generate_runner(model, work, prompt, args.new_tokens, timeout)
            else:
                runner = peer_runner(
                    "generate",
                    PeerConfig("offload", "fp32", False),
                    model,
                    data,
                    work,
                    args.steps,
                    args.seq_len,
                    timeout,
                    args.peer_jemalloc,
                    reserve_bytes=reserve,
                    prompt_ids=prompt,
                    new_tokens=args.new_tokens,
                    capped=capped,
                )
            if deadline is not None and time.monotonic() > deadline:
                climbs[peer] = not_measured(budget, "time limit of the benchmark reached")
            else:
                climbs[peer] = climb(runner, budgets, deadline=deadline, screen=screens.get(peer))
        ody = climbs.get("odyssey", {}).get("ok_result", {})
        result["generate"] = [
            _gen_row(p, c, ody.get("s_per_token"), ody.get("cpu_s_per_token")) for p, c in climbs.items()
        ]
        result["climbs"]["generate"] = climbs
    if train is not None:
        train.search_rest()
        train.report(result)
    matmul.append(measure_matmul(shape))
    best = best_gflops(matmul)
    result["matmul"] = {"measurements": matmul, "best_gflops": best, "shape": shape_text(shape)}
    result["targets"] = []
    if "train" in tasks:
        lim = result["compute_limit"]
        lim["fastest_gflops"] = max(best.values())
        lim["fastest_dtype"] = max(best, key=best.get)
        lim["tokens_per_s"] = goals.compute_limit_tokens_s(
            best, lim["parameters"], lim["layer_parameters"], lim["layers_kept"]
        )
        import floor

        result["kernel_floor"] = floor.measure(cfg, args.seq_len, lim["fastest_dtype"])
        rows = {r["name"]: r for r in result["train"]}
        peer = rows.get(result["fastest_peer"]) if result["fastest_peer"] else None
        result["targets"] = goals.targets(
            rows.get("odyssey"),
            rows.get(f"odyssey-{ODYSSEY_BUDGETS_GIB[1]:g}g-auto"),
            peer,
            lim["tokens_per_s"],
            args.seq_len,
            floor_s=result["kernel_floor"]["seconds"],
            rounds=result["rounds"],
            flop=lim["flop_per_token"],
        ) + goals.fp32_evidence(result["train"])
    return result


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "worker":
        w = argparse.ArgumentParser(prog="peers.py worker")
        for a in ("--task", "--peer", "--model", "--data", "--result", "--offload-folder", "--prompt-ids"):
            w.add_argument(a, required=True)
        for a in ("--steps", "--seq-len", "--budget", "--reserve", "--new-tokens"):
            w.add_argument(a, type=int, required=True)
        w.add_argument(
            "--cpu-weights", type=int, default=0, help="accelerate max_memory cpu, bytes (0: budget - reserve)"
        )
        w.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
        w.add_argument("--checkpointing", action="store_true")
        return worker(w.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="store directory (default: the 1.2B under .cache/bench, created if missing)")
    p.add_argument("--data", help="token data directory (default: the sample corpus under .cache/bench)")
    p.add_argument("--budget", default="2GiB", help="RAM budget generation starts at (its ladder climbs from it)")
    p.add_argument(
        "--max-budget",
        default="16GiB",
        help="the cap of the peers' timed runs (memory no limit) and the top of the searches and ladders",
    )
    p.add_argument("--resolution", type=common.parse_budget, default=smallest.RESOLUTION, help="of the search (256MiB)")
    p.add_argument(
        "--offload-reserve",
        default="1GiB",
        help="generation: budget left for runtime and activations; accelerate gets the rest for weights",
    )
    p.add_argument(
        "--offload-share", type=float, default=0.25, help="training: the weights' share accelerate keeps in RAM"
    )
    p.add_argument("--steps", type=int, default=4, help="steps of a timed run (the first is warm-up)")
    p.add_argument("--probe-steps", type=int, default=2, help="steps of a search attempt")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="paired rounds after the timed runs: Odyssey 1 GiB, the fastest peer and Odyssey 4 GiB again, back "
        "to back; the step targets are the median of the rounds' ratios (0: the timed runs alone)",
    )
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tasks", default="train,generate")
    p.add_argument("--peers", default="odyssey,inram,offload")
    p.add_argument("--peer-jemalloc", action="store_true", help="preload jemalloc into the peers too")
    p.add_argument(
        "--odyssey-compile",
        choices=("on", "off"),
        default="off",
        help="Odyssey's `compile` setting (default off, as `odyssey train`; on: the warm-up step compiles)",
    )
    p.add_argument("--timeout-s", type=float, default=900, help="per attempt")
    p.add_argument("--time-limit-s", type=float, default=0, help="start no run after this long (0: no limit)")
    p.add_argument("--work", default=str(common.CACHE / "peers"), help="logs, run dirs, offload folders")
    p.add_argument("--out-dir", default=str(common.RESULTS))
    p.add_argument("--replot", action="store_true", help="rewrite peers.md and peers.png from OUT_DIR/peers.json")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    if args.replot:
        result = json.loads((out / "peers.json").read_text())
    else:
        t0 = time.perf_counter()
        result = run(args)
        result["seconds"] = round(time.perf_counter() - t0, 1)
    sections, lines = markdown_sections(result), notes(result)
    for caption, table in sections:
        print(f"\n{caption}\n{table}")
    for n in lines:
        print(f"note: {n}")
    common.write_results(
        out,
        "peers",
        result,
        TITLE,
        sections,
        lines,
        chart=(lambda p: png(result, p)) if result["train"] or result["generate"] else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
