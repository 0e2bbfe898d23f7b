"""Page-in benchmark on the 1.2B store: how fast layers come from disk into RAM, against the disk's
raw sequential read of the same bytes, measured side by side in one run.

1. strategies  the table of `odyssey bench pagein` (odyssey/bench.py): raw read, mmap, mmap with
               WILLNEED, the pager (pread) and the pager with O_DIRECT, cold and warm page cache.
2. grid        the pager (buffered preadv, page cache dropped) against its slot count (1, 2, 3, 4)
               and its read size per preadv call (1, 4, 16, 64 MiB), cold. Each cell is paired
               with a raw read (16 MiB reads, the disk's limit) timed just before it, so the ratio
               compares two readings taken seconds apart, not minutes.

    .venv/bin/python benchmarks/pagein.py [--model STORE] [--repeats 1] [--out-dir benchmarks/results]

Writes pagein-strategies.{json,md,png} (odyssey.bench's writers), pagein-grid.{json,md,png}.
Timings on a shared machine are noisy: read the ratios, not the absolute MB/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SLOTS = (1, 2, 3, 4)
READ_MIB = (1, 4, 16, 64)


def grid(store_dir: Path, slots=SLOTS, read_mib=READ_MIB, repeats: int = 1, progress=print) -> dict:
    """Cold pager throughput for every (slots, read size); each cell the best of `repeats`, paired
    with the best raw read of the same repeats."""
    from odyssey import bench
    from odyssey.pager import READ_CHUNK
    from odyssey.store import Store

    store = Store.open(store_dir)
    total = store.total_bytes()
    rows = []
    for n in slots:
        for mib in read_mib:
            raw_s, pager_s = [], []
            for _ in range(repeats):
                bench._drop_all(store)
                raw_s.append(bench.raw_read(store))
                bench._drop_all(store)
                pager_s.append(_pager_cold(store, n, mib << 20))
            raw_best, pager_best = min(raw_s), min(pager_s)
            row = {
                "slots": n,
                "read_mib": mib,
                "mb_s": round(total / 1e6 / pager_best, 1),
                "raw_mb_s": round(total / 1e6 / raw_best, 1),
                "ratio_to_raw": round(raw_best / pager_best, 3),
                "default": n == bench.DEFAULT[1] and (mib << 20) == READ_CHUNK,
            }
            rows.append(row)
            progress(
                f"  slots {n}  read {mib:3d} MiB  {row['mb_s']:7.0f} MB/s  raw {row['raw_mb_s']:7.0f} MB/s  "
                f"x{row['ratio_to_raw']:.2f}" + ("   <- default" if row["default"] else "")
            )
    bench._drop_all(store)
    return {"model": str(store_dir), "bytes": total, "units": len(store.units), "repeats": repeats, "rows": rows}


def _pager_cold(store, slots: int, read_bytes: int) -> float:
    """Seconds for the pager to hand out every unit once, reading `read_bytes` per preadv."""
    from odyssey.pager import Pager

    with Pager(store, slots=slots, read_chunk=read_bytes, drop_cache=True) as pager:
        t0 = time.perf_counter()
        pager.prefetch(store.page_units())  # layers, and the embedding and head in row blocks
        for unit in store.page_units():
            res = pager.get(unit)
            for t in res.tensors.values():  # the consumer touches the bytes
                t.view(-1)[-1].item()
            pager.release(res)
        return time.perf_counter() - t0


def grid_table(result: dict) -> str:
    rows = [
        (
            r["slots"],
            r["read_mib"],
            f"{r['mb_s']:.0f}",
            f"{r['raw_mb_s']:.0f}",
            f"{r['ratio_to_raw']:.2f}",
            "yes" if r["default"] else "",
        )
        for r in result["rows"]
    ]
    return common.markdown_table(
        ["slots", "read MiB", "pager MB/s", "raw MB/s (same moment)", "x raw", "default"], rows, "rrrrrc"
    )


def grid_png(result: dict, path: Path):
    plt = common.pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for n in sorted({r["slots"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["slots"] == n]
        ax1.plot([r["read_mib"] for r in rs], [r["mb_s"] for r in rs], marker="o", label=f"{n} slot(s)")
        ax2.plot([r["read_mib"] for r in rs], [r["ratio_to_raw"] for r in rs], marker="o", label=f"{n} slot(s)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("read size per preadv (MiB)")
        ax.legend(fontsize=8)
    ax1.set_ylabel("pager MB/s (cold)")
    ax2.set_ylabel("pager / raw read (same moment)")
    ax2.axhline(1.0, color="#d62728", lw=0.8)
    ax1.set_title("Pager throughput, cold page cache")
    ax2.set_title("Ratio to the disk's raw sequential read")
    return common.save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="store directory (default: the 1.2B under .cache/bench, created if missing)")
    p.add_argument("--repeats", type=int, default=2, help="runs per row of the strategies table; the best is kept")
    p.add_argument(
        "--grid-repeats",
        type=int,
        default=1,
        help="runs per grid cell (each already paired with its own raw read); the best is kept",
    )
    p.add_argument("--slots", default=",".join(map(str, SLOTS)))
    p.add_argument("--read-mib", default=",".join(map(str, READ_MIB)))
    p.add_argument("--out-dir", default=str(common.RESULTS))
    args = p.parse_args(argv)
    from odyssey import bench

    model = Path(args.model) if args.model else common.ensure_store("odyssey-1.2b")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mach = common.machine()
    t0 = time.perf_counter()

    print(f"page-in strategies on {model} (cold: page cache dropped before each run; best of {args.repeats})")
    strat = bench.run(str(model), bench.STRATEGIES, (1, 2, 3), repeats=args.repeats)
    strat["machine_detail"] = mach
    print(bench.table(strat))
    for path in bench.write_outputs(strat, out / "pagein-strategies.json"):
        print(f"wrote {path}")

    slots = [int(x) for x in args.slots.split(",")]
    read_mib = [int(x) for x in args.read_mib.split(",")]
    print(
        f"\npager grid on {model}: slots x read size, cold, each cell paired with a raw read "
        f"(best of {args.grid_repeats})"
    )
    g = grid(model, slots, read_mib, repeats=args.grid_repeats)
    g.update(machine=mach, date=common.today(), seconds=round(time.perf_counter() - t0, 1))
    table = grid_table(g)
    print(table)
    caption = (
        f"Pager throughput against slot count and read size, cold, {g['bytes'] / 1e6:,.0f} MB in "
        f"{g['units']} shards; raw = plain 16 MiB sequential reads of the same files timed just "
        f"before each cell (best of {args.grid_repeats})."
    )
    common.write_results(
        out, "pagein-grid", g, "Page-in: slots and read size", [(caption, table)], chart=lambda path: grid_png(g, path)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
