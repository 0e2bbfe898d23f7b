#!/usr/bin/env python3
"""Write a synthetic but realistic run directory, as `odyssey train` would leave it, for the
monitor's tests, screenshots and demos. No torch.

The records have the fields odyssey/train.py, odyssey/runtime/guard.py and odyssey/runtime/control.py
write (checked against a real run by tests/test_monitor.py). The figures follow the 1.2B model
(configs/odyssey-1.2b.yaml: 24 layers of 90 MB in bf16, a 131 MB head) on a 2-core machine: steps of
about 6 s at 512 tokens, page-in around 1.4 GB/s, anonymous RSS about 0.9 GiB under a 1.5 GiB
budget, guard samples every second. The story: a RAM spike makes the guard ask for a checkpoint; the
trainer is killed and resumed from its last checkpoint (step numbers go back); the last step's
page-in has a disk hiccup on one layer.

    python tools/record_run.py runs/demo                 # 240 steps, ~3,000 lines
    python tools/record_run.py runs/big --lines 100000   # a long file for load tests
    python tools/record_run.py runs/live --live          # keep appending, ack control requests
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from odyssey.runtime.runlog import RunDir

LAYER_BYTES = 90_185_728  # one decoder layer of odyssey-1.2b in bf16
HEAD_BLOCKS = {"head[1/2]": 90_189_824, "head[2/2]": 40_890_368}  # final norm + lm_head in 2 row blocks
LAYERS = 24
SEQ_LEN = 512
BUDGET_MIB = 1536.0

CONFIG_YAML = """\
# effective config written by odyssey train (synthetic: tools/record_run.py)
model: models/base
model_fingerprint: 0000000000000000
data: data/tok
data_tokens: 5000000
ram_budget: 1.50 GiB
ram_budget_bytes: 1610612736
train:
  seq_len: 512
  batch_size: 1
  grad_accum: 1
  steps: {steps_total}
  lr: 0.0002
  min_lr_ratio: 0.1
  warmup_steps: 10
  weight_decay: 0.0
  max_grad_norm: 1.0
  seed: 0
  checkpoint_every: 50
  keep_checkpoints: 2
  eval_every: 50
  eval_batches: 4
  mode: lora
  compute_dtype: auto
  slots: 2
  lora:
    r: 16
    alpha: 32.0
    dropout: 0.0
    targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
  guard:
    enabled: true
    interval_s: 0.5
    soft_pct: 90.0
    hard_pct: 97.0
    min_available_mib: 150.0
    max_temp_c: 90.0
    resume_temp_c: 80.0
    heartbeat_s: 2.0
    on_guard_lost: continue
    thermal_file: null
    enforce_cgroup: false
