"""Outputs never touch inputs: `check_apart` refuses, before anything is written, an output path
that is, lies inside or contains one of the command's inputs (`--force` does not change this).

Paths are compared twice: as real paths (symlinks resolved, `..` folded), and by identity
(device and inode) of every existing ancestor, so a bind mount, a hard-linked directory or a
case-insensitive filesystem cannot make one directory look like two.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from odyssey.errors import OdysseyError

Input = tuple[str, str | None, "str | os.PathLike | None"]  # (what, flag or None, path or None)


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def relation(out: str | os.PathLike, inp: str | os.PathLike) -> str | None:
    """ "is", "inside" (out lies inside inp), "contains" (out contains inp) or None."""
    ro, ri = _real(out), _real(inp)
    if ro == ri:
        return "is"
    if ri in ro.parents:
        return "inside"
    if ro in ri.parents:
        return "contains"
    if not ri.exists():
        return None
    for a in (ro, *ro.parents):  # the same directory under another name (bind mount, case-insensitive)
        if _same(a, ri):
            return "is" if a == ro else "inside"
    if ro.exists():
        for b in ri.parents:
            if _same(b, ro):
                return "contains"
    return None


def check_apart(out: str | os.PathLike, inputs: Iterable[Input], out_flag: str = "--out") -> None:
    """Refuse `out` if it is, lies inside or contains one of `inputs` ((what, flag, path) each;
    a None path is skipped): one line naming both and the fix."""
    for what, flag, path in inputs:
        if path is None:
            continue
        rel = relation(out, path)
        if rel is None:
            continue
        named = f"{flag} {path}" if flag else str(path)
        verb = {"is": "is", "inside": "lies inside", "contains": "contains"}[rel]
        raise OdysseyError(
            f"{out_flag} {out} {verb} the input {what} ({named}); an output must be apart from the inputs "
            f"(--force does not change this), choose another {out_flag}"
        )
