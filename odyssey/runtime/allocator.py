"""The memory allocator: jemalloc when present, else glibc with fewer arenas.

Measured on this kind of machine (100M model, generation at seq 512, three runs each): peak
anonymous RSS 290-376 MiB with glibc's default malloc (per-thread arenas and a dynamic mmap
threshold keep freed tensor memory), 295-298 MiB with jemalloc. PITFALLS.md reports the same on a
1.2B training step: 1.6 GB with glibc, 0.56 GB with jemalloc at the same speed. A RAM budget needs
the steady one, so heavy commands re-execute themselves once with jemalloc preloaded (Debian
`libjemalloc2`; `make` installs it where apt works). ODYSSEY_ALLOCATOR=system turns this off.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)
M_ARENA_MAX = -8


def find_jemalloc() -> str | None:
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    hits = glob.glob("/usr/lib/*/libjemalloc.so.2")
    return hits[0] if hits else None


def active() -> str:
    """'jemalloc' if loaded into this process, else 'glibc'."""
    try:
        with open("/proc/self/maps") as f:
            return "jemalloc" if "libjemalloc" in f.read() else "glibc"
    except OSError:
        return "unknown"


def quiet_threads() -> None:
    """OpenMP worker threads sleep instead of spinning while they wait (OMP_WAIT_POLICY=PASSIVE),
    unless the user chose otherwise. torch's default spin-waiting burns the cores our own prefetch
    thread, the guard and the rest of a laptop need; measured on 2 busy cores (load 6), a nano
    LoRA step took 4.41 s spinning and 0.27 s passive. Must run before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def ensure(argv: list[str]) -> None:
    """Re-exec this process with jemalloc preloaded (once), or tune glibc if jemalloc is absent.
    Call before importing torch. `argv` is the full command line to re-run (sys.argv form)."""
    quiet_threads()
    if os.environ.get("ODYSSEY_ALLOCATOR", "jemalloc") == "system" or sys.platform != "linux":
        return
    lib = find_jemalloc()
    preload = os.environ.get("LD_PRELOAD", "")
    if lib and "jemalloc" not in preload and not os.environ.get("_ODYSSEY_REEXEC"):
        env = dict(os.environ, LD_PRELOAD=f"{lib} {preload}".strip(), _ODYSSEY_REEXEC="1")
        # return freed memory to the OS promptly; background purging thread off (2 cores)
        env.setdefault("MALLOC_CONF", "dirty_decay_ms:1000,muzzy_decay_ms:0,background_thread:false")
        try:
            os.execve(sys.executable, [sys.executable, *argv], env)
        except OSError:
            pass  # carry on with glibc
    if active() != "jemalloc":
        try:
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)
        except (OSError, AttributeError):
            pass