"""
GUARD_START = {
    "budget_mib": BUDGET_MIB,
    "interval_s": 0.5,
    "soft_pct": 90.0,
    "hard_pct": 97.0,
    "min_available_mib": 150.0,
    "max_temp_c": 90.0,
    "resume_temp_c": 80.0,
}


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


class Recorder:
    """Generates the records of a run in time order; `emit` collects them as JSON lines."""

    def __init__(
        self,
        t0: float,
        steps_total: int,
        seed: int = 0,
        with_temp: bool = True,
        pagein_every: int = 1,
        memory_per_step: int = 6,
    ):
        self.t = t0
        self.rng = random.Random(seed)
        self.steps_total = steps_total
        self.with_temp = with_temp
        self.pagein_every = pagein_every
        self.memory_per_step = memory_per_step
        self.records: list[dict] = []
        self.temp_c = 56.0
        self.anon_base = 880.0
        self.spike_at: set[int] = set()
        self.hiccup_at: set[int] = set()
        self.want_checkpoint = False
        self.last_ckpt = 0
        self.request_id = 1_700_000_000_000_000_000
        self.pid = 4242

    def emit(self, kind: str, **fields) -> None:
        self.records.append({"t": self.t, "kind": kind, **fields})

    def lines(self, shift_s: float = 0.0) -> list[str]:
        """The records as JSON lines, timestamps moved by `shift_s`."""
        return [_line({**r, "t": round(r["t"] + shift_s, 3)}) for r in self.records]

    def loss_at(self, step: int) -> float:
        return 2.05 + 1.15 * math.exp(-step / 70.0) + self.rng.gauss(0, 0.06)

    def lr_at(self, step: int) -> float:
        if step <= 10:
            return 2e-4 * step / 10
        frac = (step - 10) / max(1, self.steps_total - 10)
        return 2e-5 + 0.5 * (2e-4 - 2e-5) * (1 + math.cos(math.pi * min(1.0, frac)))

    def layers_pass(self, hiccup: bool, first: bool = False) -> list[dict]:
        """One step's pager.UnitStat.to_json() list as the engine makes it with 2 slots: layers
        0..L-1 forward (layer 0 still in a slot from the last backward), the head's two row
        blocks (they take both slots), L-1..0 backward."""
        out = []
        slow = self.rng.randrange(1, LAYERS - 1) if hiccup else -1
        schedule = (
            [(i, False) for i in range(LAYERS)]
            + [(name, False) for name in HEAD_BLOCKS]
            + [(i, True) for i in range(LAYERS - 1, -1, -1)]
        )
        for k, (name, backward) in enumerate(schedule):
            nbytes = HEAD_BLOCKS.get(name, LAYER_BYTES)
            reused = k == 0 and not first
            if reused:
                out.append({"layer": name, "bytes": nbytes, "read_s": 0.0, "stall_s": 0.0, "mb_s": 0.0, "reused": True})
                continue
            mb_s = self.rng.gauss(1420, 90)
            if name == slow and backward:
                mb_s = self.rng.uniform(160, 240)
            read_s = nbytes / 1e6 / mb_s
            stall = max(0.0, self.rng.gauss(0.004, 0.004)) + (read_s * 0.7 if name == slow and backward else 0.0)
            out.append(
                {
                    "layer": name,
                    "bytes": nbytes,
                    "read_s": round(read_s, 5),
                    "stall_s": round(stall, 5),
                    "mb_s": round(mb_s, 1),
                    "reused": False,
                }
            )
        return out

    def memory(self, anon: float) -> None:
        """A guard memory line (odyssey/runtime/guard.py `_memory_line`)."""
        self.emit(
            "memory",
            source="guard",
            pid=self.pid,
            anon_mib=round(anon, 1),
            file_mib=round(180 + self.rng.gauss(0, 15), 1),
            anon_pct=round(100 * anon / BUDGET_MIB, 1),
            budget_mib=BUDGET_MIB,
            avail_mib=round(5400 - anon + self.rng.gauss(0, 30), 1),
            swap_mib=0.0,
            cgroup_mib=None,
            cgroup_limit_mib=None,
            temp_c=round(self.temp_c, 1) if self.with_temp else None,
        )

    def step(self, step: int) -> None:
        step_s = self.rng.gauss(6.1, 0.25)
        hiccup = step in self.hiccup_at
        spike = step in self.spike_at
        if hiccup:
            step_s += 0.9
        peak = 0.0
        for k in range(self.memory_per_step):  # guard samples during the step, ~1 s apart
            self.t += step_s / self.memory_per_step
            phase = k / max(1, self.memory_per_step - 1)
            anon = self.anon_base + 170 * math.sin(math.pi * phase) + self.rng.gauss(0, 8)
            if spike and k == self.memory_per_step // 2:
                anon = BUDGET_MIB * 0.915
            peak = max(peak, anon)
            self.temp_c += self.rng.gauss(0.02, 0.25)
            self.temp_c = min(78.0, max(50.0, self.temp_c + (66.0 - self.temp_c) * 0.01))
            if spike and k == self.memory_per_step // 2:
                self.request_id += 1
                self.emit(
                    "guard",
                    action="checkpoint",
                    level="warning",
                    reason=f"anonymous RAM {anon / 1024:.2f} GiB reached {100 * anon / BUDGET_MIB:.0f}% of "
                    f"the 1.50 GiB budget (soft limit 90%)",
                    value=round(anon, 1),
                    limit=round(0.9 * BUDGET_MIB, 1),
                    unit="MiB",
                    request_id=self.request_id,
                )
                self.want_checkpoint = True
            self.memory(anon)
        if step % self.pagein_every == 0 or hiccup:
            self.emit("pagein", step=step, layers=self.layers_pass(hiccup, first=step == 1))
        pagein_mb_s = self.rng.gauss(1390, 70) if not hiccup else self.rng.uniform(600, 800)
        stall_s = max(0.0, self.rng.gauss(0.18, 0.05)) + (0.7 if hiccup else 0.0)
        self.emit(
            "step",
            step=step,
            loss=round(self.loss_at(step), 6),
            lr=self.lr_at(step),
            grad_norm=round(abs(self.rng.gauss(0.8, 0.2)), 6),
            tokens_per_s=round(SEQ_LEN / step_s, 2),
            step_s=round(step_s, 4),
            pagein_mb_s=round(pagein_mb_s, 1),
            stall_s=round(stall_s, 4),
            rss_anon_mib=round(peak, 1),
            budget_mib=BUDGET_MIB,
            pagein_bytes=int(pagein_mb_s * 1e6 * step_s),  # residency (odyssey/residency.py): a 1.5 GiB
            resident_bytes=2 * 90_177_536,  # budget pins two layers of the 1.2B and keeps none's activations
            pinned_units=2,
            pinned_mib=172.0,
            kept_layers=0,
            spilled_layers=0,
            spill_bytes=0,
            spill_wait_s=0.0,
            steps_total=self.steps_total,
            tokens=step * SEQ_LEN,
            world_size=1,
        )
        if step % 50 == 0:
            self.t += 9.0
            self.emit("val", step=step, val_loss=round(self.loss_at(step) + 0.07, 6), batches=4)
        if step % 50 == 0 or self.want_checkpoint:
            self.t += 1.5
            why = "requested" if self.want_checkpoint else "every 50 steps"
            self.emit(
                "event",
                level="info",
                source="trainer",
                action="checkpoint",
                step=step,
                message=f"checkpoint step-{step:06d} written ({why}; 52.4 MB in 1.4 s)",
            )
            self.want_checkpoint = False
            self.last_ckpt = step

    def heartbeat(self, run: RunDir, t: float, watched: int, guard_pid: int, running: bool) -> None:
        """guard.json as odyssey/runtime/guard.py leaves it: watching while the trainer runs, else exited."""
        if not running:
            run.write_heartbeat(t=t, pid=guard_pid, state="exited", watched=watched)
            return
        run.write_heartbeat(
            t=t,
            pid=guard_pid,
            state="watching",
            watched=watched,
            anon_mib=self.anon_base,
            temp_c=round(self.temp_c, 1) if self.with_temp else None,
        )

    def start(self, resumed_from: int | None = None) -> None:
        """What the trainer and a fresh guard write when a process starts."""
        what = f"resumed from step-{resumed_from:06d}" if resumed_from else "training started"
        self.emit(
            "event",
            level="info",
            source="trainer",
            rank=0,
            action="start",
            resumed_from=resumed_from,
            message=f"{what}: 1.236 B parameters, LoRA r=16, {self.steps_total} steps, RAM budget 1.50 GiB, "
            f"plan 1.21 GiB",
        )
        self.t += 0.4
        self.emit(
            "guard",
            action="start",
            level="info",
            reason=f"watching pid {self.pid} with a budget of 1.50 GiB",
            **GUARD_START,
            thermal_source="/sys/class/thermal/thermal_zone0/temp" if self.with_temp else "none",
        )


def record_run(
    out: str | os.PathLike,
    steps: int = 240,
    steps_total: int = 1000,
    seed: int = 0,
    resume: bool = True,
    with_temp: bool = True,
    state: str = "running",
    pid: int | None = None,
    end_t: float | None = None,
) -> Path:
    """Write RUN/config.yaml, metrics.jsonl, status.json and guard.json under `out`; returns it.
    The run reaches step `steps` of `steps_total`; with `resume` it was stopped at 80% of the way
    and resumed from the checkpoint before (so steps go back). Timestamps end at `end_t` (now)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    end_t = time.time() if end_t is None else end_t
    stop_at = int(steps * 0.8) if resume else None
    rec = Recorder(0.0, steps_total, seed=seed, with_temp=with_temp)
    rec.spike_at = {max(2, int(steps * 0.55))}
    rec.hiccup_at = {max(3, int(steps * 0.3)), steps}
    rec.start()
    step = 1
    while step <= steps:
        rec.step(step)
        if resume and step == stop_at:  # SIGKILL: no stop event, the guard sees the trainer go
            rec.t += 0.5
            rec.emit(
                "guard",
                action="exit",
                level="info",
                reason=f"watched process {rec.pid} is gone (exited, crashed or killed)",
            )
            rec.t += 300
            rec.pid += 1
            ckpt = rec.last_ckpt
            rec.start(resumed_from=ckpt)
            resume = False
            step = ckpt + 1
            continue
        step += 1
    if state in ("finished", "stopped"):  # how the trainer and its guard end a run
        rec.t += 1.0
        if state == "finished":
            rec.emit(
                "event",
                level="info",
                source="trainer",
                action="finished",
                step=steps,
                message=f"finished at step {steps}; result in {out / 'adapter'}",
            )
        else:
            rec.emit(
                "event",
                level="info",
                source="trainer",
                action="stopped",
                step=steps,
                message=f"stopped at step {steps} (stop requested by user); checkpoint step-{steps:06d}",
            )
        rec.t += 0.1
        rec.emit("guard", action="exit", level="info", reason="guard terminated (SIGTERM or SIGINT)")
    run = RunDir(out)
    run.config_path.write_text(CONFIG_YAML.format(steps_total=steps_total), encoding="utf-8")
    with open(run.metrics_path, "w", encoding="utf-8") as f:
        f.writelines(rec.lines(shift_s=end_t - rec.t))
    trainer = pid or os.getpid()
    run.write_status(t=end_t, state=state, step=steps, pid=trainer, ack_id=None, steps_total=steps_total)
    rec.heartbeat(run, end_t, watched=trainer, guard_pid=trainer + 1, running=state in ("running", "paused"))
    return out


