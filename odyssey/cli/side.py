"""`odyssey doctor`, `guard` and `monitor`: the machine and the light side processes."""

from __future__ import annotations

import argparse

from odyssey.cli.common import (
    EXAMPLES,
    parser_for,
)
from odyssey.errors import OdysseyError


def add_doctor_parser(sub) -> None:
    s = parser_for(sub, "doctor", "print the facts about this machine that matter to Odyssey, each with a verdict")
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
    s.add_argument(
        "--remeasure",
        action="store_true",
        help="run the compute probe (bf16 against fp32 matmul) again and rewrite its cache",
    )
    s.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    import json

    from odyssey.runtime import doctor

    if args.read_test_mib < 0:
        raise OdysseyError(f"--read-test-mib must be >= 0 (0 skips the test), got {args.read_test_mib}")
    facts = doctor.gather(args.models_dir, args.read_test_mib << 20, args.thermal_file, args.remeasure)
    if args.json:
        print(json.dumps({f.key: f.to_json() for f in facts}, indent=2))
        return 0
    print(doctor.HEADING, flush=True)
    for fact in facts:  # one at a time: the cold read takes a few seconds
        print(fact.lines(), flush=True)
    return 0


def add_guard_parser(sub) -> None:
    # The guard's options come from its own parser (odyssey.runtime.guard_cli is light: no torch), so
    # they cannot drift; cmd_guard turns them into the guard's settings with the guard's own function.
    from odyssey.runtime import guard_cli

    s = sub.add_parser(
        "guard",
        parents=[guard_cli.build_parser()],
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
    from odyssey.runtime import guard, guard_cli

    settings = guard_cli.settings_from_args(args)
    return guard_cli.run(guard.Guard(args.pid, args.run, parse_bytes(args.ram_budget), settings))


def add_monitor_parser(sub) -> None:
    # The monitor's arguments come from the light odyssey.monitor (no tkinter), as its own parser's do.
    from odyssey import monitor

    s = parser_for(sub, "monitor", "open the live window on a run: loss, page-in, RAM, temperature, controls")
    monitor.add_arguments(s)
    s.set_defaults(func=cmd_monitor)


def cmd_monitor(args) -> int:
    from odyssey import monitor

    # odyssey.monitor.show checks the run directory, the display and tkinter before importing
    # tkinter, so each ends in one line (exit 2).
    return monitor.show(monitor.MonitorSettings.from_args(args))
