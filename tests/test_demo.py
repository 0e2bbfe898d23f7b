"""tools/demo.py, DEMO=real: the commands it runs on the real SmolLM2-135M-Instruct Q4_1 GGUF (fast: the
plan parsed by odyssey's own parser, the dry run), and the whole demo end to end (slow: the answers
change, the loss on held-out answers drops, the adapter is a llama.cpp LoRA GGUF)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from odyssey.cli import build_parser
from odyssey.config import load_train_config
from odyssey.realmodel import smollm2_gguf
from tests.conftest import ROOT, load_tool

demo = load_tool("demo")


def run_demo(*args, which: str = "real", timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEMO": which, "PYTHONPATH": str(ROOT)}
    env.pop("DISPLAY", None)  # no monitor window
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def option(args: list, flag: str):
    return args[args.index(flag) + 1]


def test_real_plan_is_well_formed(tmp_path, monkeypatch):
    """Every command parses with odyssey's own parser, every one reads the GGUF, and the stages are
    chained: prepare-data's output is train's data, train's adapter is what chat, eval and export use."""
    monkeypatch.delenv("DISPLAY", raising=False)
    model = smollm2_gguf()
    plan = demo.real_plan(model, tmp_path, steps=3)
    verbs = [c.args[0] for c in plan]
    assert verbs == ["info", "plan", *["chat"] * 3, "eval", "prepare-data", "train", *["chat"] * 3, "eval", "export"]
    parser = build_parser()
    parsed = [parser.parse_args([str(a) for a in c.args]) for c in plan]  # argparse exits (SystemExit) on an error
    assert parsed[0].model == str(model)  # odyssey info GGUF
    for c in plan[1:]:
        assert option(c.args, "--model") == model, c.name

    by_name = {c.name: c.args for c in plan}
    run = option(by_name["real-lora"], "--out")
    assert option(by_name["real-lora"], "--data") == option(by_name["real-data"], "--out")
    adapter = run / "adapter"
    after = [c.args for c in plan if c.name.endswith("-after")] + [by_name["real-export"]]
    assert len(after) == 5  # three questions, eval, export
    for args in after:
        assert option(args, "--adapter") == adapter
    for c in plan[: verbs.index("train")]:
        assert "--adapter" not in c.args, c.name  # "before" is the bare GGUF

    # the same questions before and after, temperature 0; the EN and KO ones are in the training set
    asks = {c.name: option(c.args, "--prompt") for c in plan if c.capture}
    assert len(asks) == 6
    for key in ("en", "ko", "general"):
        assert asks[f"ask-{key}-before"] == asks[f"ask-{key}-after"]
    for lang in ("en", "ko"):
        lines = (demo.INSTRUCTIONS / f"instructions_{lang}.jsonl").read_text(encoding="utf-8").splitlines()
        assert any(json.loads(x)["messages"][0]["content"] == asks[f"ask-{lang}-before"] for x in lines)
    assert all(option(c.args, "--temperature") == "0" for c in plan if c.capture)

    # train's key=value overrides are valid settings; the export is the adapter as a llama.cpp LoRA
    train = parsed[verbs.index("train")]
    config = load_train_config(None, train.overrides + [f"steps={train.steps}"])
    assert (config.steps, config.seq_len, config.lora.r) == (3, demo.REAL_SEQ_LEN, demo.REAL_R)
    assert option(by_name["real-export"], "--formats") == "gguf-lora"
    assert option(by_name["eval-before"], "--out") != option(by_name["eval-after"], "--out")
    assert all(Path(option(c.args, "--out")).is_relative_to(tmp_path) for c in plan if "--out" in c.args)


def test_dry_run_lists_the_commands_and_writes_nothing(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo("--dry-run", "--out", out, "--steps", 2)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"GGUF={smollm2_gguf()}")
    assert any(x.startswith("real-lora") and 'odyssey train --model "$GGUF"' in x and "--steps 2" in x for x in lines)
    assert lines[-1].split() == [
        "(llama.cpp)",
        "llama-cli",
        "-m",
        '"$GGUF"',
        "--lora",
        str(out / "exports/real/adapter-f32.gguf"),
    ]
    assert not out.exists()


def test_refusals():
    proc = run_demo(which="bogus")
    assert proc.returncode == 1 and "DEMO must be nano, small, 1.2b, chat or real, got 'bogus'" in proc.stderr
    proc = run_demo("--dry-run", which="nano")
    assert proc.returncode == 1 and "--dry-run, --out and --steps are for DEMO=real" in proc.stderr
    proc = run_demo("--dry-run", "--steps", 0)
    assert proc.returncode == 1 and "--steps must be at least 1, got 0" in proc.stderr


