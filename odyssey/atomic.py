"""Crash-safe file writes: a temporary name in the same directory, flushed, fsynced, renamed.

A crash at any moment leaves either the old file or the new one under the final name, never a
half-written one. Temporary names end in `.tmp` (plus a random part) so `verify` and cleanups can
recognise leftovers.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        fsync_dir(tmp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", suffix=".tmp", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
