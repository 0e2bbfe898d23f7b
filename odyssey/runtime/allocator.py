"""The memory allocator: jemalloc when present, else glibc with fewer arenas.

Measured on this kind of machine (100M model, generation at seq 512, three runs each): peak
anonymous RSS 290-376 MiB with glibc's default malloc (per-thread arenas and a dynamic mmap
threshold keep freed tensor memory), 295-298 MiB with jemalloc. PITFALLS.md reports the same on a
1.2B training step: 1.6 GB with glibc, 0.56 GB with jemalloc at the same speed. A RAM budget needs
the steady one, so heavy commands re-execute themselves once with jemalloc preloaded (Debian
`libjemalloc2`; `make` installs it where apt works). ODYSSEY_ALLOCATOR=system turns this off.

jemalloc starts returning freed pages to the OS within about a second (dirty_decay_ms:1000), so a
command's RSS follows what it holds. A training step, though, allocates and frees the same
activation-sized buffers at every layer, and the kernel faults and zeroes them in again each time:
3.2 M minor faults in 5 steps of the 1.2B at 4 GiB, 11.8 s of system time. Where the plan leaves
room (KEEP_ROOM), training keeps its freed pages instead (`hold_freed_pages` "kept": dirty_decay_ms
-1 on every arena): 0.93 M faults (the pinned weights', once) and 5.6 s, and one OpenMP core less
idle. What is kept is the step's own high-water mark plus jemalloc's fragmentation, 1395 MiB of
anonymous RSS against 1260 in the first step at 4 GiB, 772 against 540-690 at 1 GiB, flat over 20
steps; at 1 GiB that pushed the cgroup to its limit, hence the room it needs. With less room the
freed pages go back lazily ("lazy": MADV_FREE, muzzy_decay_ms -1): the kernel takes them when the
cgroup or the machine needs the memory, and until then they come back without a fault. The 1.2B
at 1 GiB in a 1 GiB cgroup, 7 steps: minor faults 5.3-5.7 M -> 1.8 M, system time 16.8-19.6 ->
9.2-11.5 s; see README's speed section for the steps. jemalloc's arena for allocations over 8 MiB
(oversize_threshold; most of an fp32 step's activations) purges at once, and at once is always
MADV_DONTNEED; in "lazy" it gets a decay time, so that a purge is MADV_FREE, and the trainer purges
it between layers (`release_freed`), so that what it holds unpurged is two layers' freed buffers
at most: the 1.2B in fp32 at 1 GiB, 6 steps: 8.1 M minor faults -> 0.6 M, system time 24 -> 8-9 s.
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
# freed memory back to the OS promptly; no background purging thread (2 cores)
MALLOC_CONF = "dirty_decay_ms:1000,muzzy_decay_ms:0,background_thread:false"
KEEP_ROOM = 256 << 20  # bytes of the budget over the plan that let a training run keep freed pages
HUGE_DECAY_MS = 1  # the huge arena's decay time in "lazy": not 0 (a purge at 0 ms is MADV_DONTNEED)
SPIN_COUNT = 3_000  # libgomp busy-wait iterations before sleeping: some 30 microseconds
mode = ""  # what hold_freed_pages chose in this process: "kept", "lazy", or "" (nothing)
_mallctl = None  # jemalloc's mallctl, once hold_freed_pages changed something
_huge = None  # "lazy": the huge arena's index (opt.narenas); None without one
_purge = None  # "lazy": b"arena.N.decay" once the huge arena exists and purges lazily


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
    """OpenMP worker threads spin briefly, then sleep, while they wait (OMP_WAIT_POLICY=PASSIVE
    with GOMP_SPINCOUNT=SPIN_COUNT), unless the user set either. Must run before torch is imported
    (libgomp reads both when it loads). Measured on 2 cores (median step s; nano: seq 256, 8 steps;
    1.2B: 4 GiB, 6 steps):

    | spin count              | nano, 4 busy loops beside | nano, idle | 1.2B, idle |
    |-------------------------|---------------------------|------------|------------|
    | 0 (PASSIVE alone)       | 0.12-0.26                 | 0.091      | 10.0       |
    | 3,000 (SPIN_COUNT)      | 0.27                      | 0.077      | 8.7        |
    | 30,000                  | 0.90                      | 0.079      | 8.7-9.7    |
    | 300,000 (torch default) | 1.19                      |            |            |

    Spinning long burns the cores our own prefetch thread, the guard and the rest of a laptop
    need; not spinning at all costs a futex wake-up at each of a step's thousands of parallel
    regions."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


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
        env.setdefault("MALLOC_CONF", MALLOC_CONF)
        try:
            os.execve(sys.executable, [sys.executable, *argv], env)
        except OSError:
            pass  # carry on with glibc
    if active() != "jemalloc":
        try:
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)
        except (OSError, AttributeError):
            pass