def test_summary_helpers(tmp_path):
    assert demo.clean_answer("어느 오후, \n어느 \ufffd") == "어느 오후, 어느"
    records = [
        {"kind": "pagein", "step": 1, "layers": [{"bytes": 2**20}, {"bytes": 2**20}]},
        {"kind": "pagein", "step": 1, "layers": [{"bytes": 2**20}]},
        {"kind": "pagein", "step": 2, "layers": [{"bytes": 5 * 2**20}]},
        {"kind": "pagein", "step": 3, "layers": [{"bytes": 4 * 2**20}]},
        {"kind": "step", "step": 1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert demo.pagein_per_step(tmp_path) == 4.0  # median of 3, 5 and 4 MiB


def test_summary_puts_before_and_after_side_by_side(tmp_path, capsys):
    adapter = tmp_path / "adapter-f32.gguf"
    adapter.write_bytes(b"x" * 2_000_000)
    fig = {
        "gguf": adapter,
        "asks": {"en": "A story.\n\nWhere?", "ko": "이야기.\n\n언제?", "general": "What is the capital of France?"},
        "answers": {
            "before": {"en": "In a small\ntown.", "ko": "어느 오후, 어느 \ufffd", "general": "Paris."},
            "after": {"en": "In the school yard.", "ko": "햇살이 밝은 어느 오후였어요.", "general": "Paris."},
        },
        "references": {"en": "In the school yard.", "ko": "햇살이 밝은 어느 오후였어요."},
        "evals": {
            "before": {"loss": 1.2, "exact": 0, "examples": 10},
            "after": {"loss": 0.4, "exact": 3, "examples": 10},
        },
        "lora": {"steps": 16, "loss": (1.5, 0.3), "val": (1.1, 0.5), "seconds": 200.0, "pagein_mib": 153.4},
        "adapter": adapter,
        "llama_cli": "llama-cli -m x --lora y",
    }
    st = demo.Stage()
    st.rows = [("real-lora", 200.0, 420.0)]
    demo.real_summary(st, fig, 600.0, tmp_path)
    out = capsys.readouterr().out
    assert (
        "16 steps of 1024 tokens in 200 s, loss on answers 1.50 -> 0.30 (validation 1.10 -> 0.50); page-in 153 MiB"
        in out
    )
    assert (
        "Q (ko, from the training set; after a story): 언제?\n      before: 어느 오후, 어느\n      after:  햇살이"
        in out
    )
    assert "before: In a small town.\n" in out
    assert "loss on answers 1.200 -> 0.400, exact match 0/10 -> 3/10" in out
    assert "(2.0 MB, a llama.cpp LoRA GGUF)\n             llama-cli -m x --lora y" in out


@pytest.mark.slow
def test_real_demo_end_to_end(tmp_path):
    """DEMO=real with 6 LoRA steps (the demo runs 16): every stage succeeds, the answers change, the loss
    on held-out answers drops, and the adapter is a llama.cpp LoRA GGUF. About 8 minutes on 2 cores."""
    out = tmp_path / "demo"
    proc = run_demo("--out", out, "--steps", 6, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo summary (real" in proc.stdout
    fig = json.loads((out / "real-summary.json").read_text(encoding="utf-8"))
    before, after = fig["answers"]["before"], fig["answers"]["after"]
    for key in ("en", "ko", "general"):
        assert before[key] and after[key], key
    for lang in ("en", "ko"):
        assert after[lang] != before[lang], lang
    assert "Paris" in after["general"]  # LoRA on stories did not break what the model knew
    assert fig["lora"]["steps"] == 6 and fig["lora"]["loss"][1] < fig["lora"]["loss"][0]
    assert fig["evals"]["after"]["loss"] < fig["evals"]["before"]["loss"]
    assert fig["evals"]["after"]["examples"] == demo.REAL_EVAL_LIMIT
    adapter = out / "exports" / "real" / "adapter-f32.gguf"
    reader = gguf.GGUFReader(adapter)
    field = reader.fields["general.type"]
    assert bytes(field.parts[field.data[0]]).decode() == "adapter"
    assert sum(t.name.endswith(".lora_a") for t in reader.tensors) == 30 * 7  # 7 projections x 30 layers
    assert fig["lora"]["pagein_mib"] > 0
