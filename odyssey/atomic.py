"""Crash-safe file writes: a temporary name in the same directory, flushed, fsynced, renamed.

A crash at any moment leaves either the old file or the new one under the final name, never a
half-written one. A temporary name says what it will become and who is writing it:
`.NAME.odyssey-COMMAND-PID.RANDOM.tmp` (COMMAND as set by `set_command`, left out when unset), so
a later run recognises a leftover of a killed one (its process is gone) and removes it
(`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_COMMAND = ""  # the command named in temporary names (set_command), "" for none
_TEMP_RE = re.compile(
    r"^\.(?P<target>.+)\.odyssey-(?:(?P<command>[a-z][a-z0-9-]*?)-)?(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp$"
)


def set_command(name: str) -> None:
    """Name the running command (e.g. "export") in the temporary names this process makes."""
    global _COMMAND
    _COMMAND = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")


def temp_prefix(name: str) -> str:
    """The start of a temporary name for the final name `name`: `.NAME.odyssey-COMMAND-PID.`"""
    who = f"{_COMMAND}-{os.getpid()}" if _COMMAND else str(os.getpid())
    return f".{name}.odyssey-{who}."


def parse_temp_name(name: str) -> tuple[str, str | None, int] | None:
    """(final name, command or None, pid) of an Odyssey temporary name, else None. The aside
    directory of `atomic_dir` (`FINAL.old`) is reported as FINAL."""
    m = _TEMP_RE.match(name)
    if m is None:
        return None
    target = m["target"]
    return (target[: -len(".old")] if target.endswith(".old") else target), m["command"], int(m["pid"])


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not: it is dead, only not yet reaped)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OverflowError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def stale_temps(directory: str | os.PathLike, targets=None) -> list[Path]:
    """Odyssey temporary files and directories in `directory` left by a process that is gone,
    whose final name is in `targets` (a collection of names, or a predicate on a name; None: any)."""
    directory = Path(directory)
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        parsed = parse_temp_name(name)
        if parsed is None or pid_alive(parsed[2]):
            continue
        if targets is None or (targets(parsed[0]) if callable(targets) else parsed[0] in targets):
            found.append(directory / name)
    return found


def remove_stale_temps(directory: str | os.PathLike, targets=None) -> list[str]:
    """Remove what `stale_temps` finds; returns the names removed."""
    removed = []
    for p in stale_temps(directory, targets):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p.name)
    return removed


def _umask_mode(base: int = 0o666) -> int:
    # mkstemp/mkdtemp create 0600/0700; a finished file or directory gets the usual mode (base
    # 0666 or 0777 minus the umask): exports and checkpoints are read by other programs and users.
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path for a writer that wants a file name (torch.save, a library).

    The caller writes the file at the yielded path; on clean exit it is fsynced and renamed.
    `durable=False` skips the fsyncs: still atomic (old or new file, never half), but a crash may
    lose the new file. For state rewritten every fraction of a second, like a heartbeat.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _umask_mode())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _umask_mode())  # a library may have re-created the file as 0600
        if durable:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp_path, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """Open a temporary file beside `path`; on clean exit flush, fsync and rename it to `path`.

    On an exception the temporary file is removed and `path` is untouched.
    """
    with atomic_path(path, durable) as tmp:
        with open(tmp, mode) as f:
            yield f


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on clean exit it is synced and replaces
    `final` (an old `final` is moved aside first and deleted after); on error it is removed and
    `final` is untouched. Files inside are written by the caller (durably, e.g. with atomic_path)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), suffix=".tmp", dir=final.parent))
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        fsync_dir(tmp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(f"{final.name}.old"), suffix=".tmp", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def flocked(directory: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `directory` (flock on the directory itself: no lock file to leave
    behind), held for the `with` block; no lock where the platform or the filesystem has none.
    Processes sharing a cache directory (the probe, GGUF checksum records, GGUF tokenizers) take
    turns with it."""
    fd = None
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    with atomic_open(path, "wb", durable) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, durable: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), durable)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2, durable: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", durable)


def existing_parent(path: str | os.PathLike) -> Path:
    """`path` made absolute, or its nearest ancestor that exists: where a file about to be created
    there will live (the filesystem whose free space a writer checks first)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return p
