"""`odyssey doctor`: the facts about this machine that decide how Odyssey runs, each with a verdict.

One `Fact` per line of output: "ok" (nothing to do) or "note" (worth knowing, with what to do).
A note is never an error: the command always exits 0, and "unavailable" (a temperature sensor on
a VM) is a normal answer. The facts, in order:

  memory       total and available RAM, and the memory cgroup's limit when the process is in one
  disk         free space where models go (--models-dir, default ./models, else the nearest
               existing parent), and its filesystem
  cold read    write a temporary file there (fsync), drop it from the page cache, read it back with
               16 MiB preads: MB/s, what a pass over the 1.2B model costs in page-in (~5 s, deleted)
  cpu          model, cores, AVX2 / AVX512 / AVX512-BF16 / AMX
  compute      the compute probe's figures (bf16 and fp32 GFLOP/s at the 1.2B's largest projection)
               and the dtype `--compute-dtype auto` picks from them (odyssey.probe, cached)
  temperature  the guard's own reader (sensors.Thermometer); "unavailable" is normal on VMs
  cgroups      whether a memory cgroup can be made (the guard's --enforce-cgroup)
  allocator    whether jemalloc is found (heavy commands preload it)
  torch        version, threads, CPU or CUDA build
  monitor      whether `odyssey monitor` can open a window (DISPLAY, tkinter)

`--json` prints one object: {"<key>": {"verdict", "summary", "hint", ...figures}, ...}.
The facts of the cpu and the compute probe live in odyssey.runtime.doctor_compute; `Fact` in
odyssey.runtime.fact.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from odyssey.config import format_bytes
from odyssey.errors import OdysseyError
from odyssey.runtime.doctor_compute import compute_fact, cpu_fact
from odyssey.runtime.fact import Fact

DEMO_BUDGET_BYTES = 2 << 30
"""The RAM budget `make demo` trains the 1.2B model under: the figure available RAM is judged by."""
DEMO_BUDGET_GIB = f"{DEMO_BUDGET_BYTES >> 30} GiB"
MODEL_1P2B_BYTES = 2_426_700_000
"""The 1.2B store in bf16 (1,213,302,784 parameters x 2 bytes + headers): one pass pages in this much."""
DISK_OK_BYTES = 5 * MODEL_1P2B_BYTES
"""Room for the demo's copies of the 1.2B model: base, merged and three exports (~12 GB)."""
READ_TEST_BYTES = 256 << 20
"""Size of the cold-read test file: large enough to get past a disk's write-back and read-ahead bursts."""
CHUNK_BYTES = 16 << 20
"""Bytes per write and per pread in the test (the pager reads in 16 MiB chunks too)."""
WRITE_LIMIT_S = 3.0
READ_LIMIT_S = 2.0
"""The test stops writing (reading) after this long, so a slow disk still finishes in about 5 s."""
COLD_OK_MB_S = 300.0
"""Below this, paging the 1.2B model in (~8 s a pass) takes longer than computing it on 2 cores."""
RAM_FILESYSTEMS = ("tmpfs", "ramfs")
"""Filesystems that live in RAM: models there take RAM from the budget, and a cold read is a copy."""


# --------------------------------------------------------------------------------------------
# memory and disk


def memory_fact() -> Fact:
    import psutil

    from odyssey.runtime.memory import cgroup_usage_bytes

    vm = psutil.virtual_memory()
    usable = vm.available
    data = {
        "total_bytes": vm.total,
        "available_bytes": vm.available,
        "swap_total_bytes": psutil.swap_memory().total,
        "cgroup_limit_bytes": None,
        "cgroup_usage_bytes": None,
    }
    summary = f"{format_bytes(vm.total)} total, {format_bytes(vm.available)} available"
    cg = cgroup_usage_bytes(os.getpid())
    if cg is not None and cg[1] is not None:
        usage, limit = cg
        data.update(cgroup_limit_bytes=limit, cgroup_usage_bytes=usage)
        usable = min(usable, max(limit - usage, 0))
        summary += f"; inside a memory cgroup limited to {format_bytes(limit)} ({format_bytes(usage)} used)"
    else:
        summary += "; no cgroup limit on this process"
    data["usable_bytes"] = usable
    if usable >= DEMO_BUDGET_BYTES:
        return Fact(
            "memory",
            "memory",
            True,
            summary,
            f"room for the demo's {DEMO_BUDGET_GIB} budget; `odyssey plan` shows what a run needs",
            data,
        )
    suggest_mib = int(usable * 0.8) >> 20  # leave a fifth for the OS, the guard and the page cache
    return Fact(
        "memory",
        "memory",
        False,
        summary,
        f"less than the demo's {DEMO_BUDGET_GIB} budget is free: try --ram-budget "
        f"{suggest_mib}MiB and a shorter --seq-len (`odyssey plan` says what fits)",
        data,
    )


