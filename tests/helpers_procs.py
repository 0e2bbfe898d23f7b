"""Real processes for the guard and control tests. No torch.

As a script (the watched "trainer"):
    python tests/helpers_procs.py hold      reads commands on stdin: "alloc MIB" makes it hold MIB of
                                            touched memory (replacing what it held) and answers
                                            "ok MIB"; "lazy MIB" maps MIB more, touches it and frees
                                            it with MADV_FREE (the kernel may take it back; RssAnon
                                            counts it meanwhile, as LazyFree), answers "ok lazy MIB";
                                            "exit" or end of input ends it.
    python tests/helpers_procs.py alloc MIB touch MIB of memory, print "ok", exit 0.

As a module: `Hog` drives a `hold` process; `guard_env()` is an environment in which
`python -m odyssey.runtime.guard` imports this checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def guard_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class Hog:
    """A child Python process that holds as much anonymous memory as it is told to."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.pid = self.proc.pid

    def hold(self, mib: int) -> None:
        self.proc.stdin.write(f"alloc {mib}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.strip() == f"ok {mib}", line

    def hold_lazy(self, mib: int) -> None:
        """Map `mib` MiB more, touch it, and free it with MADV_FREE (replacing what was so freed)."""
        self.proc.stdin.write(f"lazy {mib}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.strip() == f"ok lazy {mib}", line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        self.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


HANG_S = 60.0
"""How long a test waits for an event before calling it lost: a guard against hangs, never a speed
claim (a loaded 2-core machine can take seconds for what takes milliseconds when idle). Speed
claims are asserted in tests marked `slow`."""


def wait_for(cond: Callable[[], object], timeout_s: float = HANG_S, every_s: float = 0.02):
    """Poll `cond` until it returns something truthy; returns it, or None on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(every_s)


def _touched(mib: int) -> bytes | None:
    return b"\x01" * (mib * MIB) if mib > 0 else None  # every page written, so it is resident


def _lazy(mib: int):
    import mmap

    m = mmap.mmap(-1, mib * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.write(b"\x01" * (mib * MIB))
    m.madvise(mmap.MADV_FREE)
    return m


def _main(argv: list[str]) -> int:
    if argv[0] == "alloc":
        buf = _touched(int(argv[1]))
        print("ok", flush=True)
        del buf
        return 0
    if argv[0] == "hold":
        buf = lazy = None
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "exit":
                break
            if cmd[0] == "alloc":
                buf = None
                buf = _touched(int(cmd[1]))
                print(f"ok {cmd[1]}", flush=True)
            if cmd[0] == "lazy":
                lazy = None
                lazy = _lazy(int(cmd[1]))
                print(f"ok lazy {cmd[1]}", flush=True)
        del buf, lazy
        return 0
    print(f"unknown mode {argv[0]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
