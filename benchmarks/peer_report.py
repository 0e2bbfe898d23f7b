"""The tables, notes and chart of peers.py: one row per training run (Odyssey's budgets and dtypes,
every peer configuration, with its smallest cgroup and its loss check), generation rows, the
machine line and the targets first. Pure formatting of what peers.py measured; no torch.
"""

from __future__ import annotations

from pathlib import Path

import common
import goals
from common import GIB, MIB

PEER_LABELS = {
    "odyssey": "Odyssey (paged from disk)",
    "inram": "transformers + peft, in RAM",
    "offload": "transformers + peft + accelerate disk offload",
    "offload-probe": "the same, most weights on disk, memory no limit",
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _first_attempt(climb_res: dict) -> dict:
    return (climb_res.get("attempts") or [{}])[0]


def train_row(name: str, label: str, short: str, climb_res: dict, seq_len: int, **extra) -> dict:
    """A training row from one timed run (a climb of one budget): its figures where it ran, else
    its error; the peak memory of the run (cgroup and anonymous)."""
    r = climb_res.get("ok_result") or {}
    first = _first_attempt(climb_res)
    step = r.get("step_s")
    peak = climb_res.get("ok_peak_bytes") or first.get("peak_bytes")
    return {
        "name": name,
        "label": label,
        "short": short,
        "status": climb_res["status"],
        "budget_bytes": climb_res.get("budget_bytes"),
        "step_s": step,
        "cpu_s": r.get("cpu_s"),
        "measured_steps": r.get("measured_steps"),
        "tokens_per_s": round(seq_len / step, 2) if step else None,
        "peak_cgroup_mib": round(peak / MIB) if peak and climb_res["status"] == "runs" else None,
        "peak_anon_mib": r.get("peak_anon_mib") or r.get("peak_rss_anon_mib"),
        "first_loss": (r.get("losses") or [None])[0],
        "error": climb_res.get("error", ""),
        "device_map": r.get("device_map"),
        "loadavg": r.get("loadavg"),
        **extra,
    }


def smallest_text(row: dict) -> str:
    """The "smallest cgroup that ran" cell of a peer row."""
    if row["status"] != "runs":
        return "-"
    s = row.get("search")
    cap = row.get("budget_bytes")
    if not s:
        why = row.get("search_skipped") or "not searched"
        return f"<= {cap / GIB:.2f} GiB ({why})" if cap else why
    got = s["smallest_ok_bytes"] / GIB
    if not s["resolved"]:
        return f"<= {got:.2f} GiB (search stopped: {s['stopped'] or 'incomplete'})"
    below = s.get("largest_failed_bytes")
    low = f"{below / GIB:.2f} GiB did not" if below else f"floor {s['lo_bytes'] / GIB:.2f} GiB"
    return f"{got:.2f} GiB ({low})"


def train_notes(row: dict) -> str:
    parts = []
    if row["status"] != "runs" and row.get("error"):
        parts.append(common.short_error(row["error"]))
    dm = row.get("device_map") or {}
    if row["name"].startswith("offload") and dm:
        share = dm.get("disk_share", 0)
        parts.append(f"{share:.0%} of the weights on disk" if share else "nothing offloaded")
    if row.get("pinned"):
        parts.append(row["pinned"])
    if row.get("layers_kept") is not None:
        parts.append(f"{row['layers_kept']} layers not recomputed")
    if row.get("page_in"):
        parts.append(f"page-in {row['page_in']}")
    if row.get("note"):
        parts.append(row["note"])
    return "; ".join(parts)


def train_table(rows: list[dict]) -> str:
    """Every training configuration: where and how it ran, its figures, and its first loss
    checked against the fp32 reference."""
    headers = [
        "run",
        "compute",
        "cgroup of the timed run",
        "smallest cgroup that ran",
        "step s",
        "CPU s",
        "tokens/s",
        "x fastest peer",
        "peak cgroup MiB",
        "peak anon MiB",
        "loss step 1",
        "loss",
        "notes",
    ]
    out = []
    for r in rows:
        budget = r.get("budget_bytes")
        cell = "no cgroup" if r.get("uncapped") else (f"{budget / GIB:g} GiB" if budget else "-")
        status = "" if r["status"] == "runs" else f"{r['status']}"
        out.append(
            (
                r["label"],
                r.get("compute") or "-",
                cell,
                r.get("smallest") or "-",
                status or common.fmt(r["step_s"], 2),
                common.fmt(r.get("cpu_s"), 1),
                common.fmt(r.get("tokens_per_s"), 1),
                common.fmt(r.get("x_fastest_peer")),
                common.fmt(r.get("peak_cgroup_mib")),
                common.fmt(r.get("peak_anon_mib"), 0),
                common.fmt(r.get("first_loss"), 5),
                r.get("loss_check") or "-",
                train_notes(r),
            )
        )
    return common.markdown_table(headers, out, "llcc" + "r" * 7 + "ll")


def _row(name: str, climb_res: dict, **measures) -> dict:
    """A generation row: the climb's outcome, the task's `measures` (times and their ratios to
    Odyssey), and the peak memory where it ran."""
    r = climb_res["ok_result"]
    return {
        "tool": name,
        "label": climb_res.get("label") or PEER_LABELS[name],
        "status": climb_res["status"],
        # the probe runs at one large cap only: "within the budget" does not apply
        "ran_within_budget": None if name == "offload-probe" else climb_res["ran_within_budget"],
        "smallest_ok_gib": climb_res["smallest_ok_bytes"] / GIB if climb_res["smallest_ok_bytes"] else None,
        **measures,
        "loadavg": r.get("loadavg"),
        "peak_cgroup_mib": round(climb_res["ok_peak_bytes"] / MIB) if climb_res["ok_peak_bytes"] else None,
        "peak_anon_mib": r.get("peak_anon_mib") or r.get("peak_rss_anon_mib"),
        "error": climb_res["error"],
        "device_map": r.get("device_map"),
        "stopped": climb_res.get("stopped", ""),
    }


def _gen_row(name: str, climb_res: dict, odyssey_tok: float | None, odyssey_cpu: float | None = None) -> dict:
    r = climb_res["ok_result"]
    return _row(
        name,
        climb_res,
        s_per_token=r.get("s_per_token"),
        decode_steps=r.get("decode_steps"),
        cpu_s_per_token=r.get("cpu_s_per_token"),
        ratio_to_odyssey=_ratio(r.get("s_per_token"), odyssey_tok),
        cpu_ratio_to_odyssey=_ratio(r.get("cpu_s_per_token"), odyssey_cpu),
        tokens=r.get("tokens"),
    )


def _note(row: dict) -> str:
    parts = []
    if row["status"] != "runs" or row["ran_within_budget"] is False:
        if row["error"]:
            parts.append(("at smaller budgets: " if row["status"] == "runs" else "") + common.short_error(row["error"]))
    if row.get("stopped") and row["status"] != "runs":
        parts.append(f"stopped: {row['stopped']}")
    dm = row.get("device_map") or {}
    if row["tool"].startswith("offload") and row["status"] == "runs":
        share = dm.get("disk_share", 0)
        parts.append(
            f"{share:.0%} of the weights on disk" if share else "nothing offloaded at this budget: runs as in RAM"
        )
    return "; ".join(parts)


def gen_table(rows: list[dict], budget_gib: float) -> str:
    headers = [
        "tool",
        f"runs in {budget_gib:g} GiB",
        "smallest budget that ran",
        "s / token",
        "CPU s / token",
        "median of",
        "x Odyssey",
        "x Odyssey (CPU)",
        "peak cgroup MiB",
        "peak anon MiB",
        "notes",
    ]
    out = []
    for r in rows:
        out.append(
            (
                r["label"],
                common.fmt(r["ran_within_budget"]),
                "does not run" if r["status"] != "runs" else f"{r['smallest_ok_gib']:g} GiB",
                common.fmt(r.get("s_per_token"), 2),
                common.fmt(r.get("cpu_s_per_token"), 2),
                r["decode_steps"] or "-",
                common.fmt(r["ratio_to_odyssey"]),
                common.fmt(r.get("cpu_ratio_to_odyssey")),
                common.fmt(r["peak_cgroup_mib"]),
                common.fmt(r["peak_anon_mib"], 0),
                _note(r),
            )
        )
    return common.markdown_table(headers, out, "lcc" + "r" * 7 + "l")


SHORT = {"odyssey": "Odyssey", "offload": "accelerate\noffload", "offload-probe": "offload,\nno mem limit"}


def png(result: dict, path: Path):
    """Three panels: step time of every training run (wall and CPU), memory (the cgroup peak of
    the timed run and the smallest cgroup that ran), s/token of generation."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [3, 3, 1.2]})

    def grouped(ax, rows, keys, labels, title, ylabel, names):
        width = 0.8 / len(keys)
        for k, (key, label) in enumerate(zip(keys, labels, strict=True)):
            xs = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(rows))]
            vals = [r.get(key) for r in rows]
            ax.bar(
                xs,
                [v or 0 for v in vals],
                width,
                label=label,
                color=[
                    ("#2ca02c" if r.get("name", r.get("tool", "")).startswith("odyssey") else "#1f77b4") for r in rows
                ],
                alpha=1.0 if k == 0 else 0.5,
            )
            for x, v in zip(xs, vals, strict=True):
                ax.text(x, v or 0, "n/a" if v is None else f"{v:,.1f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(rows)), names, fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        if len(keys) > 1:
            ax.legend(fontsize=7)

    t, g = result["train"], result["generate"]
    if t:
        names = [r.get("short") or r["name"] for r in t]
        grouped(axes[0], t, ["step_s", "cpu_s"], ["wall s", "CPU s"], "LoRA step (lower is better)", "s", names)
        for r in t:
            s = r.get("search") or {}
            r["_smallest_mib"] = s.get("smallest_ok_bytes", 0) / MIB if s.get("resolved") else None
        grouped(
            axes[1],
            t,
            ["peak_cgroup_mib", "_smallest_mib"],
            ["peak of the timed run", "smallest cgroup that ran"],
            "memory (MiB)",
            "MiB",
            names,
        )
        for r in t:
            r.pop("_smallest_mib", None)
    if g:
        grouped(
            axes[2],
            g,
            ["s_per_token", "cpu_s_per_token"],
            ["wall s", "CPU s"],
            "generation, s per token",
            "s",
            [SHORT.get(r["tool"], r["tool"]) for r in g],
        )
    return common.save_figure(fig, path)


def machine_caption(m: dict, matmul: dict, shape_text: str, threads: int) -> str:
    """The first line of peers.md: the CPU, the flags that matter, threads, and the matmul rates."""
    flags = m.get("matmul_flags") or m.get("simd") or []
    kernels = m.get("kernels") or ""
    limited = f" (kernels limited: {kernels.split(' ', 1)[1]})" if " " in kernels else ""
    return (
        f"**Machine:** {m.get('cpu')}, {m.get('cores')} cores, torch threads {threads}, "
        f"{m.get('ram_gib')} GiB RAM; matmul flags {' '.join(flags) or '-'}{limited}; matmul {shape_text} measured "
        f"in this run: bf16 {matmul.get('bf16', 0):,.0f} GFLOP/s, fp32 {matmul.get('fp32', 0):,.0f} GFLOP/s."
    )


def floor_caption(fl: dict | None) -> str:
    """The kernel floor's sentence (benchmarks/floor.py), or "" when the run did not measure it."""
    if not fl:
        return ""
    parts = "; ".join(f"{k} {v:.2f} s" for k, v in fl["parts"].items())
    return (
        f" The kernel floor is the step's unavoidable kernels timed at the model's shapes in "
        f"{fl['dtype']} in this run (benchmarks/floor.py), summed over the layers, no recompute: "
        f"{fl['seconds']:.2f} s ({parts})."
    )


def markdown_sections(result: dict) -> list[tuple[str, str]]:
    s, m = result["settings"], result["machine"]
    out = []
    mm = result.get("matmul") or {}
    caption = machine_caption(
        m, mm.get("best_gflops") or m.get("matmul_gflops") or {}, mm.get("shape", "-"), s.get("threads", 0)
    )
    if result.get("targets"):
        lim = result.get("compute_limit") or {}
        out.append(
            (
                caption + f"\n\n**Targets** ({s.get('model_label', '')} model, batch 1, seq_len {s['seq_len']}, "
                f"LoRA r={s['lora_r']}): the fastest peer is "
                f"{_label_of(result, result.get('fastest_peer')) or 'none (no peer ran)'}; the compute limit is "
                f"{lim.get('fastest_dtype', '-')} {common.fmt(lim.get('fastest_gflops'), 0)} GFLOP/s / "
                f"{lim.get('flop_per_token', 0) / 1e9:.3g} GFLOP per token "
                f"({lim.get('layers_kept', 0)} of the layers not recomputed) = "
                f"{common.fmt(lim.get('tokens_per_s'), 1)} tokens/s." + floor_caption(result.get("kernel_floor")),
                goals.table(result["targets"]),
            )
        )
    else:
        out.append((caption, ""))
    if len(result.get("rounds") or []) > 1:
        out.append(
            (
                "**Paired rounds**: the three runs the step targets compare, run again back to back (every "
                "other round in reverse order; round 0 is the table below); the step targets are the median "
                "of the rounds' ratios."
                + (
                    " Each round also measured the matmul just before its Odyssey 1 GiB run; the compute "
                    "target is the median of the rounds' 1 GiB step against the limit at that rate."
                    if any(r.get("gflops") for r in result["rounds"])
                    else ""
                ),
                rounds_table(result["rounds"], s["seq_len"], (result.get("compute_limit") or {}).get("flop_per_token")),
            )
        )
    if result["train"]:
        out.append(
            (
                f"**LoRA training step, every configuration**, {s.get('model_label', '')} model, batch 1, "
                f"seq_len {s['seq_len']}, r={s['lora_r']}, alpha {s['lora_alpha']}, "
                f"{', '.join(t.split('_')[0] for t in s['targets'])}, AdamW; the same batches. Step time is the "
                f"median of {s['measured_steps']} steps after a warm-up step; peers timed with memory no limit "
                f"(cap {s.get('max_budget_gib', 16):g} GiB), their smallest cgroup found by bisection to "
                f"{s.get('resolution_mib', 256)} MiB ({s.get('probe_steps', 2)} steps an attempt); loss of "
                f"step 1 checked against {result.get('loss_reference') or 'no fp32 reference'}.",
                train_table(result["train"]),
            )
        )
    if result["generate"]:
        out.append(
            (
                f"**Generation**, greedy, {s['prompt_len']}-token prompt, {s['new_tokens']} new tokens; "
                f"seconds per token = median gap between tokens after the first.",
                gen_table(result["generate"], s["budget_gib"]),
            )
        )
    return out


def rounds_table(rounds: list[dict], tokens_per_step: int = 0, flop: float | None = None) -> str:
    """A row per paired round (its three step times and two ratios), then the ratios' medians;
    where the rounds measured the matmul beside their 1 GiB run (and `flop`, FLOP a token, is
    given), two more columns: the fastest rate measured and the 1 GiB step over that limit."""
    keys = ("odyssey", "odyssey-4g")
    limit = flop is not None and any(r.get("gflops") for r in rounds)

    def ratio(rs, k):
        return common.median(goals.round_ratios(rs, k))

    def of_limit(rs):
        return common.median(goals.round_limit_ratios(rs, tokens_per_step, flop))

    rows = [
        (str(r["round"]), *(common.fmt(r.get(k)) for k in ("odyssey", "peer", "odyssey-4g")))
        + tuple(common.fmt(ratio([r], k)) for k in keys)
        + ((common.fmt(goals.round_rate(r), 0), common.fmt(of_limit([r]))) if limit else ())
        for r in rounds
    ]
    rows.append(
        ("median", "", "", "", *(common.fmt(ratio(rounds, k)) for k in keys))
        + (("", common.fmt(of_limit(rounds))) if limit else ())
    )
    headers = ["round", "Odyssey 1 GiB s", "fastest peer s", "Odyssey 4 GiB s", "1 GiB / peer", "4 GiB / peer"]
    if limit:
        headers += ["matmul GFLOP/s beside", "1 GiB / compute limit"]
    return common.markdown_table(headers, rows, "lrrrrr" + ("rr" if limit else ""))


def _label_of(result: dict, name: str | None) -> str | None:
    return next((r["label"] for r in result.get("train", []) if r["name"] == name), None)


def notes(result: dict) -> list[str]:
    s = result["settings"]
    out = [
        "Targets: pass/fail as measured in this run; the bench does not fail the build on them.",
        "CPU s: CPU time (user + system, all threads) of the run's process for the same step; other work "
        "on the machine stretches wall time far more than CPU time.",
        "bf16 autocast: the peer's weights loaded in bf16 (the store's own precision), LoRA weights in fp32 "
        "(peft's default), the forward under torch.autocast('cpu', torch.bfloat16); Odyssey's auto picks "
        "bf16 or fp32 from its own matmul probe (odyssey.probe).",
        "Smallest cgroup: bisection between the weights' bytes (raised to the peak anonymous memory of the "
        "timed run where the machine has no swap) and the cap; '<=' where the time limit stopped it first.",
        f"Peers use the {s['peer_allocator']} allocator (as a user gets them); Odyssey preloads jemalloc "
        "itself when it is installed.",
        "Peak cgroup memory counts anonymous memory plus page cache charged to the group (file pages of "
        "the weights read); peak anon is the process's anonymous RSS.",
        f"accelerate disk offload (training) keeps {s.get('offload_share', 0.25):.0%} of the weights in RAM "
        f"(max_memory cpu), the rest on disk; for generation max_memory cpu = budget - "
        f"{s['offload_reserve_gib']:g} GiB.",
    ]
    if s.get("odyssey_compile") == "on":
        out.append(
            "Odyssey ran with compile=on (torch.compile of each decoder layer; its compilation falls in the "
            "warm-up step, left out of the median)."
        )
    if str(s.get("cgroup", "")).startswith("unavailable"):
        out.append(f"No memory cgroups here ({s['cgroup']}): every run was uncapped and nothing was searched.")
    for line in result.get("loss_problems") or []:
        out.append(f"LOSS DISAGREES: {line}")
    return out
