"""`make demo`: the whole odyssey on this machine, everything under demo/.

DEMO=1.2b (the default: the real 1.2B model on disk), DEMO=small or DEMO=nano (seconds). Each
stage is the `odyssey` command a user would type; the demo prints it, runs it, measures its
seconds and peak RSS, and ends with a summary:

  corpus    tools/make_sample_corpus.py             the bilingual sample corpus, generated
  init      odyssey init (or reuse when verified)   the model on disk, never all in RAM
  data      odyssey prepare-data --model            BPE tokenizer + token files; tokenizer into the store
  train     odyssey train --ram-budget 2GiB         LoRA, a few steps, guard on (monitor with a display)
  merge     odyssey merge                           adapter folded in, layer by layer
  export    odyssey export --formats safetensors,pth,gguf
  generate  odyssey generate                        a short text from the merged model
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
BUDGET = "2GiB"
# per size: training steps and sequence length (the 1.2B's steps take ~20 s each on 2 cores)
TRAIN = {"nano": (30, 256, "3e-3"), "small": (10, 256, "1e-3"), "1.2b": (6, 256, "1e-3")}


class Stage:
    def __init__(self):
        self.rows: list[tuple[str, float, float]] = []  # (name, seconds, peak RSS MiB)

    def run(self, name: str, args: list[str], check: bool = True, tool: bool = False) -> int:
        cmd = [sys.executable, *args] if tool else [sys.executable, "-m", "odyssey", *args]
        shown = " ".join(shlex.quote(str(a)) for a in (args if tool else ["odyssey", *args]))
        print(f"\n$ {shown}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS (ru_maxrss, KiB)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        if name:
            self.rows.append((name, seconds, usage.ru_maxrss / 1024))
        if check and proc.returncode != 0:
            sys.exit(f"demo: stage {name or args[0]} failed with status {proc.returncode}")
        return proc.returncode


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    which = os.environ.get("DEMO", "1.2b").lower()
    config = {"nano": "configs/nano.yaml", "small": "configs/small.yaml", "1.2b": "configs/odyssey-1.2b.yaml"}.get(
        which
    )
    if config is None:
        sys.exit(f"demo: DEMO must be nano, small or 1.2b, got {which!r}")
    steps, seq_len, lr = TRAIN[which]
    model = DEMO / "models" / f"base-{which}"
    merged = DEMO / "models" / f"merged-{which}"
    corpus, tok = DEMO / "data" / "corpus", DEMO / "data" / f"tok-{which}"
    run = DEMO / "runs" / f"lora-{which}"
    exports = DEMO / "exports" / which
    st = Stage()
    t_all = time.perf_counter()

    st.run("corpus", ["tools/make_sample_corpus.py", "--out", corpus], tool=True)
    reuse = (model / "model.safetensors.index.json").exists() and st.run(
        "", ["verify", model, "--quiet"], check=False
    ) == 0
    if reuse:
        print(f"demo: reusing the verified model at {model}")
    else:
        st.run("init", ["init", "--config", config, "--out", model, "--force"])
    st.run("", ["info", model])
    st.run("data", ["prepare-data", corpus, "--out", tok, "--model", model, "--force"])
    st.run("", ["plan", "--model", model, "--ram-budget", BUDGET, "--seq-len", str(seq_len)])
    train = [
        "train",
        "--model",
        model,
        "--data",
        tok,
        "--out",
        run,
        "--ram-budget",
        BUDGET,
        "--steps",
        str(steps),
        f"seq_len={seq_len}",
        f"lr={lr}",
        "warmup_steps=1",
        f"eval_every={steps}",
        "eval_batches=2",
        f"checkpoint_every={max(1, steps // 2)}",
    ]
    if os.environ.get("DISPLAY"):
        train.append("--monitor")
    if run.exists():  # a previous demo's run: start afresh
        import shutil

        shutil.rmtree(run)
    st.run("train", train)
    st.run("merge", ["merge", "--model", model, "--adapter", run / "adapter", "--out", merged, "--force"])
    st.run("export", ["export", merged, "--out", exports, "--formats", "safetensors,pth,gguf", "--force"])
    st.run(
        "generate",
        [
            "generate",
            "--model",
            merged,
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "12",
            "--ram-budget",
            "1GiB",
            "--temperature",
            "0.8",
        ],
    )
    summary(st, which, model, merged, exports, run, time.perf_counter() - t_all)
    return 0


def summary(st: Stage, which: str, model: Path, merged: Path, exports: Path, run: Path, total_s: float) -> None:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in records if r.get("kind") == "step"]
    vals = [r for r in records if r.get("kind") == "val"]
    pagein = [r["pagein_mb_s"] for r in steps[1:] or steps]
    print(f"\n== demo summary ({which}) / 데모 요약 ==")
    print(f"  {'stage':10s} {'seconds':>8s} {'peak RSS':>10s}")
    for name, seconds, rss in st.rows:
        print(f"  {name:10s} {seconds:8.1f} {rss:8.0f} MiB")
    print(f"  {'total':10s} {total_s:8.1f}")
    print(
        f"  model      {size_of(model) / 1e9:.2f} GB at {model.relative_to(ROOT)}; "
        f"merged {size_of(merged) / 1e9:.2f} GB"
    )
    for p in sorted(q for q in exports.iterdir() if not q.name.startswith(".")):  # not the export record
        print(f"  export     {p.name:22s} {size_of(p) / 1e9:.2f} GB")
    if steps:
        print(
            f"  training   {len(steps)} steps, loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}"
            + (f", validation {vals[0]['val_loss']:.3f} -> {vals[-1]['val_loss']:.3f}" if len(vals) >= 2 else "")
            + f"; median step {sorted(s['step_s'] for s in steps)[len(steps) // 2]:.1f} s; page-in "
            f"{sorted(pagein)[len(pagein) // 2]:.0f} MB/s; "
            f"anonymous RSS {max(s['rss_anon_mib'] for s in steps):.0f} MiB "
            f"of the {BUDGET} budget"
        )
    print(f"  everything is under {DEMO.relative_to(ROOT)}/ (`make clean-demo` removes it)")


if __name__ == "__main__":
    sys.exit(main())
