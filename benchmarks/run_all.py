"""Every benchmark, one after the other (`make bench`): page-in, out-of-core overhead, peers,
scaling, generation (SmolLM2-135M greedy: resident, paged, transformers), GGUF bases. Each part
runs in its own process and prints its tables; the results land in benchmarks/results/ as JSON,
markdown and PNG, and benchmarks/results/README.md collects the tables with the date and the
machine. The whole run is planned to fit 125 minutes on a 2-core machine: peers gets what pagein
and overhead leave less 64 minutes for the parts after it (on the 1.2B: about 25 minutes for the
runs the targets need, the rest for the smallest-cgroup searches and generation); the parts that
climb or search budgets start no run past their time limit. The GGUF part (gguf_bases.py, last)
runs whole, about 45 minutes: LoRA quality on a bf16 store vs its Q8_0 and Q4_K GGUF, the 1.2B
step by base, and the 8B's shape as a Q4_K GGUF in a 3 GiB cgroup.

    .venv/bin/python benchmarks/run_all.py [--parts pagein,overhead,peers,scaling,generation,gguf] [--minutes 125]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import generation  # noqa: E402
import gguf_bases  # noqa: E402
import goals  # noqa: E402
import overhead  # noqa: E402
import peers  # noqa: E402
import scaling  # noqa: E402

HERE = Path(__file__).resolve().parent
PARTS = ("pagein", "overhead", "peers", "scaling", "generation", "gguf")
# seconds kept for the parts after this one: a part that climbs budgets stops climbing when only these are left
RESERVE_AFTER_S = {
    "pagein": 120 * 60,
    "overhead": 110 * 60,
    "peers": 64 * 60,
    "scaling": 50 * 60,
    "generation": 45 * 60,
    "gguf": 0,
}
README_ORDER = ("peers", "scaling", "generation", "gguf", "overhead", "pagein")  # the headline first
TITLES = {
    "pagein": "Page-in",
    "overhead": overhead.TITLE,
    "peers": peers.TITLE,
    "scaling": scaling.TITLE,
    "generation": generation.TITLE,
    "gguf": gguf_bases.TITLE,
}
MARKDOWN = {  # part -> result files shown in the README, in order
    "pagein": ("pagein-strategies.md", "pagein-grid.md"),
    "overhead": ("overhead.md",),
    "peers": ("peers.md",),
    "scaling": ("scaling.md",),
    "generation": ("generation-smollm2-135m.md",),
    "gguf": ("gguf.md",),
}
RESULT_JSON = {  # part -> the result file whose "date" and "machine" say when and where it was measured
    "pagein": "pagein-grid.json",
    "overhead": "overhead.json",
    "peers": "peers.json",
    "scaling": "scaling.json",
    "generation": "generation-smollm2-135m.json",
    "gguf": "gguf.json",
}
PICTURES = {
    "pagein": ("pagein-grid.png", "pagein-strategies.png"),
    "overhead": ("overhead.png",),
    "peers": ("peers.png",),
    "scaling": ("scaling.png",),
    "generation": (),
    "gguf": (),
}


def command(part: str, out_dir: Path, seconds_left: float, steps: int) -> list[str]:
    """The command line of one part."""
    py = common.PYTHON
    limit = max(60.0, seconds_left - RESERVE_AFTER_S[part])
    if part == "pagein":
        return [py, str(HERE / "pagein.py"), "--out-dir", str(out_dir)]
    if part == "overhead":
        return [py, str(HERE / "overhead.py"), "--out", str(out_dir / "overhead.json")]
    if part == "peers":
        return [
            py,
            str(HERE / "peers.py"),
            "--out-dir",
            str(out_dir),
            "--steps",
            str(steps),
            "--time-limit-s",
            f"{limit:.0f}",
        ]
    if part == "scaling":
        return [
            py,
            str(HERE / "scaling.py"),
            "--out-dir",
            str(out_dir),
            "--steps",
            str(steps),
            "--reuse-peers",
            str(out_dir / "peers.json"),
            "--time-limit-s",
            f"{limit:.0f}",
        ]
    if part == "generation":
        return [py, str(HERE / "generation.py"), "--out-dir", str(out_dir)]
    if part == "gguf":  # quality, the 1.2B step by base, the 8B's shape in 3 GiB (about 45 minutes on 2 cores)
        return [py, str(HERE / "gguf_bases.py"), "--out-dir", str(out_dir), "--steps", str(steps)]
    raise ValueError(part)


def measured(out_dir: Path, part: str) -> tuple[str, str] | None:
    """(date, machine line) of a part's result file (RESULT_JSON), or None where it has none."""
    try:
        res = json.loads((out_dir / RESULT_JSON[part]).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(res, dict) or not res.get("date"):
        return None
    m = res.get("machine")
    return str(res["date"]), (common.describe_machine(m) if isinstance(m, dict) else str(m or "-"))


def _status_row(run: dict, rerun: bool) -> tuple[str, str, str]:
    """(part, status, minutes) of the README's first table; `rerun`: the part's results are newer
    than this run's (or from another machine)."""
    seconds = run.get("seconds")
    status = run["status"] + ("; results rerun on their own since" if rerun and seconds is not None else "")
    return run["part"], status, common.fmt(seconds / 60 if seconds is not None else None, 1)


def readme(out_dir: Path, machine: dict, runs: list[dict], date: str) -> str:
    """The combined README of the results directory: date, machine, every table, the charts. A
    section measured on another day or machine than the run (a part rerun on its own since) says
    when and where."""
    where = common.describe_machine(machine)
    own = {r["part"]: measured(out_dir, r["part"]) for r in runs}
    other = {p: m for p, m in own.items() if m and (m[0][:10] != date[:10] or m[1] != where)}
    lines = [
        "# Odyssey benchmarks",
        "",
        f"Measured {date} on {where}."
        + (" Sections measured on another day or machine say when and where." if other else ""),
        "",
        "Every comparison is a ratio of figures measured side by side in one run; other work shared "
        "this machine, so absolute timings are noisy. Reproduce with `make bench`.",
        "",
        common.markdown_table(["part", "status", "minutes"], [_status_row(r, r["part"] in other) for r in runs], "lll"),
        "",
    ]
    for r in sorted(runs, key=lambda r: README_ORDER.index(r["part"])):
        part = r["part"]
        lines += [f"## {TITLES[part]}", ""]
        if part in other:
            lines += [f"Measured {other[part][0]} on {other[part][1]}.", ""]
        shown = False
        for name in MARKDOWN[part]:
            path = out_dir / name
            if path.is_file():
                text = path.read_text().strip().splitlines()
                if text and text[0] == f"## {TITLES[part]}":  # the same title as this section: once is enough
                    text = text[1:]
                # other part titles go one level down, under this section
                text = [("#" + ln) if ln.startswith("## ") else ln for ln in text]
                lines += [*text, ""]
                shown = True
        if not shown:
            lines += [f"No result ({r['status']}).", ""]
        for name in PICTURES[part]:
            if (out_dir / name).is_file():
                lines += [f"![{name}]({name})", ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def targets_text(out_dir: Path) -> str | None:
    """The targets table of OUT_DIR/peers.json with the machine line, for the end of the run's
    output; None when there is no such result."""
    try:
        res = json.loads((out_dir / "peers.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not res.get("targets"):
        return None
    m, mm = res.get("machine", {}), res.get("matmul", {})
    g = mm.get("best_gflops", {})
    head = (
        f"Targets ({res.get('date', '')}; {m.get('cpu')}, {res.get('settings', {}).get('threads')} threads, matmul "
        f"{mm.get('shape')}: bf16 {g.get('bf16', 0):,.0f}, fp32 {g.get('fp32', 0):,.0f} GFLOP/s)"
    )
    return head + "\n" + goals.table(res["targets"])


def write_readme(out_dir: Path, machine: dict, runs: list[dict], date: str) -> None:
    common.atomic.write_text(out_dir / "README.md", readme(out_dir, machine, runs, date) + "\n")
    print(f"wrote {out_dir / 'README.md'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--minutes", type=float, default=125, help="time the whole run should fit in")
    p.add_argument("--steps", type=int, default=4, help="training steps per run; the first is warm-up")
    p.add_argument("--out-dir", default=str(common.RESULTS))
    p.add_argument(
        "--readme-only",
        action="store_true",
        help="rebuild OUT_DIR/README.md from the results already there (OUT_DIR/run_all.json, and the "
        "parts run on their own since)",
    )
    args = p.parse_args(argv)
    if args.readme_only:
        out_dir = Path(args.out_dir)
        summary = json.loads((out_dir / "run_all.json").read_text())
        runs = list(summary["parts"])
        done = {r["part"] for r in runs}
        # parts run on their own (not in that whole run) whose results are there
        runs += [{"part": p, "status": "run on its own"} for p in PARTS if p not in done and measured(out_dir, p)]
        write_readme(out_dir, summary["machine"], runs, summary["date"])
        return 0
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown {bad[0]!r}; choose from {', '.join(PARTS)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    machine = common.machine()
    date = common.today()
    print(f"Odyssey benchmarks, {date}\n{common.describe_machine(machine)}")
    print(
        f"training figures: median of {args.steps - 1} steps after a warm-up step (2 at seq_len 2048); "
        f"budget 2 GiB unless noted\n"
    )
    # the stores and data every part uses, made once up front (not timed with the parts)
    for config in ("odyssey-1.2b", "small", "nano"):
        common.ensure_store(config)
    common.ensure_data()

    runs = []
    for part in parts:
        left = args.minutes * 60 - (time.monotonic() - t_start)
        cmd = command(part, out_dir, left, args.steps)
        print(f"\n===== {part} ({left / 60:.1f} min left) =====", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(cmd, cwd=common.ROOT)
        seconds = time.monotonic() - t0
        status = "ok" if rc == 0 else f"failed (exit {rc})"
        print(f"===== {part}: {status} in {seconds / 60:.1f} min =====", flush=True)
        runs.append(
            {
                "part": part,
                "status": status,
                "seconds": round(seconds, 1),
                "returncode": rc,
                "command": " ".join(cmd[1:]),
            }
        )
    total = time.monotonic() - t_start
    summary = {
        "date": date,
        "machine": machine,
        "parts": runs,
        "seconds": round(total, 1),
        "steps": args.steps,
        "measured_steps": args.steps - 1,
    }
    common.write_json(out_dir / "run_all.json", summary)
    print(f"\nall parts in {total / 60:.1f} min (target {args.minutes:g} min)")
    for r in runs:
        print(f"  {r['part']:9s} {r['status']:18s} {r['seconds'] / 60:5.1f} min")
    write_readme(out_dir, machine, runs, date)
    if "peers" in parts and (text := targets_text(out_dir)):
        print(f"\n{text}")
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
