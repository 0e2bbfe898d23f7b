"""`odyssey init`, `import`, `verify`, `info`, `merge` and `export`: the verbs that make, check and
convert stores."""

from __future__ import annotations

import sys

from odyssey.cli.common import (
    add_store_out_options,
    count,
    kept_phrase,
    parser_for,
    written_phrase,
)


def add_init_parser(sub) -> None:
    s = parser_for(sub, "init", "create a new model on disk from a config (streams; never all in RAM)")
    s.add_argument("--config", required=True, help="model YAML, e.g. configs/nano.yaml")
    add_store_out_options(s, "bf16", "weights on disk")
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
        f"{written_phrase(s)}{kept_phrase(s)}"
    )
    return 0


def add_import_parser(sub) -> None:
    s = parser_for(
        sub,
        "import",
        "convert a Hugging Face checkpoint (llama mistral qwen2 qwen3 gemma3) or a llama.cpp GGUF "
        "(llama qwen2 qwen3) to a store",
    )
    s.add_argument("src", help="HF model directory (config.json + safetensors), or a .gguf file")
    add_store_out_options(
        s, None, "default: the source dtype (HF); bf16 for a GGUF, f32 for a GGUF whose tensors are all F32"
    )
    s.set_defaults(func=cmd_import)


def cmd_import(args) -> int:
    from pathlib import Path

    from odyssey.gguf.store import names_gguf

    if Path(args.src).is_file() or names_gguf(args.src):  # a GGUF (a file that is not one: refused by its bytes)
        from odyssey.gguf.importer import import_gguf

        s = import_gguf(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet)
        types = ", ".join(f"{n} {k}" for k, n in sorted(s["source_types"].items()))
        tok = ", ".join(s["tokenizer_files"]) or "no tokenizer in the GGUF's metadata"
        print(
            f"imported {args.src} ({types}) -> {s['out']}: {s['parameters']:,} parameters, "
            f"{written_phrase(s)}{kept_phrase(s)}; {tok}"
        )
        return 0
    from odyssey.store import import_hf

    s = import_hf(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet)
    tok = ", ".join(s["tokenizer_files"]) or "no tokenizer files"
    print(f"imported {args.src} -> {s['out']}: {s['parameters']:,} parameters, {written_phrase(s)}; {tok}")
    return 0


def add_verify_parser(sub) -> None:
    s = parser_for(sub, "verify", "check every shard's size, header, shapes and checksum")
    s.add_argument("model", help="store directory, or a llama.cpp .gguf file")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    from odyssey.gguf.store import names_gguf
    from odyssey.store import verify_store

    if names_gguf(args.model):
        return _verify_gguf(args)

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


def _verify_gguf(args) -> int:
    """`odyssey verify model.gguf`: the structure, every tensor's type, size and range (open), and
    every pager unit against the checksums recorded at first use (missing ones recorded now)."""
    from odyssey.errors import OdysseyError
    from odyssey.gguf.store import GGUFStore

    try:
        store = GGUFStore.open(args.model)
    except OdysseyError as e:
        print(f"FAIL {e}", file=sys.stderr)
        return 2
    problems = store.verify(progress=not args.quiet)
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {store.path}", file=sys.stderr)
        return 2
    print(
        f"OK {store.path}: GGUF, {len(store.gf.tensors)} tensors, {store.total_bytes() / 1e6:,.1f} MB, "
        f"structure, sizes, ranges and {len(store.page_units())} unit checksums "
        f"match (recorded in {store.record_path()})"
    )
    return 0


def add_info_parser(sub) -> None:
    s = parser_for(sub, "info", "print architecture, parameters, bytes per layer and dtype")
    s.add_argument("model", help="store directory, or a llama.cpp .gguf file")
    s.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from odyssey.store import describe, open_model

    store = open_model(args.model)
    print(store.describe() if hasattr(store, "describe") else describe(store))
    return 0


def add_merge_parser(sub) -> None:
    s = parser_for(sub, "merge", "fold a LoRA adapter into its base, layer by layer, as a new store")
    s.add_argument("--model", required=True, help="base store directory or .gguf file the adapter was trained on")
    s.add_argument("--adapter", required=True, help="adapter directory in PEFT format, e.g. runs/r1/adapter")
    add_store_out_options(s, None, "default: the base's dtype")
    s.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from odyssey.merge import merge

    s = merge(args.model, args.adapter, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet)
    print(
        f"merged {s['adapter']} ({s['modules']} modules in {s['layers']} layers) into {s['base']} -> {s['out']}: "
        f"{written_phrase(s)}, peak anonymous RSS {s['peak_anon_bytes'] / 2**20:,.0f} MiB{kept_phrase(s)}"
    )
    return 0


def add_export_parser(sub) -> None:
    s = parser_for(sub, "export", "write a store as safetensors (HF), .pth and/or .gguf, or an adapter as a GGUF LoRA")
    s.add_argument("model", nargs="?", help="store directory or .gguf file (or --model)")
    s.add_argument("--model", dest="model_opt", metavar="STORE", help="store directory (the base, with gguf-lora)")
    s.add_argument(
        "--out",
        required=True,
        help="directory for OUT/safetensors/, OUT/model.pth, OUT/model-TYPE.gguf, OUT/adapter-TYPE.gguf",
    )
    s.add_argument(
        "--formats",
        default="safetensors,pth,gguf",
        help="comma-separated: safetensors, pth, gguf; or gguf-lora alone (the --adapter as a llama.cpp LoRA adapter)",
    )
    s.add_argument(
        "--gguf-type",
        default=None,
        help="GGUF type: f32, f16 (default), bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k (llama.cpp's Q4_K_M mix), "
        "q5_k (Q5_K_M) or q6_k; norms stay f32, the head is Q6_K in the 4- to 6-bit files; gguf-lora: f32 (default) "
        "or f16",
    )
    s.add_argument(
        "--adapter", help="merge this adapter on the fly (the store is left unchanged); with gguf-lora, export it"
    )
    s.add_argument("--force", action="store_true", help="overwrite outputs that exist")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from odyssey.config import format_bytes
    from odyssey.errors import OdysseyError
    from odyssey.export import export_model

    if args.model and args.model_opt and args.model != args.model_opt:
        raise OdysseyError(f"two stores given ({args.model} and --model {args.model_opt}); pass one")
    model = args.model or args.model_opt
    if not model:
        raise OdysseyError("export needs a store: `odyssey export STORE --out DIR` (or --model STORE)")
    s = export_model(
        model,
        args.out,
        args.formats,
        gguf_type=args.gguf_type,
        adapter=args.adapter,
        force=args.force,
        progress=not args.quiet,
    )
    lora = any(r["format"].startswith("gguf-lora") for r in s["formats"])
    if lora:
        print(f"exported {s['adapter']} (LoRA for {model}) -> {s['out']} in {s['seconds']:.1f} s")
    else:
        merged = f" (with {s['adapter']} merged)" if s["adapter"] else ""
        print(f"exported {model}{merged} -> {s['out']} in {s['seconds']:.1f} s")
    for r in s["formats"]:
        print(
            f"  {r['format']:<14} {r['path']:<40} {format_bytes(r['bytes']):>11} {r['seconds']:>7.1f} s "
            f"{r['mb_s']:>6.0f} MB/s  peak anonymous RSS {r['peak_anon_bytes'] / 2**20:,.0f} MiB"
        )
        if r.get("types"):  # a GGUF's mix: what each GGML type holds
            mix = ", ".join(f"{t} {m['tensors']} ({format_bytes(m['bytes'])})" for t, m in r["types"].items())
            print(f"  {'':<14} tensors: {mix}")
    return 0
