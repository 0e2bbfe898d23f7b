"""`odyssey chat` (and `generate --chat`) and `odyssey eval`: talking to the model through its chat
template, and scoring its answers on a question/answer set."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from odyssey.cli.common import count, number, parser_for, ram_budget_arg
from odyssey.dtypes import COMPUTE_DTYPES
from odyssey.errors import OdysseyError


def add_chat_options(s) -> None:
    """The options a conversation adds to generate's (shared by `chat` and `generate --chat`)."""
    s.add_argument("--system", help="a system message at the start of the conversation")
    s.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a Jinja chat template in place of the store's own (or the default ChatML); `none`: plain prompts",
    )
    s.add_argument(
        "--max-context",
        type=count(2),
        help="tokens of history + answer kept (default: the model's max_position_embeddings, at most 2048)",
    )


def add_model_options(s, max_new_tokens: int) -> None:
    """--model, --adapter and the engine's options, as generate has them."""
    s.add_argument("--model", required=True, help="store directory, or a llama.cpp .gguf file")
    s.add_argument("--adapter", help="a LoRA adapter directory (e.g. RUN/adapter) applied on the fly")
    s.add_argument("--max-new-tokens", type=count(1), default=max_new_tokens)
    s.add_argument("--ram-budget", help="e.g. 1GiB")
    s.add_argument("--slots", type=count(1), default=2)
    add_pin_option(s)
    s.add_argument("--compute-dtype", default="auto", choices=list(COMPUTE_DTYPES))


def add_pin_option(s) -> None:
    """--pin/--no-pin of the commands that generate (residency.py)."""
    s.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep units resident across tokens with what the plan leaves of --ram-budget (default); "
        "--no-pin: page every unit through the slots",
    )


def add_chat_parser(sub) -> None:
    s = parser_for(sub, "chat", "talk with the model in the terminal through its chat template")
    add_model_options(s, max_new_tokens=256)
    s.add_argument("--prompt", help="answer this one message and exit (the answer alone on stdout)")
    s.add_argument("--temperature", type=number(0.0), default=0.7, help="0 = greedy")
    s.add_argument("--top-k", type=count(0), default=40)
    s.add_argument("--seed", type=count(0), default=0)
    s.add_argument("--quiet", action="store_true", help="no memory plan, no figures")
    add_chat_options(s)
    s.set_defaults(func=cmd_chat, prompt_ids=None)


def open_chat(args):
    """(store, template, stop ids, max context) for the chat options in `args`; one line on error."""
    from odyssey.chat import check_context, default_max_context
    from odyssey.data.templates import load_chat_template
    from odyssey.generate import stop_ids
    from odyssey.store import open_model, tokenizer_dir
    from odyssey.tokenizer import load_model_tokenizer

    store = open_model(args.model)
    tok = load_model_tokenizer(
        tokenizer_dir(store),
        fix="a conversation needs the model's tokenizer: `odyssey import` a model that has one, or add one "
        f"with `odyssey prepare-data DATA --out DIR --model {store.root}`",
    )
    template = load_chat_template(
        tokenizer_dir(store), override=args.chat_template, model_vocab_size=store.config.vocab_size, tok=tok
    )
    max_context = args.max_context or default_max_context(store.config)
    check_context(store.config, max_context, args.max_new_tokens)
    return store, template, stop_ids(store, template.tok, template), max_context


def cmd_chat(args) -> int:
    from odyssey.chat import ChatSession, interactive
    from odyssey.generate import open_engine

    if getattr(args, "prompt_ids", None):
        raise OdysseyError("--prompt-ids has no place in a conversation; pass --prompt TEXT (or drop --chat)")
    if args.prompt is not None and not args.prompt.strip():
        raise OdysseyError("--prompt is empty; pass the message to answer, e.g. --prompt 'What is 2+2?'")
    store, template, stop, max_context = open_chat(args)

    def note(text: str) -> None:
        if not args.quiet or text.startswith("odyssey:"):
            print(text, file=sys.stderr, flush=True)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with open_engine(
        store,
        adapter=args.adapter,
        seq_len=max_context,
        budget=ram_budget_arg(args),
        compute_dtype=args.compute_dtype,
        slots=args.slots,
        pin=args.pin,
        show=not args.quiet,
    ) as eng:
        session = ChatSession(
            eng,
            template.tok,
            template,
            stop,
            system=args.system,
            max_context=max_context,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
        if args.prompt is None:
            with_adapter = f", adapter {args.adapter}" if args.adapter else ""
            note(f"chat with {store.root} ({template.origin} template{with_adapter})")
            return interactive(session, input, write, note)
        t0 = time.perf_counter()
        reply = session.ask(args.prompt, write)
        dt = time.perf_counter() - t0
    write("\n")
    end = "end of turn" if reply.stopped else f"--max-new-tokens {args.max_new_tokens}"
    note(f"{len(reply.ids)} tokens in {dt:.1f} s ({dt / max(len(reply.ids), 1):.2f} s/token), stopped at {end}")
    return 0


def add_eval_parser(sub) -> None:
    s = parser_for(sub, "eval", "score the model's answers on a question/answer set: loss on answers, exact match")
    add_model_options(s, max_new_tokens=64)
    s.add_argument("--data", required=True, help="chat, completions or alpaca records (.jsonl .json .parquet .csv)")
    s.add_argument("--format", choices=["auto", "chat", "completions", "alpaca"], default="auto")
    s.add_argument("--limit", type=count(1), help="score the first N records only")
    s.add_argument("--prompt-key", default="prompt", help="completions records: the key of the prompt")
    s.add_argument("--completion-key", default="completion", help="completions records: the key of the answer")
    s.add_argument("--out", help="a .jsonl file: each question, its reference and the model's answer")
    s.add_argument("--quiet", action="store_true", help="no memory plan, no progress bar")
    add_chat_options(s)
    s.set_defaults(func=cmd_eval, system=None)


def cmd_eval(args) -> int:
    from odyssey.evaluate import encode_examples, evaluate, read_conversations, write_rows
    from odyssey.generate import open_engine

    data = Path(args.data)
    if args.out:
        from odyssey.outputs import check_apart

        inputs = [("data", "--data", data), ("store", "--model", args.model), ("adapter", "--adapter", args.adapter)]
        check_apart(args.out, inputs, "--out")
    from odyssey.data.formats import Keys

    records = read_conversations(data, args.format, args.limit, Keys(args.prompt_key, args.completion_key))
    store, template, stop, _ = open_chat(args)
    examples = encode_examples(template, records)
    with open_engine(
        store,
        adapter=args.adapter,
        seq_len=max(len(e.ids) for e in examples) + args.max_new_tokens,
        budget=ram_budget_arg(args),
        compute_dtype=args.compute_dtype,
        slots=args.slots,
        pin=args.pin,
        show=not args.quiet,
    ) as eng:
        result = evaluate(
            eng, template.tok, examples, stop, max_new_tokens=args.max_new_tokens, progress=not args.quiet
        )
    if args.out:
        write_rows(args.out, result.rows)
    print(result.summary(), flush=True)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
