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
from pathlib import Path
from typing import IO, Iterator


def _umask_mode() -> int:
    # mkstemp creates files 0600; a finished file gets the usual mode (0666 minus the umask).
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


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


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    with atomic_open(path, "wb", durable) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, durable: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), durable)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2, durable: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", durable)