def write_lines(
    path: str | os.PathLike, n_lines: int, seed: int = 1, steps_total: int = 100_000, append: bool = False
) -> int:
    """Append about `n_lines` realistic lines (memory samples, steps, a page-in pass every 10
    steps) to a metrics file; returns the number of lines written."""
    end_t = time.time()
    rec = Recorder(0.0, steps_total, seed=seed, pagein_every=10, memory_per_step=6)
    step = 1
    while len(rec.records) < n_lines:
        rec.step(step)
        step += 1
    del rec.records[n_lines:]
    lines = rec.lines(shift_s=end_t - rec.t)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.writelines(lines)
    return len(lines)


def live(out: Path, seed: int = 0, step_s: float = 1.0) -> None:
    """Keep appending a step every `step_s` seconds and handle control requests as odyssey/train.py
    does (status.json states and ack_id, the trainer's pause / resume / checkpoint / stop events)."""
    run = RunDir(out)
    status = run.read_status()
    step, total = status["step"], status.get("steps_total") or 1000
    rec = Recorder(time.time(), total, seed=seed + 1)
    rec.pid = os.getpid()
    state, ack = "running", None
    seen = (run.read_control() or {}).get("id")  # old requests are not ours
    while True:
        ctl = run.read_control()
        rec.t = time.time()
        if ctl and ctl.get("id") != seen:
            seen = ack = ctl.get("id")
            action, source = ctl.get("action"), ctl.get("source", "user")
            if action == "stop":
                run.write_status(
                    state="stopping", step=step, pid=os.getpid(), ack_id=ack, ack_action=action, steps_total=total
                )
                why = ctl.get("reason") or f"stop requested by {source}"
                rec.emit(
                    "event",
                    level="info",
                    source="trainer",
                    action="checkpoint",
                    step=step,
                    message=f"checkpoint step-{step:06d} written (stop: {why}; 52.4 MB in 1.4 s)",
                )
                rec.emit(
                    "event",
                    level="info",
                    source="trainer",
                    action="stopped",
                    step=step,
                    message=f"stopped at step {step} ({why}); checkpoint step-{step:06d}",
                )
                state = "stopped"
            elif action == "pause" and state != "paused":
                state = "paused"
                rec.emit(
                    "event",
                    level="warning",
                    source="trainer",
                    action="paused",
                    step=step,
                    message=f"paused by {source}{': ' + ctl['reason'] if ctl.get('reason') else ''} / 일시정지",
                )
            elif action == "resume" and state == "paused":
                state = "running"
                rec.emit(
                    "event",
                    level="info",
                    source="trainer",
                    action="resumed",
                    step=step,
                    message=f"resumed by {source} / 재개",
                )
            elif action == "checkpoint":
                rec.want_checkpoint = True
        if state == "running" and step < total:
            step += 1
            rec.t = time.time() - 6.1  # the recorder simulates ~6.1 s steps: end them now
            rec.step(step)
        if state == "running" and step >= total:
            state = "finished"
            rec.emit(
                "event",
                level="info",
                source="trainer",
                action="finished",
                step=step,
                message=f"finished at step {step}; result in {out / 'adapter'}",
            )
        with open(run.metrics_path, "a", encoding="utf-8") as f:
            f.writelines(rec.lines())
        rec.records.clear()
        run.write_status(state=state, step=step, pid=os.getpid(), ack_id=ack, steps_total=total)
        ended = state in ("stopped", "finished")
        rec.heartbeat(run, time.time(), watched=os.getpid(), guard_pid=os.getpid(), running=not ended)
        if ended:
            return
        time.sleep(step_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python tools/record_run.py runs/demo && odyssey monitor runs/demo",
    )
    p.add_argument("out", help="run directory to write")
    p.add_argument("--steps", type=int, default=240, help="steps reached (default 240)")
    p.add_argument("--steps-total", type=int, default=1000, help="steps planned (default 1000)")
    p.add_argument("--no-resume", action="store_true", help="a run without a stop and resume")
    p.add_argument("--no-temp", action="store_true", help="no temperature sensor (as on most VMs)")
    p.add_argument("--state", default="running", help="status.json state (default running)")
    p.add_argument("--lines", type=int, default=0, help="instead: write this many metrics lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--live", action="store_true", help="then keep appending a step a second and acknowledge control requests"
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.lines:
        out.mkdir(parents=True, exist_ok=True)
        n = write_lines(out / "metrics.jsonl", args.lines, seed=args.seed)
        print(f"wrote {n} lines to {out / 'metrics.jsonl'}")
        return 0
    record_run(
        out,
        steps=args.steps,
        steps_total=args.steps_total,
        seed=args.seed,
        resume=not args.no_resume,
        with_temp=not args.no_temp,
        state=args.state,
    )
    print(f"wrote a recorded run to {out}")
    if args.live:
        try:
            live(out, seed=args.seed)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
