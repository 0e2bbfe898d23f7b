"""Memory cgroups: a hard RAM cap around a process (Linux, root or a delegated cgroup). No torch.

Two kernel interfaces, one API:
```
v1  /sys/fs/cgroup/memory/<parent>/<name>/   memory.limit_in_bytes  memory.usage_in_bytes
                                             memory.max_usage_in_bytes  memory.oom_control (oom_kill N)
v2  /sys/fs/cgroup/<parent>/<name>/          memory.max  memory.current  memory.peak
                                             memory.events (oom_kill N)
```
A new group is made under our own memory cgroup when we can write there (a limit already on us
still applies, and the usage stays counted in our parent), else under the hierarchy's root. Swap
is capped too (memsw = limit on v1, swap.max = 0 on v2) so the cap is a cap, not an invitation to
swap. Usage counts page cache as well as anonymous memory: file pages are reclaimed before the
kernel OOM-kills, so a process reading big files still fits.

    ok, why = available()
    with MemoryCgroup.create("odyssey-1234", 2 << 30) as cg:   # removed on exit
        cg.add(1234)
        ... cg.usage(), cg.peak(), cg.oom_kills()
    rc, peak, oom = run_in_cgroup([sys.executable, "forward.py"], 1 << 30)
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from odyssey.errors import OdysseyError

UNLIMITED_V1 = 1 << 60  # v1 reports "no limit" as a huge page-rounded number


class CgroupUnavailable(OdysseyError):
    """No memory cgroup can be created here; `str(e)` says why and what to do."""


class Hierarchy(NamedTuple):
    version: int
    """1 (memory controller mounted on its own) or 2 (unified hierarchy with the memory controller)."""
    root: Path
    """Mount point of the hierarchy, e.g. /sys/fs/cgroup/memory (v1) or /sys/fs/cgroup (v2)."""


def find_hierarchy() -> Hierarchy | None:
    """The mounted hierarchy that has the memory controller, or None (not Linux, not mounted)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    v2 = None
    for fields in mounts:
        if len(fields) < 4:
            continue
        mount_point, fstype, options = fields[1], fields[2], fields[3].split(",")
        if fstype == "cgroup" and "memory" in options:
            return Hierarchy(1, Path(mount_point))  # the memory controller lives in one place only
        if fstype == "cgroup2" and v2 is None:
            try:
                controllers = (Path(mount_point) / "cgroup.controllers").read_text().split()
            except OSError:
                continue
            if "memory" in controllers:
                v2 = Hierarchy(2, Path(mount_point))
    return v2


