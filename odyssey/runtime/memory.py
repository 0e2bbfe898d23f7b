"""Memory readings of a process, its cgroup and the system, and a process's state and start time
(/proc/PID/stat, the one parser of it). No torch import.

Anonymous memory (`RssAnon`) is what a RAM budget must bound: heap, tensors, buffers. File-backed
RSS (`RssFile`) is page cache mapped into the process: reclaimable, but counted in a cgroup's usage.
psutil's RSS and USS mix the two, so we read /proc ourselves (Linux) and fall back to psutil.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

MIB = 1 << 20


@dataclass
class ProcessMemory:
    anon_bytes: int
    """RssAnon: heap and anonymous mappings (what the budget bounds)."""
    file_bytes: int
    """RssFile + RssShmem: file-backed pages mapped into the process."""
    peak_bytes: int
    """VmHWM: peak total RSS since the process started."""
    shmem_bytes: int = 0
    """RssShmem, part of file_bytes: shared anonymous mappings, such as the pager's buffer pool."""
    lazy_bytes: int = 0
    """LazyFree, part of anon_bytes: pages freed with MADV_FREE (a training run's allocator, see
    allocator.hold_freed_pages) that the kernel takes back, without I/O, when it needs them. 0 unless
    read: process_memory(lazy=True) reads /proc/PID/smaps_rollup, which walks the page tables (~11 ms
    for 800 MiB of 4 KiB pages) where /proc/PID/status takes ~0.03 ms."""

    @property
    def rss_bytes(self) -> int:
        return self.anon_bytes + self.file_bytes

    @property
    def held_bytes(self) -> int:
        """Anonymous memory the kernel cannot take back without swapping: RssAnon less LazyFree."""
        return self.anon_bytes - self.lazy_bytes


def lazy_free_bytes(pid: int) -> int:
    """LazyFree of `pid` from /proc/PID/smaps_rollup (Linux 4.14 and later); 0 where there is none."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"LazyFree:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_memory(pid: int | None = None, lazy: bool = False) -> ProcessMemory:
    """The process's memory from /proc/PID/status; with `lazy`, LazyFree too (see lazy_bytes)."""
    pid = os.getpid() if pid is None else pid
    fields = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    fields[key] = int(rest.split()[0]) * 1024  # kB -> bytes
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    if "RssAnon" not in fields:  # not Linux: psutil's RSS counts everything as anonymous
        import psutil

        info = psutil.Process(pid).memory_info()
        return ProcessMemory(info.rss, 0, info.rss)
    return ProcessMemory(
        fields["RssAnon"],
        fields.get("RssFile", 0) + fields.get("RssShmem", 0),
        fields.get("VmHWM", 0),
        fields.get("RssShmem", 0),
        lazy_free_bytes(pid) if lazy else 0,
    )


class ProcStat(NamedTuple):
    state: str
    """One letter: R running, S sleeping, D waiting on the disk, T stopped, Z zombie, X dead..."""
    start_ticks: int
    """Start time after boot in clock ticks: with the pid, it tells a process from a later one that
    reused its pid."""
    cpu_ticks: int
    """CPU time used so far, user + system, in clock ticks (os.sysconf("SC_CLK_TCK") a second)."""


