"""Odyssey against what a user would reach for instead, on the same weights, the same batches and
the same LoRA, each inside its own memory cgroup capped at the RAM budget.

Training (batch 1, seq_len 512, LoRA r=16, alpha 32 on q,k,v,o,gate,up,down, AdamW lr 2e-4, the
same token windows in the same order: `odyssey.data.BatchSampler` with seed 0 on the same token
data, so every tool's first loss is the same number):
- odyssey          `odyssey train --ram-budget B` (weights paged from disk, recompute backward)
- peft-inram       transformers + peft, the model fully in RAM (`from_pretrained(store)`)
- peft-offload     transformers + peft + accelerate disk offload: `device_map="auto"`,
                   `max_memory={"cpu": B - reserve}`, `offload_folder`
Generation (greedy, the same prompt ids, N new tokens): `odyssey generate --ram-budget B` against
transformers + accelerate disk offload `generate()` under the same cap.

All compute in fp32 here: this CPU has no native bf16 (bf16 matmuls are emulated and about 8x
slower than fp32), so every tool gets `dtype=torch.float32` (Odyssey picks fp32 itself).

Budgets: each tool starts at the budget (default 2 GiB). When it is OOM-killed or crashes, it is
retried at the next rung of 3, 4, 6, 8, 12, 16 GiB; the smallest budget at which it runs is the
result, or "does not run" with the last line of its error (a crash that repeats with the same
message at two budgets is not a memory problem and stops the climb). Rungs that cannot work are
listed, not run: in RAM, budgets below the fp32 weights alone; with disk offload, the climb stops
at the budget whose weights share holds every weight (nothing would be offloaded: that is the
in-RAM peer). When disk-offloaded training never ran, one probe attempt at 16 GiB with the first
budget's weights share tells whether it runs at all when memory is no limit.

Step time is the median of the steps after the first (warm-up); "CPU s" is the CPU time of the
tool's process in the same steps (wall time on a shared machine stretches with other work, CPU
time much less). Peak memory is the cgroup's peak (anonymous memory + page cache charged to the
group) and the process's peak anonymous RSS sampled every 0.05-0.1 s.

    .venv/bin/python benchmarks/peers.py [--model STORE] [--budget 2GiB] [--steps 4] [--new-tokens 8]

The workers are this file too: `peers.py worker --task train|generate --peer inram|offload ...`.
"""

from __future__ import annotations

import argparse
import json
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
from common import GIB, MIB  # noqa: E402

TITLE = "Odyssey against transformers + peft (+ accelerate)"  # of peers.md and its README section
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA, LR = 16, 32, 2e-4
RUNGS_GIB = (2, 3, 4, 6, 8, 12, 16)
PEER_LABELS = {
    "odyssey": "Odyssey (paged from disk)",
    "inram": "transformers + peft, in RAM",
    "offload": "transformers + peft + accelerate disk offload",
    "offload-probe": "the same, most weights on disk, memory no limit",
}


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
    peer: str,
    model: Path,
    data: Path,
    work: Path,
    steps: int,
    seq_len: int,
    reserve_bytes: int,
    prompt_ids: Sequence[int],
    new_tokens: int,
    timeout_s: float,
    jemalloc: bool,
    cpu_weights: int = 0,
) -> Callable[[int], Attempt]:
    """Attempts of one peer worker; accelerate gets max_memory cpu = `cpu_weights` when given,
    else the budget less `reserve_bytes`."""

    def run(budget: int) -> Attempt:
        tag = f"{task}-{peer}-{budget // MIB}MiB" + (f"-cpu{cpu_weights // MIB}MiB" if cpu_weights else "")
        result_file = work / f"{tag}.json"
        offload = work / f"offload-{tag}"
        result_file.unlink(missing_ok=True)
        shutil.rmtree(offload, ignore_errors=True)
        cmd = [
            common.PYTHON,
            str(Path(__file__).resolve()),
            "worker",
            "--task",
            task,
            "--peer",
            peer,
            "--model",
            str(model),
            "--data",
            str(data),
            "--result",
            str(result_file),
            "--steps",
            str(steps),
            "--seq-len",
            str(seq_len),
            "--budget",
            str(budget),
            "--reserve",
            str(reserve_bytes),
            "--offload-folder",
            str(offload),
            "--prompt-ids",
            ",".join(map(str, prompt_ids)),
            "--new-tokens",
            str(new_tokens),
            "--cpu-weights",
            str(cpu_weights),
        ]
        rc, peak, oom, error, seconds = common.run_capped(
            cmd, budget, work / f"{tag}.log", _seconds(timeout_s), peer_env(jemalloc)
        )
        shutil.rmtree(offload, ignore_errors=True)
        result = _read_json(result_file)
        ok = rc == 0 and bool(result.get("done"))
        if rc == 0 and not ok:
            error = "exited 0 without a result"
        return Attempt(budget, ok, rc, oom, peak, error, round(seconds, 1), result)

    return run


