"""`odyssey monitor RUN`: a Tkinter window on a run directory (feed.py reads it, charts.py draws,
app.py lays out and writes control requests).

This module stays light (no tkinter import) because the trainer imports it for `--monitor`:
`launch_detached` starts the window in its own process, in its own session and outside the
trainer's process tree, so a slow window never slows training, closing it never stops training,
and the guard never counts its memory against the training budget.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from odyssey.errors import OdysseyError

XVFB_HINT = (
    "on a headless machine run it under Xvfb: `xvfb-run -a odyssey monitor RUN`, or start "
    "`Xvfb :99 &` and `export DISPLAY=:99` (apt-get install xvfb), or use `ssh -X`"
)


def display_problem() -> str | None:
    """Why no window can open here (one line), or None. Only X11 platforms need DISPLAY."""
    if sys.platform in ("win32", "darwin"):
        return None
    display = os.environ.get("DISPLAY")
    if not display and not os.environ.get("WAYLAND_DISPLAY"):
        return f"DISPLAY is not set, so the monitor cannot open a window; {XVFB_HINT}"
    if display and not x_server_answers(display):
        return f"no X server answers at DISPLAY={display}, so the monitor cannot open a window; {XVFB_HINT}"
    return None


def x_server_answers(display: str, timeout_s: float = 2.0) -> bool:
    """Whether something listens where an X client would connect for `display` ("[host]:N[.S]"):
    the Unix socket /tmp/.X11-unix/XN (also its abstract twin) for a local display, TCP 6000+N
    for a remote one (ssh -X forwards localhost:10 and up). Checked before a window is started in
    another process, whose failure the user would never see."""
    import socket

    host, _, rest = display.rpartition(":")
    number = rest.split(".")[0]
    if not number.isdigit():
        return False
    if host in ("", "unix"):
        targets = [(socket.AF_UNIX, f"/tmp/.X11-unix/X{number}"), (socket.AF_UNIX, f"\0/tmp/.X11-unix/X{number}")]
    else:
        targets = [(socket.AF_INET, (host, 6000 + int(number)))]
    for family, address in targets:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(timeout_s)
                s.connect(address)
                return True
        except OSError:
            continue
    return False


# Run by a short-lived intermediate process: starts the window in a new session, says its pid and
# exits at once, so the window is re-parented to init. It is then no child of the trainer: the
# guard (which sums the trainer's process tree against the budget) does not count its memory, the
# trainer never waits for it, and it leaves no zombie when it is closed first.
_LAUNCHER = """\
import subprocess, sys, time
log_path, cmd = sys.argv[1], sys.argv[2:]
with open(log_path, "ab") as log:
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                         close_fds=True)
    log.write(("%s odyssey monitor pid %d: %s\\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), p.pid,
               " ".join(cmd))).encode())
print(p.pid, flush=True)
"""


def launch_detached(run_dir: str | os.PathLike, wait_s: float = 30.0, log_path: str | os.PathLike | None = None) -> int:
    """Start `python -m odyssey.monitor RUN` detached from the caller and return its pid.

    The window runs in its own session (Ctrl-C in the trainer's terminal does not reach it) and is
    not the caller's child (started through a process that exits at once): it outlives the trainer
    to show the end of the run, and the guard does not count its memory as the trainer's. Its
    output goes to RUN/monitor.log (or `log_path`), never to the trainer's pipes. Raises
    OdysseyError when no display is available, before anything starts."""
    problem = display_problem()
    if problem:
        raise OdysseyError(problem)
    run_dir = Path(run_dir)
    log_path = Path(log_path) if log_path else run_dir / "monitor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # importable even when not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "odyssey.monitor", str(run_dir), "--wait-s", str(wait_s)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(log_path), *cmd],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise OdysseyError(f"could not start the monitor: {e}") from None
    try:
        return int(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise OdysseyError(f"could not start the monitor: {why}") from None


@dataclass(frozen=True)
class MonitorSettings:
    """How a window opens: the values of `odyssey monitor`'s command line (and of the monitor's own,
    `python -m odyssey.monitor`, which has the same options)."""

    run: str
    """The run directory (the --out of odyssey train)."""
    interval_ms: int = 500
    """Refresh period."""
    wait_s: float = 0.0
    """Wait this long for the run directory to appear (used by train --monitor)."""
    geometry: str = "1280x800"
    """Window size, Tk syntax."""
    screenshot: str | None = None
    """Save a PNG of the window once the run is read, then close it."""
    screenshot_after_s: float = 3.0
    """With screenshot: seconds to let the window settle first."""

    def __post_init__(self):
        if self.interval_ms <= 0:
            raise OdysseyError(f"--interval-ms must be > 0, got {self.interval_ms}")

    @classmethod
    def from_args(cls, args) -> MonitorSettings:
        """From parsed arguments that have every field as an attribute (either parser's)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def show(settings: MonitorSettings) -> int:
    """Open the window as `settings` say and return 0 when it is closed; raises OdysseyError."""
    from odyssey.monitor.app import run_monitor as app_run

    return app_run(
        settings.run,
        wait_s=settings.wait_s,
        geometry=settings.geometry,
        interval_ms=settings.interval_ms,
        screenshot=settings.screenshot,
        screenshot_after_s=settings.screenshot_after_s,
    )


def main(argv: list[str] | None = None) -> int:
    """`odyssey monitor RUN [--interval-ms N] [--wait-s S] [--geometry WxH]`; raises OdysseyError."""
    from odyssey.monitor.app import main as app_main

    return app_main(argv)


def run_monitor(run_dir: str | os.PathLike, wait_s: float = 0.0) -> int:
    """Open the window on `run_dir` and return 0 when it is closed; raises OdysseyError."""
    from odyssey.monitor.app import run_monitor as app_run

    return app_run(run_dir, wait_s=wait_s)


__all__ = ["MonitorSettings", "display_problem", "launch_detached", "main", "run_monitor", "show"]
