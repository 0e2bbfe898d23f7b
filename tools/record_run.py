#!/usr/bin/env python3
"""Write a synthetic but realistic run directory, as `odyssey train` would leave it, for the
monitor's tests, screenshots and demos. No torch.

The figures follow the 1.2B model (configs/odyssey-1.2b.yaml: 24 layers of 90 MB in bf16, a 131 MB
embedding and head) on a 2-core machine: steps of about 6 s at 512 tokens, page-in around
1.4 GB/s, anonymous RSS about 0.9 GiB under a 1.5 GiB budget, guard samples every second. The story:
a RAM spike makes the guard ask for a checkpoint; the run is stopped and resumed from its last
checkpoint (step numbers go back); the last page-in pass has a disk hiccup on one layer.

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

LAYER_BYTES = 90_185_728  # one decoder layer of odyssey-1.2b in bf16
EMBED_BYTES = 131_072_000  # 32000 x 2048 bf16
HEAD_BYTES = 131_076_096  # lm_head + final norm
LAYERS = 24
SEQ_LEN = 512
BUDGET_MIB = 1536.0

CONFIG_YAML = """\
# effective config written by odyssey train (synthetic: tools/record_run.py)
model: models/base
data: data/tok
ram_budget: 1.5GiB
train:
  seq_len: 512
  batch_size: 1
  grad_accum: 1
  steps: {steps_total}
  lr: 0.0002
  warmup_steps: 10
  checkpoint_every: 50
  eval_every: 50
  lora:
    r: 16
    alpha: 32.0
    targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
  guard:
    interval_s: 1.0
    soft_pct: 90.0
    hard_pct: 97.0
    max_temp_c: 90.0
    resume_temp_c: 80.0