def odyssey_train_runner(
    model: Path, data: Path, work: Path, steps: int, seq_len: int, timeout_s: float, extra: Sequence[str] = ()
) -> Callable[[int], Attempt]:
    def run(budget: int) -> Attempt:
        tag = f"train-odyssey-seq{seq_len}-{budget // MIB}MiB"
        run_dir = work / tag
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = common.train_cmd(model, data, run_dir, budget, steps, seq_len, extra)
        load0 = os.getloadavg()[0]
        with ChildCpu() as cpu:
            rc, peak, oom, error, seconds = common.run_capped(cmd, budget, work / f"{tag}.log", _seconds(timeout_s))
        records = common.read_metrics(run_dir / "metrics.jsonl")
        summary = common.summarize_steps(records)
        summary["cpu_s_all"] = [None if c is None else round(c, 2) for c in step_cpu(records, cpu.samples)]
        summary["cpu_s"] = common.median(summary["cpu_s_all"][1:])
        summary["peak_anon_mib"] = round(cpu.peak_anon_bytes / MIB, 1) or None  # sampled every 0.1 s
        summary["loadavg"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
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


def generation_summary(arrivals: Sequence[float], n_tokens: int) -> dict:
    """Seconds per generated token = median gap between consecutive token arrivals after the
    first (the first includes start-up and the prompt pass)."""
    gaps = [b - a for a, b in pairwise(arrivals)]
    return {
        "new_tokens": n_tokens,
        "s_per_token": common.median(gaps),
        "decode_steps": len(gaps),
        "first_token_s": arrivals[0] if arrivals else None,
    }


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
            except (OSError, IndexError, ValueError, ProcessLookupError):
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
# the worker: one peer, one task, inside the cgroup


def worker(args) -> int:
    from odyssey.runtime.memory import PeakSampler

    res: dict = {"task": args.task, "peer": args.peer, "done": False, "loadavg": [round(os.getloadavg()[0], 2)]}

    def save(**kw):
        res.update(kw)
        common.write_json(Path(args.result), res)

    with PeakSampler(interval_s=0.05) as sampler:
        t0 = time.perf_counter()
        import torch

        from odyssey.runtime import allocator

        torch.manual_seed(0)
        save(allocator=allocator.active(), threads=torch.get_num_threads(), import_s=round(time.perf_counter() - t0, 2))
        model, device_map = _load_peer(args, torch)
        save(
            load_s=round(time.perf_counter() - t0, 2),
            device_map=device_map,
            peak_anon_mib=round(sampler.peak_bytes / MIB, 1),
        )
        if args.task == "train":
            _train(args, torch, model, sampler, save)
        else:
            _generate(args, torch, model, sampler, save)
    save(
        done=True,
        peak_anon_mib=round(sampler.peak_bytes / MIB, 1),
        loadavg=res["loadavg"] + [round(os.getloadavg()[0], 2)],
    )
    return 0


def _load_peer(args, torch):
    from transformers import LlamaForCausalLM

    if args.peer == "inram":
        return LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32), {"cpu": "all"}
    cpu = args.cpu_weights or max(args.budget - args.reserve, 64 * MIB)
    model = LlamaForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, device_map="auto", max_memory={"cpu": cpu}, offload_folder=args.offload_folder
    )
    counts = offload_summary(model, getattr(model, "hf_device_map", {}))
    counts["cpu_max_memory_mib"] = cpu // MIB
    return model, counts


def offload_summary(model, device_map: dict) -> dict:
    """How much of the model accelerate placed where: parameters per device and their share."""
    per: dict = {}
    for name, where in device_map.items():
        mod = model.get_submodule(name) if name else model
        per[str(where)] = per.get(str(where), 0) + sum(p.numel() for p in mod.parameters())
    total = sum(per.values()) or 1
    return {"params": per, "disk_share": round(per.get("disk", 0) / total, 3), "entries": len(device_map)}


