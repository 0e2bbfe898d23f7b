"""The guard's command line: one table of thresholds (`OPTIONS`) builds its parser, reads the
settings back and writes them for a child process (`control.guard_command`); `main` and `run` start
a `Guard` (`python -m odyssey.runtime.guard`, `odyssey guard`). No torch."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass

from odyssey.config import GuardSettings, parse_bytes
from odyssey.errors import OdysseyError
from odyssey.runtime.guard import Guard


@dataclass(frozen=True)
class Option:
    """One guard threshold on the command line: its flag, the GuardSettings field it sets and its help
    (formatted with the field's default as `default`). The field's default says the kind: a float
    takes a number, None a string, False is a switch."""

    flag: str
    field: str
    help: str

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


OPTIONS = (
    Option(
        "--thermal-file",
        "thermal_file",
        "file with the temperature in millidegrees C (default: psutil, then /sys/class/thermal)",
    ),
    Option("--interval", "interval_s", "seconds between samples ({default})"),
    Option("--soft-pct", "soft_pct", "checkpoint above this %% of the budget ({default:g})"),
    Option("--hard-pct", "hard_pct", "stop above this %% of the budget ({default:g})"),
    Option(
        "--min-available-mib", "min_available_mib", "stop when system MemAvailable falls below this ({default:g} MiB)"
    ),
    Option("--max-temp-c", "max_temp_c", "pause above this temperature ({default:g} C)"),
    Option("--resume-temp-c", "resume_temp_c", "resume below this temperature ({default:g} C)"),
    Option(
        "--enforce-cgroup",
        "enforce_cgroup",
        "also cap the process with a memory cgroup set to the budget (Linux, root)",
    ),
)
"""The guard's thresholds on its command line, in the order `--help` lists them: what builds the
parser (`build_parser`), reads it back (`settings_from_args`) and writes it for a child
(`settings_argv`, used by `control.guard_command`)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="odyssey guard",
        description="Watch a training process's RAM and the CPU temperature; ask it (through RUN/control.json) "
        "to checkpoint, pause, resume or stop. Exits when the process is gone.",
        epilog="example: odyssey guard --pid 1234 --run runs/r1 --ram-budget 2GiB --thermal-file /tmp/temp",
    )
    p.add_argument("--pid", type=int, required=True, help="process to watch (with its children)")
    p.add_argument("--run", required=True, help="run directory (metrics.jsonl, control.json, guard.json)")
    p.add_argument("--ram-budget", required=True, help="RAM budget, e.g. 2GiB, 1500MiB or bytes")
    d = GuardSettings()
    for o in OPTIONS:
        default = getattr(d, o.field)
        if isinstance(default, bool):
            p.add_argument(o.flag, action="store_true", help=o.help)
        else:
            kind = str if default is None else type(default)
            p.add_argument(o.flag, type=kind, default=default, help=o.help.format(default=default))
    return p


def settings_from_args(args: argparse.Namespace) -> GuardSettings:
    """The thresholds in `args`, parsed by build_parser() or by a parser built on it (`odyssey guard`)."""
    return GuardSettings(**{o.field: getattr(args, o.dest) for o in OPTIONS})


def settings_argv(settings: GuardSettings) -> list[str]:
    """The options that give the guard's parser `settings` back (a threshold left unset or off is left out)."""
    argv: list[str] = []
    for o in OPTIONS:
        value = getattr(settings, o.field)
        if isinstance(value, bool):
            argv += [o.flag] * value
        elif isinstance(value, int | float):
            argv += [o.flag, repr(float(value))]
        elif value:
            argv += [o.flag, str(value)]
    return argv


def run(guard: Guard) -> int:
    """Runs `guard` until its process is gone or a signal ends it; returns the exit status (0)."""
    # SIGTERM (stop_guard) and SIGINT (Ctrl+C reaches the whole process group; the trainer handles
    # its own) end the loop cleanly: final event, cgroup removed, heartbeat "exited".
    signal.signal(signal.SIGTERM, guard.request_exit)
    signal.signal(signal.SIGINT, guard.request_exit)
    return guard.run_forever()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        guard = Guard(args.pid, args.run, parse_bytes(args.ram_budget), settings_from_args(args))
    except OdysseyError as e:
        print(f"odyssey guard: error: {e}", file=sys.stderr)
        return e.exit_status
    return run(guard)
