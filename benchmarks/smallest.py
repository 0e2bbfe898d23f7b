"""The smallest memory cgroup a command runs in, found by bisection, and the choice of the fastest
configuration. Pure logic: the runner is a function of the budget (tests give a fake one).

The search brackets the answer between a budget known (or assumed) too small and one where the
command ran, and halves the bracket until it is narrower than the resolution (~256 MiB) or the
time left cannot hold another attempt (each attempt is assumed to take as long as the last one).
The lower bound is not run: it is a floor nothing can run at (the weights' bytes, or the peak
anonymous memory the command needed when memory was no limit: without swap, anonymous pages
cannot be reclaimed, so a cgroup below them kills it). The upper bound is the budget of the
measurement run; an optional first guess (its cgroup peak, rounded up) is tried before halving,
since the answer usually lies just below it.

Every failure counts as "too small" (an OOM kill, or a crash the pressure caused); the errors are
kept with each attempt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

from common import GIB, MIB

RESOLUTION = 256 * MIB


def align_up(n: int, step: int) -> int:
    """`n` rounded up to a multiple of `step`."""
    return -(-int(n) // step) * step


def midpoint(lo: int, hi: int, step: int = 16 * MIB) -> int:
    """The middle of (lo, hi), on a `step` boundary strictly inside the bracket when there is one."""
    mid = (lo + hi) // 2 // step * step
    if mid <= lo:
        mid = lo + step
    return min(mid, hi)


def bisect_budget(
    runner: Callable[[int], object],
    lo_bytes: int,
    hi_bytes: int,
    resolution_bytes: int = RESOLUTION,
    deadline: float | None = None,
    first_guess: int | None = None,
    last_seconds: float = 0.0,
    progress=print,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """The smallest budget in (lo_bytes, hi_bytes] at which `runner(budget)` succeeds, to within
    `resolution_bytes`, `hi_bytes` having run already (the measurement run: not repeated).
    `runner` returns an object with `ok`, `oom_killed`, `error`, `seconds` and `peak_bytes` (an
    Attempt). `deadline` is a `clock()` time: no attempt starts when the time left is shorter than
    the last attempt took (`last_seconds` for the first).

    Returns {"smallest_ok_bytes", "largest_failed_bytes" (None: the floor, never run),
    "lo_bytes", "hi_bytes", "resolution_bytes", "resolved" (the bracket is within the resolution),
    "stopped" (why it ended early, or ""), "attempts" ([asdict(attempt)...])}."""
    ok_b, fail_b = int(hi_bytes), int(lo_bytes)
    failed_run: int | None = None
    attempts = []
    stopped = ""
    est = float(last_seconds)
    guess = first_guess if first_guess and fail_b < first_guess < ok_b else None
    while ok_b - fail_b > resolution_bytes:
        if deadline is not None and clock() + est > deadline:
            stopped = "time limit of the benchmark reached"
            break
        b = int(guess) if guess else midpoint(fail_b, ok_b)
        guess = None
        a = runner(b)
        attempts.append(asdict(a) if hasattr(a, "__dataclass_fields__") else dict(vars(a)))
        est = max(float(getattr(a, "seconds", 0.0) or 0.0), 0.0)
        how = "ran" if a.ok else ("OOM-killed" if a.oom_killed else f"failed: {a.error}")
        progress(f"    {b / GIB:6.2f} GiB: {how}")
        if a.ok:
            ok_b = b
        else:
            fail_b = failed_run = b
    return {
        "smallest_ok_bytes": ok_b,
        "largest_failed_bytes": failed_run,
        "lo_bytes": int(lo_bytes),
        "hi_bytes": int(hi_bytes),
        "resolution_bytes": int(resolution_bytes),
        "resolved": ok_b - fail_b <= resolution_bytes,
        "stopped": stopped,
        "attempts": attempts,
    }


def search_floor(weights_bytes: int, peak_anon_bytes: int | None, swap: bool) -> int:
    """The lower bound of a search: the weights' bytes, raised to the peak anonymous memory of the
    unlimited run where there is no swap (anonymous pages cannot leave RAM then)."""
    floor = int(weights_bytes)
    if peak_anon_bytes and not swap:
        floor = max(floor, int(peak_anon_bytes))
    return floor


def swap_present(path: str = "/proc/swaps") -> bool:
    """Whether any swap is active (a header line only: none)."""
    try:
        with open(path) as f:
            return len([ln for ln in f.read().splitlines() if ln.strip()]) > 1
    except OSError:
        return False


def fastest(rows: Sequence[dict], key: str = "step_s") -> dict | None:
    """The row with the smallest `key` among those that ran (status "runs" and a number); None
    when none did. A configuration that failed is never chosen, however fast its partial figure."""
    ran = [r for r in rows if r.get("status") == "runs" and isinstance(r.get(key), int | float) and r[key] > 0]
    return min(ran, key=lambda r: r[key]) if ran else None