def _train(args, torch, model, sampler, save):
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from odyssey.data import BatchSampler, TokenData

    model = get_peft_model(
        model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    save(trainable=sum(p.numel() for p in params), lora_devices=sorted({str(p.device) for p in params}))
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    batches = BatchSampler(TokenData(args.data), "train", args.seq_len, 1, seed=0)
    steps, losses, cpus = [], [], []
    for _ in range(args.steps):
        batch = batches.next_batch()  # text data: (1, T) int64 each, every target trained
        x, y = batch.x, batch.y
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model(input_ids=x).logits  # (1, T, V) fp32
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(round(time.perf_counter() - t0, 3))
        cpus.append(round(time.process_time() - c0, 2))  # all threads of this process
        losses.append(round(float(loss), 5))
        del logits, loss
        save(step_s_all=steps, cpu_s_all=cpus, losses=losses, peak_anon_mib=round(sampler.peak_bytes / MIB, 1))
    save(step_s=common.median(steps[1:]), cpu_s=common.median(cpus[1:]), measured_steps=len(steps[1:]))


def _generate(args, torch, model, sampler, save):
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.t, self.cpu = [], []

        def put(self, value):
            self.t.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def end(self):
            pass

    ids = torch.tensor([[int(i) for i in args.prompt_ids.split(",")]])
    clock = Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.new_tokens,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
        )
    new = [int(t) for t in out[0, ids.shape[1] :]]
    arrivals = [t - t0 for t in clock.t[1:]]  # the first put() is the prompt
    summary = generation_summary(arrivals, len(new))
    summary["cpu_s_per_token"] = common.median([b - a for a, b in pairwise(clock.cpu[1:])])
    save(tokens=new, generate_s=round(time.perf_counter() - t0, 2), **summary)


# --------------------------------------------------------------------------------------------
# the benchmark


def weights_fp32_bytes(model: Path) -> int:
    from odyssey.store import Store

    return Store.open(model).config.num_parameters() * 4


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


def _offloaded(climb_res: dict) -> bool:
    """Did the attempt that ran keep some weights on disk?"""
    return bool((climb_res.get("ok_result", {}).get("device_map") or {}).get("disk_share"))


def prompt_from(data: Path, n: int) -> list[int]:
    from odyssey.data import TokenData

    return [int(t) for t in TokenData(data).tokens("val")[:n]]


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _row(name: str, climb_res: dict, **measures) -> dict:
    """A table row: the climb's outcome, the task's `measures` (times and their ratios to Odyssey),
    and the peak memory where it ran."""
    r = climb_res["ok_result"]
    return {
        "tool": name,
        "label": climb_res.get("label") or PEER_LABELS[name],
        "status": climb_res["status"],
        # the probe runs at one large cap only: "within the budget" does not apply
        "ran_within_budget": None if name == "offload-probe" else climb_res["ran_within_budget"],
        "smallest_ok_gib": climb_res["smallest_ok_bytes"] / GIB if climb_res["smallest_ok_bytes"] else None,
        **measures,
        "loadavg": r.get("loadavg"),
        "peak_cgroup_mib": round(climb_res["ok_peak_bytes"] / MIB) if climb_res["ok_peak_bytes"] else None,
        "peak_anon_mib": r.get("peak_anon_mib") or r.get("peak_rss_anon_mib"),
        "error": climb_res["error"],
        "device_map": r.get("device_map"),
        "stopped": climb_res.get("stopped", ""),
    }


def _train_row(name: str, climb_res: dict, odyssey_step: float | None, odyssey_cpu: float | None = None) -> dict:
    r = climb_res["ok_result"]
    return _row(
        name,
        climb_res,
        step_s=r.get("step_s"),
        measured_steps=r.get("measured_steps"),
        cpu_s=r.get("cpu_s"),
        ratio_to_odyssey=_ratio(r.get("step_s"), odyssey_step),
        cpu_ratio_to_odyssey=_ratio(r.get("cpu_s"), odyssey_cpu),
        first_loss=(r.get("losses") or [None])[0],
    )


