"""`odyssey plan`, `generate`, `train`, `prepare-data` and `bench`: the verbs that run the model or
prepare its data."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from odyssey.cli.chat import add_chat_options, add_pin_option
from odyssey.cli.common import (
    count,
    number,
    parser_for,
    ram_budget_arg,
)
from odyssey.dtypes import COMPUTE_DTYPES, compute_dtype_line
from odyssey.errors import OdysseyError


def add_plan_parser(sub) -> None:
    s = parser_for(sub, "plan", "show the memory plan of a run against a RAM budget, term by term")
    s.add_argument("--model", required=True, help="store directory, or a llama.cpp .gguf file")
    s.add_argument("--ram-budget", help="e.g. 2GiB, 1500MiB, 2G")
    s.add_argument(
        "--mode",
        default="lora",
        choices=["lora", "forward", "full"],
        help="lora: training with adapters; forward: generation; full: all parameters",
    )
    s.add_argument("--seq-len", type=count(1), default=512)
    s.add_argument("--batch-size", type=count(1), default=1)
    s.add_argument("--lora-r", type=count(1), default=16)
    s.add_argument(
        "--grad-accum", type=count(1), default=1, help="micro-batches a step sums gradients over (train's grad_accum)"
    )
    s.add_argument("--slots", type=count(1), default=2, help="pager buffer slots")
    add_residency_options(s, default_pin=True)
    s.add_argument("--compute-dtype", default="auto", choices=list(COMPUTE_DTYPES))
    s.set_defaults(func=cmd_plan)


def add_residency_options(s, default_pin) -> None:
    """--pin/--no-pin and --recompute (train's `pin` and `recompute`; residency.py)."""
    s.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=default_pin,
        help="keep units resident across steps with what the plan leaves of --ram-budget (default); "
        "--no-pin: page every unit through the slots (layers that keep activations are paged too)",
    )
    s.add_argument(
        "--recompute",
        choices=["auto", "all"],
        default=None if default_pin is None else "auto",
        help="auto: the last layers keep their activations where the budget allows (default); "
        "all: recompute every layer in backward",
    )
    s.add_argument(
        "--spill",
        choices=["auto", "on", "off"],
        default=None if default_pin is None else "auto",
        help="layers the budget cannot keep activations for write them to disk and read them back for "
        "backward instead of recomputing them; auto (default): when the disk is fast enough, measured",
    )
    s.add_argument(
        "--spill-dir",
        default=None,
        help="where the spill file goes (unnamed, gone with the process); default: the run directory "
        "(odyssey plan: the current directory)",
    )
    s.add_argument(
        "--optimizer-offload",
        choices=["auto", "on", "off"],
        default=None if default_pin is None else "auto",
        help="the AdamW moments wait on disk (in the spill directory) between optimizer steps instead of "
        "in RAM; auto (default): where that spares recompute or lets the plan fit",
    )


def cmd_plan(args) -> int:
    from odyssey.config import LoraSettings, TrainConfig
    from odyssey.planner import plan_checked
    from odyssey.store import open_model
    from odyssey.train import training_plan

    store = open_model(args.model)
    budget = ram_budget_arg(args)
    if args.mode == "forward":  # generate's plan: `auto` decides for one token a pass, as generate does
        from odyssey.dtypes import compute_dtype_name
        from odyssey.probe import DECODE_TOKENS

        compute = compute_dtype_line(args.compute_dtype, store.dtype, store.config, DECODE_TOKENS)
        args.compute_dtype = compute_dtype_name(args.compute_dtype, store.dtype, store.config, DECODE_TOKENS)
        plan_checked(
            store,
            mode="forward",
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            slots=args.slots,
            budget=budget,
            compute_dtype=args.compute_dtype,
            pin=args.pin,
            show=lambda p: print(f"{p.table()}\n{compute}"),
        )
        return 0
    cfg = TrainConfig(  # the plan `odyssey train` would make with these settings
        mode=args.mode,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        slots=args.slots,
        compute_dtype=args.compute_dtype,
        pin=args.pin,
        recompute=args.recompute,
        spill=args.spill,
        spill_dir=args.spill_dir or "",
        optimizer_offload=args.optimizer_offload,
        lora=LoraSettings(r=args.lora_r),
    )
    compute = compute_dtype_line(args.compute_dtype, store.dtype, store.config)

    def show(p, lines) -> None:  # "spill: none" is in the table already (the residency's lines)
        print("\n".join([p.table(), compute, *(x for x in lines if not x.startswith("spill: none"))]))

    training_plan(store, cfg, budget, ".", show=show)
    return 0


