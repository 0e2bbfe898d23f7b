"""What reading the store costs the matmuls on this machine: matmul GFLOP/s at the model's largest
projection (odyssey.probe's shape, the compute dtype `auto` trains in) alone, and while a thread
streams the store's units from disk as the pager does (O_DIRECT, READ_CHUNK a preadv call), the
two taking turns for --rounds rounds.

A process's CPU time does not show this cost: on a VM the host may serve the guest's disk reads on
the cores the guest's vCPUs run on, and the guest sees it as steal time (the eighth figure of
/proc/stat's cpu line). Measured on the 2-core AVX2-only EPYC (2026-12-02, a Firecracker guest,
kernel 6.18.44-fc): fp32 matmul 157-160 GFLOP/s alone, 91-102 while the store streamed at
0.5-1.8 GB/s, steal rising from ~0 to ~30 % of the two cores; about 0.5-1.5 core-seconds lost per
GB read. A 1.2B LoRA step in a 1 GiB cgroup reads 4.3 GB of weights and writes and reads 1.4 GB
of spilled activations: seconds of the two cores a step that no kernel timing counts.

With the cores idle the same reads cause almost no steal (0.04-0.22 s of a 4 s window at 670-943
MB/s, against 2.3-2.6 s beside the matmul): the host serves them on a core the guest is not using.
Several readers at once (`--readers`, the units shared between them: more requests in flight) did
not lower the cost: one reader 742-807 MB/s beside the matmul and 0.71-1.05 core-seconds lost per
GB, four 793-855 MB/s and 0.65-0.88, in runs minutes apart on a drifting machine
(benchmarks/results/io-tax-avx2-only-{1reader,4readers}.md; an earlier try with 1, 2, 4 and 8
readers: 404-623 MB/s, 0.35-1.93 core-seconds a GB, no order). The tax is the host's work for the
bytes while the guest keeps both cores busy, so what lowers it is fewer bytes read.

    python benchmarks/io_tax.py [--model STORE] [--rounds 3] [--seconds 4] [--readers 1]
                                [--out benchmarks/results/io-tax]

Writes OUT.json and OUT.md: per round the matmul alone and beside the readers, their MB/s, the
steal time, and the core-seconds the matmuls lost per GB read ((1 - beside / alone) x seconds
x threads / GB), then the readers alone with the cores idle (MB/s, steal); then the medians.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

STEAL = 7  # /proc/stat "cpu" line: user nice system idle iowait irq softirq steal ...


def steal_jiffies() -> int | None:
    """The machine's steal time so far, in clock ticks (None where /proc/stat has no such field)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        return int(fields[STEAL])
    except (OSError, IndexError, ValueError):
        return None


class StoreStreamer:
    """A thread reading `store`'s units from disk, in turn and over again, O_DIRECT in the pager's
    request size, until stopped; `nbytes` read so far. Where the file system refuses O_DIRECT
    (tmpfs) it reads buffered, as the pager does, and `direct` says so."""

    def __init__(self, store, part: int = 0, parts: int = 1):
        from odyssey.pager import READ_CHUNK, _aligned

        spans = [(store.page(u).path, *_aligned(store.page(u))) for u in store.page_units()]
        self.spans = spans[part::parts] or spans  # `parts` streamers share the units between them
        self.chunk = READ_CHUNK
        self.nbytes = 0
        self.direct = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        buf = mmap.mmap(-1, self.chunk)
        view = memoryview(buf)
        try:
            while not self._stop.is_set():
                for path, a0, size in self.spans:
                    fd = self._open(path)
                    try:
                        off = 0
                        while off < size and not self._stop.is_set():
                            got = os.preadv(fd, [view[: min(self.chunk, size - off)]], a0 + off)
                            if got <= 0:
                                break
                            off += got
                            self.nbytes += got
                    finally:
                        os.close(fd)
                    if self._stop.is_set():
                        break
        finally:
            view.release()
            buf.close()

    def _open(self, path) -> int:
        if self.direct:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False
        return os.open(path, os.O_RDONLY)

    def __enter__(self) -> StoreStreamer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def matmul_gflops(x, w, seconds: float) -> float:
    """GFLOP/s of x @ w repeated for `seconds` (after one warm-up product)."""
    x @ w
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x @ w
        n += 1
    return 2 * x.shape[0] * x.shape[1] * w.shape[1] * n / (time.perf_counter() - t0) / 1e9


class Readers:
    """`k` StoreStreamers at once, the store's units shared between them (k requests in flight)."""

    def __init__(self, store, k: int):
        self.streamers = [StoreStreamer(store, i, k) for i in range(k)]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.streamers)

    @property
    def direct(self) -> bool:
        return all(s.direct for s in self.streamers)

    def __enter__(self) -> Readers:
        for s in self.streamers:
            s.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for s in self.streamers:
            s.__exit__(*exc)