def own_group(h: Hierarchy, pid: int | str = "self") -> Path | None:
    """The directory of `pid`'s group in hierarchy `h`."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if (h.version == 1 and "memory" in controllers.split(",")) or (h.version == 2 and parts[0] == "0"):
            d = h.root / rel.lstrip("/")
            return d if d.is_dir() else None
    return None


def _parent_ok(h: Hierarchy, parent: Path) -> bool:
    if not os.access(parent, os.W_OK):
        return False
    if h.version == 1:
        return True
    # v2: children only get memory.* files when the parent hands the controller down.
    try:
        if "memory" in (parent / "cgroup.subtree_control").read_text().split():
            return True
        if parent != h.root:
            return False  # a group with processes cannot enable controllers for its children
        (parent / "cgroup.subtree_control").write_text("+memory")
        return True
    except OSError:
        return False


def _pick_parent() -> tuple[Hierarchy | None, Path | None, str]:
    if not sys.platform.startswith("linux"):
        return None, None, f"memory cgroups need Linux (this is {sys.platform})"
    h = find_hierarchy()
    if h is None:
        return None, None, "no memory cgroup hierarchy is mounted (looked in /proc/self/mounts)"
    candidates = [own_group(h), h.root]
    for parent in candidates:
        if parent is not None and _parent_ok(h, parent):
            return h, parent, ""
    return (
        h,
        None,
        (
            f"no write access to the memory cgroups under {h.root} (cgroup v{h.version}); "
            "run as root or in a delegated cgroup"
        ),
    )


def available() -> tuple[bool, str]:
    """(True, where groups will be made) or (False, why not). Cheap; creates nothing."""
    h, parent, why = _pick_parent()
    if parent is None:
        return False, why
    return True, f"cgroup v{h.version} under {parent}"


def _read_int(path: Path) -> int | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    if raw == "max":
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """'key value' lines (memory.events, memory.oom_control, memory.stat)."""
    out = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


class MemoryCgroup:
    """One memory cgroup. `create` makes it; `remove` (or leaving the `with` block) deletes it."""

    def __init__(self, path: Path, version: int):
        self.path = Path(path)
        self.version = version
        self.removed = False

    def __repr__(self) -> str:
        return f"MemoryCgroup({str(self.path)!r}, v{self.version})"

    @property
    def name(self) -> str:
        return self.path.name

    # --- life cycle ---
    @classmethod
    def create(cls, name: str, limit_bytes: int) -> MemoryCgroup:
        """Make group `name` with a hard limit of `limit_bytes` (RAM + swap). Usable as a context
        manager that removes the group. Raises CgroupUnavailable without the rights."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"cgroup name must be a plain directory name, got {name!r}")
        if limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be > 0, got {limit_bytes}")
        h, parent, why = _pick_parent()
        if parent is None:
            raise CgroupUnavailable(f"memory cgroup unavailable: {why}")
        path = parent / name
        try:
            path.mkdir()
        except FileExistsError:
            cg = cls(path, h.version)
            if cg.pids():  # a live group of that name: do not steal it
                raise CgroupUnavailable(f"memory cgroup {path} exists and has processes; choose another name") from None
        except OSError as e:
            raise CgroupUnavailable(f"memory cgroup unavailable: cannot create {path}: {e.strerror}") from None
        cg = cls(path, h.version)
        try:
            cg.set_limit(limit_bytes)
        except OSError as e:
            cg.remove()
            raise CgroupUnavailable(
                f"memory cgroup unavailable: cannot set the limit of {path}: {e.strerror}"
            ) from None
        return cg

    def set_limit(self, limit_bytes: int) -> None:
        limit_bytes = int(limit_bytes)
        if self.version == 1:
            memsw = self.path / "memory.memsw.limit_in_bytes"
            # memsw must stay >= the RAM limit: when lowering, RAM first; when raising, memsw first.
            current = _read_int(self.path / "memory.limit_in_bytes") or 0
            if memsw.exists() and limit_bytes > current:
                _write_quiet(memsw, limit_bytes)
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            if memsw.exists():
                _write_quiet(memsw, limit_bytes)
            # Charges made before `add` follow the process in (anonymous pages; v1 only).
            _write_quiet(self.path / "memory.move_charge_at_immigrate", 1)
        else:
            (self.path / "memory.max").write_text(str(limit_bytes))
            _write_quiet(self.path / "memory.swap.max", 0)

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the group; its future children follow."""
        procs = self.path / "cgroup.procs"
        try:
            procs.write_text(str(pid))
        except OSError as e:
            if e.errno == errno.ENOMEM and self.version == 1:
                # Its existing memory does not fit under the limit: move it without the charges.
                _write_quiet(self.path / "memory.move_charge_at_immigrate", 0)
                procs.write_text(str(pid))
            elif e.errno == errno.ESRCH:
                raise ProcessLookupError(pid) from None
            else:
                raise

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def remove(self, timeout_s: float = 2.0) -> None:
        """Move any processes left to the parent group and delete the group. Idempotent."""
        if self.removed:
            return
        deadline = time.monotonic() + timeout_s
        parent_procs = self.path.parent / "cgroup.procs"
        while True:
            for pid in self.pids():
                _write_quiet(parent_procs, pid)
            try:
                self.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # EBUSY: a process is still exiting; give the kernel a moment.
                if e.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.removed = True

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- readings (bytes) ---
    def limit(self) -> int | None:
        if self.version == 1:
            v = _read_int(self.path / "memory.limit_in_bytes")
            return None if v is None or v >= UNLIMITED_V1 else v
        return _read_int(self.path / "memory.max")

    def usage(self) -> int | None:
        """Current charge: anonymous memory plus page cache of the group."""
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return _read_int(self.path / name)

    def peak(self) -> int | None:
        """Highest charge since creation (None on v2 kernels older than 5.19, without memory.peak)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return _read_int(self.path / name)

    def oom_kills(self) -> int:
        """Processes the kernel OOM-killed in this group because of its limit."""
        if self.version == 1:
            return _read_keyed(self.path / "memory.oom_control").get("oom_kill", 0)
        return _read_keyed(self.path / "memory.events").get("oom_kill", 0)

    def anon_bytes(self) -> int | None:
        """Anonymous memory of the group (memory.stat), the part a RAM budget bounds."""
        stat = _read_keyed(self.path / "memory.stat")
        value = stat.get("rss" if self.version == 1 else "anon")
        return value


def _write_quiet(path: Path, value) -> bool:
    try:
        path.write_text(str(value))
        return True
    except OSError:
        return False


class CgroupRun(NamedTuple):
    returncode: int
    peak_bytes: int | None
    """The group's peak charge (anonymous + page cache)."""
    oom_killed: bool


def run_in_cgroup(
    cmd: Sequence[str], limit_bytes: int, *, name: str | None = None, timeout: float | None = None, **popen_kwargs
) -> CgroupRun:
    """Run `cmd` from its first instruction inside a fresh memory cgroup capped at `limit_bytes`;
    returns (returncode, peak_bytes, oom_killed). Extra keyword arguments go to subprocess.Popen
    (cwd, env, stdout...). Raises CgroupUnavailable without the rights, subprocess.TimeoutExpired
    after killing the command when `timeout` runs out."""
    name = name or f"odyssey-run-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    with MemoryCgroup.create(name, limit_bytes) as cg:
        procs = str(cg.path / "cgroup.procs")

        def enter_group() -> None:  # runs in the child between fork and exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        proc = subprocess.Popen(list(cmd), preexec_fn=enter_group, **popen_kwargs)
        try:
            returncode = proc.wait(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        oom = cg.oom_kills() > 0
        if not oom and returncode == -9 and cg.version == 1:
            oom = _read_int(cg.path / "memory.failcnt") not in (None, 0)  # kernels without oom_kill
        return CgroupRun(returncode, cg.peak(), oom)