def add_generate_parser(sub) -> None:
    s = parser_for(sub, "generate", "generate text with the model paged from disk under a RAM budget")
    s.add_argument("--model", required=True, help="store directory, or a llama.cpp .gguf file")
    prompt = s.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer in the store)")
    prompt.add_argument("--prompt-ids", help="prompt as token ids, e.g. 1,2,3 (no tokenizer needed)")
    s.add_argument("--adapter", help="a LoRA adapter directory (e.g. RUN/adapter) applied on the fly")
    s.add_argument("--max-new-tokens", type=count(1), default=32)
    s.add_argument("--ram-budget", help="e.g. 1GiB")
    s.add_argument("--temperature", type=number(0.0), default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=count(0), default=40)
    s.add_argument("--seed", type=count(0), default=0)
    s.add_argument("--slots", type=count(1), default=2)
    add_pin_option(s)
    s.add_argument("--compute-dtype", default="auto", choices=list(COMPUTE_DTYPES))
    s.add_argument("--quiet", action="store_true", help="only the generated text")
    s.add_argument(
        "--chat", action="store_true", help="a conversation through the chat template: `odyssey chat` (see its help)"
    )
    add_chat_options(s)
    s.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from odyssey.generate import generate_ids, open_engine, stop_ids, stream_text
    from odyssey.store import open_model, tokenizer_dir
    from odyssey.tokenizer import load_model_tokenizer

    if args.chat:  # `generate --chat` is `odyssey chat`
        from odyssey.cli.chat import cmd_chat

        return cmd_chat(args)
    store = open_model(args.model)
    if args.prompt_ids:
        try:
            prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise OdysseyError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        tok = load_model_tokenizer(tokenizer_dir(store)) if store.tokenizer_path() else None
    else:
        if args.prompt is None:
            raise OdysseyError("pass --prompt TEXT (or --prompt-ids 1,2,3)")
        tok = load_model_tokenizer(
            tokenizer_dir(store),
            fix=f"add one with `odyssey prepare-data DATA --out DIR --model {store.root}` "
            f"(or `odyssey import` a model that has one), or pass --prompt-ids 1,2,3",
        )
        prompt = tok.encode(args.prompt)  # as transformers: a BOS only where the tokenizer adds one
    vocab = store.config.vocab_size
    outside = [i for i in prompt if not 0 <= i < vocab]
    if outside:
        raise OdysseyError(f"prompt id {outside[0]} is outside the model's vocabulary (0..{vocab - 1})")
    t0 = time.perf_counter()
    with open_engine(  # a plan that does not fit is one line naming its terms; one that fits is shown
        store,
        adapter=args.adapter,
        seq_len=len(prompt) + args.max_new_tokens,
        budget=ram_budget_arg(args),
        compute_dtype=args.compute_dtype,
        slots=args.slots,
        pin=args.pin,
        show=not args.quiet,
    ) as eng:
        if args.prompt and not args.quiet:
            sys.stdout.write(args.prompt)
        new = stream_text(
            tok,
            generate_ids(
                eng,
                prompt,
                args.max_new_tokens,
                args.temperature,
                args.top_k,
                args.seed,
                eos_ids=stop_ids(store, tok),
                vocab_limit=tok.vocab_size if tok else None,
            ),
            lambda s: (sys.stdout.write(s), sys.stdout.flush()),
            prompt_ids=prompt,
        )
        dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    if not args.quiet:
        print(f"{len(new)} tokens in {dt:.1f} s ({dt / max(len(new), 1):.2f} s/token)", file=sys.stderr)
    return 0


