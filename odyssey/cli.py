"""`odyssey` subcommands: each a small function calling the modules that do the work.

A user-caused error (`OdysseyError`) ends with one line on stderr and exit status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from odyssey.errors import OdysseyError

EXAMPLES = {
    "init": "odyssey init --config configs/odyssey-1.2b.yaml --out models/base",
    "import": "odyssey import ~/Downloads/TinyLlama-1.1B --out models/tinyllama",
    "verify": "odyssey verify models/base",
    "info": "odyssey info models/base",
}


def _parser_for(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text,
                          epilog=f"example:\n  {EXAMPLES[name]}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


# ---------------------------------------------------------------------------------------------
# store commands


def cmd_init(args) -> int:
    from odyssey.config import load_model_config
    from odyssey.store import init_store

    cfg = load_model_config(args.config, args.overrides)
    s = init_store(cfg, args.out, dtype=args.dtype, seed=args.seed, force=args.force,
                   progress=not args.quiet)
    kept = f", {s['kept_shards']} complete shards kept" if s["kept_shards"] else ""
    print(f"initialised {s['out']}: {s['parameters']:,} parameters ({s['parameters'] / 1e9:.3f} B), "
          f"{s['bytes'] / 1e6:,.1f} MB {s['dtype']} in {s['seconds']:.1f} s "
          f"({s['mb_s']:.0f} MB/s){kept}")
    return 0


def cmd_import(args) -> int:
    from odyssey.store import import_hf

    s = import_hf(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet)
    tok = ", ".join(s["tokenizer_files"]) or "no tokenizer files"
    print(f"imported {args.src} -> {s['out']}: {s['parameters']:,} parameters, "
          f"{s['bytes'] / 1e6:,.1f} MB {s['dtype']} in {s['seconds']:.1f} s ({s['mb_s']:.0f} MB/s); {tok}")
    return 0


def cmd_verify(args) -> int:
    from odyssey.store import Store, StoreError

    try:
        store = Store.open(args.model)
    except StoreError as e:
        # A header or size problem found at open: still one line per problem, then exit 2.
        print(f"FAIL {e}", file=sys.stderr)
        return 2
    problems = store.verify(progress=not args.quiet)
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} of {len(store.shards)} shards have problems", file=sys.stderr)
        return 2
    print(f"OK {store.root}: {len(store.shards)} shards, {store.total_bytes() / 1e6:,.1f} MB, "
          f"sizes, headers, shapes and checksums match")
    return 0


def cmd_info(args) -> int:
    from odyssey.store import Store, describe

    print(describe(Store.open(args.model)))
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="odyssey",
        description="Own a 1.2B-parameter Llama on a small CPU machine: create it on disk, fine-tune "
                    "it with LoRA under a RAM budget, merge and export it.",
        epilog="example:\n  odyssey init --config configs/nano.yaml --out models/nano && odyssey info models/nano",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = _parser_for(sub, "init", "create a new model on disk from a config (streams; never all in RAM)")
    s.add_argument("--config", required=True, help="model YAML, e.g. configs/nano.yaml")
    s.add_argument("--out", required=True, help="store directory to create")
    s.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"], help="weights on disk")
    s.add_argument("--seed", type=int, default=0, help="init seed (each tensor seeded by seed and name)")
    s.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_hidden_layers=4")
    s.set_defaults(func=cmd_init)

    s = _parser_for(sub, "import", "convert a Hugging Face Llama-family checkpoint into a store")
    s.add_argument("src", help="HF model directory (config.json + safetensors)")
    s.add_argument("--out", required=True, help="store directory to create")
    s.add_argument("--dtype", default=None, choices=["bf16", "f16", "f32"], help="default: keep the source dtype")
    s.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_import)

    s = _parser_for(sub, "verify", "check every shard's size, header, shapes and checksum")
    s.add_argument("model", help="store directory")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_verify)

    s = _parser_for(sub, "info", "print architecture, parameters, bytes per layer and dtype")
    s.add_argument("model", help="store directory")
    s.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OdysseyError as e:
        print(f"odyssey: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("odyssey: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