def resolve_models_dir(models_dir: str | None) -> tuple[Path, Path]:
    """(the directory asked for, the directory measured): the asked one if it exists, else its
    nearest existing parent (where it would be created). Default: ./models."""
    asked = Path(models_dir) if models_dir else Path("models")
    if asked.exists() and not asked.is_dir():
        raise OdysseyError(f"--models-dir {asked} is a file, not a directory; pass the directory models go in")
    probe = asked.absolute()
    while not probe.is_dir():
        probe = probe.parent
    return asked, probe


def filesystem(path: Path) -> tuple[str, str]:
    """(type, mount point) of the filesystem holding `path` (the longest mount point in /proc/mounts
    that contains it), or ("", "") when unknown."""
    best, fstype = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, fields[2]
    except OSError:
        return "", ""
    return fstype, best


def disk_fact(asked: Path, probe: Path) -> Fact:
    du = shutil.disk_usage(probe)
    where = str(probe) if asked.absolute() == probe else f"{probe} (where {asked} would be created)"
    fstype, mount = filesystem(probe.resolve())
    summary = f"{du.free / 1e9:,.1f} GB free of {du.total / 1e9:,.1f} GB at {where}"
    summary += f", {fstype} on {mount}" if fstype else ""
    data = {
        "path": str(probe),
        "free_bytes": du.free,
        "total_bytes": du.total,
        "filesystem": fstype,
        "mount_point": mount,
    }
    if fstype in RAM_FILESYSTEMS:
        return Fact(
            "disk",
            "disk",
            False,
            summary,
            f"{fstype} lives in RAM: models there take RAM from the budget; pass --models-dir on a disk",
            data,
        )
    if du.free >= DISK_OK_BYTES:
        return Fact(
            "disk",
            "disk",
            True,
            summary,
            f"room for the 1.2B model ({MODEL_1P2B_BYTES / 1e9:.2f} GB bf16), a merged copy and its exports",
            data,
        )
    return Fact(
        "disk",
        "disk",
        False,
        summary,
        f"the demo keeps ~{DISK_OK_BYTES / 1e9:.0f} GB (1.2B base, merged, three exports); free some "
        "space, pass --models-dir on a larger disk, or use `DEMO=nano make demo`",
        data,
    )


# --------------------------------------------------------------------------------------------
# cold read


