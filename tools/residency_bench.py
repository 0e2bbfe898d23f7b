"""Step time of a LoRA step with residency off (every unit paged, every layer recomputed) and on
(what the planner picks for --ram-budget), in one process, rounds interleaved so that a busy
machine slows both alike. Wall and CPU seconds (this process, all threads) per step, median.
`--kept-pinned` adds a third setting: the plan's kept layers pinned as well (what a kept layer
cost before its weights were saved as handles, engine.SavedWeights), to time what paging a kept
layer again in backward costs.

    python tools/residency_bench.py STORE [--seq-len 256] [--ram-budget 8GiB] [--rounds 3] [--steps 2]
        [--kept-pinned]

Prints one JSON object: the plan's residency and, per setting, the step seconds and page-in bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from odyssey.config import LoraSettings, parse_bytes  # noqa: E402
from odyssey.engine import Engine  # noqa: E402
from odyssey.planner import plan_for_store  # noqa: E402
from odyssey.residency import units_from_labels  # noqa: E402
from odyssey.store import Store  # noqa: E402
from tests.helpers_lora import lora_skeleton  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ram-budget", default="8GiB")
    ap.add_argument("--compute-dtype", default="fp32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps a setting runs each round")
    ap.add_argument("--kept-pinned", action="store_true", help="also time the kept layers pinned")
    args = ap.parse_args()
    store = Store.open(args.store)
    plan = plan_for_store(
        store,
        mode="lora",
        seq_len=args.seq_len,
        lora=LoraSettings(r=4, alpha=8),
        budget=parse_bytes(args.ram_budget),
        compute_dtype=args.compute_dtype,
    )
    res = plan.residency
    settings = {
        "off": dict(pinned=[], keep=0),
        "on": dict(pinned=units_from_labels(store, res.pinned), keep=res.kept),
    }
    if args.kept_pinned:
        kept = list(range(res.layers - res.kept, res.layers))
        labels = list(res.pinned) + [i for i in kept if i not in res.pinned]
        settings["kept_pinned"] = dict(pinned=units_from_labels(store, labels), keep=res.kept)
    V = store.config.vocab_size
    ids = torch.randint(0, V, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(0, V, (1, args.seq_len), generator=torch.Generator().manual_seed(1))
    engines = {}
    for name, kw in settings.items():
        skel = lora_skeleton(store, std=0.02)
        engines[name] = (Engine(store, compute_dtype=args.compute_dtype, model=skel, **kw), skel)
        engines[name][0].train_step(ids, tgt)  # warm-up: pinned units are read here
        engines[name][0].pass_stats(0.0)
    wall: dict = {n: [] for n in settings}
    cpu: dict = {n: [] for n in settings}
    read: dict = {n: [] for n in settings}
    for _ in range(args.rounds):
        for name, (eng, skel) in engines.items():
            for _ in range(args.steps):
                for p in skel.parameters():
                    p.grad = None
                t0, c0 = time.perf_counter(), time.process_time()
                eng.train_step(ids, tgt)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                read[name].append(eng.pass_stats(wall[name][-1]).pagein_bytes)
    for eng, _ in engines.values():
        eng.close()
    out = {
        "store": str(store.root),
        "parameters": store.config.num_parameters(),
        "seq_len": args.seq_len,
        "compute_dtype": args.compute_dtype,
        "threads": torch.get_num_threads(),
        "budget": args.ram_budget,
        "residency": {
            "pinned": len(res.pinned),
            "units": res.units,
            "kept": res.kept,
            "kept_paged": res.kept_paged,
            "layers": res.layers,
        },
    }
    for name in settings:
        out[name] = {
            "step_s": round(statistics.median(wall[name]), 3),
            "cpu_s": round(statistics.median(cpu[name]), 3),
            "pagein_bytes": int(statistics.median(read[name])),
            "all_step_s": [round(x, 3) for x in wall[name]],
        }
    for name in settings:
        if name != "off":
            out[f"{name}_over_off"] = {k: round(out[name][k] / out["off"][k], 3) for k in ("step_s", "cpu_s")}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