"""


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


class Recorder:
    """Generates the records of a run in time order; `emit` collects them as JSON lines."""

    def __init__(self, t0: float, steps_total: int, seed: int = 0, with_temp: bool = True,
                 pagein_every: int = 1, memory_per_step: int = 6):
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

    def layers_pass(self, hiccup: bool) -> list[dict]:
        out = []
        slow = self.rng.randrange(LAYERS) if hiccup else -1
        for name, nbytes in [("embed", EMBED_BYTES)] + [(i, LAYER_BYTES) for i in range(LAYERS)] + [("head", HEAD_BYTES)]:
            mb_s = self.rng.gauss(1420, 90)
            if name == slow:
                mb_s = self.rng.uniform(160, 240)
            read_s = nbytes / 1e6 / mb_s
            stall = max(0.0, self.rng.gauss(0.004, 0.004)) + (read_s * 0.7 if name == slow else 0.0)
            out.append({"layer": name, "bytes": nbytes, "read_s": round(read_s, 4),
                        "stall_s": round(stall, 4), "mb_s": round(mb_s, 1)})
        return out

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
            self.emit("memory", anon_mib=round(anon, 1), file_mib=round(180 + self.rng.gauss(0, 15), 1),
                      cgroup_mib=None, available_mib=round(5400 - anon + self.rng.gauss(0, 30), 1),
                      swap_mib=0.0, temp_c=round(self.temp_c, 1) if self.with_temp else None,
                      budget_mib=BUDGET_MIB)
            if spike and k == self.memory_per_step // 2:
                reason = f"anonymous RAM {anon:.0f} MiB is {100 * anon / BUDGET_MIB:.1f}% of the {BUDGET_MIB:.0f} MiB budget (soft limit 90%)"
                self.emit("guard", action="warn", reason=reason, anon_mib=round(anon, 1))
                self.emit("guard", action="checkpoint", reason=reason, anon_mib=round(anon, 1))
        if step % self.pagein_every == 0 or hiccup:
            self.emit("pagein", step=step, layers=self.layers_pass(hiccup))
        pagein_mb_s = self.rng.gauss(1390, 70) if not hiccup else self.rng.uniform(600, 800)
        stall_s = max(0.0, self.rng.gauss(0.18, 0.05)) + (0.7 if hiccup else 0.0)
        self.emit("step", step=step, loss=round(self.loss_at(step), 4), lr=self.lr_at(step),
                  tokens_per_s=round(SEQ_LEN / step_s, 1), step_s=round(step_s, 3),
                  pagein_mb_s=round(pagein_mb_s, 1), stall_s=round(stall_s, 3),
                  rss_anon_mib=round(peak, 1), budget_mib=BUDGET_MIB, steps_total=self.steps_total)
        if step % 50 == 0:
            self.t += 9.0
            self.emit("val", step=step, val_loss=round(self.loss_at(step) + 0.07, 4))
        if step % 50 == 0 or spike:
            self.t += 1.5
            self.emit("event", level="info", message=f"checkpoint step-{step} written (adapter + optimizer, 52 MB)")


def record_run(out: str | os.PathLike, steps: int = 240, steps_total: int = 1000, seed: int = 0,
               resume: bool = True, with_temp: bool = True, state: str = "running",
               pid: int | None = None, end_t: float | None = None) -> Path:
    """Write RUN/config.yaml, metrics.jsonl, status.json and guard.json under `out`; returns it.
    The run reaches step `steps` of `steps_total`; with `resume` it was stopped at 80% of the way
    and resumed from the checkpoint before (so steps go back). Timestamps end at `end_t` (now)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    end_t = time.time() if end_t is None else end_t
    stop_at = int(steps * 0.8) if resume else None
    ckpt = (stop_at // 50) * 50 if stop_at else None
    rec = Recorder(0.0, steps_total, seed=seed, with_temp=with_temp)
    rec.spike_at = {max(2, int(steps * 0.55))}
    rec.hiccup_at = {max(3, int(steps * 0.3)), steps}
    rec.emit("event", level="info", message=f"training started: odyssey-1.2b, LoRA r=16, "
                                             f"{steps_total} steps, RAM budget {BUDGET_MIB:.0f} MiB")
    rec.emit("event", level="info", message="memory plan: base layers paged (2 x 86 MiB slots), "
                                             "LoRA + AdamW 41 MiB, activations 212 MiB; fits")
    step = 1
    while step <= steps:
        rec.step(step)
        if resume and step == stop_at:
            rec.t += 0.5
            rec.emit("guard", action="exit", reason=f"trainer ended by signal 9 (SIGKILL) at step {step}")
            rec.emit("event", level="error", message=f"trainer killed at step {step}; last checkpoint is step-{ckpt}")
            rec.t += 300
            rec.emit("event", level="info", message=f"resumed from checkpoint step-{ckpt} "
                                                     f"(data position and RNG restored)")
            resume = False
            step = ckpt + 1
            continue
        step += 1
    rec.emit("event", level="warning", message="page-in slowed to 190 MB/s on one layer "
                                                "(disk busy?) / 페이지인 속도 저하")
    (out / "config.yaml").write_text(CONFIG_YAML.format(steps_total=steps_total), encoding="utf-8")
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as f:
        f.writelines(rec.lines(shift_s=end_t - rec.t))
    _write_json(out / "status.json", {"state": state, "step": steps, "pid": pid or os.getpid(),
                                      "ack_id": 0, "t": end_t})
    _write_json(out / "guard.json", {"t": end_t, "pid": pid or os.getpid(), "state": "watching"})
    return out


def write_lines(path: str | os.PathLike, n_lines: int, seed: int = 1, steps_total: int = 100_000,
                append: bool = False) -> int:
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


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def live(out: Path, seed: int = 0, step_s: float = 1.0) -> None:
    """Keep appending a step a `step_s` seconds and acknowledge control requests like the trainer."""
    status = json.loads((out / "status.json").read_text())
    step = status["step"]
    rec = Recorder(time.time(), 1000, seed=seed + 1)
    state, ack = "running", 0
    while True:
        ctl = None
        try:
            ctl = json.loads((out / "control.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if ctl and ctl.get("id", 0) > ack:
            ack = ctl["id"]
            action = ctl.get("action")
            state = {"pause": "paused", "resume": "running", "stop": "stopped"}.get(action, state)
            rec.t = time.time()
            rec.emit("event", level="info", message=f"{action} requested by {ctl.get('source')} at step {step}")
        if state == "running":
            step += 1
            rec.t = time.time() - step_s
            rec.step(step)
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.writelines(rec.lines())
        rec.records.clear()
        _write_json(out / "status.json", {"state": state, "step": step, "pid": os.getpid(), "ack_id": ack,
                                          "t": time.time()})
        _write_json(out / "guard.json", {"t": time.time(), "pid": os.getpid(), "state": "watching"})
        if state == "stopped":
            return
        time.sleep(step_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example: python tools/record_run.py runs/demo && odyssey monitor runs/demo")
    p.add_argument("out", help="run directory to write")
    p.add_argument("--steps", type=int, default=240, help="steps reached (default 240)")
    p.add_argument("--steps-total", type=int, default=1000, help="steps planned (default 1000)")
    p.add_argument("--no-resume", action="store_true", help="a run without a stop and resume")
    p.add_argument("--no-temp", action="store_true", help="no temperature sensor (as on most VMs)")
    p.add_argument("--state", default="running", help="status.json state (default running)")
    p.add_argument("--lines", type=int, default=0, help="instead: write this many metrics lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--live", action="store_true",
                   help="then keep appending a step a second and acknowledge control requests")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.lines:
        out.mkdir(parents=True, exist_ok=True)
        n = write_lines(out / "metrics.jsonl", args.lines, seed=args.seed)
        print(f"wrote {n} lines to {out / 'metrics.jsonl'}")
        return 0
    record_run(out, steps=args.steps, steps_total=args.steps_total, seed=args.seed,
               resume=not args.no_resume, with_temp=not args.no_temp, state=args.state)
    print(f"wrote a recorded run to {out}")
    if args.live:
        try:
            live(out, seed=args.seed)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
