"""`odyssey` subcommands: each a small function calling the modules that do the work.

A user-caused error (`OdysseyError`) ends with one line on stderr and exit status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

from odyssey.dtypes import COMPUTE_DTYPES, STORE_DTYPES
from odyssey.errors import OdysseyError

EXAMPLES = {
    "init": "odyssey init --config configs/odyssey-1.2b.yaml --out models/base",
    "import": "odyssey import ~/Downloads/TinyLlama-1.1B --out models/tinyllama",
    "verify": "odyssey verify models/base",
    "info": "odyssey info models/base",
    "plan": "odyssey plan --model models/base --ram-budget 2GiB --seq-len 512",
    "prepare-data": "odyssey prepare-data data/sample --out data/tok --model models/base",
    "bench": "odyssey bench pagein --model models/base --out benchmarks/results/pagein.json",
    "merge": "odyssey merge --model models/base --adapter runs/r1/adapter --out models/merged",
    "export": "odyssey export models/merged --out exports --formats safetensors,pth,gguf --gguf-type q8_0",
    "train": "odyssey train --model models/base --data data/tok --out runs/r1 --ram-budget 2GiB --steps 200 lora.r=16",
    "generate": (
        'odyssey generate --model models/base --prompt "Once upon a time" --max-new-tokens 32 --ram-budget 1GiB'
    ),
    "doctor": "odyssey doctor --models-dir models",
    "guard": "odyssey guard --pid 1234 --run runs/r1 --ram-budget 2GiB --thermal-file /tmp/temp",
    "monitor": "odyssey monitor runs/r1   (headless: xvfb-run -a odyssey monitor runs/r1)",
}


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the cause and the fix (exit 2), like Odyssey's own."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def count(low: int):
    """argparse type: a whole number >= `low` (sizes, lengths, counts, seeds)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def number(low: float, high: float = math.inf):
    """argparse type: a finite number in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            span = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text}")
        return value

    return parse


KEY_VALUE = re.compile(r"^[A-Za-z_][\w.]*=")  # a config override, wherever it stands on the line


def _parser_for(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# ---------------------------------------------------------------------------------------------
# store commands


def _add_store_out_options(s, dtype_default: str | None, dtype_help: str) -> None:
    """--out, --dtype, --force and --quiet: the options of a command that writes a new store."""
    s.add_argument("--out", required=True, help="store directory to create")
    s.add_argument("--dtype", default=dtype_default, choices=list(STORE_DTYPES), help=dtype_help)
    s.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def _written(s: dict) -> str:
    """What a command that wrote a store (init, import, merge) says of the bytes it wrote."""
    return f"{s['bytes'] / 1e6:,.1f} MB {s['dtype']} in {s['seconds']:.1f} s ({s['mb_s']:.0f} MB/s)"


def _kept(s: dict) -> str:
    """The complete shards a resumed init or merge kept (see store.writer), said after its summary."""
    return f", {s['kept_shards']} complete shards kept" if s["kept_shards"] else ""


def add_init_parser(sub) -> None:
    s = _parser_for(sub, "init", "create a new model on disk from a config (streams; never all in RAM)")
    s.add_argument("--config", required=True, help="model YAML, e.g. configs/nano.yaml")
    _add_store_out_options(s, "bf16", "weights on disk")
    s.add_argument("--seed", type=count(0), default=0, help="init seed (each tensor seeded by seed and name)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_hidden_layers=4")
    s.set_defaults(func=cmd_init)


def cmd_init(args) -> int:
    from odyssey.config import load_model_config
    from odyssey.store import init_store

    cfg = load_model_config(args.config, args.overrides)
    s = init_store(cfg, args.out, dtype=args.dtype, seed=args.seed, force=args.force, progress=not args.quiet)
    print(
        f"initialised {s['out']}: {s['parameters']:,} parameters ({s['parameters'] / 1e9:.3f} B), "
        f"{_written(s)}{_kept(s)}"
    )
    return 0


def add_import_parser(sub) -> None:
    s = _parser_for(sub, "import", "convert a Hugging Face Llama-family checkpoint into a store")
    s.add_argument("src", help="HF model directory (config.json + safetensors)")
    _add_store_out_options(s, None, "default: keep the source dtype")
    s.set_defaults(func=cmd_import)


def cmd_import(args) -> int:
    from odyssey.store import import_hf

    s = import_hf(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet)
    tok = ", ".join(s["tokenizer_files"]) or "no tokenizer files"
    print(f"imported {args.src} -> {s['out']}: {s['parameters']:,} parameters, {_written(s)}; {tok}")
    return 0


def add_verify_parser(sub) -> None:
    s = _parser_for(sub, "verify", "check every shard's size, header, shapes and checksum")
    s.add_argument("model", help="store directory")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    from odyssey.store import verify_store

    # Config, index fields against the headers, sizes, shapes, checksums: one line per problem.
    store, problems, note = verify_store(args.model, progress=not args.quiet)
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if problems:
        if store is not None:
            print(f"{len(problems)} problem(s) in {store.root} ({len(store.shards)} shards)", file=sys.stderr)
        return 2
    if note:
        print(note)
    print(
        f"OK {store.root}: {len(store.shards)} shards, {store.total_bytes() / 1e6:,.1f} MB, "
        f"sizes, headers, shapes, index fields and checksums match"
    )
    return 0


def add_info_parser(sub) -> None:
    s = _parser_for(sub, "info", "print architecture, parameters, bytes per layer and dtype")
    s.add_argument("model", help="store directory")
    s.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from odyssey.store import Store, describe

    print(describe(Store.open(args.model)))
    return 0


# ---------------------------------------------------------------------------------------------
# planning and generation


def _budget(args):
    from odyssey.config import parse_bytes

    return parse_bytes(args.ram_budget) if args.ram_budget else None


def add_plan_parser(sub) -> None:
    s = _parser_for(sub, "plan", "show the memory plan of a run against a RAM budget, term by term")
    s.add_argument("--model", required=True, help="store directory")
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
    s.add_argument("--slots", type=count(1), default=2, help="pager buffer slots")
    s.add_argument("--compute-dtype", default="auto", choices=list(COMPUTE_DTYPES))
    s.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from odyssey.config import LoraSettings
    from odyssey.planner import plan_checked
    from odyssey.store import Store

    plan_checked(
        Store.open(args.model),
        mode=args.mode,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        slots=args.slots,
        budget=_budget(args),
        lora=LoraSettings(r=args.lora_r) if args.mode == "lora" else None,
        compute_dtype=args.compute_dtype,
        show=lambda p: print(p.table()),
    )
    return 0


def add_generate_parser(sub) -> None:
    s = _parser_for(sub, "generate", "generate text with the model paged from disk under a RAM budget")
    s.add_argument("--model", required=True, help="store directory")
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
    s.add_argument("--compute-dtype", default="auto", choices=list(COMPUTE_DTYPES))
    s.add_argument("--quiet", action="store_true", help="only the generated text")
    s.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from odyssey.engine import Engine
    from odyssey.generate import generate_ids, stream_text
    from odyssey.planner import plan_checked
    from odyssey.store import Store
    from odyssey.tokenizer import load_tokenizer

    store = Store.open(args.model)
    if args.prompt_ids:
        try:
            prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise OdysseyError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        tok = load_tokenizer(store.root) if store.tokenizer_path() else None
    else:
        if args.prompt is None:
            raise OdysseyError("pass --prompt TEXT (or --prompt-ids 1,2,3)")
        tok = load_tokenizer(
            store.root,
            fix=f"add one with `odyssey prepare-data DATA --out DIR --model {store.root}` "
            f"(or `odyssey import` a model that has one), or pass --prompt-ids 1,2,3",
        )
        prompt = tok.encode(args.prompt).ids
        bos = store.config.bos_token_id
        if bos is not None and (not prompt or prompt[0] != bos):
            prompt = [bos] + prompt
    vocab = store.config.vocab_size
    outside = [i for i in prompt if not 0 <= i < vocab]
    if outside:
        raise OdysseyError(f"prompt id {outside[0]} is outside the model's vocabulary (0..{vocab - 1})")
    adapter = None
    if args.adapter:  # base paged from disk, LoRA adapter resident (refused if made for another base)
        from odyssey.adapters import read_adapter

        adapter = read_adapter(args.adapter)
    plan_checked(  # a plan that does not fit is one line naming its terms; one that fits is shown
        store,
        mode="forward",
        seq_len=len(prompt) + args.max_new_tokens,
        slots=args.slots,
        budget=_budget(args),
        compute_dtype=args.compute_dtype,
        show=None if args.quiet else lambda p: print(p.table(), file=sys.stderr),
        show_first=False,
    )
    model = None
    if adapter is not None:
        from odyssey.adapters import adapter_skeleton

        model = adapter_skeleton(store, adapter)
    t0 = time.perf_counter()
    with Engine(store, compute_dtype=args.compute_dtype, slots=args.slots, model=model) as eng:
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
                eos_id=store.config.eos_token_id,
                vocab_limit=tok.get_vocab_size() if tok else None,
            ),
            lambda s: (sys.stdout.write(s), sys.stdout.flush()),
        )
        dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    if not args.quiet:
        print(f"{len(new)} tokens in {dt:.1f} s ({dt / max(len(new), 1):.2f} s/token)", file=sys.stderr)
    return 0


def add_train_parser(sub) -> None:
    s = _parser_for(sub, "train", "train LoRA adapters (or a small model fully) under a RAM budget, resumable")
    s.add_argument("--model", help="base store directory (default on --resume: the run's)")
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
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lora.r=32 seq_len=256")
    s.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from odyssey.train import train

    if args.nproc and args.nproc > 1:
        return _launch_ranks(args.nproc)
    overrides = list(args.overrides)  # --mode and --steps are shorthands for config overrides
    overrides += [f"mode={args.mode}"] * bool(args.mode) + [f"steps={args.steps}"] * (args.steps is not None)
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


def _launch_ranks(nproc: int) -> int:
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
    s = _parser_for(sub, "prepare-data", "tokenize .txt/.jsonl text into token files (training a BPE if needed)")
    s.add_argument("inputs", nargs="+", help=".txt or .jsonl files or directories")
    s.add_argument("--out", required=True, help="data directory to write")
    s.add_argument("--vocab-size", type=count(1), help="BPE vocabulary to train (default: the model's, else 8192)")
    s.add_argument("--tokenizer", help="use this directory's tokenizer.json instead of training one")
    s.add_argument("--model", help="store directory: check the vocabulary fits and place the tokenizer there")
    s.add_argument("--val-fraction", type=number(0.0, 1.0), default=0.05)
    s.add_argument("--seed", type=count(0), default=0)
    s.add_argument("--force", action="store_true", help="write into a non-empty --out")
    s.add_argument("--quiet", action="store_true")
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
    )
    return 0


def add_bench_parser(sub) -> None:
    s = _parser_for(sub, "bench", "measure page-in throughput against the disk's raw sequential read")
    s.add_argument("what", choices=["pagein"], help="which benchmark")
    s.add_argument("--model", required=True, help="store directory")
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


# ---------------------------------------------------------------------------------------------
# merge and export


def add_merge_parser(sub) -> None:
    s = _parser_for(sub, "merge", "fold a LoRA adapter into its base, layer by layer, as a new store")
    s.add_argument("--model", required=True, help="base store directory the adapter was trained on")
    s.add_argument("--adapter", required=True, help="adapter directory in PEFT format, e.g. runs/r1/adapter")
    _add_store_out_options(s, None, "default: the base's dtype")
    s.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from odyssey.merge import merge

    s = merge(args.model, args.adapter, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet)
    print(
        f"merged {s['adapter']} ({s['modules']} modules in {s['layers']} layers) into {s['base']} -> {s['out']}: "
        f"{_written(s)}, peak anonymous RSS {s['peak_anon_bytes'] / 2**20:,.0f} MiB{_kept(s)}"
    )
    return 0


def add_export_parser(sub) -> None:
    s = _parser_for(sub, "export", "write a store as safetensors (HF), .pth and/or .gguf, streaming")
    s.add_argument("model", help="store directory")
    s.add_argument("--out", required=True, help="directory for OUT/safetensors/, OUT/model.pth, OUT/model-TYPE.gguf")
    s.add_argument("--formats", default="safetensors,pth,gguf", help="comma-separated: safetensors, pth, gguf")
    s.add_argument("--gguf-type", default="f16", help="GGUF tensor type: f32, f16, bf16 or q8_0")
    s.add_argument("--adapter", help="merge this adapter on the fly (the store is left unchanged)")
    s.add_argument("--force", action="store_true", help="overwrite outputs that exist")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from odyssey.export import export_model

    s = export_model(
        args.model,
        args.out,
        args.formats,
        gguf_type=args.gguf_type,
        adapter=args.adapter,
        force=args.force,
        progress=not args.quiet,
    )
    merged = f" (with {s['adapter']} merged)" if s["adapter"] else ""
    print(f"exported {args.model}{merged} -> {s['out']} in {s['seconds']:.1f} s")
    for r in s["formats"]:
        print(
            f"  {r['format']:<12} {r['path']:<40} {r['bytes'] / 1e6:>10,.1f} MB {r['seconds']:>7.1f} s "
            f"{r['mb_s']:>6.0f} MB/s  peak anonymous RSS {r['peak_anon_bytes'] / 2**20:,.0f} MiB"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# the machine, the guard and the monitor


def add_doctor_parser(sub) -> None:
    s = _parser_for(sub, "doctor", "print the facts about this machine that matter to Odyssey, each with a verdict")
    s.add_argument(
        "--models-dir",
        help="where models go: free disk and the cold-read test are measured there "
        "(default: ./models, else the current directory)",
    )
    s.add_argument(
        "--read-test-mib",
        type=int,  # doctor checks >= 0 itself, naming the option
        default=256,
        help="size of the cold-read test file in MiB (default 256, ~5 s at most; 0 skips it)",
    )
    s.add_argument("--thermal-file", help="a temperature file to check (millidegrees C), as the guard would read it")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    s.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    import json

    from odyssey.runtime import doctor

    if args.read_test_mib < 0:
        raise OdysseyError(f"--read-test-mib must be >= 0 (0 skips the test), got {args.read_test_mib}")
    facts = doctor.gather(args.models_dir, args.read_test_mib << 20, args.thermal_file)
    if args.json:
        print(json.dumps({f.key: f.to_json() for f in facts}, indent=2))
        return 0
    print(doctor.HEADING, flush=True)
    for fact in facts:  # one at a time: the cold read takes a few seconds
        print(fact.lines(), flush=True)
    return 0


def add_guard_parser(sub) -> None:
    # The guard's options come from its own parser (odyssey.runtime.guard is light: no torch), so they
    # cannot drift; cmd_guard turns them into the guard's settings with the guard's own function.
    from odyssey.runtime import guard

    s = sub.add_parser(
        "guard",
        parents=[guard.build_parser()],
        conflict_handler="resolve",
        help="watch a training process's RAM and temperature (what `train` starts)",
        description="Watch a training process's RAM and the CPU temperature; ask it (through "
        "RUN/control.json)\nto checkpoint, pause, resume or stop. Exits when the "
        "process is gone.",
        epilog=f"example:\n  {EXAMPLES['guard']}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.set_defaults(func=cmd_guard)


def cmd_guard(args) -> int:
    from odyssey.config import parse_bytes
    from odyssey.runtime import guard

    return guard.run(guard.Guard(args.pid, args.run, parse_bytes(args.ram_budget), guard.settings_from_args(args)))


def add_monitor_parser(sub) -> None:
    # The monitor's arguments come from the light odyssey.monitor (no tkinter), as its own parser's do.
    from odyssey import monitor

    s = _parser_for(sub, "monitor", "open the live window on a run: loss, page-in, RAM, temperature, controls")
    monitor.add_arguments(s)
    s.set_defaults(func=cmd_monitor)


def cmd_monitor(args) -> int:
    from odyssey import monitor

    # odyssey.monitor.show checks the run directory, the display and tkinter before importing
    # tkinter, so each ends in one line (exit 2).
    return monitor.show(monitor.MonitorSettings.from_args(args))


# ---------------------------------------------------------------------------------------------


COMMANDS = (
    add_init_parser,
    add_import_parser,
    add_verify_parser,
    add_info_parser,
    add_plan_parser,
    add_generate_parser,
    add_train_parser,
    add_prepare_data_parser,
    add_bench_parser,
    add_merge_parser,
    add_export_parser,
    add_doctor_parser,
    add_guard_parser,
    add_monitor_parser,
)
"""One `add_<command>_parser(sub)` per verb, in the order `odyssey --help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="odyssey",
        description="Own a 1.2B-parameter Llama on a small CPU machine: create it on disk, fine-tune "
        "it with LoRA under a RAM budget, merge and export it.",
        epilog="example:\n  odyssey init --config configs/nano.yaml --out models/nano && odyssey info models/nano",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(sub)
    return p


def close_progress_bars() -> None:
    """Close the progress bars an error left open, so the error line is the last thing printed (a bar
    left to the garbage collector redraws itself after it)."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


def os_error_line(e: OSError) -> str:
    """One line for an OSError a user can cause, naming the path and what to do."""
    import errno

    where = f" ({e.filename})" if e.filename else ""
    fixes = {
        errno.ENOSPC: "the disk is full: free space or choose an --out on another disk",
        errno.EDQUOT: "the disk quota is used up: free space or choose an --out on another disk",
        errno.EROFS: "the file system is read-only: choose a writable --out",
        errno.EACCES: "permission denied: choose a path you may write (or read)",
        errno.EPERM: "operation not permitted: choose a path you may write (or read)",
        errno.ENOENT: "no such file or directory: check the path",
        errno.ENOTDIR: "a path component is not a directory: check the path",
        errno.EISDIR: "a directory where a file was expected: check the path",
    }
    fix = fixes.get(e.errno, f"{e.strerror or type(e).__name__}: check the path and the disk")
    return f"{fix}{where}"


HEAVY = {"generate", "plan", "train", "merge", "export", "bench", "init", "import"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # `key=value` after an option is left over by argparse: an override all the same
        if hasattr(args, "overrides") and all(KEY_VALUE.match(e) for e in extras):
            args.overrides = [*args.overrides, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if argv is None and getattr(args, "command", None) in HEAVY:
        from odyssey.runtime import allocator

        allocator.ensure(["-m", "odyssey", *sys.argv[1:]])  # re-exec with jemalloc, once
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OdysseyError as e:
        close_progress_bars()
        print(f"odyssey: error: {e}", file=sys.stderr)
        return e.exit_status
    except OSError as e:  # the machine said no: a full disk, a read-only or forbidden path, a file gone
        close_progress_bars()
        print(f"odyssey: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("odyssey: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