def _gen_row(name: str, climb_res: dict, odyssey_tok: float | None, odyssey_cpu: float | None = None) -> dict:
    r = climb_res["ok_result"]
    return _row(
        name,
        climb_res,
        s_per_token=r.get("s_per_token"),
        decode_steps=r.get("decode_steps"),
        cpu_s_per_token=r.get("cpu_s_per_token"),
        ratio_to_odyssey=_ratio(r.get("s_per_token"), odyssey_tok),
        cpu_ratio_to_odyssey=_ratio(r.get("cpu_s_per_token"), odyssey_cpu),
        tokens=r.get("tokens"),
    )


def _note(row: dict) -> str:
    parts = []
    if row["status"] != "runs" or row["ran_within_budget"] is False:
        if row["error"]:
            parts.append(("at smaller budgets: " if row["status"] == "runs" else "") + common.short_error(row["error"]))
    if row.get("stopped") and row["status"] != "runs":
        parts.append(f"stopped: {row['stopped']}")
    dm = row.get("device_map") or {}
    if row["tool"].startswith("offload") and row["status"] == "runs":
        share = dm.get("disk_share", 0)
        parts.append(
            f"{share:.0%} of the weights on disk" if share else "nothing offloaded at this budget: runs as in RAM"
        )
    return "; ".join(parts)


def _peer_table(
    rows: list[dict],
    budget_gib: float,
    measures: Sequence[tuple[str, str, int]],
    count: str,
    extra: Sequence[tuple[str, str, int]] = (),
) -> str:
    """The columns both tasks share: where each tool ran, its `measures` ((header, key, digits): wall
    and CPU time) with how many steps they are the median of (the `count` key), the ratios to
    Odyssey, peak memory, the `extra` columns and the notes."""
    headers = [
        "tool",
        f"runs in {budget_gib:g} GiB",
        "smallest budget that ran",
        *(h for h, _, _ in measures),
        "median of",
        "x Odyssey",
        "x Odyssey (CPU)",
        "peak cgroup MiB",
        "peak anon MiB",
        *(h for h, _, _ in extra),
        "notes",
    ]
    out = []
    for r in rows:
        out.append(
            (
                r["label"],
                common.fmt(r["ran_within_budget"]),
                "does not run" if r["status"] != "runs" else f"{r['smallest_ok_gib']:g} GiB",
                *(common.fmt(r.get(k), d) for _, k, d in measures),
                r[count] or "-",
                common.fmt(r["ratio_to_odyssey"]),
                common.fmt(r.get("cpu_ratio_to_odyssey")),
                common.fmt(r["peak_cgroup_mib"]),
                common.fmt(r["peak_anon_mib"], 0),
                *(common.fmt(r.get(k), d) for _, k, d in extra),
                _note(r),
            )
        )
    return common.markdown_table(headers, out, "lcc" + "r" * (len(headers) - 4) + "l")


def train_table(rows: list[dict], budget_gib: float) -> str:
    return _peer_table(
        rows,
        budget_gib,
        [("step s", "step_s", 1), ("CPU s", "cpu_s", 1)],
        "measured_steps",
        extra=[("loss step 1", "first_loss", 4)],
    )


def gen_table(rows: list[dict], budget_gib: float) -> str:
    return _peer_table(
        rows, budget_gib, [("s / token", "s_per_token", 2), ("CPU s / token", "cpu_s_per_token", 2)], "decode_steps"
    )


SHORT = {
    "odyssey": "Odyssey",
    "inram": "peft\nin RAM",
    "offload": "accelerate\noffload",
    "offload-probe": "offload,\nno mem limit",
}