def add_train_parser(sub) -> None:
    s = parser_for(sub, "train", "train LoRA adapters (or a small model fully) under a RAM budget, resumable")
    s.add_argument("--model", help="base store directory or .gguf file (default on --resume: the run's)")
    s.add_argument("--data", help="data directory from `odyssey prepare-data` (default on --resume: the run's)")
    s.add_argument("--out", required=True, help="run directory (config, metrics, checkpoints, adapter)")
    s.add_argument("--ram-budget", help="e.g. 2GiB; checked by the memory plan before the first step")
    s.add_argument("--config", help="training YAML (default: built-in defaults; see configs/lora.yaml)")
    s.add_argument("--steps", type=count(1), help="optimizer steps (overrides the config's steps)")
    s.add_argument("--mode", choices=["lora", "full"], help="full: train every parameter in RAM (small models)")
    s.add_argument("--resume", action="store_true", help="continue --out from its last checkpoint")
    s.add_argument("--monitor", action="store_true", help="open the monitor window in its own process")
    s.add_argument("--no-guard", action="store_true", help="do not start the guard process")
    s.add_argument("--nproc", type=count(1), help="data-parallel ranks on this machine (torchrun shortcut)")
    s.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="examples data (chat, completions, alpaca): pack whole examples into each window, attention kept "
        "within each (default); --no-packing: one example per window, padded",
    )
    s.add_argument(
        "--too-long",
        choices=["truncate", "drop"],
        help="examples longer than seq_len + 1 tokens: keep their first seq_len + 1 (default) or drop them",
    )
    add_residency_options(s, default_pin=None)
    s.add_argument(
        "--compile",
        choices=["on", "off"],
        default=None,
        help="torch.compile each decoder layer (default off: no faster than eager here; see README, Speed)",
    )
    s.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar, no compute-dtype or residency line (both stay in the run's events)",
    )
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lora.r=32 seq_len=256")
    s.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from odyssey.train import train

    if args.nproc and args.nproc > 1:
        return launch_ranks(args.nproc)
    overrides = list(args.overrides)  # --mode and --steps are shorthands for config overrides
    overrides += [f"mode={args.mode}"] * bool(args.mode) + [f"steps={args.steps}"] * (args.steps is not None)
    overrides += [f"packing={str(args.packing).lower()}"] * (args.packing is not None)
    overrides += [f"too_long={args.too_long}"] * bool(args.too_long)
    overrides += [f"pin={str(args.pin).lower()}"] * (args.pin is not None)
    overrides += [f"recompute={args.recompute}"] * bool(args.recompute)
    overrides += [f"compile={args.compile}"] * bool(args.compile)
    overrides += [f"spill={args.spill}"] * bool(args.spill)
    overrides += [f"spill_dir={args.spill_dir}"] * (args.spill_dir is not None)
    overrides += [f"optimizer_offload={args.optimizer_offload}"] * bool(args.optimizer_offload)
    return train(
        args.out,
        model=args.model,
        data=args.data,
        budget=args.ram_budget,
        config_path=args.config,
        overrides=overrides,
        resume=args.resume,
        monitor=args.monitor,
        guard=not args.no_guard,
        progress=not args.quiet,
    )


def launch_ranks(nproc: int) -> int:
    """`odyssey train --nproc N ...`: the same command on N local ranks through torchrun
    (torch.distributed.run, standalone rendezvous on this machine)."""
    import subprocess

    argv = sys.argv[1:]
    i = next(k for k, a in enumerate(argv) if a == "--nproc" or a.startswith("--nproc="))
    argv = argv[:i] + argv[i + (1 if "=" in argv[i] else 2) :]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "odyssey",
        *argv,
    ]
    return subprocess.call(cmd)


