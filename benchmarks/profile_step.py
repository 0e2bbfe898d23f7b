"""Where one LoRA training step spends its CPU time: torch.profiler over a step of the engine (the
model's store, seq 512, batch 1, r 16 by default), at a tight budget (every unit paged, every layer
recomputed) and at a larger one (what the planner pins and keeps there), plus the optimizer.

    python benchmarks/profile_step.py [--config odyssey-1.2b] [--budgets 1GiB,4GiB] [--seq-len 512]
        [--compute-dtype auto] [--out benchmarks/results/profile-1.2b]

Writes OUT.json and OUT.md: per budget the top ops by self CPU time, the share of matmul kernels
(aten::mm, addmm, bmm and their oneDNN forms) against everything else, and the split by phase
(engine.train_step names its phases with `record_function`: odyssey.forward, odyssey.head_loss,
odyssey.backward; the optimizer step here). Self CPU time is the time an op's own code ran on the
calling thread (its OpenMP workers' time counts once, as wall time on that thread); the reader
thread's preads are not ops and do not appear. On a shared machine the shares mean something,
absolute seconds less: the load average is recorded next to each profile.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # jemalloc, as `odyssey train` runs (re-exec once, before torch)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from odyssey.runtime import allocator

    allocator.ensure([str(Path(__file__).resolve()), *sys.argv[1:]])

from benchmarks import common  # noqa: E402
from odyssey import atomic  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn_mm", "mkldnn::_linear_pointwise"}
ATTENTION = "scaled_dot_product"
SPILL_DIR = common.CACHE / "profile-spill"  # where layers spill when the plan spills them (--spill-dir)
FINDINGS = "\n## Findings"  # a hand-written section at the end of OUT.md, kept when the script reruns
PHASES = ("odyssey.forward", "odyssey.head_loss", "odyssey.backward", "odyssey.optimizer")


def kind(name: str) -> str:
    """An op's class in the report: matmul, attention, or other."""
    if name in MATMUL:
        return "matmul"
    if ATTENTION in name or "flash_attention" in name:
        return "attention"
    return "other"


def phase_of(ev) -> str:
    """The odyssey.* phase an event ran under (its nearest such ancestor), or "outside"."""
    p = ev
    while p is not None:
        if p.name in PHASES:
            return p.name.removeprefix("odyssey.")
        p = p.cpu_parent
    return "outside"


def analyse(prof, wall_s: float, cpu_s: float, top: int = 25) -> dict:
    """Top ops by self CPU time and the matmul / attention / other split, overall and per phase."""
    import collections

    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    by_op: dict = collections.defaultdict(lambda: [0.0, 0, set()])
    phases: dict = collections.defaultdict(lambda: collections.Counter())
    phase_wall: dict = {}
    for e in events:
        if e.name in PHASES:
            phase_wall[e.name.removeprefix("odyssey.")] = phase_wall.get(e.name, 0.0) + e.cpu_time_total / 1e6
            continue
        s = e.self_cpu_time_total / 1e6
        row = by_op[e.name]
        row[0] += s
        row[1] += 1
        if len(row[2]) < 3 and e.input_shapes:
            row[2].add(str(e.input_shapes)[:120])
        phases[phase_of(e)][kind(e.name)] += s
    total = sum(r[0] for r in by_op.values())
    ops = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
    split = collections.Counter()
    for c in phases.values():
        split.update(c)
    shaped = sorted(
        (a for a in prof.key_averages(group_by_input_shape=True) if a.key not in PHASES),
        key=lambda a: -a.self_cpu_time_total,
    )[:top]
    return {
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "ops_self_s": total,
        "split": {k: split[k] for k in ("matmul", "attention", "other")},
        "phases": {
            p: {"wall_s": phase_wall.get(p), **{k: phases[p][k] for k in ("matmul", "attention", "other")}}
            for p in ("forward", "head_loss", "backward", "optimizer", "outside")
            if p in phases or p in phase_wall
        },
        "top": [{"op": n, "self_s": r[0], "calls": r[1], "shapes": sorted(r[2])} for n, r in ops],
        "top_by_shape": [
            {"op": a.key, "shapes": str(a.input_shapes)[:160], "self_s": a.self_cpu_time_total / 1e6, "calls": a.count}
            for a in shaped
        ],
    }


