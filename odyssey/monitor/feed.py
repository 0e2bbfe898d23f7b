"""What the monitor knows about a run: tails RUN/metrics.jsonl and RUN/status.json into series and
latest values. Pure logic, no Tk: the window (app.py) asks for formatted fields and downsampled
chart points, the tests drive it without a display.

Reading is incremental (`MetricsTail`) and capped per `poll` so a 100,000-line file never blocks the
window; `poll` reports whether bytes are still waiting so the caller can come back sooner.

A resumed run appends after a restart with step numbers going back to the last checkpoint: the
step series drop the points the new process will redo (steps >= the first new step), so the loss
chart shows one consistent history, and the log says where the run resumed. Time series (page-in,
RAM, temperature) keep everything and break their line over a gap longer than `GAP_S`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from itertools import pairwise

from odyssey.config import GuardSettings
from odyssey.monitor.fields import TERMINAL_STATES, FeedText
from odyssey.monitor.records import BatchTail, find_section, finite, layer_rows, num
from odyssey.monitor.series import Series
from odyssey.runtime.memory import proc_stat
from odyssey.runtime.runlog import ACTIONS, RunDir

GAP_S = 120.0
"""A silence longer than this (seconds) between two samples of a time series breaks its line."""
POLL_BYTES = 2 << 20
"""Bytes read from metrics.jsonl per poll (about 7,000 lines of a real run, ~0.1 s of parsing):
bounds the work of one UI tick."""
LOG_LINES = 1000
"""Log entries kept (the oldest are dropped)."""
ETA_WINDOW = 50
"""Steps over which the wall-clock rate for the ETA is measured."""
LIVE_STATES = ("starting", "running", "paused", "stopping")
"""States of status.json (control.Controller) while a trainer owns the run."""

# Bilingual labels, shared by the window and the tests.
ACTION_LABELS = {
    "pause": ("Pause", "일시정지"),
    "resume": ("Resume", "재개"),
    "checkpoint": ("Checkpoint now", "지금 체크포인트"),
    "stop": ("Stop", "중지"),
}


# --------------------------------------------------------------------------------------------
# control requests


@dataclass
class PendingRequest:
    id: int
    action: str
    t: float
    acked_step: int | None = None
    superseded_by: str | None = None


# --------------------------------------------------------------------------------------------
# the feed


@dataclass
class LogEntry:
    t: float
    level: str  # info | warning | error | guard
    text: str
    seq: int = 0


class Feed(FeedText):
    """Everything the window shows, updated by `poll()`."""

    def __init__(self, run_dir: str | os.PathLike, poll_bytes: int = POLL_BYTES):
        self.run = RunDir(run_dir)
        self.tail = BatchTail(self.run.metrics_path)
        self.poll_bytes = poll_bytes
        self.version = 0  # bumps when the charts or the log change (value fields are read every tick)
        self._reset_state()
        self.status: dict | None = None
        self.heartbeat: dict | None = None
        self.limits = GuardSettings()
        """The guard's thresholds: GuardSettings' defaults, then RUN/config.yaml's guard section, then
        the running guard's own (its start event)."""
        self.mode: str | None = None  # "lora" (paged base) or "full" (nothing paged), from config.yaml
        self._config_mtime: float | None = None
        self.pending: PendingRequest | None = None
        self.more_waiting = False

    def _reset_state(self) -> None:
        self.records = 0
        # step series (x = step)
        self.loss = Series()
        self.loss_ema = Series()
        self.val_loss = Series()
        self._ema: float | None = None
        self.resume_steps: list[int] = []
        self._resume_pending = False  # the trainer's start event has resumed_from; the next step marks it
        # time series (x = unix s)
        self.pagein = Series(gap=GAP_S)
        self.anon = Series(gap=GAP_S)
        self.cgroup = Series(gap=GAP_S)
        self.temp = Series(gap=GAP_S)
        self.budget_mib: float | None = None
        # latest values
        self.last_step: dict | None = None
        self.last_val: dict | None = None
        self.last_memory: dict | None = None
        self.last_guard: dict | None = None
        self.layers: list[dict] = []
        self.layers_step: int | None = None
        self._rss = (0.0, None)  # (t, anon MiB) latest from step or memory records
        self._step_times: deque = deque(maxlen=ETA_WINDOW)  # (t, step) of the current segment
        self.log: deque[LogEntry] = deque(maxlen=LOG_LINES)
        self._log_seq = 0
        self.t_last: float | None = None
        self.guard_started = False
        self._guard_limits: dict[str, float] = {}
        self._resets_seen = self.tail.resets

    # --- reading ---
    def poll(self, max_bytes: int | None = None) -> bool:
        """Read what was appended since the last call (up to `max_bytes`), status.json, guard.json
        and config.yaml. Returns True when the charts or the log changed (`version` moved; the value
        fields are cheap and refreshed every tick); `more_waiting` tells whether the metrics file
        still has unread bytes."""
        before = self.version
        records = self.tail.read_new(max_bytes or self.poll_bytes)
        if self.tail.resets != self._resets_seen:  # file replaced or truncated: start over
            self._reset_state()
            self._add_log(time.time(), "warning", "metrics.jsonl was replaced or truncated; reading it again")
        if records:
            self.ingest(records)
        try:
            self.more_waiting = os.stat(self.tail.path).st_size > self.tail.offset
        except FileNotFoundError:
            self.more_waiting = False
        self._read_status()
        self._read_config()
        self.heartbeat = self.run.read_heartbeat()  # shown in a field only: no chart redraw
        return self.version != before

    def ingest(self, records: list[dict]) -> None:
        """Fold records (as read from metrics.jsonl) into the series and latest values."""
        for r in records:
            kind = r.get("kind")
            t = num(r.get("t")) or 0.0
            self.records += 1
            if self.t_last is None or t > self.t_last:
                self.t_last = t
            handler = _HANDLERS.get(kind)
            if handler is not None:
                handler(self, r, t)
        if records:
            self.version += 1

    def _on_step(self, r: dict, t: float) -> None:
        step = r.get("step")
        if not isinstance(step, int):
            return
        last = self.loss.last()
        if last is not None and step <= last[0]:
            dropped = self.loss.truncate_from(step)
            self.loss_ema.truncate_from(step)
            self.val_loss.truncate_from(step)
            self._ema = self.loss_ema.ys[-1] if len(self.loss_ema) else None
            self._step_times.clear()
            self.resume_steps = [s for s in self.resume_steps if s < step] + [step]
            self._add_log(
                t,
                "info",
                f"run resumed at step {step} (after step {int(last[0])}; {dropped} step(s) will be redone) / 재개됨",
            )
        elif self._resume_pending and last is not None:  # resumed from the last step done
            self._step_times.clear()
            self.resume_steps.append(step)
            self._add_log(t, "info", f"run resumed at step {step} / 재개됨")
        self._resume_pending = False
        loss = r.get("loss")
        if finite(loss):
            self.loss.append(step, loss)
            self._ema = loss if self._ema is None else 0.9 * self._ema + 0.1 * loss
            self.loss_ema.append(step, self._ema)
        elif loss is not None:
            self._add_log(t, "error", f"step {step}: loss is {loss}")
        mbs = r.get("pagein_mb_s")
        if finite(mbs):
            self.pagein.append(t, mbs)
        rss = r.get("rss_anon_mib")
        if finite(rss) and t >= self._rss[0]:
            self._rss = (t, rss)
            mem_t = num((self.last_memory or {}).get("t"))
            if mem_t is None or t - mem_t > 15.0:  # no guard samples (they come every <= 10 s):
                self.anon.append(t, rss)  # plot the trainer's own reading
        if finite(r.get("budget_mib")):
            self.budget_mib = r["budget_mib"]
        self.last_step = r
        self._step_times.append((t, step))

    def _on_val(self, r: dict, t: float) -> None:
        step, v = r.get("step"), r.get("val_loss")
        if isinstance(step, int) and finite(v):
            last = self.val_loss.last()
            if last is not None and step <= last[0]:
                self.val_loss.truncate_from(step)
            self.val_loss.append(step, v)
            self.last_val = r

    def _on_pagein(self, r: dict, t: float) -> None:
        layers = r.get("layers")
        if isinstance(layers, list):
            self.layers = [L for L in layers if isinstance(L, dict)]
            self.layers_step = r.get("step")

    def _on_memory(self, r: dict, t: float) -> None:
        get = r.get
        anon = get("anon_mib")
        if finite(anon):
            self.anon.append(t, anon)
            if t >= self._rss[0]:
                self._rss = (t, anon)
        v = get("cgroup_mib")
        if v is not None and finite(v) and finite(get("cgroup_limit_mib")):
            # a group without a limit may hold a whole desktop session: not this run's figure
            self.cgroup.append(t, v)
        v = get("temp_c")
        if v is not None and finite(v):
            self.temp.append(t, v)
        v = get("budget_mib")
        if v is not None and finite(v):
            self.budget_mib = v
        self.last_memory = r

    def _on_guard(self, r: dict, t: float) -> None:
        action, reason = r.get("action", "?"), r.get("reason", "")
        level = r.get("level")
        if level not in ("info", "warning", "error"):  # older lines without a level
            level = "warning" if action in ("warn", "checkpoint", "pause") else "error" if action == "stop" else "info"
        if action in ACTIONS and r.get("request_id", 0) is not None:
            self.last_guard = r  # a request the guard wrote: shown in the Guard field for a while
        if action == "start":  # the running guard's own thresholds win over config.yaml
            self.guard_started = True
            self._guard_limits = {k: float(r[k]) for k in _LIMIT_KEYS if finite(r.get(k))}
            for k, v in self._guard_limits.items():
                setattr(self.limits, k, v)
        self._add_log(
            t, "guard" if level == "info" else level, f"guard {action}: {reason}" if reason else f"guard {action}"
        )

    def _on_event(self, r: dict, t: float) -> None:
        level = r.get("level", "info")
        if level not in ("info", "warning", "error"):
            level = "info"
        message = str(r.get("message", ""))
        if r.get("source", "trainer") == "trainer" and r.get("resumed_from") is not None:
            self._resume_pending = True
        self._add_log(t, level, message)

    def _add_log(self, t: float, level: str, text: str) -> None:
        self._log_seq += 1
        self.log.append(LogEntry(t, level, text, self._log_seq))
        self.version += 1

    def log_since(self, seq: int) -> list[LogEntry]:
        """Log entries newer than `seq` (the window appends only those)."""
        return [e for e in self.log if e.seq > seq]

    def _read_status(self) -> None:
        status = self.run.read_status()
        if status == self.status:
            return
        self.status = status  # shown in value fields only: no chart redraw
        p = self.pending
        if p is not None and status and p.acked_step is None and p.superseded_by is None:
            ack = status.get("ack_id")
            if isinstance(ack, int) and ack >= p.id:
                if ack == p.id:
                    p.acked_step = int(status.get("step") or 0)
                else:
                    ctl = self.run.read_control() or {}
                    p.superseded_by = f"{ctl.get('source', '?')}: {ctl.get('action', '?')}"

    def _read_config(self) -> None:
        path = self.run.config_path
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception:  # a half-written or foreign config must not stop the monitor
            return
        guard = find_section(data, "guard")
        limits = GuardSettings()
        if isinstance(guard, dict):
            for name in _LIMIT_KEYS + ("heartbeat_s",):
                if finite(guard.get(name)):
                    setattr(limits, name, float(guard[name]))
        for k, v in self._guard_limits.items():
            setattr(limits, k, v)
        self.limits = limits
        train = data.get("train") if isinstance(data, dict) else None
        if isinstance(train, dict) and isinstance(train.get("mode"), str):
            self.mode = train["mode"]
        self.version += 1

    # --- control ---
    def request(self, action: str) -> int:
        """Write a control request from the monitor and remember it until the trainer acknowledges."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        req_id = self.run.request(action, source="monitor", reason="button in odyssey monitor")
        self.pending = PendingRequest(req_id, action, time.time())
        return req_id

    def ack_text(self) -> str:
        p = self.pending
        if p is None:
            return ""
        en, ko = ACTION_LABELS[p.action]
        if p.acked_step is not None:
            return f"{en}: acknowledged at step {p.acked_step}\n{ko}: 확인됨 (단계 {p.acked_step})"
        if p.superseded_by:
            return f"{en}: replaced by a later request ({p.superseded_by})\n{ko}: 다른 요청으로 대체됨"
        text = f"{en} requested… / {ko} 요청됨…"
        state = self.state()
        if state in TERMINAL_STATES:
            text += f" (trainer is {state})"
        elif not self.trainer_alive():
            text += " (trainer not running)"
        return text

    # --- derived values ---
    def state(self) -> str:
        return str((self.status or {}).get("state") or ("waiting" if not self.records else "unknown"))

    def trainer_alive(self) -> bool:
        pid = (self.status or {}).get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie (killed, not yet reaped by its parent) is gone too
            stat = proc_stat(pid)
        except (ValueError, IndexError):
            return True
        return stat is None or stat.state not in ("Z", "X")  # None: no /proc, or gone since the kill

    def trainer_gone(self) -> bool:
        """status.json says a trainer owns the run, but its process is not running (killed, crashed,
        or the run is being resumed and the new trainer has not written its status yet)."""
        return self.state() in LIVE_STATES and not self.trainer_alive()

    def enabled_actions(self) -> set[str]:
        """Buttons that make sense now: none once the run ended, is stopping or its trainer is gone;
        Pause only while running, Resume only while paused."""
        state = self.state()
        if state in TERMINAL_STATES or state == "stopping" or self.trainer_gone():
            return set()
        if state == "paused":
            return {"resume", "checkpoint", "stop"}
        if state == "running":
            return {"pause", "checkpoint", "stop"}
        return set(ACTIONS)

    def steps_total(self) -> int | None:
        for src in (self.last_step, self.status):
            v = (src or {}).get("steps_total")
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    def eta_s(self) -> float | None:
        """Remaining steps times the wall-clock time a step has taken over the last ETA_WINDOW
        steps of this process (evaluations and checkpoints included); a gap more than 5x the
        median (a pause, a laptop lid) counts as 5x the median."""
        total, s = self.steps_total(), self.last_step
        if total is None or s is None:
            return None
        remaining = total - s["step"]
        if remaining <= 0:
            return 0.0
        times = list(self._step_times)
        gaps = [(t2 - t1) / (s2 - s1) for (t1, s1), (t2, s2) in pairwise(times) if s2 > s1]
        if gaps:
            cap = 5 * sorted(gaps)[len(gaps) // 2]
            per_step = sum(min(g, cap) for g in gaps) / len(gaps)
        elif finite(s.get("step_s")):
            per_step = s["step_s"]
        else:
            return None
        return remaining * per_step

    def rss_mib(self) -> float | None:
        return self._rss[1]

    def headroom_mib(self) -> float | None:
        rss = self.rss_mib()
        if rss is None or self.budget_mib is None:
            return None
        return self.budget_mib - rss

    def layer_rows(self) -> list[dict]:
        """The last pagein record folded per unit (see `layer_rows`)."""
        return layer_rows(self.layers)


_LIMIT_KEYS = ("soft_pct", "hard_pct", "max_temp_c", "resume_temp_c")
_HANDLERS = {
    "step": Feed._on_step,
    "val": Feed._on_val,
    "pagein": Feed._on_pagein,
    "memory": Feed._on_memory,
    "guard": Feed._on_guard,
    "event": Feed._on_event,
}
