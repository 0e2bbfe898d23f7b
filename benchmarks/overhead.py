#!/usr/bin/env python3
"""What paging costs: the same LoRA steps on the same model (a) out-of-core, base layers paged from
disk, inside a memory cgroup of the budget, and (b) with every base weight resident in RAM
(the engine's ResidentPager), side by side in one run; plus tokens/s against the compute limit.

    python benchmarks/overhead.py                          # 1.2B, seq 512, r=16, 2 GiB, 3 steps
    python benchmarks/overhead.py --config nano --steps 5  # quick look

Each side runs in its own subprocess (`--worker paged|resident`), one warm-up step and then
`--steps` measured steps; rounds alternate paged, resident, paged, ... so drift on a noisy machine
hits both. The compute limit is the matmul FLOP/s of the compute dtype measured in the same run,
divided by 6 x parameters FLOP per token (forward 2, input gradients 2, recompute 2: LoRA on a
frozen base needs no weight gradients of the base).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import MIB  # noqa: E402

TITLE = "Out-of-core overhead"  # of overhead.md and its README section


def worker(args) -> int:
    """One side: prints one JSON line {"step_s": [...], "peak_anon_mib": ...}."""
    import torch

    from odyssey.config import LoraSettings, TrainConfig
    from odyssey.data import BatchSampler, TokenData
    from odyssey.learners import LoraLearner
    from odyssey.runtime.memory import process_memory
    from odyssey.store import Store

    store = Store.open(args.model)
    cfg = TrainConfig(seq_len=args.seq_len, batch_size=1, lora=LoraSettings(r=args.r, alpha=2 * args.r))
    learner = LoraLearner(store, cfg, resident=args.worker == "resident")
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-4)
    sampler = BatchSampler(TokenData(args.data), "train", args.seq_len, 1, seed=0)
    times, peak, stall = [], 0.0, []
    for i in range(args.steps + 1):
        batch = sampler.next_batch()
        learner.take_stats(0.0)
        t0 = time.perf_counter()
        learner.step(batch, 1.0, None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        st = learner.take_stats(dt)
        peak = max(peak, process_memory().anon_bytes / MIB)
        if i:  # the first step warms up caches and the allocator
            times.append(dt)
            stall.append(st.stall_s)
    learner.close()
    print(json.dumps({"step_s": times, "stall_s": stall, "peak_anon_mib": peak}))
    return 0


def matmul_gflops(dtype: str, n: int = 1024, seconds: float = 2.0) -> float:
    from odyssey.dtypes import compute_dtype_info
    from odyssey.runtime.allocator import quiet_threads

    quiet_threads()  # as in the workers (spinning OpenMP threads distort a busy machine's figure)
    import torch

    dt = compute_dtype_info(dtype).torch()
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - t0) / 1e9


def run_side(side: str, store: Path, data: Path, args) -> dict:
    """One side's worker in a subprocess (the paged side in a memory cgroup of the budget when
    cgroups are available); its JSON line, with the cgroup's peak (MiB, None without a cgroup)."""
    from odyssey.runtime import cgroup

    cmd = [
        common.PYTHON,
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--model",
        str(store),
        "--data",
        str(data),
        "--steps",
        str(args.steps),
        "--seq-len",
        str(args.seq_len),
        "--r",
        str(args.r),
    ]
    budget = common.parse_budget(args.budget) if side == "paged" and cgroup.available()[0] else None
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / f"{side}.log"
        rc, peak, oom, _, _ = common.run_capped(cmd, budget, log)  # stdout and stderr both into the log
        out = log.read_text(errors="replace")
    if rc != 0:
        raise SystemExit(f"{side} worker failed (exit {rc}{', OOM-killed' if oom else ''}): {common.last_line(out)}")
    res = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    res["cgroup_peak_mib"] = None if peak is None else peak / MIB
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="odyssey-1.2b", help="model config under configs/ (store made when missing)")
    ap.add_argument("--model", help="an existing store instead of --config")
    ap.add_argument("--data", help="token data (default: the sample corpus under the cache)")
    ap.add_argument("--budget", default="2GiB", help="RAM budget of the paged side (a memory cgroup)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per side per round (after 1 warm-up)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=str(common.RESULTS / "overhead.json"))
    ap.add_argument("--worker", choices=["paged", "resident"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        from odyssey.runtime import allocator

        allocator.ensure([str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])])
        return worker(args)  # with the allocator and thread settings of the odyssey commands

    from odyssey.dtypes import compute_dtype_name
    from odyssey.store import Store

    store = Path(args.model) if args.model else common.ensure_store(args.config)
    data = Path(args.data) if args.data else common.ensure_data()
    opened = Store.open(store)
    params = opened.config.num_parameters()
    compute = compute_dtype_name("auto", opened.dtype, opened.config)  # what the workers' engine computes in
    sides = {"paged": [], "resident": []}
    for _ in range(args.rounds):
        for side in ("paged", "resident"):
            print(f"overhead: {side} side, {args.steps} steps + 1 warm-up ...", flush=True)
            sides[side].append(run_side(side, store, data, args))
    flops = {d: matmul_gflops(d) for d in ("fp32", "bf16")}
    paged = common.median([t for r in sides["paged"] for t in r["step_s"]])
    resident = common.median([t for r in sides["resident"] for t in r["step_s"]])
    tokens = args.seq_len
    limit_tps = flops[compute] * 1e9 / (6 * params)
    result = {
        "machine": common.machine(),
        "date": common.today(),
        "model": common.model_label(store),
        "parameters": params,
        "seq_len": args.seq_len,
        "r": args.r,
        "budget": args.budget,
        "steps": args.steps,
        "rounds": args.rounds,
        "compute_dtype": compute,
        "matmul_gflops": flops,
        "paged": sides["paged"],
        "resident": sides["resident"],
        "paged_step_s": paged,
        "resident_step_s": resident,
        "ratio": paged / resident,
        "paged_tokens_per_s": tokens / paged,
        "resident_tokens_per_s": tokens / resident,
        "compute_limit_tokens_per_s": limit_tps,
        "paged_peak_mib": max((r["cgroup_peak_mib"] or r["peak_anon_mib"]) for r in sides["paged"]),
        "resident_peak_anon_mib": max(r["peak_anon_mib"] for r in sides["resident"]),
    }
    n = args.steps * args.rounds
    table = common.markdown_table(
        ["side", "median step (s)", "tokens/s", "of compute limit", "peak memory (MiB)"],
        [
            [
                f"out-of-core (paged, in a {args.budget} cgroup)",
                common.fmt(paged),
                common.fmt(tokens / paged, 1),
                f"{100 * tokens / paged / limit_tps:.0f}%",
                common.fmt(result["paged_peak_mib"], 0),
            ],
            [
                "all base weights resident",
                common.fmt(resident),
                common.fmt(tokens / resident, 1),
                f"{100 * tokens / resident / limit_tps:.0f}%",
                common.fmt(result["resident_peak_anon_mib"], 0),
            ],
            ["ratio out-of-core / resident", common.fmt(paged / resident, 3), "", "", ""],
        ],
        "lrrrr",
    )
    notes = [
        f"{result['model']} model, LoRA r={args.r}, batch 1 x seq {args.seq_len}; medians of {n} steps per side "
        f"after a warm-up step, {args.rounds} round(s) alternating sides",
        f"compute limit: {compute} matmul {flops[compute]:.0f} GFLOP/s measured in this run / (6 x {result['model']} "
        f"FLOP per token) = {limit_tps:.1f} tokens/s (bf16 {flops['bf16']:.1f}, fp32 {flops['fp32']:.0f} GFLOP/s)",
        "paged peak: the cgroup's max usage (anonymous + page cache charged to it); resident: anonymous RSS",
        common.describe_machine(result["machine"]) + f"; {result['date']}",
    ]
    print(table)
    for line in notes:
        print("- " + line)
    out = Path(args.out)
    common.write_results(out.parent, out.stem, result, TITLE, [("", table)], notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
