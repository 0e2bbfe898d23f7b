"""What every `odyssey` verb shares: the examples, a parser whose errors are one line, typed
option values, and the options and phrases of the commands that write a store."""

from __future__ import annotations

import argparse
import math
import re

from odyssey.dtypes import STORE_DTYPES

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
    "chat": "odyssey chat --model models/base --adapter runs/r1/adapter --ram-budget 1GiB",
    "eval": "odyssey eval --model models/base --adapter runs/r1/adapter --data data/sample/qa.jsonl --limit 50",
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


def parser_for(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_store_out_options(s, dtype_default: str | None, dtype_help: str) -> None:
    """--out, --dtype, --force and --quiet: the options of a command that writes a new store."""
    s.add_argument("--out", required=True, help="store directory to create")
    s.add_argument("--dtype", default=dtype_default, choices=list(STORE_DTYPES), help=dtype_help)
    s.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def written_phrase(s: dict) -> str:
    """What a command that wrote a store (init, import, merge) says of the bytes it wrote."""
    return f"{s['bytes'] / 1e6:,.1f} MB {s['dtype']} in {s['seconds']:.1f} s ({s['mb_s']:.0f} MB/s)"


def kept_phrase(s: dict) -> str:
    """The complete shards a resumed init or merge kept (see store.writer), said after its summary."""
    return f", {s['kept_shards']} complete shards kept" if s["kept_shards"] else ""


def ram_budget_arg(args):
    from odyssey.config import parse_bytes

    return parse_bytes(args.ram_budget) if args.ram_budget else None