def cold_read(directory: Path, size_bytes: int = READ_TEST_BYTES) -> dict:
    """Write up to `size_bytes` to a temporary file in `directory` (fsync after each 16 MiB, stopping
    after WRITE_LIMIT_S), drop its pages from the page cache, and read it back with 16 MiB preads
    (stopping after READ_LIMIT_S). The file is deleted in every case. Raises OSError when it cannot
    be written or read. Returns MB/s (1e6 bytes a second) of the write and of the cold read."""
    block = os.urandom(CHUNK_BYTES)  # random bytes: a compressing filesystem cannot shrink them
    fd, name = tempfile.mkstemp(prefix=".odyssey-doctor-", suffix=".tmp", dir=directory)
    try:
        written, t0 = 0, time.perf_counter()
        while written < size_bytes and (written == 0 or time.perf_counter() - t0 < WRITE_LIMIT_S):
            view = memoryview(block)[: min(CHUNK_BYTES, size_bytes - written)]
            while view:
                n = os.write(fd, view)
                view, written = view[n:], written + n
            os.fsync(fd)  # on the disk, so the read below cannot come from dirty pages
        write_s = time.perf_counter() - t0
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages after fsync: all dropped
            dropped = True
        except (OSError, AttributeError):  # not Linux, or a filesystem that refuses
            dropped = False
        buf = bytearray(CHUNK_BYTES)
        done, t1 = 0, time.perf_counter()
        while done < written and time.perf_counter() - t1 < READ_LIMIT_S:
            n = os.preadv(fd, [buf], done)
            if n <= 0:
                break
            done += n
        read_s = time.perf_counter() - t1
    finally:
        os.close(fd)
        os.unlink(name)
    return {
        "bytes_written": written,
        "write_s": round(write_s, 3),
        "write_mb_s": round(written / 1e6 / max(write_s, 1e-9), 1),
        "bytes_read": done,
        "read_s": round(read_s, 3),
        "read_mb_s": round(done / 1e6 / max(read_s, 1e-9), 1),
        "cache_dropped": dropped,
    }


def cold_read_fact(probe: Path, size_bytes: int = READ_TEST_BYTES) -> Fact:
    if size_bytes <= 0:
        return Fact("cold_read", "cold read", True, "skipped (--read-test-mib 0)")
    free = shutil.disk_usage(probe).free
    if free < 4 * size_bytes:  # never the test that fills a nearly full disk
        return Fact(
            "cold_read",
            "cold read",
            False,
            f"skipped: only {free / 1e6:,.0f} MB free at {probe}",
            "free some space and run doctor again",
            {"skipped": True},
        )
    try:
        r = cold_read(probe, size_bytes)
    except OSError as e:
        return Fact(
            "cold_read",
            "cold read",
            False,
            f"the test file in {probe} failed: {e.strerror or e}",
            "Odyssey writes its models there: check the permissions and free space",
            {"error": str(e)},
        )
    mb_s = r["read_mb_s"]
    pass_s = MODEL_1P2B_BYTES / 1e6 / max(mb_s, 1e-9)
    summary = (
        f"{mb_s:,.0f} MB/s reading {r['bytes_read'] / (1 << 20):,.0f} MiB cold "
        f"(written at {r['write_mb_s']:,.0f} MB/s with fsync)"
    )
    if not r["cache_dropped"]:
        return Fact(
            "cold_read",
            "cold read",
            False,
            summary + "; the page cache could not be dropped",
            "the figure may be the cache's, not the disk's",
            r,
        )
    if filesystem(probe.resolve())[0] in RAM_FILESYSTEMS:
        return Fact("cold_read", "cold read", False, summary, "a copy from RAM (see disk), not a disk read", r)
    paging = f"paging in the 1.2B model ({MODEL_1P2B_BYTES / 1e9:.2f} GB, one pass) takes ~{pass_s:.1f} s at this speed"
    if mb_s >= COLD_OK_MB_S:
        return Fact("cold_read", "cold read", True, summary, paging, r)
    return Fact(
        "cold_read",
        "cold read",
        False,
        summary,
        paging + "; training will wait on the disk (a faster disk or --models-dir on an SSD helps)",
        r,
    )


# --------------------------------------------------------------------------------------------
# guard, cgroups, allocator, torch, monitor


def temperature_fact(thermal_file: str | None = None) -> Fact:
    from odyssey.runtime.sensors import Thermometer

    th = Thermometer(thermal_file)
    temp_c = th.read()
    data = {"temp_c": None if temp_c is None else round(temp_c, 1), "source": th.source}
    if temp_c is not None:
        return Fact(
            "temperature",
            "temperature",
            True,
            f"{temp_c:.0f} C (from {th.source})",
            "the guard pauses training when the CPU runs hot",
            data,
        )
    return Fact(
        "temperature",
        "temperature",
        False,
        f"unavailable (source: {th.source})",
        "normal on VMs: the guard then cannot pause for heat (a sensor file: --thermal-file)",
        data,
    )


