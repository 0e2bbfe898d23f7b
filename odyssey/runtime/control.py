"""The trainer's side of the run directory's control channel, and the guard's launcher. No torch.

    guard = start_guard(os.getpid(), run.root, budget_bytes, cfg.guard)   # first, before heavy imports
    ctl = Controller(run, cfg.guard, guard=guard)
    ...between layers:
        req = ctl.poll()                 # one os.stat when nothing changed (~1 us)
        if req: handle it, then ctl.ack(req, state="paused" | "running" | "stopped", step=step)
        if ctl.check_guard() == "stop": checkpoint and stop
    stop_guard(guard)

Requests (RUN/control.json, written by `RunDir.request`) carry increasing ids; `poll` returns each
new one exactly once, and `ack` writes RUN/status.json with `ack_id`, which is how the guard and
the monitor know a request was handled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from odyssey.config import GuardSettings
from odyssey.runtime.guard_cli import settings_argv
from odyssey.runtime.runlog import ACTIONS, RunDir

GUARD_START_GRACE_S = 3.0
"""Extra time a freshly started guard gets to write its first heartbeat (interpreter start-up)."""


class Controller:
    """Cheap polling of control requests, acknowledgements, and the guard's heartbeat.

    Requests already in control.json when the Controller is made are old (a previous run, or the
    stop that ended it) and are not returned, unless `handle_existing=True`."""

    def __init__(
        self,
        run: RunDir | str | os.PathLike,
        settings: GuardSettings | None = None,
        *,
        guard: subprocess.Popen | None = None,
        handle_existing: bool = False,
    ):
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.settings = settings or GuardSettings()
        self.guard = guard
        self.last_id: int | None = None
        """Id of the last request `poll` returned (or found already there)."""
        self.ack_id: int | None = (self.run.read_status() or {}).get("ack_id")
        self._control_key: tuple | None = None
        self._control_path = os.fspath(self.run.control_path)  # str: a stat without Path overhead
        if not handle_existing:
            key = self._stat_key()
            existing = self.run.read_control()
            if existing is not None:
                self.last_id = existing.get("id")
                self._control_key = key
        self._guard_since = time.monotonic()
        self._guard_lost = False
        self._guard_checked = float("-inf")
        self._verdict = "continue"

    # --- requests ---
    def _stat_key(self) -> tuple | None:
        try:
            st = os.stat(self._control_path)
        except FileNotFoundError:
            return None
        # An atomic replace always brings a new inode; an in-place edit changes mtime or size.
        return st.st_ino, st.st_mtime_ns, st.st_size

    def poll(self) -> dict | None:
        """The newest control request if it was not returned before, else None. Costs one stat
        unless control.json changed."""
        key = self._stat_key()
        if key is None or key == self._control_key:
            return None
        self._control_key = key
        request = self.run.read_control()
        if not request or request.get("id") is None or request.get("id") == self.last_id:
            return None
        self.last_id = request["id"]
        if request.get("action") not in ACTIONS:
            self.run.append(
                "event",
                level="warning",
                source="controller",
                message=f"ignored control request with unknown action {request.get('action')!r}",
            )
            return None
        return request

    def ack(self, request: dict, state: str, step: int, **fields) -> dict:
        """Record `request` as handled: status.json gets ack_id (and ack_action) with the state."""
        self.ack_id = request["id"]
        return self.write_status(state, step, ack_action=request.get("action"), **fields)

    def write_status(self, state: str, step: int, **fields) -> dict:
        """status.json with the trainer's state; always carries the last ack_id."""
        return self.run.write_status(state=state, step=step, pid=os.getpid(), ack_id=self.ack_id, **fields)

    # --- the guard ---
    def attach_guard(self, guard: subprocess.Popen | None) -> None:
        self.guard = guard
        self._guard_since = time.monotonic()

    def heartbeat_age_s(self) -> float:
        """Seconds since the guard's last heartbeat (inf if it never wrote one)."""
        try:
            return max(0.0, time.time() - os.stat(self.run.guard_path).st_mtime)
        except FileNotFoundError:
            return float("inf")

    def guard_alive(self) -> bool:
        """Heartbeat newer than settings.heartbeat_s (and, when we started it, the process still
        running). A guard started less than heartbeat_s + 3 s ago counts as alive while it boots."""
        if self.guard is not None and self.guard.poll() is not None:
            return False
        if self.heartbeat_age_s() <= self.settings.heartbeat_s:
            return True
        booting = time.monotonic() - self._guard_since < self.settings.heartbeat_s + GUARD_START_GRACE_S
        return booting and self.heartbeat_age_s() > time.monotonic() - self._guard_since

    def check_guard(self) -> str:
        """ "continue" or "stop". On first noticing a lost guard, logs a warning event and returns
        settings.on_guard_lost from then on; a guard that comes back is logged too. At most one
        real check every 0.2 s, so calling it between layers costs nothing."""
        if not self.settings.enabled:
            return "continue"
        now = time.monotonic()
        if now - self._guard_checked < min(0.2, self.settings.heartbeat_s / 4):
            return self._verdict
        self._guard_checked = now
        alive = self.guard_alive()
        if not alive and not self._guard_lost:
            self._guard_lost = True
            self._verdict = self.settings.on_guard_lost
            age = self.heartbeat_age_s()
            seen = "never wrote a heartbeat" if age == float("inf") else f"last heartbeat {age:.1f} s ago"
            code = self.guard.returncode if self.guard is not None else None
            then = "stopping" if self._verdict == "stop" else "continuing without RAM and temperature watch"
            self.run.append(
                "event",
                level="warning",
                source="controller",
                action="guard_lost",
                message=f"guard process lost ({seen}"
                f"{'' if code is None else f', exit status {code}'}); {then} "
                f"(guard.on_guard_lost={self.settings.on_guard_lost})",
            )
        elif alive and self._guard_lost:
            self._guard_lost = False
            self._verdict = "continue"
            self.run.append(
                "event", level="info", source="controller", action="guard_back", message="guard heartbeat is back"
            )
        return self._verdict


# --------------------------------------------------------------------------------------------
# launching the guard


def guard_command(
    pid: int, run_dir: str | os.PathLike, budget_bytes: int, settings: GuardSettings, python: str = sys.executable
) -> list[str]:
    """The command line that starts the guard on `pid` with `settings` (its options: guard_cli.OPTIONS)."""
    return [
        python,
        "-m",
        "odyssey.runtime.guard",
        "--pid",
        str(pid),
        "--run",
        str(run_dir),
        "--ram-budget",
        str(int(budget_bytes)),
        *settings_argv(settings),
    ]


def start_guard(
    pid: int, run_dir: str | os.PathLike, budget_bytes: int, settings: GuardSettings, python: str = sys.executable
) -> subprocess.Popen:
    """Launch `python -m odyssey.runtime.guard` watching `pid`. The guard gets its own session, so a Ctrl+C
    meant for the trainer does not end it; it exits by itself when `pid` is gone."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # importable even when not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        guard_command(pid, run_dir, budget_bytes, settings, python),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_guard(popen: subprocess.Popen | None, timeout_s: float = 3.0) -> int | None:
    """SIGTERM the guard (it logs its exit and removes its cgroup), SIGKILL after `timeout_s`.
    Returns its exit status (None if there was no guard)."""
    if popen is None:
        return None
    if popen.poll() is None:
        try:
            popen.send_signal(signal.SIGTERM)
            return popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            popen.kill()
    return popen.wait()
