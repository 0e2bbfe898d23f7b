"""The guard: a small separate process that keeps the machine safe while Odyssey trains. No torch.

`odyssey train` starts it (`control.start_guard`); it also runs on its own:

    odyssey guard --pid 1234 --run runs/r1 --ram-budget 2GiB
    python -m odyssey.runtime.guard --pid 1234 --run runs/r1 --ram-budget 2GiB --thermal-file /tmp/temp

Every `interval_s` (0.5 s) it samples the watched process tree (anonymous and file-backed RSS; the
guard itself is left out although it is the trainer's child; from 95% of the soft limit up, pages
the allocator freed lazily (LazyFree: the kernel takes them back without I/O) are left out of the
anonymous figure), the tree's memory cgroup when it is
not the root group, MemAvailable and swap in use, and the CPU temperature (the --thermal-file,
else psutil's sensors, else /sys/class/thermal/thermal_zone*/temp; millidegrees C; "unavailable" is
a normal reading on VMs). Then it applies the policies and asks the trainer through RUN/control.json:

| condition                                     | request      | when                              |
|-----------------------------------------------|--------------|-----------------------------------|
| tree anon RAM >= hard_pct of the budget       | stop         | once (re-issued if overwritten)   |
| MemAvailable < min_available_mib              | stop         | once                              |
| tree anon RAM >= soft_pct of the budget       | checkpoint   | once per excursion (re-armed below 95% of it) |
| temperature > max_temp_c                      | pause        | once, remembered as the guard's   |
| temperature < resume_temp_c, guard had paused | resume       | once                              |
| watched process gone (exit, crash, kill)      | (none)       | guard event, guard exits 0        |

One request a sample, most urgent first; a non-stop request waits (up to 1.5 s) while the previous
request is still unacknowledged, so two requests in quick succession do not overwrite each other.

What it writes to RUN/metrics.jsonl (sizes in MiB, one decimal):
  memory  {"source":"guard","pid","anon_mib","file_mib","anon_pct","budget_mib","avail_mib",
           "swap_mib","cgroup_mib","cgroup_limit_mib","temp_c"}   (cgroup_*/temp_c null when unknown;
          "lazy_mib", the LazyFree left out of anon_mib, where it was read)
          at most one line a second, only when something moved (anon, file or cgroup by 1% of the
          budget, MemAvailable by 32 MiB, temperature by 1 C), else one every 10 s; and one with
          every policy decision. Under constant change: <= 3600 lines (~0.6 MB) an hour.
  guard   {"action":"start"|"checkpoint"|"stop"|"pause"|"resume"|"rearm"|"cgroup"|"warn"|"exit",
           "level":"info"|"warning"|"error", "reason", "value", "limit", "unit", "request_id"}
and RUN/guard.json (heartbeat) every sample: {"t","pid","state","watched","anon_mib","temp_c"},
state "watching" | "paused" (by the guard, for heat) | "stopping" (stop requested) | "exited".

Exit status: 0 when the watched process is gone or on SIGTERM/SIGINT; 2 on bad arguments.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from odyssey.config import GuardSettings, format_bytes
from odyssey.errors import OdysseyError
from odyssey.runtime import memory
from odyssey.runtime.runlog import RunDir
from odyssey.runtime.sensors import HAS_PROC, Sample, Thermometer, system_memory

MIB = 1 << 20
REARM_FRACTION = 0.95
"""The soft limit fires again only after anon RAM fell below this fraction of it."""
ACK_WAIT_S = 1.5
"""A non-stop request waits this long for the previous request to be acknowledged."""
MEMORY_LINE_MIN_S = 1.0
MEMORY_LINE_MAX_S = 10.0
THERMAL_LOST_RESUME_S = 30.0
"""Paused for heat and the temperature became unreadable: resume after this long (never pause forever)."""


# --------------------------------------------------------------------------------------------
# the guard


def _mib(n: float | None) -> float | None:
    return None if n is None else round(n / MIB, 1)


class Guard:
    """Samples, decides, requests. `step()` is one sample; `run()` loops until the watched process
    is gone or `request_exit()` is called (SIGTERM)."""

    def __init__(
        self,
        pid: int,
        run: RunDir | str | os.PathLike,
        budget_bytes: int,
        settings: GuardSettings | None = None,
        *,
        thermometer: Thermometer | None = None,
        enforce_cgroup: bool | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.pid = int(pid)
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        if self.run.root.exists() and not self.run.root.is_dir():
            raise OdysseyError(f"--run {self.run.root} is a file, not a run directory; pass the --out of the run")
        self.budget_bytes = int(budget_bytes)
        if self.budget_bytes <= 0:
            raise OdysseyError(f"--ram-budget must be > 0, got {budget_bytes}")
        self.settings = settings or GuardSettings()
        self.enforce_cgroup = self.settings.enforce_cgroup if enforce_cgroup is None else enforce_cgroup
        self.thermometer = thermometer or Thermometer(self.settings.thermal_file)
        self.log = log or (lambda msg: print(f"odyssey guard: {msg}", file=sys.stderr, flush=True))
        s = self.settings
        self.soft_bytes = self.budget_bytes * s.soft_pct / 100.0
        self.hard_bytes = self.budget_bytes * s.hard_pct / 100.0
        self.min_available_bytes = s.min_available_mib * MIB
        self.exclude = frozenset({os.getpid()})

        self.identity = memory.proc_stat(self.pid) if HAS_PROC else None
        if HAS_PROC and (self.identity is None or self.identity.state in "ZX"):
            raise OdysseyError(f"--pid {self.pid}: no such running process")
        self._psutil_proc = None
        if not HAS_PROC:
            import psutil

            try:
                self._psutil_proc = psutil.Process(self.pid)
            except psutil.NoSuchProcess:
                raise OdysseyError(f"--pid {self.pid}: no such running process") from None

        # policy state
        self.soft_armed = True
        self.stop_id: int | None = None
        self.stop_reason = ""
        self.paused_by_guard = False
        self.temp_lost_since: float | None = None
        self.last_request_t = 0.0
        self.cgroup = None
        self._exit_requested = False
        self._last_line: Sample | None = None
        self._last_line_t = 0.0
        self._write_errors = 0
        self.samples = 0

    # --- life cycle ---
    def start(self) -> None:
        s = self.settings
        self._event(
            "start",
            "info",
            f"watching pid {self.pid} with a budget of {format_bytes(self.budget_bytes)}",
            budget_mib=_mib(self.budget_bytes),
            interval_s=s.interval_s,
            soft_pct=s.soft_pct,
            hard_pct=s.hard_pct,
            min_available_mib=s.min_available_mib,
            max_temp_c=s.max_temp_c,
            resume_temp_c=s.resume_temp_c,
            thermal_source=self.thermometer.source,
        )
        if self.enforce_cgroup:
            self.setup_cgroup()

    def setup_cgroup(self) -> str | None:
        """Put the watched tree in a memory cgroup capped at the budget. Returns None when enforced,
        else the reason it is not (said once, in an event and on stderr; the guard goes on)."""
        from odyssey.runtime import cgroup

        ok, why = cgroup.available()
        if ok:
            try:
                cg = cgroup.MemoryCgroup.create(f"odyssey-{self.pid}", self.budget_bytes)
            except cgroup.CgroupUnavailable as e:
                ok, why = False, str(e)
        if ok:
            try:
                held = memory.tree_memory(self.pid, self.exclude).anon_bytes
                for p in memory.tree_pids(self.pid, self.exclude):
                    try:
                        cg.add(p)
                    except ProcessLookupError:
                        continue
            except OSError as e:
                cg.remove()
                ok, why = False, f"cannot move pid {self.pid} into {cg.path}: {e.strerror}"
        if not ok:
            reason = f"cgroup limit not enforced ({why}); the guard alone watches the budget"
            self.log(reason)
            self._event("cgroup", "warning", reason)
            return reason
        self.cgroup = cg
        note = ""
        if (cg.usage() or 0) < held / 2:  # v2, and v1 kernels without move_charge_at_immigrate
            note = (
                f"; the {format_bytes(held)} the process already held stays charged to its old group, "
                "so start the guard early"
            )
        self._event(
            "cgroup",
            "info",
            f"hard limit {format_bytes(self.budget_bytes)} on {cg.path}{note}",
            limit=_mib(self.budget_bytes),
            unit="MiB",
            path=str(cg.path),
        )
        return None

    def request_exit(self, *_args) -> None:
        self._exit_requested = True

    def close(self, reason: str, level: str = "info") -> None:
        oom = self.cgroup.oom_kills() if self.cgroup is not None else 0
        if oom:
            reason += f"; the memory cgroup OOM-killed {oom} process(es) at the {format_bytes(self.budget_bytes)} limit"
            level = "error"
        self._event("exit", level, reason)
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except OSError as e:
                self.log(f"could not remove {self.cgroup.path}: {e.strerror}")
        self._heartbeat("exited")

    def run_forever(self) -> int:
        """The loop: sample every interval until the watched process is gone or SIGTERM. Returns 0."""
        self.start()
        next_t = time.monotonic()
        while True:
            if self._exit_requested:
                self.close("guard terminated (SIGTERM or SIGINT)")
                return 0
            try:
                alive = self.step()
            except Exception as e:  # a reading that broke must not take the guard down
                alive = True
                self._write_errors += 1
                if self._write_errors <= 3:
                    self.log(f"sample failed: {type(e).__name__}: {e}")
            if not alive:
                return 0
            next_t += self.settings.interval_s
            delay = next_t - time.monotonic()
            if delay < 0:  # fell behind (suspended, overloaded): do not burst to catch up
                next_t, delay = time.monotonic(), 0.0
            time.sleep(delay)

    # --- one sample ---
    def watched_alive(self) -> bool:
        if self._psutil_proc is not None:
            import psutil

            try:
                return self._psutil_proc.is_running() and self._psutil_proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False
        ident = memory.proc_stat(self.pid)  # the same start time: not a later process that reused the pid
        return ident is not None and ident.start_ticks == self.identity.start_ticks and ident.state not in "ZX"

    def sample(self) -> Sample | None:
        """One reading, or None when the watched process is gone."""
        if not self.watched_alive():
            return None
        near = self.soft_bytes * REARM_FRACTION  # where a decision could turn on pages freed lazily
        tree = memory.tree_memory(self.pid, self.exclude, lazy_from=near)  # the kernel's: not held
        available, swap = system_memory()
        cg_usage = cg_limit = None
        if self.cgroup is not None:
            cg_usage, cg_limit = self.cgroup.usage(), self.cgroup.limit()
        else:
            d = memory.cgroup_of(self.pid)
            if d is not None and d not in (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")):
                try:
                    cg_usage, cg_limit = memory.cgroup_usage_bytes(self.pid) or (None, None)
                except (OSError, ValueError):
                    pass
        sample = Sample(time.time(), tree.held_bytes, tree.file_bytes, available, swap, cg_usage, cg_limit)
        sample.temp_c, sample.lazy_bytes = self.thermometer.read(), tree.lazy_bytes if tree.anon_bytes >= near else None
        if not self.watched_alive():  # died while we read: its numbers are meaningless
            return None
        return sample

    def step(self) -> bool:
        """Sample, apply the policies, write the heartbeat. False when the watched process is gone."""
        s = self.sample()
        if s is None:
            self.close(f"watched process {self.pid} is gone (exited, crashed or killed)")
            return False
        self.samples += 1
        decided = self.apply(s)
        self._memory_line(s, force=decided)
        self._heartbeat(self.state, anon_mib=_mib(s.anon_bytes), temp_c=s.temp_c)
        return True

    @property
    def state(self) -> str:
        if self.stop_id is not None:
            return "stopping"
        return "paused" if self.paused_by_guard else "watching"

    # --- policies ---
    def apply(self, s: Sample) -> bool:
        """Apply the policies to one sample; at most one request. True when something was decided."""
        pct = 100.0 * s.anon_bytes / self.budget_bytes
        anon, budget = format_bytes(s.anon_bytes), format_bytes(self.budget_bytes)
        st = self.settings

        # 1. stop: hard limit or the system running out
        if self.stop_id is None:
            if s.anon_bytes >= self.hard_bytes:
                return self._request(
                    "stop",
                    "error",
                    f"anonymous RAM {anon} reached {pct:.0f}% of the {budget} budget (hard limit {st.hard_pct:g}%)",
                    s.anon_bytes,
                    self.hard_bytes,
                )
            if s.available_bytes < self.min_available_bytes:
                return self._request(
                    "stop",
                    "error",
                    f"system MemAvailable {format_bytes(s.available_bytes)} is below "
                    f"the {st.min_available_mib:g} MiB minimum",
                    s.available_bytes,
                    self.min_available_bytes,
                )
        else:
            return self._reassert_stop()

        # 2. checkpoint: soft limit, once per excursion
        if self.soft_armed and s.anon_bytes >= self.soft_bytes:
            if self._request(
                "checkpoint",
                "warning",
                f"anonymous RAM {anon} reached {pct:.0f}% of the {budget} budget (soft limit {st.soft_pct:g}%)",
                s.anon_bytes,
                self.soft_bytes,
            ):
                self.soft_armed = False
                return True
        elif not self.soft_armed and s.anon_bytes < self.soft_bytes * REARM_FRACTION:
            self.soft_armed = True
            self._event(
                "rearm",
                "info",
                f"anonymous RAM {anon} is back under the soft limit",
                value=_mib(s.anon_bytes),
                limit=_mib(self.soft_bytes),
                unit="MiB",
            )
            return True

        # 3. heat
        t = s.temp_c
        if t is not None:
            self.temp_lost_since = None
            if not self.paused_by_guard and t > st.max_temp_c:
                if (self.run.read_status() or {}).get("state") == "paused":
                    return False  # paused already (by the user): not ours to resume later
                if self._request(
                    "pause", "warning", f"CPU at {t:.0f} C, above {st.max_temp_c:g} C", t, st.max_temp_c, unit="C"
                ):
                    self.paused_by_guard = True
                    return True
            elif self.paused_by_guard and t < st.resume_temp_c:
                ctl = self.run.read_control() or {}
                if ctl.get("source", "guard") != "guard":
                    # someone asked for something after our pause (a user's pause or resume): theirs now
                    self.paused_by_guard = False
                    self._event(
                        "resume",
                        "info",
                        f"CPU cooled to {t:.0f} C; not resuming: the last request "
                        f"({ctl.get('action')!r} from {ctl.get('source')!r}) came after the guard's pause",
                        value=round(t, 1),
                        limit=st.resume_temp_c,
                        unit="C",
                        request_id=None,
                    )
                    return True
                if self._request(
                    "resume",
                    "info",
                    f"CPU cooled to {t:.0f} C, below {st.resume_temp_c:g} C",
                    t,
                    st.resume_temp_c,
                    unit="C",
                ):
                    self.paused_by_guard = False
                    return True
        elif self.paused_by_guard:
            now = time.monotonic()
            if self.temp_lost_since is None:
                self.temp_lost_since = now
                self._event("warn", "warning", "temperature became unavailable while paused for heat")
            elif now - self.temp_lost_since >= THERMAL_LOST_RESUME_S:
                if self._request(
                    "resume",
                    "warning",
                    f"temperature unavailable for {THERMAL_LOST_RESUME_S:g} s while paused; resuming",
                    None,
                    st.resume_temp_c,
                    unit="C",
                ):
                    self.paused_by_guard = False
                    self.temp_lost_since = None
                    return True
        return False

    def _pending_request(self) -> bool:
        """Is the latest control request still unacknowledged and younger than ACK_WAIT_S?"""
        ctl = self.run.read_control()
        if not ctl or time.time() - float(ctl.get("t", 0)) >= ACK_WAIT_S:
            return False
        status = self.run.read_status() or {}
        return status.get("ack_id") != ctl.get("id")

    def _request(self, action: str, level: str, reason: str, value, limit, unit: str = "MiB") -> bool:
        if action != "stop" and self._pending_request():
            return False  # next sample: do not overwrite a request the trainer has not seen
        req_id = self.run.request(action, source="guard", reason=reason)
        if action == "stop":
            self.stop_id, self.stop_reason = req_id, reason
        if unit == "MiB":
            value, limit = _mib(value), _mib(limit)
        else:
            value = None if value is None else round(value, 1)
        self._event(action, level, reason, value=value, limit=limit, unit=unit, request_id=req_id)
        if level != "info":
            self.log(f"{action}: {reason}")
        return True

    def _reassert_stop(self) -> bool:
        """After a stop, nothing else matters; if another request replaced ours before the trainer
        handled it, write the stop again."""
        ctl = self.run.read_control() or {}
        if ctl.get("id") == self.stop_id:
            return False
        status = self.run.read_status() or {}
        if status.get("ack_id") == self.stop_id or status.get("state") in ("stopped", "finished", "failed"):
            return False
        self.stop_id = self.run.request("stop", source="guard", reason=self.stop_reason)
        self._event(
            "stop",
            "error",
            f"re-issued (overwritten by {ctl.get('action')!r}): {self.stop_reason}",
            request_id=self.stop_id,
        )
        return True

    # --- output ---
    def _event(self, action: str, level: str, reason: str, **fields) -> None:
        self._append("guard", action=action, level=level, reason=reason, **fields)

    def _append(self, kind: str, **fields) -> None:
        try:
            self.run.append(kind, **fields)
        except OSError as e:  # disk full, run dir removed: keep guarding, say it (a few times)
            self._write_errors += 1
            if self._write_errors <= 3:
                self.log(f"cannot write {self.run.metrics_path}: {e}")

    def _heartbeat(self, state: str, **fields) -> None:
        try:
            self.run.write_heartbeat(state=state, watched=self.pid, **fields)
        except OSError as e:
            self._write_errors += 1
            if self._write_errors <= 3:
                self.log(f"cannot write {self.run.guard_path}: {e}")

    def _memory_line(self, s: Sample, force: bool = False) -> None:
        """Compact memory lines: see the module docstring for when."""
        last, since = self._last_line, s.t - self._last_line_t
        if not force and last is not None:
            if since < MEMORY_LINE_MIN_S:
                return
            step = max(0.01 * self.budget_bytes, MIB)
            moved = (
                abs(s.anon_bytes - last.anon_bytes) >= step
                or abs(s.file_bytes - last.file_bytes) >= step
                or abs((s.cgroup_bytes or 0) - (last.cgroup_bytes or 0)) >= step
                or abs(s.available_bytes - last.available_bytes) >= 32 * MIB
                or (s.temp_c is None) != (last.temp_c is None)
                or (s.temp_c is not None and abs(s.temp_c - last.temp_c) >= 1.0)
            )
            if not moved and since < MEMORY_LINE_MAX_S:
                return
        self._last_line, self._last_line_t = s, s.t
        self._append(
            "memory",
            source="guard",
            pid=self.pid,
            anon_mib=_mib(s.anon_bytes),
            file_mib=_mib(s.file_bytes),
            anon_pct=round(100.0 * s.anon_bytes / self.budget_bytes, 1),
            budget_mib=_mib(self.budget_bytes),
            avail_mib=_mib(s.available_bytes),
            swap_mib=_mib(s.swap_used_bytes),
            cgroup_mib=_mib(s.cgroup_bytes),
            cgroup_limit_mib=_mib(s.cgroup_limit_bytes),
            temp_c=None if s.temp_c is None else round(s.temp_c, 1),
            **({} if s.lazy_bytes is None else {"lazy_mib": _mib(s.lazy_bytes)}),
        )


if __name__ == "__main__":  # `python -m odyssey.runtime.guard`: control.start_guard's command line
    from odyssey.runtime.guard_cli import main

    sys.exit(main())