def cgroup_fact() -> Fact:
    from odyssey.runtime import cgroup

    ok, why = cgroup.available()
    if ok:
        return Fact(
            "cgroups",
            "cgroups",
            True,
            f"memory cgroups can be made ({why})",
            "the guard can cap training at the budget (--enforce-cgroup)",
            {"available": True, "where": why},
        )
    return Fact(
        "cgroups",
        "cgroups",
        False,
        f"memory cgroups cannot be made: {why}",
        "the guard alone watches the budget (it asks the trainer to checkpoint and stop)",
        {"available": False, "why": why},
    )


def allocator_fact() -> Fact:
    from odyssey.runtime import allocator

    lib = allocator.find_jemalloc()
    off = os.environ.get("ODYSSEY_ALLOCATOR") == "system"
    data = {"jemalloc": lib, "disabled": off}
    if lib and not off:
        return Fact(
            "allocator",
            "allocator",
            True,
            f"jemalloc found at {lib}",
            "heavy commands preload it: freed tensor memory goes back to the OS (training with room: kept)",
            data,
        )
    if lib:
        return Fact(
            "allocator",
            "allocator",
            False,
            f"jemalloc found at {lib}, but ODYSSEY_ALLOCATOR=system",
            "glibc malloc keeps more (1.6 GB against 0.56 GB on a 1.2B step); unset ODYSSEY_ALLOCATOR",
            data,
        )
    return Fact(
        "allocator",
        "allocator",
        False,
        "jemalloc not found; glibc malloc with 2 arenas",
        "glibc keeps more freed memory (1.6 GB against 0.56 GB on a 1.2B step): apt-get install libjemalloc2",
        data,
    )


def torch_fact() -> Fact:
    import torch

    cuda, threads = torch.version.cuda, torch.get_num_threads()
    summary = f"torch {torch.__version__}, {threads} threads, " + (f"CUDA {cuda} build" if cuda else "CPU build")
    data = {"version": torch.__version__, "threads": threads, "cuda": cuda}
    if cuda:
        return Fact(
            "torch",
            "torch",
            False,
            summary,
            "Odyssey runs on the CPU: the CPU build (`make` installs it) is gigabytes smaller",
            data,
        )
    return Fact("torch", "torch", True, summary, "", data)


def monitor_fact() -> Fact:
    from odyssey.monitor import display_problem

    problem = display_problem()
    has_tk = importlib.util.find_spec("tkinter") is not None  # found, not imported (no window here)
    data = {"display": os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"), "tkinter": has_tk}
    if not has_tk:
        return Fact(
            "monitor",
            "monitor",
            False,
            "tkinter is not installed",
            "`odyssey monitor` needs it: apt-get install python3-tk",
            data,
        )
    if problem:
        return Fact(
            "monitor",
            "monitor",
            False,
            "no display (DISPLAY is not set)",
            "run the monitor under Xvfb: `xvfb-run -a odyssey monitor RUN`, or use `ssh -X`",
            data,
        )
    return Fact("monitor", "monitor", True, f"a window can open on {data['display']}", "", data)


# --------------------------------------------------------------------------------------------


def gather(
    models_dir: str | None = None,
    read_test_bytes: int = READ_TEST_BYTES,
    thermal_file: str | None = None,
    remeasure: bool = False,
) -> Iterator[Fact]:
    """Every fact in order, each as soon as it is known (the cold read takes up to ~5 s, torch ~1 s,
    the compute probe under a second when not cached; `remeasure` measures it again)."""
    asked, probe = resolve_models_dir(models_dir)
    yield memory_fact()
    yield disk_fact(asked, probe)
    yield cold_read_fact(probe, read_test_bytes)
    yield cpu_fact()
    yield compute_fact(remeasure)
    yield temperature_fact(thermal_file)
    yield cgroup_fact()
    yield allocator_fact()
    yield torch_fact()
    yield monitor_fact()


HEADING = "odyssey doctor: this machine as Odyssey sees it / Odyssey가 보는 이 컴퓨터"