def png(result: dict, path: Path):
    """Three panels: step time (wall and CPU), peak memory against the budget, s/token."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    budget_mib = result["settings"]["budget_gib"] * 1024

    def grouped(ax, rows, keys, labels, title, ylabel, line=None):
        width = 0.8 / len(keys)
        for k, (key, label) in enumerate(zip(keys, labels, strict=True)):
            xs = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(rows))]
            vals = [r.get(key) for r in rows]
            ax.bar(
                xs,
                [v or 0 for v in vals],
                width,
                label=label,
                color=[("#2ca02c" if r["tool"] == "odyssey" else "#1f77b4") for r in rows],
                alpha=1.0 if k == 0 else 0.5,
            )
            for x, v in zip(xs, vals, strict=True):
                ax.text(x, v or 0, "n/a" if v is None else f"{v:,.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), [SHORT.get(r["tool"], r["tool"]) for r in rows], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        if line:
            ax.axhline(line, color="#d62728", lw=0.8, ls="--")
        if len(keys) > 1:
            ax.legend(fontsize=7)

    t, g = result["train"], result["generate"]
    if t:
        grouped(
            axes[0], t, ["step_s", "cpu_s"], ["wall s", "CPU s"], "LoRA step (lower is better; n/a: did not run)", "s"
        )
        grouped(
            axes[1],
            t,
            ["peak_cgroup_mib"],
            ["peak"],
            "peak memory where it ran (MiB)\nred: the budget",
            "MiB",
            budget_mib,
        )
    if g:
        grouped(
            axes[2],
            g,
            ["s_per_token", "cpu_s_per_token"],
            ["wall s", "CPU s"],
            "generation, s per token (lower is better)",
            "s",
        )
    return common.save_figure(fig, path)


def run(args) -> dict:
    model = Path(args.model) if args.model else common.ensure_store("odyssey-1.2b")
    data = Path(args.data) if args.data else common.ensure_data()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    budget = common.parse_budget(args.budget)
    budgets = ladder(budget, cap_bytes=common.parse_budget(args.max_budget))
    reserve = common.parse_budget(args.offload_reserve)
    deadline = time.monotonic() + args.time_limit_s if args.time_limit_s else None
    timeout = attempt_timeout(args.timeout_s, deadline)
    prompt = prompt_from(data, args.prompt_len)
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
        "budget_gib": budget / GIB,
        "ladder_gib": [b / GIB for b in budgets],
        "offload_reserve_gib": reserve / GIB,
        "compute_dtype": "fp32",
        "prompt_len": len(prompt),
        "new_tokens": args.new_tokens,
        "peer_allocator": "jemalloc" if args.peer_jemalloc else "system (glibc)",
    }
    print(
        f"peers on {model}: seq_len {args.seq_len}, batch 1, LoRA r={LORA_R} alpha {LORA_ALPHA}, AdamW; "
        f"{args.steps} steps each, step time = median of the last {args.steps - 1}; budget ladder "
        f"{', '.join(f'{b / GIB:g}' for b in budgets)} GiB"
    )
    result = {"machine": common.machine(), "date": common.today(), "settings": settings, "climbs": {}}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]

    weights = weights_fp32_bytes(model)
    screens = peer_screens(weights, reserve)
    settings["weights_fp32_gib"] = round(weights / GIB, 2)
    train_rows, gen_rows = [], []
    if "train" in tasks:
        climbs = {}
        for peer in peers:
            print(f"  train: {PEER_LABELS[peer]}")
            if peer == "odyssey":
                ok, why = common.train_available()
                if not ok:
                    print(f"    skipped: {why}")
                    climbs[peer] = {
                        "attempts": [],
                        "budget_bytes": budget,
                        "ran_within_budget": False,
                        "smallest_ok_bytes": None,
                        "status": "not measured",
                        "error": why,
                        "stopped": why,
                        "ok_result": {},
                        "ok_peak_bytes": None,
                    }
                    continue
                runner = odyssey_train_runner(model, data, work, args.steps, args.seq_len, timeout)
            else:
                runner = peer_runner(
                    "train",
                    peer,
                    model,
                    data,
                    work,
                    args.steps,
                    args.seq_len,
                    reserve,
                    prompt,
                    args.new_tokens,
                    timeout,
                    args.peer_jemalloc,
                )
            climbs[peer] = climb(runner, budgets, deadline=deadline, screen=screens.get(peer))
            if peer == "offload" and args.offload_probe and not _offloaded(climbs[peer]):
                # It ran only once nothing was left on disk (or not at all): does disk-offloaded
                # LoRA training run when memory is no limit? One attempt at the probe budget with
                # the weights share of the first budget.
                probe = common.parse_budget(args.offload_probe)
                share = max(budget - reserve, 64 * MIB)
                print(
                    f"  train: {PEER_LABELS['offload-probe']} ({share / GIB:g} GiB of weights in RAM, "
                    f"cap {probe / GIB:g} GiB)"
                )
                runner = peer_runner(
                    "train",
                    "offload",
                    model,
                    data,
                    work,
                    args.steps,
                    args.seq_len,
                    reserve,
                    prompt,
                    args.new_tokens,
                    timeout,
                    args.peer_jemalloc,
                    cpu_weights=share,
                )
                climbs["offload-probe"] = climb(runner, [probe], deadline=None)
                climbs["offload-probe"]["label"] = (
                    f"the same, {share / GIB:g} GiB of weights in RAM, the rest "
                    f"on disk, cap {probe / GIB:g} GiB (memory no limit)"
                )
        ody = climbs.get("odyssey", {}).get("ok_result", {})
        train_rows = [_train_row(p, c, ody.get("step_s"), ody.get("cpu_s")) for p, c in climbs.items()]
        result["climbs"]["train"] = climbs
    if "generate" in tasks:
        climbs = {}
        for peer in [p for p in peers if p in ("odyssey", "offload")]:
            print(f"  generate: {PEER_LABELS[peer]}")
            if peer == "odyssey":
                runner = odyssey_generate_runner(model, work, prompt, args.new_tokens, timeout)
            else:
                runner = peer_runner(
                    "generate",
                    peer,
                    model,
                    data,
                    work,
                    args.steps,
                    args.seq_len,
                    reserve,
                    prompt,
                    args.new_tokens,
                    timeout,
                    args.peer_jemalloc,
                )
            climbs[peer] = climb(runner, budgets, deadline=deadline, screen=screens.get(peer))
        ody = climbs.get("odyssey", {}).get("ok_result", {})
        gen_rows = [_gen_row(p, c, ody.get("s_per_token"), ody.get("cpu_s_per_token")) for p, c in climbs.items()]
        result["climbs"]["generate"] = climbs
    result["train"], result["generate"] = train_rows, gen_rows
    return result


def markdown_sections(result: dict) -> list[tuple[str, str]]:
    s = result["settings"]
    out = []
    if result["train"]:
        out.append(
            (
                f"**LoRA training step**, {s.get('model_label', '')} model, batch 1, seq_len {s['seq_len']}, "
                f"r={s['lora_r']}, "
                f"alpha {s['lora_alpha']}, {', '.join(t.split('_')[0] for t in s['targets'])}, AdamW, fp32 "
                f"compute; each tool in a memory cgroup starting at {s['budget_gib']:g} GiB. Step time is "
                f"the median of {s['measured_steps']} steps after a warm-up step, at the smallest budget "
                f"that ran.",
                train_table(result["train"], s["budget_gib"]),
            )
        )
    if result["generate"]:
        out.append(
            (
                f"**Generation**, greedy, {s['prompt_len']}-token prompt, {s['new_tokens']} new tokens; "
                f"seconds per token = median gap between tokens after the first.",
                gen_table(result["generate"], s["budget_gib"]),
            )
        )
    return out


def notes(result: dict) -> list[str]:
    s = result["settings"]
    return [
        "CPU s: CPU time (user + system, all threads) of the tool's process for the same step or token; "
        "other work on the machine stretches wall time far more than CPU time, so the CPU ratio is the "
        "steadier comparison of work done, the wall ratio the one a user waits for.",
        f"Peers use the {s['peer_allocator']} allocator (as a user gets them); Odyssey preloads jemalloc "
        "itself when it is installed.",
        "Peak cgroup memory counts anonymous memory plus page cache charged to the group (file pages of "
        "the weights read); peak anon is the process's anonymous RSS.",
        f"accelerate disk offload gets max_memory cpu = budget - {s['offload_reserve_gib']:g} GiB for "
        "weights; the rest goes to disk.",
    ]


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
        return worker(w.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="store directory (default: the 1.2B under .cache/bench, created if missing)")
    p.add_argument("--data", help="token data directory (default: the sample corpus under .cache/bench)")
    p.add_argument("--budget", default="2GiB", help="RAM budget every tool starts at")
    p.add_argument("--max-budget", default="16GiB", help="highest rung of the retry ladder")
    p.add_argument(
        "--offload-reserve",
        default="1GiB",
        help="budget left for runtime and activations; accelerate gets the rest for weights",
    )
    p.add_argument("--steps", type=int, default=4, help="training steps per tool (the first is warm-up)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tasks", default="train,generate")
    p.add_argument("--peers", default="odyssey,inram,offload")
    p.add_argument(
        "--offload-probe",
        default="16GiB",
        help="when disk-offloaded training never ran, try once at this cap with the weights share "
        "of the first budget ('' to skip)",
    )
    p.add_argument("--peer-jemalloc", action="store_true", help="preload jemalloc into the peers too")
    p.add_argument("--timeout-s", type=float, default=900, help="per attempt")
    p.add_argument("--time-limit-s", type=float, default=0, help="stop climbing after this long (0: no limit)")
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
