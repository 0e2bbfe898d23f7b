"""How the pager reads the store in a training run: O_DIRECT or through the page cache (`direct_io`).

Buffered reads (what the pager did alone before) copy every byte from the page cache into a slot,
then drop the cache's copy (posix_fadvise); the kernel's read-ahead keeps requests in flight.
O_DIRECT reads go from the disk into the slot: no copy and no page-cache pages to fill and drop,
but no read-ahead either. Measured on the 1.2B in a 1 GiB cgroup (2-core EPYC, virtio disk, 4.3
GB paged a step): reading the store costs 0.29 CPU s a GB buffered against 0.15 O_DIRECT, and the
run's system time fell from 19.3-22.3 s to 15.6-17.9 s (7 steps, three pairs), about 0.5 s of CPU
a step that the two cores' matmuls get back; but the same disk reads 760-875 MB/s O_DIRECT
against 1,260 buffered (cold). Where the step is compute-bound the CPU saved is what counts;
where page-in is the bound, read-ahead is. Neither figure counts what the host spends serving the
reads: on a VM that can be the guest's own cores, seen as steal time (benchmarks/io_tax.py; on the
2-core AVX2-only EPYC, a Firecracker guest, fp32 matmul ran at 0.54-0.72 of its rate while the
store streamed O_DIRECT, whatever the rate, 557-879 MB/s).

`auto` measures the store's O_DIRECT read rate (PROBE_BYTES from PROBE_UNITS units, about 0.1 s)
and reads O_DIRECT when that rate is at least MARGIN times what the step needs: the bytes the pager
reads a step over the step's compute time (spill.layer_compute_s: 4N FLOP a token at
STEP_EFFICIENCY of the matmul probe's rate; already ~20 % more than the 1.2B's steps at 1 GiB read,
4.3 GB in 10-11 s; the forward of a layer, half the compute, reads the whole layer, as backward
does). The reader never stalled a step at 806-1,210 MB/s against the ~475 MB/s so estimated. A
file system that refuses O_DIRECT (tmpfs) keeps buffered reads.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass

PROBE_BYTES = 96 << 20  # read this much of the store to time the disk
PROBE_UNITS = 3  # from the start of this many units spread over the store
MARGIN = 1.25  # O_DIRECT rate / the rate a step needs, at least


@dataclass(frozen=True)
class ReadChoice:
    direct: bool
    why: str  # one line for the start of a run ("" when nothing is paged a step)


def probe_direct(store, nbytes: int = PROBE_BYTES, units: int = PROBE_UNITS) -> float:
    """Bytes/s of O_DIRECT reads of `store`, in the pager's request size: `nbytes` in all, from
    the first bytes of `units` units spread over the store (one spot alone read 550-1,210 MB/s in
    one hour on a virtio disk; spots the host has cached read fast). Raises OSError where the
    file system refuses O_DIRECT."""
    from odyssey.dtypes import PAGE_SIZE
    from odyssey.pager import READ_CHUNK, _aligned

    pool = store.page_units()
    picks = [pool[round(i * (len(pool) - 1) / max(units - 1, 1))] for i in range(units)]
    picks = list(dict.fromkeys(picks))  # a store of fewer units than `units`
    each = max(nbytes // len(picks) // PAGE_SIZE, 1) * PAGE_SIZE  # O_DIRECT: whole pages
    chunk = min(READ_CHUNK, each)
    buf = mmap.mmap(-1, chunk)
    view = memoryview(buf)
    done, seconds = 0, 0.0
    try:
        for unit in picks:
            page = store.page(unit)
            a0, aligned = _aligned(page)
            size = min(aligned, each)
            fd = os.open(page.path, os.O_RDONLY | os.O_DIRECT)
            try:
                t0 = time.perf_counter()
                off = 0
                while off < size and (got := os.preadv(fd, [view[: min(chunk, size - off)]], a0 + off)) > 0:
                    off += got
                seconds += time.perf_counter() - t0
                done += off
            finally:
                os.close(fd)
    finally:
        view.release()
        buf.close()
    if done == 0:
        raise OSError(f"read nothing from {store.root}")
    return done / max(seconds, 1e-9)


def choose(setting: str, store, *, read_bytes: int, tokens: int, compute: str, probe=probe_direct) -> ReadChoice:
    """Whether the pager reads `store` O_DIRECT in a training run whose steps read `read_bytes`
    (the plan's steady-state page-in a step) of `tokens` tokens each, computed in `compute`
    ("bf16" | "fp32"). `on` / `off` as said; `auto` by the measured rate (module docstring)."""
    from odyssey.spill import layer_compute_s

    if setting == "off":
        return ReadChoice(False, "")
    if setting == "on":
        return ReadChoice(True, "page-in: O_DIRECT (direct_io=on)")
    if read_bytes <= 0:
        return ReadChoice(False, "")  # every unit pinned: read once, nothing paged a step
    cfg = store.config
    need = read_bytes / (cfg.num_hidden_layers * layer_compute_s(cfg, tokens, compute))
    try:
        rate = probe(store)
    except OSError as e:
        return ReadChoice(
            False, f"page-in: buffered (auto: the store's file system takes no O_DIRECT reads: {e.strerror or e})"
        )
    figures = f"the store reads {rate / 1e6:,.0f} MB/s O_DIRECT, a step needs ~{need / 1e6:,.0f}"
    if rate >= MARGIN * need:
        return ReadChoice(
            True, f"page-in: O_DIRECT (auto: {figures}; no page-cache copy; direct_io=off reads buffered)"
        )
    return ReadChoice(
        False, f"page-in: buffered (auto: {figures}, under {MARGIN}x: the kernel's read-ahead is worth its copy)"
    )
