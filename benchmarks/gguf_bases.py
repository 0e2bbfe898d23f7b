"""GGUF bases, measured: what a quantized base costs in quality and what it saves in page-in.

1. quality  the same LoRA run on a bf16 store and on its Q8_0 and Q4_K GGUF. A small llama
            (hidden 256, so every matrix is whole K-quant blocks; 4 layers, vocabulary 2048) is first
            trained fully on the sample stories (f32), exported as bf16, Q8_0 and Q4_K GGUF, the bf16
            GGUF imported as a bf16 store; then LoRA r=16 on the bilingual instruction set, the same
            batches in the same order, on each base (fp32 compute everywhere, so the base's bytes are
            the only difference). Validation loss on the answers after the run, side by side.
2. step     the 1.2B LoRA step (seq 512, batch 1, r=16) paged from the bf16 store, from its Q8_0
            GGUF and from its Q4_K GGUF, each in a memory cgroup: step seconds, bytes paged in per
            step, page-in MB/s and stall.
3. 8b       a model of Llama 3.1 8B's shape (configs/llama-3.1-8b.yaml, random init) streamed to
            disk, exported as a Q4_K GGUF (or --big-type), and its LoRA step (seq 512, batch 1,
            r=16) run 3 times inside a 3 GiB memory cgroup from that GGUF. The bf16 store (16 GB) and
            the GGUF (4.6 GB) are created under --work and removed after, unless --big-gguf names
            a GGUF made before (then nothing is created or removed).

    .venv/bin/python benchmarks/gguf_bases.py [--parts quality,step,8b] [--model STORE] [--budget 2GiB]

Writes gguf.{json,md} under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import GIB, MIB  # noqa: E402

TITLE = "GGUF bases: quality and page-in"
ROOT = common.ROOT
QUALITY_SHAPE = [  # overrides of configs/nano.yaml: rows of 256 and 768 columns are whole K-quant blocks
    "hidden_size=256",
    "intermediate_size=768",
    "vocab_size=2048",
    "num_attention_heads=4",
    "num_key_value_heads=2",
]
BASE_STEPS, BASE_LR = 300, "3e-3"
LORA_STEPS, LORA_LR, SEQ, BATCH = 200, "5e-3", 256, 8
QUANT_TYPES = ("q8_0", "q4_k")


def _run(args, env=None, capture=False) -> str:
    proc = subprocess.run(common.odyssey_cmd(*args), cwd=ROOT, env=env, text=True, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"odyssey {' '.join(map(str, args[:2]))} failed: {common.last_line(proc.stderr)}")
    return proc.stdout if capture else ""


def _fp32_env() -> dict:
    return dict(os.environ, ODYSSEY_COMPUTE_DTYPE="fp32")


def _val_loss(run: Path) -> float | None:
    vals = [r for r in common.read_metrics(run / "metrics.jsonl") if r.get("kind") == "val"]
    return vals[-1]["val_loss"] if vals else None


def _last_loss(run: Path) -> float | None:
    steps = [r for r in common.read_metrics(run / "metrics.jsonl") if r.get("kind") == "step"]
    return steps[-1]["loss"] if steps else None


def _gguf(exports: Path, qtype: str) -> Path:
    found = sorted(exports.glob(f"*{qtype}*.gguf"))
    if not found:
        raise RuntimeError(f"no {qtype} GGUF under {exports}")
    return found[0]


def quality(work: Path, progress=print) -> dict:
    """Part 1 (see the module docstring): validation losses of the same LoRA run on each base."""
    env = _fp32_env()
    base_store, tok, inst = work / "base-init", work / "tok-stories", work / "tok-instructions"
    base_run, exports = work / "runs" / "base", work / "exports"
    for p in (base_run, exports):
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.perf_counter()
    progress("quality: the base (a small llama trained fully on the sample stories)")
    _run(["init", "--config", "configs/nano.yaml", "--out", base_store, "--dtype", "f32", "--force", "--quiet",
          *QUALITY_SHAPE])  # fmt: skip
    _run(["prepare-data", ROOT / "data" / "sample", "--out", tok, "--model", base_store, "--seq-len", SEQ,
          "--force", "--quiet"])  # fmt: skip
    _run(["train", "--mode", "full", "--model", base_store, "--data", tok, "--out", base_run, "--steps", BASE_STEPS,
          "--no-guard", "--quiet", "--ram-budget", "2GiB", f"seq_len={SEQ}", f"batch_size={BATCH}", f"lr={BASE_LR}",
          "warmup_steps=10",
          f"eval_every={BASE_STEPS}", f"checkpoint_every={BASE_STEPS}"], env=env)  # fmt: skip
    base = base_run / "model"
    progress("quality: exports (bf16, q8_0, q4_k GGUF) and the bf16 store")
    for qtype in ("bf16", *QUANT_TYPES):
        _run(["export", base, "--out", exports / qtype, "--formats", "gguf", "--gguf-type", qtype, "--force",
              "--quiet"])  # fmt: skip
    bf16_store = work / "base-bf16"
    _run(["import", _gguf(exports / "bf16", "bf16"), "--out", bf16_store, "--force"])
    _run(["prepare-data", ROOT / "data" / "sample-instructions" / "instructions_en.jsonl",
          ROOT / "data" / "sample-instructions" / "instructions_ko.jsonl", "--out", inst, "--model", bf16_store,
          "--seq-len", SEQ * 2, "--force", "--quiet"])  # fmt: skip
    bases = {"bf16 store": bf16_store, **{f"{q.upper()} GGUF": _gguf(exports / q, q) for q in QUANT_TYPES}}
    rows = []
    for label, model in bases.items():
        progress(f"quality: LoRA on the {label}")
        run = work / "runs" / f"lora-{label.split()[0].lower()}"
        shutil.rmtree(run, ignore_errors=True)
        t1 = time.perf_counter()
        _run(["train", "--model", model, "--data", inst, "--out", run, "--steps", LORA_STEPS, "--no-guard",
              "--quiet", "--ram-budget", "2GiB", f"seq_len={SEQ}", f"batch_size={BATCH}", f"lr={LORA_LR}", "lora.r=16",
              "lora.alpha=32",
              "warmup_steps=10", f"eval_every={LORA_STEPS}", "eval_batches=8",
              f"checkpoint_every={LORA_STEPS}"], env=env)  # fmt: skip
        nbytes = model.stat().st_size if model.is_file() else sum(p.stat().st_size for p in model.glob("*.safetensors"))
        rows.append(
            {
                "base": label,
                "bytes": nbytes,
                "val_loss": _val_loss(run),
                "train_loss": _last_loss(run),
                "seconds": round(time.perf_counter() - t1, 1),
            }
        )
    ref = rows[0]["val_loss"]
    for r in rows:
        r["vs_bf16"] = r["val_loss"] / ref if ref and r["val_loss"] is not None else None
    return {
        "base_steps": BASE_STEPS,
        "base_val_loss": _val_loss(base_run),
        "lora_steps": LORA_STEPS,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def quality_table(q: dict) -> str:
    rows = [
        [r["base"], common.fmt(r["bytes"] / MIB, 1), common.fmt(r["val_loss"], 4), common.fmt(r["vs_bf16"], 4),
         common.fmt(r["train_loss"], 4), common.fmt(r["seconds"], 0)]
        for r in q["rows"]
    ]  # fmt: skip
    return common.markdown_table(["base", "weights MiB", "validation loss", "x bf16", "last training loss", "s"], rows)


def _pagein_bytes(records: list[dict]) -> list[int]:
    """Bytes read from disk per step (units served from a slot are not counted), from the "pagein" records."""
    out = []
    for r in records:
        if r.get("kind") == "pagein":
            out.append(sum(u.get("bytes", 0) for u in r.get("layers", []) if not u.get("reused")))
    return out


def step(store: Path, work: Path, budget: int, steps: int = 3, progress=print) -> dict:
    """Part 2: the 1.2B LoRA step from the bf16 store and from its Q8_0 and Q4_K GGUF."""
    data = common.ensure_data(progress=progress)
    if not (store / "tokenizer.json").is_file():  # a GGUF carries its tokenizer: the data's, so the ids agree
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (data / name).is_file():
                shutil.copyfile(data / name, store / name)
    exports = work / "exports-1.2b"
    models = {"bf16 store": store}
    for qtype in QUANT_TYPES:
        if not list((exports / qtype).glob(f"*{qtype}*.gguf")):
            progress(f"step: exporting {store.name} as {qtype} GGUF")
            _run(["export", store, "--out", exports / qtype, "--formats", "gguf", "--gguf-type", qtype, "--force",
                  "--quiet"])  # fmt: skip
        models[f"{qtype.upper()} GGUF"] = _gguf(exports / qtype, qtype)
    rows = []
    for label, model in models.items():
        progress(f"step: {label}, {steps} steps in a {budget / GIB:.2f} GiB cgroup")
        run = work / "runs" / f"step-{label.split()[0].lower()}"
        shutil.rmtree(run, ignore_errors=True)
        rc, peak, oom, error, seconds = common.run_capped(
            common.train_cmd(model, data, run, budget, steps), budget, work / "logs" / f"step-{label.split()[0]}.log"
        )
        records = common.read_metrics(run / "metrics.jsonl")
        s = common.summarize_steps(records)
        reads = _pagein_bytes(records)
        rows.append(
            {
                "model": label,
                "file_bytes": model.stat().st_size
                if model.is_file()
                else sum(p.stat().st_size for p in model.glob("*.safetensors")),
                "error": error,
                "step_s": s["step_s"],
                "pagein_bytes": common.median(reads[1:] or reads),
                "pagein_mb_s": s["pagein_mb_s"],
                "stall_s": s["stall_s"],
                "peak_cgroup_mib": peak / MIB if peak else None,
                "peak_anon_mib": s["peak_rss_anon_mib"],
                "loss_1": s["losses"][0] if s["losses"] else None,
            }
        )
    return {"budget": budget, "steps": steps, "rows": rows}


def step_table(st: dict) -> str:
    rows = [
        [r["model"], common.fmt(r["file_bytes"] / MIB, 0), common.fmt(r["step_s"], 1),
         common.fmt(r["pagein_bytes"] / MIB if r["pagein_bytes"] else None, 0), common.fmt(r["pagein_mb_s"], 0),
         common.fmt(r["stall_s"], 2), common.fmt(r["peak_cgroup_mib"], 0), common.fmt(r["peak_anon_mib"], 0),
         common.fmt(r["loss_1"], 4), r["error"]]
        for r in st["rows"]
    ]  # fmt: skip
    return common.markdown_table(
        ["base", "file MiB", "step s", "paged in MiB/step", "page-in MB/s", "stall s", "peak cgroup MiB",
         "peak anon MiB", "loss step 1", "error"],
        rows,
    )  # fmt: skip


def big(
    work: Path, qtype: str = "q4_k", budget: int = 3 * GIB, steps: int = 3, gguf: Path | None = None, progress=print
) -> dict:
    """Part 3 (see the module docstring): the 8B-shaped model's LoRA step from its GGUF in a `budget` cgroup."""
    work.mkdir(parents=True, exist_ok=True)
    store, tok, run = work / "store-8b", work / "tok-8b", work / "runs" / "lora-8b"
    made: list[Path] = []
    figures: dict = {"type": qtype, "budget": budget, "steps": steps}
    try:
        if gguf is None:
            progress("8b: odyssey init --config configs/llama-3.1-8b.yaml (streamed, 16 GB bf16)")
            t0 = time.perf_counter()
            made.append(store)
            _run(["init", "--config", "configs/llama-3.1-8b.yaml", "--out", store, "--force", "--quiet"])
            figures["init_s"] = round(time.perf_counter() - t0, 1)
            _run(["prepare-data", ROOT / "data" / "sample", "--out", tok, "--model", store, "--seq-len", 512,
                  "--force", "--quiet"])  # fmt: skip
            progress(f"8b: odyssey export --formats gguf --gguf-type {qtype}")
            t0 = time.perf_counter()
            made.append(work / "export-8b")
            _run(["export", store, "--out", work / "export-8b", "--formats", "gguf", "--gguf-type", qtype, "--force",
                  "--quiet"])  # fmt: skip
            figures["export_s"] = round(time.perf_counter() - t0, 1)
            gguf = _gguf(work / "export-8b", qtype)
            shutil.rmtree(store)  # the GGUF is what the run reads
        else:
            _run(["prepare-data", ROOT / "data" / "sample", "--out", tok, "--model", gguf, "--seq-len", 512,
                  "--force", "--quiet"])  # fmt: skip
        figures["gguf_bytes"] = gguf.stat().st_size
        figures["plan"] = _run(["plan", "--model", gguf, "--ram-budget", f"{budget // MIB}MiB", "--seq-len", 512,
                                "--lora-r", 16], capture=True)  # fmt: skip
        progress(figures["plan"])
        progress(f"8b: {steps} LoRA steps in a {budget / GIB:.2f} GiB cgroup")
        shutil.rmtree(run, ignore_errors=True)
        rc, peak, oom, error, seconds = common.run_capped(
            common.train_cmd(gguf, tok, run, budget, steps), budget, work / "logs" / "lora-8b.log"
        )
        records = common.read_metrics(run / "metrics.jsonl")
        steps_ = [r for r in records if r.get("kind") == "step"]
        figures.update(
            error=error,
            seconds=round(seconds, 1),
            peak_cgroup_mib=round(peak / MIB, 1) if peak else None,
            step_s=[r["step_s"] for r in steps_],
            stall_s=[r["stall_s"] for r in steps_],
            pagein_mb_s=[r["pagein_mb_s"] for r in steps_],
            pagein_bytes=_pagein_bytes(records),
            rss_anon_mib=[r["rss_anon_mib"] for r in steps_],
            losses=[r["loss"] for r in steps_],
        )
    finally:
        for p in made:
            shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(tok, ignore_errors=True)
    return figures


