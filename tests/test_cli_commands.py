"""Every `odyssey` verb's help ends with an example; `guard` and `monitor` turn their arguments into
their modules' own settings; `monitor` without a run directory or a display ends in one line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from odyssey import cli
from odyssey.config import GuardSettings
from odyssey.monitor import MonitorSettings
from odyssey.runtime import control, guard_cli
from tests.conftest import assert_user_error, run_cli


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """The verbs as the parser has them (so verbs added later are checked too)."""
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def assert_ends_with_example(text: str, verb: str = "") -> None:
    lines = text.strip().splitlines()
    assert lines[-2].strip() == "example:", lines[-2:]
    assert lines[-1].strip().startswith("odyssey ") and f"odyssey {verb}".strip() in lines[-1], lines[-1]


def test_top_help_ends_with_an_example():
    p = run_cli("--help")
    assert p.returncode == 0
    assert_ends_with_example(p.stdout)
    for verb in subcommands():
        assert f"    {verb} " in p.stdout or f"    {verb}\n" in p.stdout, verb


def test_the_new_verbs_are_there():
    assert {"doctor", "guard", "monitor"} <= set(subcommands())


@pytest.mark.parametrize("verb", sorted(subcommands()))
def test_every_verb_help_ends_with_an_example(verb):
    assert verb in cli.EXAMPLES
    assert_ends_with_example(subcommands()[verb].format_help(), verb)


# --- guard ---


def test_guard_help_shows_the_guards_options_and_an_example():
    p = run_cli("guard", "--help")
    assert p.returncode == 0, p.stderr
    for a in guard_cli.build_parser()._actions:
        for opt in a.option_strings:
            assert opt in p.stdout, opt
    assert_ends_with_example(p.stdout, "guard")


def test_guard_arguments_reach_the_guards_settings():
    args = cli.build_parser().parse_args(
        [
            "guard",
            "--pid",
            "12",
            "--run",
            "runs/r1",
            "--ram-budget",
            "1GiB",
            "--soft-pct",
            "70",
            "--max-temp-c",
            "-5",
            "--resume-temp-c",
            "-10",
            "--interval",
            "0.25",
            "--enforce-cgroup",
        ]
    )
    s = guard_cli.settings_from_args(args)
    # the values given, and the guard's defaults for the rest; a negative value stays a value
    assert (args.pid, args.run, args.ram_budget) == (12, "runs/r1", "1GiB")
    assert s == GuardSettings(interval_s=0.25, soft_pct=70.0, max_temp_c=-5.0, resume_temp_c=-10.0, enforce_cgroup=True)
    # the command line `odyssey train` starts its guard with gives the guard's parser the same settings
    argv = control.guard_command(12, "runs/r1", 1 << 30, s)[3:]
    assert guard_cli.settings_from_args(guard_cli.build_parser().parse_args(argv)) == s


def test_guard_runs_with_the_arguments_given(tmp_path):
    # A short-lived process to watch: the guard starts, logs its settings, and exits 0 when it is gone.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    try:
        p = run_cli(
            "guard",
            "--pid",
            child.pid,
            "--run",
            tmp_path / "run",
            "--ram-budget",
            "1GiB",
            "--interval",
            "0.1",
            "--soft-pct",
            "70",
            timeout=60,
        )
    finally:
        child.wait()
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["kind"] == "guard" and e["action"] == "start")
    assert (start["budget_mib"], start["soft_pct"], start["interval_s"]) == (1024.0, 70.0, 0.1)
    assert json.loads((tmp_path / "run" / "guard.json").read_text())["state"] == "exited"


def test_guard_on_a_process_that_is_gone(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    p = run_cli("guard", "--pid", child.pid, "--run", tmp_path / "run", "--ram-budget", "1GiB")
    assert_user_error(p, f"--pid {child.pid}", "no such running process")


def test_guard_without_its_required_options_is_a_usage_error():
    p = run_cli("guard")
    assert p.returncode == 2 and "--pid" in p.stderr and "Traceback" not in p.stderr


# --- monitor ---


def test_monitor_help_ends_with_an_example():
    p = run_cli("monitor", "--help")
    assert p.returncode == 0, p.stderr
    for opt in ("--interval-ms", "--wait-s", "--geometry", "run"):
        assert opt in p.stdout
    assert_ends_with_example(p.stdout, "monitor")


def test_monitor_options_match_the_monitors_own_parser():
    pytest.importorskip("tkinter")
    from odyssey.monitor import build_parser

    def shape(parser):
        return {(tuple(a.option_strings), a.dest, a.type, a.nargs) for a in parser._actions}

    assert shape(subcommands()["monitor"]) == shape(build_parser())


def test_monitor_arguments_reach_the_monitors_settings():
    pytest.importorskip("tkinter")
    from odyssey.monitor import build_parser

    args = cli.build_parser().parse_args(["monitor", "--wait-s", "3", "--", "-odd-run-name"])
    back = MonitorSettings.from_args(args)
    assert (back.run, back.wait_s, back.interval_ms, back.geometry) == ("-odd-run-name", 3.0, 500, "1280x800")
    # options left out keep the monitor's defaults, the same from either parser
    assert MonitorSettings.from_args(build_parser().parse_args(["--wait-s=3", "--", "-odd-run-name"])) == back


def test_monitor_without_the_run_directory_is_one_line():
    p = run_cli("monitor", "/nonexistent/run")
    assert_user_error(p, "run directory /nonexistent/run not found", "odyssey monitor runs/r1")
    assert len(p.stderr.strip().splitlines()) == 1


def test_monitor_without_a_display_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    p = run_cli("monitor", tmp_path, env=env)
    assert_user_error(p, "DISPLAY is not set", "xvfb-run")
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("tkinter") is not None, reason="tkinter is installed here")
def test_monitor_without_tkinter_is_one_line(tmp_path):
    p = run_cli("monitor", tmp_path, env=dict(os.environ, DISPLAY=":99"))
    assert_user_error(p, "python3-tk")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["plan", "--model", "m", "--seq-len", "-5"], "--seq-len: must be >= 1, got -5"),
        (["plan", "--model", "m", "--slots", "0"], "--slots: must be >= 1, got 0"),
        (["plan", "--model", "m", "--batch-size", "two"], "--batch-size: must be a whole number"),
        (["generate", "--model", "m", "--max-new-tokens", "-1"], "--max-new-tokens: must be >= 1"),
        (["generate", "--model", "m", "--temperature", "nan"], "--temperature: must be a finite number"),
        (["generate", "--model", "m", "--top-k", "-3"], "--top-k: must be >= 0"),
        (["train", "--out", "r", "--steps", "0"], "--steps: must be >= 1"),
        (["train", "--out", "r", "--nproc", "0"], "--nproc: must be >= 1"),
        (["prepare-data", "c", "--out", "d", "--val-fraction", "inf"], "--val-fraction: must be a finite number"),
        (["init", "--config", "c", "--out", "o", "--seed", "-1"], "--seed: must be >= 0"),
        (["train", "--out", "r", "--bogus"], "unrecognized arguments: --bogus"),
        (["merge", "--model", "m", "--adapter", "a", "--out", "o", "lr=1"], "unrecognized arguments: lr=1"),
    ],
)
def test_impossible_option_values_are_one_line(argv, needle):
    """argparse's own errors are one line too (no usage block), exit 2, naming the option and the fix."""
    p = run_cli(*argv)
    assert_user_error(p, needle, "--help")
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