def hold_freed_pages(room: int | None) -> str:
    """Training: how the pages jemalloc frees go back to the OS, by the budget's `room` over the plan
    (None: no budget). "kept" with at least KEEP_ROOM: never purged (dirty_decay_ms -1). "lazy" with
    less: purged with MADV_FREE instead of MADV_DONTNEED and never forced out (muzzy_decay_ms -1), so
    a page stays mapped until the kernel needs the memory (the budget's cgroup at its limit, the
    machine short) and until then comes back without a fault or a zeroing; RssAnon counts it
    meanwhile, as LazyFree (memory.process_memory(lazy=True)). The arena of allocations over 8 MiB
    (jemalloc's oversize_threshold) purges when `release_freed` asks, between layers: left to its
    own ticks with a decay time, it held freed buffers unpurged (the 1.2B in fp32 at 1 GiB: +214 MiB,
    OOM-killed). "" (nothing changed) without jemalloc (glibc keeps its heap as it likes) or under a
    user's own MALLOC_CONF."""
    global mode, _mallctl, _huge
    if active() != "jemalloc" or os.environ.get("MALLOC_CONF", MALLOC_CONF) != MALLOC_CONF:
        return ""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return ""
    narenas = _read(mallctl, b"arenas.narenas", ctypes.c_uint)
    if narenas is None:
        return ""
    which = "kept" if room is None or room >= KEEP_ROOM else "lazy"
    knob = "dirty_decay_ms" if which == "kept" else "muzzy_decay_ms"
    if not _write(mallctl, f"arenas.{knob}", -1):  # the default of arenas made later
        return ""
    for i in range(narenas):  # arenas not yet initialised refuse: they take that default
        _write(mallctl, f"arena.{i}.{knob}", -1)
    mode, _mallctl = which, mallctl
    if _read(mallctl, b"opt.oversize_threshold", ctypes.c_size_t):  # else no huge arena
        _huge = _read(mallctl, b"opt.narenas", ctypes.c_uint)
    release_freed()
    return which


def _read(mallctl, name: bytes, ctype):
    """A jemalloc setting's value, None where it refuses."""
    value = ctype(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    ok = mallctl(name, ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0
    return value.value if ok else None


def _write(mallctl, name: str, ms: int) -> bool:
    """Set a jemalloc decay time (milliseconds, -1: never); False where it refuses."""
    value = ctypes.c_ssize_t(ms)
    return mallctl(name.encode(), None, None, ctypes.byref(value), ctypes.c_size_t(ctypes.sizeof(value))) == 0


def release_freed() -> None:
    """In "lazy": hand the buffers the huge arena holds freed back to the OS lazily (MADV_FREE); the
    trainer calls it between layers. jemalloc's decay counts a freed page from the first decay pass
    that sees it, so a call purges what the call before found free (HUGE_DECAY_MS ago at least):
    until then the next layer reuses it as it is, and the arena holds two layers' freed buffers at
    most. jemalloc makes that arena on the first allocation over opt.oversize_threshold, numbered
    after the opt.narenas automatic ones, and sets its decay times then (dirty 0: MADV_DONTNEED at
    once); the first call that finds it sets HUGE_DECAY_MS and muzzy -1. Nothing in the other modes."""
    global _purge
    if mode != "lazy" or not _huge:
        return
    if _purge is None:
        if (_read(_mallctl, b"arenas.narenas", ctypes.c_uint) or 0) <= _huge:
            return  # not made yet
        for knob, ms in (("dirty", HUGE_DECAY_MS), ("muzzy", -1)):
            if not _write(_mallctl, f"arena.{_huge}.{knob}_decay_ms", ms):
                return
        _purge = f"arena.{_huge}.decay".encode()
    _mallctl(_purge, None, None, None, ctypes.c_size_t(0))