def big_table(b: dict) -> str:
    rows = [
        [i + 1, common.fmt(b["step_s"][i], 1), common.fmt(b["pagein_bytes"][i] / MIB if i < len(b["pagein_bytes"])
         else None, 0), common.fmt(b["pagein_mb_s"][i], 0), common.fmt(b["stall_s"][i], 2),
         common.fmt(b["rss_anon_mib"][i], 0), common.fmt(b["losses"][i], 4)]
        for i in range(len(b["step_s"]))
    ]  # fmt: skip
    return common.markdown_table(
        ["step", "step s", "paged in MiB", "page-in MB/s", "stall s", "anon RSS MiB", "loss"], rows
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="quality,step")
    ap.add_argument("--model", type=Path, help="the 1.2B store (default: created under the bench cache)")
    ap.add_argument("--budget", default="2GiB")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=common.CACHE / "gguf")
    ap.add_argument("--big-type", default="q4_k", help="the 8B part's GGUF type")
    ap.add_argument("--big-gguf", type=Path, help="the 8B part: use this GGUF (made before) instead of creating one")
    ap.add_argument("--big-budget", default="3GiB")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    result: dict = {"machine": common.machine(), "date": common.today()}
    sections = []
    if "quality" in parts:
        q = quality(args.work)
        result["quality"] = q
        print(quality_table(q))
        sections.append(
            (
                f"Quality: LoRA r=16, {q['lora_steps']} steps on the instruction set, on each base "
                f"(base trained {q['base_steps']} steps, its own validation loss {common.fmt(q['base_val_loss'], 4)})",
                quality_table(q),
            )
        )
    if "step" in parts:
        store = args.model or common.ensure_store("odyssey-1.2b")
        st = step(store, args.work, common.parse_budget(args.budget), args.steps)
        result["step"] = st
        print(step_table(st))
        sections.append(
            (
                f"The 1.2B LoRA step (seq 512, batch 1, r=16) in a {args.budget} cgroup, by base; median of the "
                f"steps after the first",
                step_table(st),
            )
        )
    if "8b" in parts:
        b = big(args.work, args.big_type, common.parse_budget(args.big_budget), 3, args.big_gguf)
        result["8b"] = b
        print(big_table(b))
        sections.append(
            (
                f"Llama 3.1 8B's shape as a {b['type'].upper()} GGUF ({common.fmt(b['gguf_bytes'] / GIB, 2)} GiB): "
                f"LoRA r=16, seq 512, batch 1, inside a {args.big_budget} memory cgroup (peak "
                f"{common.fmt(b['peak_cgroup_mib'], 0)} MiB){'; ' + b['error'] if b['error'] else ''}",
                big_table(b),
            )
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out_dir / "gguf.json", result)
    common.write_markdown(
        args.out_dir / "gguf.md",
        TITLE,
        sections,
        [common.describe_machine(result["machine"]), "fp32 compute in the quality part; auto in the step part."],
    )
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1)[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