def proc_stat(pid: int) -> ProcStat | None:
    """State, start time and CPU time of `pid` from /proc/PID/stat, or None when there is no such
    process (or no /proc: not Linux). Fields are counted after the last ')', since the command name
    in parentheses may itself contain spaces and ')'. Malformed contents raise ValueError or
    IndexError."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # fields[0] is field 3 of proc(5), "state"
    return ProcStat(fields[0].decode(), int(fields[19]), int(fields[11]) + int(fields[12]))


def rss_anon_mib(pid: int | None = None) -> float:
    return process_memory(pid).anon_bytes / MIB


_HAS_CHILDREN_FILE = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _children(pid: int) -> list[int]:
    """Direct children of `pid`: /proc/PID/task/*/children (cheap), else psutil (scans all pids)."""
    if _HAS_CHILDREN_FILE:
        kids: list[int] = []
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    kids.extend(int(k) for k in f.read().split())
            except OSError:
                continue  # the thread ended meanwhile
        return kids
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def tree_pids(pid: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    """`pid` and its descendants, leaving out `exclude` and everything below them."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in exclude or p in out:
            continue
        out.append(p)
        todo.extend(_children(p))
    return out


def tree_memory(pid: int, exclude: frozenset[int] = frozenset(), lazy_from: float | None = None) -> ProcessMemory:
    """Summed over `pid` and its descendants (the trainer may spawn workers), leaving out
    `exclude` and what is below it (the guard is the trainer's child and must not count itself).
    LazyFree too (lazy_bytes) where the summed RssAnon reaches `lazy_from` (None: never)."""
    anon = file = peak = shmem = 0
    read = []
    for p in tree_pids(pid, exclude):
        try:
            m = process_memory(p)
        except Exception:  # gone between listing and reading (ProcessLookupError, psutil's errors)
            continue
        anon, file, peak = anon + m.anon_bytes, file + m.file_bytes, max(peak, m.peak_bytes)
        shmem += m.shmem_bytes
        read.append(p)
    free = sum(map(lazy_free_bytes, read)) if lazy_from is not None and anon >= lazy_from else 0
    return ProcessMemory(anon, file, peak, shmem, free)


def system_available_bytes() -> int:
    """MemAvailable: what can be allocated without swapping."""
    import psutil

    return psutil.virtual_memory().available


def swap_used_bytes() -> int:
    import psutil

    return psutil.swap_memory().used


def cgroup_of(pid: int) -> Path | None:
    """The memory cgroup directory of `pid` (v1 memory controller or v2 unified), or None."""
    from odyssey.runtime.cgroup import find_hierarchy, own_group

    h = find_hierarchy()
    return own_group(h, pid) if h is not None else None


def cgroup_usage_bytes(pid: int) -> tuple[int, int | None] | None:
    """(usage, limit) of the memory cgroup `pid` is in; limit None when unlimited; None if unknown."""
    d = cgroup_of(pid)
    if d is None or not ((d / "memory.usage_in_bytes").exists() or (d / "memory.current").exists()):
        return None
    if (d / "memory.usage_in_bytes").exists():
        usage = int((d / "memory.usage_in_bytes").read_text())
        limit = int((d / "memory.limit_in_bytes").read_text())
        return usage, (None if limit >= (1 << 60) else limit)
    usage = int((d / "memory.current").read_text())
    raw = (d / "memory.max").read_text().strip()
    return usage, (None if raw == "max" else int(raw))


class PeakSampler:
    """Samples this process's anonymous RSS on a thread every `interval_s`; `.peak_bytes` is the max,
    `.peak_with_shmem_bytes` the max of anonymous + shared (RssShmem: the pager's pool) at one sample.

    with PeakSampler() as s:
        work()
    print(s.peak_bytes / MIB)
    """

    def __init__(self, interval_s: float = 0.005, pid: int | None = None):
        self.interval_s = interval_s
        self.pid = pid
        self.peak_bytes = 0
        self.peak_with_shmem_bytes = 0
        self._stop = None
        self._thread = None

    def sample(self) -> int:
        m = process_memory(self.pid)
        self.peak_bytes = max(self.peak_bytes, m.anon_bytes)
        self.peak_with_shmem_bytes = max(self.peak_with_shmem_bytes, m.anon_bytes + m.shmem_bytes)
        return m.anon_bytes

    def __enter__(self) -> PeakSampler:
        import threading

        self._stop = threading.Event()
        self.sample()

        def loop():
            while not self._stop.wait(self.interval_s):
                self.sample()

        self._thread = threading.Thread(target=loop, name="odyssey-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
