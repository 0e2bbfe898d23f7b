"""Page-in benchmark: how fast each way of bringing a store's bytes into RAM runs, against the raw
sequential read of the same files (the disk's limit), measured side by side in one run.

Strategies:
- raw            plain large sequential reads of every shard into one reusable buffer (the limit)
- pread          the pager (its default): preadv into slots by a prefetch thread, page cache dropped
- pread-direct   the pager with O_DIRECT (no page cache, no copy)
- mmap           map each shard and touch every page (what safetensors' safe_open does)
- mmap-willneed  the same with madvise(WILLNEED) issued one shard ahead

Cold runs drop the store's pages from the page cache (posix_fadvise DONTNEED) before they start;
warm runs read the files once first and keep them cached.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
from pathlib import Path

import numpy as np

from odyssey.dtypes import PAGE_SIZE
from odyssey.pager import READ_CHUNK, Pager
from odyssey.store import Store, drop_cache, open_model

STRATEGIES = ("mmap", "mmap-willneed", "pread", "pread-direct")
DEFAULT = ("pread", 2)


def _files(store) -> list[Path]:
    """The files holding the model, in unit order: a store's shards, or the one GGUF file."""
    if not hasattr(store, "shards"):  # a GGUF file (odyssey.gguf.store)
        return [Path(store.path)]
    return [store.shards[u].path for u in store.units]


def _drop_all(store: Store) -> None:
    for path in _files(store):
        drop_cache(path)


def _warm_all(store: Store) -> None:
    buf = bytearray(READ_CHUNK)
    for path in _files(store):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def raw_read(store: Store) -> float:
    """Seconds to read every shard sequentially with 16 MiB reads into one buffer."""
    buf = bytearray(READ_CHUNK)
    t0 = time.perf_counter()
    for path in _files(store):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while os.readv(fd, [buf]):
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def pager_read(store: Store, slots: int, direct: bool, drop: bool) -> tuple[float, str | None]:
    with Pager(store, slots=slots, direct=direct, drop_cache=drop, verify=False) as pager:  # read speed alone
        t0 = time.perf_counter()
        pager.prefetch(store.page_units())  # layers, and the embedding and head in row blocks
        for unit in store.page_units():
            res = pager.get(unit)
            # touch one value per tensor: the consumer sees the bytes
            for t in res.tensors.values():
                getattr(t, "raw", t).view(-1)[-1].item()  # a GGUF matrix: its bytes
            pager.release(res)
        return time.perf_counter() - t0, pager.direct_fallback


def mmap_read(store: Store, willneed: bool) -> float:
    t0 = time.perf_counter()
    maps = []
    files = [open(p, "rb") for p in _files(store)]
    try:
        maps = [mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) for f in files]
        if willneed:
            maps[0].madvise(mmap.MADV_WILLNEED)
        for k, m in enumerate(maps):
            if willneed and k + 1 < len(maps):
                maps[k + 1].madvise(mmap.MADV_WILLNEED)
            a = np.frombuffer(m, dtype=np.uint8)
            int(a[::PAGE_SIZE].sum())  # one byte a page: every page faulted in
            del a
        return time.perf_counter() - t0
    finally:
        for m in maps:
            try:
                m.close()
            except BufferError:
                pass
        for f in files:
            f.close()


def run(
    store_dir: str, strategies=STRATEGIES, slots=(1, 2, 3), caches=("cold", "warm"), repeats: int = 1, progress=print
) -> dict:
    store = open_model(store_dir)
    total = store.total_bytes()
    rows = []
    raw_mb_s = {}
    notes = []
    for cache in caches:
        prepare = _drop_all if cache == "cold" else _warm_all

        def timed(fn, prepare=prepare):
            best = None
            for _ in range(repeats):
                prepare(store)
                s = fn()
                best = s if best is None or s < best else best
            return best

        raw_s = timed(lambda: raw_read(store))
        raw_mb_s[cache] = total / 1e6 / raw_s
        rows.append(
            dict(
                strategy="raw",
                slots=0,
                cache=cache,
                mb_s=round(raw_mb_s[cache], 1),
                ratio_to_raw=1.0,
                default=False,
                seconds=round(raw_s, 3),
            )
        )
        progress(f"  {cache:4s} raw            {raw_mb_s[cache]:8.0f} MB/s")
        for strategy in strategies:
            for n in slots if strategy.startswith("pread") else (1,):
                if strategy.startswith("pread"):
                    fallback = []

                    def fn(n=n, strategy=strategy, cache=cache, fallback=fallback):
                        s, fb = pager_read(store, n, strategy == "pread-direct", drop=(cache == "cold"))
                        fallback.append(fb)
                        return s

                    s = timed(fn)
                    if fallback and fallback[-1]:
                        notes.append(f"{strategy}: {fallback[-1]}")
                else:
                    s = timed(lambda strategy=strategy: mmap_read(store, strategy == "mmap-willneed"))
                mb_s = total / 1e6 / s
                row = dict(
                    strategy=strategy,
                    slots=n,
                    cache=cache,
                    mb_s=round(mb_s, 1),
                    ratio_to_raw=round(mb_s / raw_mb_s[cache], 3),
                    default=(strategy, n) == DEFAULT,
                    seconds=round(s, 3),
                )
                rows.append(row)
                progress(
                    f"  {cache:4s} {strategy:14s} slots {n}  {mb_s:8.0f} MB/s  x{row['ratio_to_raw']:.2f} of raw"
                    + ("   <- default" if row["default"] else "")
                )
        if cache == "warm":
            _drop_all(store)
    return {
        "model": str(store_dir),
        "bytes": total,
        "units": len(store.units),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "notes": sorted(set(notes)),
    }


def table(result: dict) -> str:
    lines = ["| cache | strategy | slots | MB/s | x raw | default |", "|---|---|---:|---:|---:|:---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['cache']} | {r['strategy']} | {r['slots'] or '-'} | {r['mb_s']:.0f} | "
            f"{r['ratio_to_raw']:.2f} | {'yes' if r['default'] else ''} |"
        )
    return "\n".join(lines)


def write_outputs(result: dict, out_json: Path | None) -> list[Path]:
    from odyssey import atomic

    written = []
    if out_json is None:
        return written
    out_json = Path(out_json)
    atomic.write_json(out_json, result)
    written.append(out_json)
    md = out_json.with_suffix(".md")
    atomic.write_text(
        md,
        f"Page-in throughput, {result['bytes'] / 1e6:,.0f} MB in {result['units']} shards, "
        f"{result['machine']}, {result['date']}\n\n{table(result)}\n",
    )
    written.append(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, values, colors = [], [], []
    for r in result["rows"]:
        labels.append(f"{r['strategy']}\n{('s' + str(r['slots'])) if r['slots'] else ''} {r['cache']}")
        values.append(r["mb_s"])
        colors.append("#d62728" if r["strategy"] == "raw" else ("#2ca02c" if r["default"] else "#1f77b4"))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=6)
    ax.set_ylabel("MB/s")
    ax.set_title("Odyssey page-in throughput (red: raw read, green: pager default)")
    fig.tight_layout()
    png = out_json.with_suffix(".png")
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, png)
    plt.close(fig)
    written.append(png)
    return written