def build(
    store,
    budget: int,
    seq_len: int,
    r: int,
    compute_dtype: str,
    runtime: int | None = None,
    spill: str = "auto",
    spill_dir=SPILL_DIR,
    **engine_kw,
):
    """(engine, skeleton, optimizer, plan choice) for a LoRA step at `budget`, planned as `odyssey
    train` plans it (train.training_plan: pinned units, layers kept, spilled to `spill_dir` or
    recomputed, page-in mode); `runtime` the process's own memory for the plan (measured now when
    None, as `odyssey train` does at start). The AdamW moments stay in RAM whatever the plan chose
    for them (its optimizer offload moves them between steps, outside the step profiled)."""
    import torch

    from odyssey.adapters import inject, lora_parameters
    from odyssey.config import LoraSettings, TrainConfig
    from odyssey.engine import Engine
    from odyssey.model import CausalLM
    from odyssey.train import training_plan

    settings = LoraSettings(r=r, alpha=2 * r)
    cfg = TrainConfig(seq_len=seq_len, batch_size=1, lora=settings, compute_dtype=compute_dtype, spill=spill)
    Path(spill_dir).mkdir(parents=True, exist_ok=True)
    choice = training_plan(store, cfg, budget, spill_dir, runtime=runtime)
    res = choice.plan.residency
    with torch.device("meta"):
        skel = CausalLM(store.config)
    inject(skel, settings, seed=0)
    for k, p in lora_parameters(skel).items():
        if "lora_B" in k:
            torch.nn.init.normal_(p, std=0.02)  # every path carries gradient
    eng = Engine(
        store,
        compute_dtype=compute_dtype,
        model=skel,
        **res.engine_kwargs(store),
        **engine_kw,
    )
    opt = torch.optim.AdamW(list(lora_parameters(skel).values()), lr=1e-4)
    return eng, skel, opt, choice


def step(eng, opt, ids, tgt) -> float:
    from torch.profiler import record_function

    opt.zero_grad(set_to_none=True)
    loss = eng.train_step(ids, tgt)
    with record_function("odyssey.optimizer"):
        opt.step()
    return loss


def batch(store, seq_len: int, sample: bool = True):
    """One batch of the benchmark's token data (the sample corpus), else random tokens."""
    import numpy as np
    import torch

    V = store.config.vocab_size
    try:
        if not sample:
            raise LookupError("random tokens asked for")
        from odyssey.data.tokens import TokenData

        data = TokenData(common.ensure_data(progress=lambda *_: None))
        arr = np.asarray(data.tokens("train")[: seq_len + 1], dtype=np.int64) % V
        t = torch.from_numpy(arr)
        return t[:-1][None], t[1:][None], "sample corpus"
    except Exception:  # data preparation unavailable: random tokens profile the same work
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, V, (1, seq_len), generator=g), torch.randint(0, V, (1, seq_len), generator=g), "random"


