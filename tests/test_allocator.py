"""The process environment heavy commands run in (odyssey.runtime.allocator): jemalloc preloaded (a
training run with room over its plan keeps the pages it frees), OpenMP threads that spin briefly
and then sleep, and the user's own settings left alone. Each case runs in a fresh interpreter:
libgomp and the preload read the environment once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from odyssey.runtime import allocator

ROOT = Path(__file__).resolve().parents[1]
SHOW = "import json, os; print(json.dumps({k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}))"
ENSURE = "import os; from odyssey.runtime import allocator; allocator.ensure(['-c', os.environ['PROBE']])"
KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MALLOC_CONF", "LD_PRELOAD", "_ODYSSEY_REEXEC", "ODYSSEY_ALLOCATOR")


def run(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in KEYS}
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def threads_env(**env) -> dict:
    return json.loads(run(f"from odyssey.runtime.allocator import quiet_threads; quiet_threads(); {SHOW}", **env))


def test_openmp_threads_spin_briefly_then_sleep():
    assert threads_env() == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": str(allocator.SPIN_COUNT)}


@pytest.mark.parametrize(
    "user",
    [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "5"}],
)
def test_the_users_openmp_settings_are_left_alone(user):
    want = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None, **user}
    assert threads_env(**user) == want


def test_heavy_commands_run_with_jemalloc():
    code = ENSURE
    probe = (
        "import json, os; from odyssey.runtime import allocator; "
        "print(json.dumps([allocator.active(), os.environ.get('MALLOC_CONF')]))"
    )
    active, conf = json.loads(run(code, PROBE=probe))
    if allocator.find_jemalloc() is None:  # no re-exec: glibc, nothing set
        assert (active, conf) == ("glibc", None)
    else:
        assert (active, conf) == ("jemalloc", allocator.MALLOC_CONF)


def test_a_users_malloc_conf_wins():
    probe = "import os; print(os.environ.get('MALLOC_CONF'))"
    assert run(ENSURE, PROBE=probe, MALLOC_CONF="dirty_decay_ms:5") == "dirty_decay_ms:5"


DECAY = """
import ctypes, json, os
from odyssey.runtime import allocator

def decay(name):
    v, n = ctypes.c_ssize_t(0), ctypes.c_size_t(8)
    rc = ctypes.CDLL(None).mallctl(name.encode(), ctypes.byref(v), ctypes.byref(n), None, ctypes.c_size_t(0))
    return v.value if rc == 0 else None

def both():
    return [decay(f"{a}.{k}_decay_ms") for a in ("arena.0", "arenas") for k in ("dirty", "muzzy")]

before = both()
mode = allocator.hold_freed_pages(int(os.environ["ROOM"]) if os.environ["ROOM"] else None)
print(json.dumps([allocator.active(), before, mode, allocator.mode, both()]))
"""


@pytest.mark.parametrize("room", [None, allocator.KEEP_ROOM, allocator.KEEP_ROOM - 1, 0])
def test_training_keeps_freed_pages_with_room_over_the_plan_else_frees_them_lazily(room):
    """dirty_decay_ms -1: freed pages are never purged ("kept"); muzzy_decay_ms -1: they are purged
    with MADV_FREE (the kernel takes them when it needs them) and never forced out ("lazy")."""
    active, before, mode, remembered, after = json.loads(
        run(ENSURE, PROBE=DECAY, ROOM="" if room is None else str(room))
    )
    if active != "jemalloc":  # no jemalloc on this machine: nothing to change, nothing changed
        assert (mode, remembered, before, after) == ("", "", [None] * 4, [None] * 4)
        return
    assert before == [1000, 0, 1000, 0]  # allocator.MALLOC_CONF
    assert mode == remembered
    if room is None or room >= allocator.KEEP_ROOM:
        assert (mode, after) == ("kept", [-1, 0, -1, 0])
    else:
        assert (mode, after) == ("lazy", [1000, -1, 1000, -1])


def test_a_users_malloc_conf_is_not_overridden_by_training():
    active, before, mode, remembered, after = json.loads(
        run(ENSURE, PROBE=DECAY, ROOM="0", MALLOC_CONF="dirty_decay_ms:5")
    )
    assert (mode, remembered) == ("", "") and after == before


HUGE = """
import ctypes, json, os, resource, time
from odyssey.runtime import allocator
from odyssey.runtime.memory import process_memory

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
N = 64 << 20  # over jemalloc's oversize_threshold (8 MiB): its huge arena

def churn():  # a layer's buffer: allocated, written, freed
    p = libc.malloc(N)
    ctypes.memset(p, 1, N)
    libc.free(p)

if os.environ["EARLY"]:
    churn()  # the huge arena made before the mode is chosen, else after it
mode = allocator.hold_freed_pages(int(os.environ["ROOM"]) if os.environ["ROOM"] else None)
for layer in range(2):
    churn()
    time.sleep(0.01)
    allocator.release_freed()  # between layers
time.sleep(0.01)
allocator.release_freed()  # the boundary after
lazy = process_memory(os.getpid(), lazy=True).lazy_bytes
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()  # the next layer's buffer
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps([allocator.active(), mode, N, lazy, faults]))
"""


@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("room", [None, 0])
def test_buffers_over_8mib_come_back_without_faults(room, early):
    """A buffer over 8 MiB freed in one layer and allocated again in the next: "lazy" (room 0) hands
    it back with MADV_FREE between layers (LazyFree), "kept" (no budget) keeps it; either way it
    comes back without faulting its 16,384 pages in again, which jemalloc's huge arena did before
    (it purged at once with MADV_DONTNEED), whether that arena was made before the mode or after."""
    active, mode, n, lazy, faults = json.loads(
        run(ENSURE, PROBE=HUGE, ROOM="" if room is None else str(room), EARLY="1" if early else "")
    )
    if active != "jemalloc":
        assert mode == ""
        return
    pages = n // os.sysconf("SC_PAGE_SIZE")
    assert faults < pages // 8, (mode, faults, pages)
    if room is None:
        assert mode == "kept" and lazy < n // 2
    else:
        assert mode == "lazy" and lazy >= n * 0.9
