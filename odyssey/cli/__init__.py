"""`odyssey` subcommands: each a small function calling the modules that do the work, with its
parser beside it (common.py: what they share; store.py, run.py, side.py: the verbs).

A user-caused error (`OdysseyError`) ends with one line on stderr and exit status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from odyssey.cli.chat import add_chat_parser, add_eval_parser
from odyssey.cli.common import EXAMPLES, KEY_VALUE, Parser
from odyssey.cli.run import (
    add_bench_parser,
    add_generate_parser,
    add_plan_parser,
    add_prepare_data_parser,
    add_train_parser,
)
from odyssey.cli.side import add_doctor_parser, add_guard_parser, add_monitor_parser
from odyssey.cli.store import (
    add_export_parser,
    add_import_parser,
    add_info_parser,
    add_init_parser,
    add_merge_parser,
    add_verify_parser,
)
from odyssey.errors import OdysseyError

__all__ = ["EXAMPLES", "build_parser", "main"]


# ---------------------------------------------------------------------------------------------


COMMANDS = (
    add_init_parser,
    add_import_parser,
    add_verify_parser,
    add_info_parser,
    add_plan_parser,
    add_generate_parser,
    add_chat_parser,
    add_train_parser,
    add_prepare_data_parser,
    add_eval_parser,
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


HEAVY = {"generate", "chat", "eval", "plan", "train", "merge", "export", "bench", "init", "import"}


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
