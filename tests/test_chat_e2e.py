"""End to end, as a user would (each command through `odyssey.cli.main`, in this process): a nano
model is trained fully (every parameter) on the sample instruction set, then LoRA teaches it a
synthetic set of facts as question -> answer conversations; greedy answers through `odyssey chat
--prompt` are exactly right for at least 90% of the training questions after LoRA, and for under
10% before (the steps are what it takes: 50 full steps instead of 100 gave 9/16 after LoRA).

The facts ("What colour is Mina's kite?" -> "red") use names that are not in the sample data and
colours whose first BPE tokens differ, so an answer is a choice the adapter has to learn. The
store is f32, so `auto` computes in fp32 on every machine. About 35 s on 2 cores.
"""

from __future__ import annotations

import json
import random
import subprocess

from tests.conftest import ROOT, cli_in_process

NAMES = ["Mina", "Jun", "Tara", "Omar", "Rina", "Kai", "Lena", "Hugo", "Nia", "Pavel", "Suki", "Dario"]
NAMES += ["Ines", "Tomas", "Yara", "Bodo", "Cleo", "Arlo", "Vera", "Ilya"]
OBJECTS = ["kite", "hat", "bike", "cup", "scarf", "ball", "boat", "lamp"]
COLOURS = ["red", "blue", "green", "yellow", "orange", "pink", "white", "silver"]  # distinct first tokens


def facts(n: int) -> list[tuple[str, str]]:
    rng = random.Random("facts")
    return [(f"What colour is {name}'s {rng.choice(OBJECTS)}?", rng.choice(COLOURS)) for name in NAMES[:n]]


def conversation(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def answers(capsys, store, qa, adapter=None) -> list[str]:
    """The greedy answer of `odyssey chat --prompt Q --temperature 0` to each question (in this process: one
    interpreter for all the questions; the command is the same)."""
    from odyssey.cli import main

    extra = ["--adapter", str(adapter)] if adapter else []
    out = []
    for q, _ in qa:
        capsys.readouterr()
        rc = main(
            [
                "chat",
                "--model",
                str(store),
                *extra,
                "--prompt",
                q,
                "--temperature",
                "0",
                "--max-new-tokens",
                "8",
                "--quiet",
            ]
        )
        got = capsys.readouterr()
        assert rc == 0, got.err
        out.append(got.out.strip())
    return out


def test_lora_learns_question_answer_pairs_through_chat(tmp_path, capsys):
    inst = ROOT / "data" / "sample-instructions"
    ok(cli_in_process("init", "--config", ROOT / "configs" / "nano.yaml", "--out", tmp_path / "base", "--dtype", "f32",
               "--quiet", "vocab_size=1024"))  # fmt: skip
    # full training: the BPE and the model learn the instruction set, every token (--no-mask-prompt:
    # a model trained on answers alone never learns to read the questions, and LoRA cannot teach it)
    ok(cli_in_process("prepare-data", inst / "instructions_en.jsonl", inst / "instructions_ko.jsonl", "--out",
               tmp_path / "inst", "--model", tmp_path / "base", "--vocab-size", 1024, "--seq-len", 128,
               "--no-mask-prompt", "--quiet"))  # fmt: skip
    common = ["--no-guard", "--quiet", "--ram-budget", "2GiB", "seq_len=128", "batch_size=8", "eval_batches=1"]
    ok(cli_in_process("train", "--mode", "full", "--model", tmp_path / "base", "--data", tmp_path / "inst", "--out",
               tmp_path / "full", "--steps", 100, *common, "lr=3e-3", "warmup_steps=10", "eval_every=100",
               "checkpoint_every=100"))  # fmt: skip
    model = tmp_path / "full" / "model"

    qa = facts(16)
    (tmp_path / "qa").mkdir()
    records = [conversation(q, a) for q, a in qa] * 4
    random.Random(0).shuffle(records)
    (tmp_path / "qa" / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ok(cli_in_process("prepare-data", tmp_path / "qa", "--out", tmp_path / "qatok", "--model", model, "--quiet"))
    manifest = json.loads((tmp_path / "qatok" / "manifest.json").read_text())
    assert manifest["layout"] == "examples" and manifest["data_format"] == "chat"
    ok(cli_in_process("train", "--model", model, "--data", tmp_path / "qatok", "--out", tmp_path / "lora",
               "--steps", 150, *common, "lr=1e-2", "lora.r=16", "lora.alpha=32", "warmup_steps=15", "eval_every=150",
               "checkpoint_every=150"))  # fmt: skip

    before = answers(capsys, model, qa)
    after = answers(capsys, model, qa, tmp_path / "lora" / "adapter")
    right_before = sum(got == a for got, (_, a) in zip(before, qa, strict=True))
    right_after = sum(got == a for got, (_, a) in zip(after, qa, strict=True))
    wrong = [(q, a, got) for got, (q, a) in zip(after, qa, strict=True) if got != a]
    print(f"exact before {right_before}/{len(qa)}, after {right_after}/{len(qa)}; wrong after: {wrong}")
    assert right_before < 0.1 * len(qa), before
    assert right_after >= 0.9 * len(qa), wrong
