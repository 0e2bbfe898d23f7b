"""`odyssey monitor RUN`: a Tkinter window on a run directory (feed.py reads it, charts.py draws,
app.py lays out and writes control requests).

This module stays light (no tkinter import) because the trainer imports it for `--monitor`:
`launch_detached` starts the window in its own process, so a slow window never slows training and
closing it never stops training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from odyssey.errors import OdysseyError

XVFB_HINT = ("on a headless machine run it under Xvfb: `xvfb-run -a odyssey monitor RUN`, or start "
             "`Xvfb :99 &` and `export DISPLAY=:99` (apt-get install xvfb), or use `ssh -X`")


def display_problem() -> Optional[str]:
    """Why no window can open here (one line), or None. Only X11 platforms need DISPLAY."""
    if sys.platform in ("win32", "darwin"):
        return None
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        return f"DISPLAY is not set, so the monitor cannot open a window; {XVFB_HINT}"
    return None


def launch_detached(run_dir: str | os.PathLike, wait_s: float = 30.0,
                    log_path: Optional[str | os.PathLike] = None) -> subprocess.Popen:
    """Start `python -m odyssey.monitor RUN` in its own process and session (Ctrl-C in the trainer's
    terminal does not reach it, and it outlives the trainer to show the end of the run). Its output
    goes to RUN/monitor.log (or `log_path`), never to the trainer's pipes. Raises OdysseyError when
    no display is available, before anything starts."""
    problem = display_problem()
    if problem:
        raise OdysseyError(problem)
    run_dir = Path(run_dir)
    log_path = Path(log_path) if log_path else run_dir / "monitor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "odyssey.monitor", str(run_dir), "--wait-s", str(wait_s)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True)


def main(argv: Optional[list[str]] = None) -> int:
    """`odyssey monitor RUN [--interval-ms N] [--wait-s S] [--geometry WxH]`; raises OdysseyError."""
    from odyssey.monitor.app import main as app_main

    return app_main(argv)


def run_monitor(run_dir: str | os.PathLike, wait_s: float = 0.0) -> int:
    """Open the window on `run_dir` and return 0 when it is closed; raises OdysseyError."""
    from odyssey.monitor.app import run_monitor as app_run

    return app_run(run_dir, wait_s=wait_s)


__all__ = ["display_problem", "launch_detached", "main", "run_monitor"]