def add_prepare_data_parser(sub) -> None:
    s = parser_for(
        sub,
        "prepare-data",
        "tokenize text or conversations (chat, completions, alpaca) into token files with the model's tokenizer",
    )
    s.add_argument("inputs", nargs="+", help=".txt, .jsonl, .json, .parquet or .csv files, or directories")
    s.add_argument("--out", required=True, help="data directory to write")
    s.add_argument(
        "--vocab-size", type=count(1), help="train a byte-level BPE of this size (default: the model's, else 8192)"
    )
    s.add_argument(
        "--tokenizer",
        help="use the Hugging Face tokenizer in this directory (a checkpoint folder, a store, a data directory)",
    )
    s.add_argument(
        "--model",
        help="store directory: tokenize with its tokenizer (a store without one gets this run's), "
        "check the vocabulary fits",
    )
    s.add_argument(
        "--replace-tokenizer",
        action="store_true",
        help="put the --tokenizer given (or the one --vocab-size trains) in place of the --model store's own",
    )
    s.add_argument("--val-fraction", type=number(0.0, 1.0), default=0.05)
    s.add_argument("--seed", type=count(0), default=0)
    s.add_argument("--force", action="store_true", help="write into a non-empty --out")
    s.add_argument("--quiet", action="store_true")
    g = s.add_argument_group("conversations (chat, completions, alpaca data)")
    g.add_argument(
        "--format",
        default="auto",
        choices=["auto", "chat", "completions", "alpaca", "text"],
        help="the data format; auto: each file's first record decides (messages, prompt/completion, "
        "instruction/output, text)",
    )
    g.add_argument(
        "--chat-template",
        metavar="FILE|none",
        help="a Jinja chat template file instead of the tokenizer's own (default ChatML where it has none); "
        "none: prompt + completion + EOS, no template",
    )
    g.add_argument(
        "--no-mask-prompt",
        dest="mask_prompt",
        action="store_false",
        help="train on every token, not only the answers (with their end-of-turn token)",
    )
    g.add_argument("--train-on", default="all", choices=["all", "last"], help="the assistant turns trained on")
    g.add_argument(
        "--seq-len",
        type=count(1),
        default=512,
        help="longest example, in tokens (+1): longer ones are truncated or dropped (--too-long)",
    )
    g.add_argument("--too-long", default="truncate", choices=["truncate", "drop"], help="what to do with a longer one")
    g.add_argument("--prompt-key", default="prompt", help="the completions format's prompt key")
    g.add_argument("--completion-key", default="completion", help="the completions format's completion key")
    s.set_defaults(func=cmd_prepare_data)


def cmd_prepare_data(args) -> int:
    from odyssey.data import prepare_data

    # prepare_data shows a progress bar and prints its own summary line
    prepare_data(
        [Path(p) for p in args.inputs],
        Path(args.out),
        vocab_size=args.vocab_size,
        tokenizer_dir=Path(args.tokenizer) if args.tokenizer else None,
        model_store=Path(args.model) if args.model else None,
        val_fraction=args.val_fraction,
        seed=args.seed,
        force=args.force,
        progress=not args.quiet,
        replace_tokenizer=args.replace_tokenizer,
        data_format=args.format,
        chat_template=args.chat_template,
        mask_prompt=args.mask_prompt,
        train_on=args.train_on,
        seq_len=args.seq_len,
        too_long=args.too_long,
        prompt_key=args.prompt_key,
        completion_key=args.completion_key,
    )
    return 0


def add_bench_parser(sub) -> None:
    s = parser_for(sub, "bench", "measure page-in throughput against the disk's raw sequential read")
    s.add_argument("what", choices=["pagein"], help="which benchmark")
    s.add_argument("--model", required=True, help="store directory, or a llama.cpp .gguf file")
    s.add_argument("--strategies", default=",".join(("mmap", "mmap-willneed", "pread", "pread-direct")))
    s.add_argument("--slots", default="1,2,3", help="slot counts for the pager strategies")
    s.add_argument("--repeats", type=count(1), default=3, help="runs per row (the best is kept: the disk is noisy)")
    s.add_argument("--out", help="JSON file; a .md table and a .png chart are written beside it")
    s.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from odyssey import bench

    if args.what != "pagein":
        raise OdysseyError(f"unknown benchmark {args.what!r}; choose pagein")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in bench.STRATEGIES]
    if bad:
        raise OdysseyError(f"--strategies: unknown {bad[0]!r}; choose from {', '.join(bench.STRATEGIES)}")
    try:
        slots = [int(x) for x in args.slots.split(",")]
    except ValueError:
        raise OdysseyError(f"--slots must be comma-separated integers, got {args.slots!r}") from None
    print(f"page-in benchmark on {args.model} (cold: page cache dropped before each run)")
    result = bench.run(args.model, strategies, slots, repeats=args.repeats)
    print(bench.table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    for p in bench.write_outputs(result, args.out):
        print(f"wrote {p}")
    return 0