def profile_budget(store, budget: int, args, runtime: int | None = None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    eng, skel, opt, choice = build(
        store,
        budget,
        args.seq_len,
        args.r,
        args.compute_dtype,
        runtime,
        spill=args.spill,
        spill_dir=Path(args.spill_dir),
        lora_fused=not args.peft_forward,
        compile_layers=args.compile_layers,
    )
    res = choice.plan.residency
    ids, tgt, source = batch(store, args.seq_len, args.tokens == "sample")
    t0 = time.perf_counter()
    step(eng, opt, ids, tgt)  # warm-up: pinned units are read here
    warm_s = time.perf_counter() - t0
    eng.pass_stats(0.0)
    load0 = os.getloadavg()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(eng, opt, ids, tgt)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = eng.pass_stats(wall)
    # an unprofiled step right after, for the profiler's own overhead
    t0, c0 = time.perf_counter(), time.process_time()
    step(eng, opt, ids, tgt)
    plain = (time.perf_counter() - t0, time.process_time() - c0)
    eng.close()
    out = analyse(prof, wall, cpu)
    out.update(
        budget=budget,
        compute_dtype=str(eng.dtype).removeprefix("torch."),
        loss=loss,
        tokens=source,
        warmup_s=warm_s,
        unprofiled_wall_s=plain[0],
        unprofiled_cpu_s=plain[1],
        load_before=load0,
        load_after=os.getloadavg(),
        pinned_units=len(res.pinned),
        kept_layers=res.kept,
        spilled_layers=res.spilled,
        spill_bytes=stats.spill_bytes,
        plan_lines=choice.lines,
        pagein_bytes=stats.pagein_bytes,
        stall_s=stats.stall_s,
        torch_threads=torch.get_num_threads(),
    )
    return out


def markdown(results: list[dict], m: dict, args) -> tuple[str, list[tuple[str, str]], list[str]]:
    f = common.fmt
    sections = []
    rows = []
    for r in results:
        s = r["split"]
        tot = sum(s.values()) or 1.0
        rows.append(
            [
                r["budget_label"],
                f"{r['pinned_units']} / {r['kept_layers']} / {r['spilled_layers']}",
                r["compute_dtype"],
                f(r["wall_s"], 1),
                f(r["cpu_s"], 1),
                f(r["unprofiled_wall_s"], 1),
                f"{100 * s['matmul'] / tot:.0f} %",
                f"{100 * s['attention'] / tot:.0f} %",
                f"{100 * s['other'] / tot:.0f} %",
                f"{r['load_before'][0]:.1f}",
            ]
        )
    sections.append(
        (
            "Step",
            common.markdown_table(
                [
                    "budget",
                    "pinned units / layers kept / spilled",
                    "compute",
                    "profiled wall s",
                    "CPU s",
                    "unprofiled wall s",
                    "matmul",
                    "attention",
                    "other ops",
                    "load (1 min)",
                ],
                rows,
            ),
        )
    )
    for r in results:
        prow = []
        for p, v in r["phases"].items():
            tot = v["matmul"] + v["attention"] + v["other"]
            prow.append(
                [
                    p,
                    f(v["wall_s"], 2) if v["wall_s"] is not None else "",
                    f(tot, 2),
                    f(v["matmul"], 2),
                    f(v["attention"], 2),
                    f(v["other"], 2),
                    f"{100 * v['other'] / tot:.0f} %" if tot else "",
                ]
            )
        sections.append(
            (
                f"Phases at {r['budget_label']}",
                common.markdown_table(
                    ["phase", "wall s", "ops self s", "matmul s", "attention s", "other s", "other share"], prow
                ),
            )
        )
        trows = [[o["op"], f(o["self_s"], 3), o["calls"]] for o in r["top"][:15]]
        sections.append((f"Top ops at {r['budget_label']}", common.markdown_table(["op", "self s", "calls"], trows)))
        srows = [[o["op"], o["shapes"][:110], f(o["self_s"], 3), o["calls"]] for o in r["top_by_shape"][:20]]
        sections.append(
            (
                f"Top (op, input shapes) at {r['budget_label']}",
                common.markdown_table(["op", "input shapes", "self s", "calls"], srows),
            )
        )
    notes = [
        f"Machine: {common.describe_machine(m)}.",
        f"{args.config}, seq {args.seq_len}, batch 1, LoRA r={args.r} on the seven projections; one warm-up step, "
        "then one profiled step (torch.profiler, CPU, record_shapes) and one unprofiled.",
        "Self CPU time of the main thread's ops; the pager's reader thread does not appear (its stall is in the "
        "wall time). The machine is shared with other work: shares mean more than seconds.",
        "Planned as `odyssey train` plans (train.training_plan); its choices: "
        + "; ".join(f"{r['budget_label']}: {', '.join(r['plan_lines']) or 'none to say'}" for r in results)
        + " (the spill's disk traffic is the spill thread's, not in the ops).",
    ]
    return "", sections, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="odyssey-1.2b")
    ap.add_argument("--store", help="a store directory (default: the benchmark's store of --config)")
    ap.add_argument("--budgets", default="1GiB,4GiB")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--compute-dtype", default="auto")
    ap.add_argument("--tokens", choices=("sample", "random"), default="sample")
    ap.add_argument("--peft-forward", action="store_true", help="PEFT's LoRA forward (the engine's before)")
    ap.add_argument("--compile-layers", action="store_true", help="torch.compile each decoder layer")
    ap.add_argument("--spill", choices=("auto", "on", "off"), default="auto", help="as odyssey train's spill")
    ap.add_argument("--spill-dir", default=str(SPILL_DIR), help="where layers spill")
    ap.add_argument("--out", default=str(common.RESULTS / "profile-1.2b"))
    args = ap.parse_args(argv)

    from odyssey.config import parse_bytes
    from odyssey.errors import OdysseyError
    from odyssey.planner import measured_runtime
    from odyssey.store import Store

    store = Store.open(args.store or common.ensure_store(args.config))
    # The plan counts this process's own memory; measured once, before any budget runs: a budget
    # profiled after another would see what the allocator kept of it (4 GiB in fp32 after 8 GiB:
    # 8 units pinned instead of 15).
    runtime = measured_runtime("lora")
    results = []
    for b in args.budgets.split(","):
        print(f"profiling a step at {b} ...", flush=True)
        try:
            r = profile_budget(store, parse_bytes(b), args, runtime)
        except OdysseyError as e:  # a budget `odyssey train` refuses: its one line
            print(f"profile_step: {e}", file=sys.stderr)
            return 2
        r["budget_label"] = b
        results.append(r)
        print(
            f"  {b}: {r['wall_s']:.1f} s profiled ({r['unprofiled_wall_s']:.1f} s plain), matmul "
            f"{100 * r['split']['matmul'] / max(1e-9, sum(r['split'].values())):.0f} %",
            flush=True,
        )
    m = common.machine()
    _, sections, notes = markdown(results, m, args)
    out = Path(args.out)
    common.write_json(Path(f"{out}.json"), {"machine": m, "args": vars(args), "results": results})
    md = Path(f"{out}.md")
    findings = md.read_text().partition(FINDINGS)[2] if md.exists() else ""  # written by hand: kept
    common.write_markdown(md, f"Profile of one LoRA step: {Path(store.root).name}", sections, notes)
    if findings:
        atomic.write_text(md, md.read_text() + FINDINGS + findings)
    print(f"wrote {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
