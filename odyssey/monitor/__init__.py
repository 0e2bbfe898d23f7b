"""`odyssey monitor RUN`: a Tkinter window on a run directory (feed.py reads it, fields.py formats it,
charts.py draws, app.py lays out and writes control requests).

This module stays light (no tkinter import) because the trainer imports it for `--monitor`:
`launch_detached` starts the window in its own process, in its own session and outside the
trainer's process tree, so a slow window never slows training, closing it never stops training,
and the guard never counts its memory against the training budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The monitor's arguments, with MonitorSettings' defaults: of `python -m odyssey.monitor` and of
    `odyssey monitor` (whose parser adds them to its own)."""
    d = MonitorSettings  # its class attributes are the defaults
    p.add_argument("run", help="the run directory (the --out of odyssey train)")
    p.add_argument("--interval-ms", type=int, default=d.interval_ms, help=f"refresh period (default {d.interval_ms})")
    p.add_argument(
        "--wait-s",
        type=float,
        default=d.wait_s,
        help="wait this long for the run directory to appear (used by train --monitor)",
    )
    p.add_argument("--geometry", default=d.geometry, help=f"window size, Tk syntax (default {d.geometry})")
    p.add_argument(
        "--screenshot",
        default=d.screenshot,
        metavar="PNG",
        help="save a PNG of the window once the run is read, then close it (needs Pillow)",
    )
    p.add_argument(
        "--screenshot-after-s",
        type=float,
        default=d.screenshot_after_s,
        help=f"with --screenshot: seconds to let the window settle first (default {d.screenshot_after_s:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m odyssey.monitor`."""
    p = argparse.ArgumentParser(
        prog="odyssey monitor",
        description="Watch a training run live (or a finished one): loss, page-in, RAM against the "
        "budget, temperature, guard events; pause, resume, checkpoint or stop it.",
        epilog="example: odyssey monitor runs/r1   (headless: xvfb-run -a odyssey monitor runs/r1)",
    )
    add_arguments(p)
    return p


def wait_for_run_dir(run_dir: str | os.PathLike, wait_s: float) -> None:
    """Return once `run_dir` is a directory; raise OdysseyError when it is not one after `wait_s`."""
    deadline = time.monotonic() + wait_s
    while not Path(run_dir).is_dir():
        if time.monotonic() >= deadline:
            raise OdysseyError(
                f"run directory {run_dir} not found; pass the --out directory of an "
                "`odyssey train` run, e.g. odyssey monitor runs/r1"
            )
        time.sleep(0.2)


def show(settings: MonitorSettings) -> int:
    """Open the window as `settings` say and return 0 when it is closed; raises OdysseyError.
    The run directory, the display and tkinter are checked before tkinter is imported, so each
    problem ends in one line."""
    import importlib.util

    wait_for_run_dir(settings.run, settings.wait_s)
    problem = display_problem()
    if problem:
        raise OdysseyError(problem)
    if importlib.util.find_spec("tkinter") is None:
        raise OdysseyError("the monitor needs tkinter, which this Python lacks: apt-get install python3-tk")
    from odyssey.monitor.app import show as app_show

    return app_show(settings)


def main(argv: list[str] | None = None) -> int:
    """`odyssey monitor RUN [--interval-ms N] [--wait-s S] [--geometry WxH]`; raises OdysseyError."""
    return show(MonitorSettings.from_args(build_parser().parse_args(argv)))


def run_monitor(run_dir: str | os.PathLike, wait_s: float = 0.0) -> int:
    """Open the window on `run_dir` and return 0 when it is closed; raises OdysseyError."""
    return show(MonitorSettings(os.fspath(run_dir), wait_s=wait_s))


__all__ = [
    "MonitorSettings",
    "add_arguments",
    "build_parser",
    "display_problem",
    "launch_detached",
    "main",
    "run_monitor",
    "show",
    "wait_for_run_dir",
]