def one_round(store, x, w, seconds: float, threads: int, readers: int = 1) -> dict:
    """The matmul alone, then beside the readers, for `seconds` each; then the readers alone (the
    cores idle) for `seconds`: their rate and the steal time they cause by themselves."""
    s0 = steal_jiffies()
    alone = matmul_gflops(x, w, seconds)
    s1 = steal_jiffies()
    t0 = time.perf_counter()
    with Readers(store, readers) as reader:
        beside = matmul_gflops(x, w, seconds)
        s2 = steal_jiffies()
    gb = reader.nbytes / 1e9
    wall = time.perf_counter() - t0
    s3 = steal_jiffies()
    t1 = time.perf_counter()
    with Readers(store, readers) as idle:
        time.sleep(seconds)
        s4 = steal_jiffies()
    idle_wall = time.perf_counter() - t1
    lost = max(1.0 - beside / alone, 0.0) * seconds * threads
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "alone_gflops": round(alone, 1),
        "beside_gflops": round(beside, 1),
        "ratio": round(beside / alone, 3),
        "read_mb_s": round(reader.nbytes / wall / 1e6, 1),
        "read_gb": round(gb, 3),
        "steal_s_alone": None if None in (s0, s1) else round((s1 - s0) / tick, 2),
        "steal_s_beside": None if None in (s1, s2) else round((s2 - s1) / tick, 2),
        "core_s_lost_per_gb": round(lost / gb, 2) if gb else None,
        "direct": reader.direct,
        "read_alone_mb_s": round(idle.nbytes / idle_wall / 1e6, 1),
        "steal_s_read_alone": None if None in (s3, s4) else round((s4 - s3) / tick, 2),
    }


def run(model: Path, rounds: int, seconds: float, readers: int = 1) -> dict:
    import torch

    from odyssey.dtypes import compute_dtype_name
    from odyssey.pager import READ_CHUNK
    from odyssey.probe import shape_of, shape_text
    from odyssey.store import Store

    store = Store.open(model)
    shape = shape_of(store.config, 512)
    dtype_name = compute_dtype_name("auto", store.dtype, store.config)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    tokens, d_in, d_out = shape
    x, w = torch.randn(tokens, d_in, dtype=dtype), torch.randn(d_in, d_out, dtype=dtype)
    threads = torch.get_num_threads()
    got = []
    for i in range(rounds):
        r = one_round(store, x, w, seconds, threads, readers)
        got.append({"round": i, **r})
        print(
            f"round {i}: {dtype_name} matmul {r['alone_gflops']:,.0f} GFLOP/s alone, {r['beside_gflops']:,.0f} "
            f"beside the reading at {r['read_mb_s']:,.0f} MB/s (x{r['ratio']:.2f}); "
            f"{r['core_s_lost_per_gb']} core-s lost per GB; the readers alone {r['read_alone_mb_s']:,.0f} MB/s, "
            f"steal {r['steal_s_read_alone']} s",
            flush=True,
        )

    def med(key):
        vals = [r[key] for r in got if r[key] is not None]
        return round(statistics.median(vals), 3) if vals else None

    return {
        "machine": common.machine(),
        "date": common.today(),
        "model": str(model),
        "shape": shape_text(shape),
        "dtype": dtype_name,
        "threads": threads,
        "seconds": seconds,
        "read_chunk_mib": READ_CHUNK >> 20,
        "readers": readers,
        "rounds": got,
        "median": {
            k: med(k)
            for k in ("alone_gflops", "beside_gflops", "ratio", "read_mb_s", "core_s_lost_per_gb", "read_alone_mb_s")
        },
    }


def sections(result: dict) -> list[tuple[str, str]]:
    m, med = result["machine"], result["median"]
    caption = (
        f"**Machine:** {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch threads {result['threads']}, "
        f"Linux {m.get('kernel', '?')}. Matmul {result['shape']} in {result['dtype']} for {result['seconds']:g} s "
        f"alone, then {result['seconds']:g} s while {readers_text(result.get('readers', 1))} the store's units "
        f"{'O_DIRECT' if all(r['direct'] for r in result['rounds']) else 'buffered (no O_DIRECT here)'} "
        f"in {result['read_chunk_mib']} MiB requests, "
        f"{len(result['rounds'])} rounds"
        + (", then the same reading with the cores idle" if "read_alone_mb_s" in result["rounds"][0] else "")
        + f". Median: x{common.fmt(med['ratio'])} the matmul's rate, "
        f"{common.fmt(med['core_s_lost_per_gb'])} core-seconds lost per GB read."
    )
    idle = "read_alone_mb_s" in result["rounds"][0]  # (results before 2026-12-02 lack it)
    headers = ["round", "alone GFLOP/s", "beside GFLOP/s", "ratio", "read MB/s", "steal s alone", "steal s beside"]
    headers.append("core-s lost / GB")
    if idle:
        headers += ["read MB/s, cores idle", "steal s, cores idle"]
    rows = [
        (
            str(r["round"]),
            common.fmt(r["alone_gflops"], 0),
            common.fmt(r["beside_gflops"], 0),
            common.fmt(r["ratio"]),
            common.fmt(r["read_mb_s"], 0),
            common.fmt(r["steal_s_alone"]),
            common.fmt(r["steal_s_beside"]),
            common.fmt(r["core_s_lost_per_gb"]),
            *((common.fmt(r["read_alone_mb_s"], 0), common.fmt(r["steal_s_read_alone"])) if idle else ()),
        )
        for r in result["rounds"]
    ]
    return [(caption, common.markdown_table(headers, rows, "l" + "r" * (len(headers) - 1)))]


def readers_text(k: int) -> str:
    return "a thread reads" if k == 1 else f"{k} threads (a share of the units each) read"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="store directory (default: the 1.2B under .cache/bench, created if missing)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0, help="of each measurement")
    p.add_argument("--readers", type=int, default=1, help="threads reading at once (requests in flight)")
    p.add_argument("--out", default=str(common.RESULTS / "io-tax"), help="OUT.json and OUT.md")
    args = p.parse_args(argv)
    model = Path(args.model) if args.model else common.ensure_store("odyssey-1.2b")
    if args.readers < 1:
        p.error("--readers must be at least 1")
    result = run(model, args.rounds, args.seconds, args.readers)
    out = Path(args.out)
    common.write_results(out.parent, out.name, result, "What reading the store costs the matmuls", sections(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
