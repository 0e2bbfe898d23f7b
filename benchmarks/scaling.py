"""How Odyssey's LoRA step grows with the model and with the sequence: step time and peak memory
of `odyssey train` (batch 1, r=16, alpha 32, AdamW) for
- the nano, small and 1.2B configs at seq_len 512, and
- the 1.2B at seq_len 128, 512 and 2048,
each inside a memory cgroup capped at its RAM budget (2 GiB to start; when the planner refuses a
budget it names the smallest that fits, and the run is retried there; an OOM kill climbs the
ladder 3, 4, 6, 8 ... GiB as in peers.py). Stores are created with `odyssey init` under
.cache/bench/ when missing. Step time is the median of the steps after the first.

    .venv/bin/python benchmarks/scaling.py [--steps 4] [--reuse-peers benchmarks/results/peers.json]

--reuse-peers takes the 1.2B seq_len 512 row from a peers.py run with the same settings instead
of measuring it again (it is the same command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import peers  # noqa: E402
from common import GIB, MIB  # noqa: E402

TITLE = "Scaling"  # of scaling.md and its README section
MODELS = ("nano", "small", "odyssey-1.2b")
SEQ_LENS = (128, 512, 2048)
BIG = "odyssey-1.2b"


def cases(models=MODELS, seq_lens=SEQ_LENS, big: str = BIG) -> list[tuple[str, int]]:
    """(config, seq_len) pairs: every model at 512, the big one at every length; no duplicates."""
    out = [(m, 512) for m in models if m != big]
    if big in models:
        out += [(big, t) for t in sorted(set(seq_lens) | {512})]
    return out


def reusable(peers_json: Path, model: Path, steps: int, seq_len: int = 512) -> dict | None:
    """The Odyssey training climb of a peers.py result with the same store, steps and seq_len."""
    try:
        res = json.loads(Path(peers_json).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    s = res.get("settings", {})
    climb = res.get("climbs", {}).get("train", {}).get("odyssey")
    if (
        climb
        and climb.get("status") == "runs"
        and Path(s.get("model", "")).resolve() == Path(model).resolve()
        and s.get("steps") == steps
        and s.get("seq_len") == seq_len
    ):
        return dict(climb, reused_from=str(peers_json))
    return None


def row(config: str, model: Path, label: str, seq_len: int, climb: dict) -> dict:
    r = climb.get("ok_result", {})
    ok_b = climb.get("smallest_ok_bytes")
    return {
        "config": config,
        "model": str(model),
        "label": label,
        "seq_len": seq_len,
        "status": climb["status"],
        "budget_gib": ok_b / GIB if ok_b else None,
        "step_s": r.get("step_s"),
        "cpu_s": r.get("cpu_s"),
        "measured_steps": r.get("measured_steps"),
        "tokens_per_s": r.get("tokens_per_s"),
        "peak_anon_mib": r.get("peak_anon_mib") or r.get("peak_rss_anon_mib"),
        "peak_cgroup_mib": round(climb["ok_peak_bytes"] / MIB) if climb.get("ok_peak_bytes") else None,
        "stall_s": r.get("stall_s"),
        "pagein_mb_s": r.get("pagein_mb_s"),
        "error": climb.get("error", ""),
        "reused_from": climb.get("reused_from"),
        "note": r.get("note", ""),
    }


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        note = []
        if r["status"] != "runs":
            note.append(common.short_error(r["error"]) or r["status"])
        elif r["error"]:
            note.append(f"at smaller budgets: {common.short_error(r['error'])}")
        if r.get("note"):
            note.append(r["note"])
        if r["reused_from"]:
            note.append("same run as peers.py")
        out.append(
            (
                f"{r['config']} ({r['label']})",
                r["seq_len"],
                common.fmt(r["budget_gib"], 2),
                common.fmt(r["step_s"], 2),
                common.fmt(r.get("cpu_s"), 2),
                r["measured_steps"] or "-",
                common.fmt(r["tokens_per_s"], 1),
                common.fmt(r["peak_anon_mib"], 0),
                common.fmt(r["peak_cgroup_mib"]),
                common.fmt(r["stall_s"], 2),
                "; ".join(note),
            )
        )
    return common.markdown_table(
        [
            "model",
            "seq_len",
            "budget GiB",
            "step s",
            "CPU s",
            "median of",
            "tokens/s",
            "peak anon MiB",
            "peak cgroup MiB",
            "stall s",
            "notes",
        ],
        out,
        "lrrrrrrrrrl",
    )


def png(rows: list[dict], path: Path):
    plt = common.pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    by_model = [r for r in rows if r["seq_len"] == 512 and r["step_s"]]
    ax1.bar(range(len(by_model)), [r["step_s"] for r in by_model], color="#2ca02c")
    ax1.set_xticks(range(len(by_model)), [f"{r['config']}\n{r['label']}" for r in by_model], fontsize=8)
    ax1.set_ylabel("step s (seq_len 512)")
    ax1.set_yscale("log")
    t1 = ax1.twinx()
    t1.plot(range(len(by_model)), [r["peak_anon_mib"] or 0 for r in by_model], "o-", color="#1f77b4")
    t1.set_ylabel("peak anon MiB", color="#1f77b4")
    ax1.set_title("by model (bars: step s, dots: memory)", fontsize=9)
    by_seq = sorted([r for r in rows if r["config"] == BIG and r["step_s"]], key=lambda r: r["seq_len"])
    ax2.plot([r["seq_len"] for r in by_seq], [r["step_s"] for r in by_seq], "o-", color="#2ca02c")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("seq_len")
    ax2.set_ylabel("step s (1.2B)")
    t2 = ax2.twinx()
    t2.plot([r["seq_len"] for r in by_seq], [r["peak_anon_mib"] or 0 for r in by_seq], "s--", color="#1f77b4")
    t2.set_ylabel("peak anon MiB", color="#1f77b4")
    ax2.set_title("1.2B by sequence length", fontsize=9)
    return common.save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="configs/NAME.yaml names")
    p.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)), help="for the 1.2B")
    p.add_argument("--budget", default="2GiB")
    p.add_argument("--max-budget", default="16GiB")
    p.add_argument("--steps", type=int, default=4, help="per run; the first is warm-up")
    p.add_argument(
        "--long-steps",
        type=int,
        default=3,
        help="per run at seq_len >= 2048 (about 4x the step time of 512; keeps `make bench` in time)",
    )
    p.add_argument("--timeout-s", type=float, default=1200, help="per attempt")
    p.add_argument("--time-limit-s", type=float, default=0, help="stop climbing after this long (0: no limit)")
    p.add_argument("--reuse-peers", help="peers.json whose Odyssey row is the 1.2B seq_len 512 run")
    p.add_argument("--data", help="token data (default: the sample corpus under .cache/bench)")
    p.add_argument("--work", default=str(common.CACHE / "scaling"))
    p.add_argument("--out-dir", default=str(common.RESULTS))
    p.add_argument("--replot", action="store_true", help="rewrite scaling.md and .png from OUT_DIR/scaling.json")
    args = p.parse_args(argv)
    if args.replot:
        result = json.loads((Path(args.out_dir) / "scaling.json").read_text())
        return write(result, Path(args.out_dir))

    ok, why = common.train_available()
    if not ok:
        print(f"scaling: {why}; nothing measured", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    data = Path(args.data) if args.data else common.ensure_data()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    budget, cap = common.parse_budget(args.budget), common.parse_budget(args.max_budget)
    deadline = time.monotonic() + args.time_limit_s if args.time_limit_s else None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    seqs = [int(x) for x in args.seq_lens.split(",")]
    todo = cases(models, seqs, BIG if BIG in models else models[-1])
    print(
        f"scaling: odyssey train, batch 1, LoRA r=16 alpha 32, {args.steps} steps a run ({args.long_steps} at "
        f"seq_len >= 2048), step time = median of the steps after the first; {len(todo)} runs"
    )
    stores = {config: common.ensure_store(config) for config in dict.fromkeys(c for c, _ in todo)}
    labels = {config: common.model_label(model) for config, model in stores.items()}
    rows = []
    for config, seq_len in todo:
        model = stores[config]
        steps = args.long_steps if seq_len >= 2048 else args.steps
        reuse = reusable(args.reuse_peers, model, steps, seq_len) if args.reuse_peers else None
        print(f"  {config} seq_len {seq_len}" + (" (from peers.py)" if reuse else ""))
        if reuse:
            climb = reuse
        else:
            runner = peers.odyssey_train_runner(
                model, data, work, steps, seq_len, peers.attempt_timeout(args.timeout_s, deadline)
            )
            climb = peers.climb(
                runner,
                peers.ladder(budget, cap_bytes=cap),
                deadline=deadline,
                suggest=lambda a: common.suggested_budget(a.error),
                cap_bytes=cap,
            )
        rows.append(row(config, model, labels[config], seq_len, climb))
    result = {
        "machine": common.machine(),
        "date": common.today(),
        "steps": args.steps,
        "long_steps": args.long_steps,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return write(result, Path(args.out_dir))


def write(result: dict, out: Path) -> int:
    tab = table(result["rows"])
    caption = (
        "**Odyssey LoRA step by model and sequence length**: batch 1, r=16, alpha 32, AdamW, fp32 compute, "
        "each run in a memory cgroup capped at its budget (2 GiB unless the planner asked for more). "
        "Step time is the median of the steps after a warm-up step (how many: the 'median of' column); "
        "CPU s is the trainer's CPU time (all threads) in the same steps, steadier than wall time on a "
        "shared machine; peak anon is its anonymous RSS sampled every 0.1 s."
    )
    print(f"\n{caption}\n{tab}")
    common.write_results(out, "scaling", result, TITLE, [(caption, tab)], chart=lambda p: png(result["rows"], p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
