"""The trainer's side: polling requests exactly once, acknowledging, noticing a lost guard; and
launching and stopping a real guard process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_procs import wait_for  # noqa: E402

from odyssey.config import GuardSettings  # noqa: E402
from odyssey.runtime import control  # noqa: E402
from odyssey.runtime.control import Controller, start_guard, stop_guard  # noqa: E402
from odyssey.runtime.runlog import RunDir  # noqa: E402

TIB = 1 << 40


@pytest.fixture
def run(tmp_path):
    r = RunDir(tmp_path / "run")
    r.root.mkdir()
    return r


def events(run, action=None):
    return [e for e in run.read_metrics("event") if action is None or e.get("action") == action]


def test_poll_sees_each_request_exactly_once(run):
    ctl = Controller(run, GuardSettings())
    assert ctl.poll() is None  # no control.json yet
    first = run.request("pause", source="monitor")
    got = ctl.poll()
    assert got["id"] == first and got["action"] == "pause" and got["source"] == "monitor"
    assert ctl.poll() is None and ctl.poll() is None
    second = run.request("resume")
    third = run.request("checkpoint")  # two before the next poll: the newest wins
    got = ctl.poll()
    assert got["id"] == third != second and got["action"] == "checkpoint"
    assert ctl.poll() is None
    # a request rewritten in place, not by rename, is seen too
    run.control_path.write_text('{"id": 5, "action": "stop", "source": "user", "reason": "", "t": 0}')
    assert ctl.poll()["action"] == "stop"
    assert ctl.poll() is None


def test_requests_already_there_are_old(run):
    run.request("stop", reason="the previous run")
    assert Controller(run, GuardSettings()).poll() is None
    assert Controller(run, GuardSettings(), handle_existing=True).poll()["action"] == "stop"


def test_unknown_action_is_ignored_with_a_warning(run):
    ctl = Controller(run, GuardSettings())
    run.control_path.write_text('{"id": 7, "action": "explode"}')
    assert ctl.poll() is None
    (e,) = run.read_metrics("event")
    assert e["level"] == "warning" and "explode" in e["message"]


@pytest.mark.parametrize("text", ['{"id": ', "[1, 2]", "null", '"pause"', '{"id": 3, "action": 5}', "\xff\xfe"])
def test_malformed_control_file_is_ignored(run, text):
    """A hand-edited control.json that is not a request object is ignored, never a crash."""
    ctl = Controller(run, GuardSettings())
    run.control_path.write_bytes(text.encode("latin-1"))
    assert ctl.poll() is None
    assert run.read_control() is None or isinstance(run.read_control(), dict)


@pytest.mark.slow
def test_poll_is_cheap(run):
    """A speed claim, so `make test-slow`: a poll with nothing new costs microseconds."""
    ctl = Controller(run, GuardSettings())
    run.request("pause")
    ctl.poll()
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        ctl.poll()
    per_call_us = (time.perf_counter() - t0) / n * 1e6
    print(f"\nController.poll with nothing new: {per_call_us:.2f} us")
    assert per_call_us < 50


def test_ack_writes_status(run):
    ctl = Controller(run, GuardSettings())
    req_id = run.request("pause", source="guard", reason="hot")
    req = ctl.poll()
    ctl.ack(req, state="paused", step=12)
    status = run.read_status()
    assert status["ack_id"] == req_id and status["ack_action"] == "pause"
    assert (status["state"], status["step"], status["pid"]) == ("paused", 12, os.getpid())
    ctl.write_status("running", 13, loss=2.5)
    status = run.read_status()
    assert status["ack_id"] == req_id and status["loss"] == 2.5
    # a new Controller (a resumed trainer) knows what was handled
    assert Controller(run, GuardSettings()).ack_id == req_id


def test_guard_command_passes_settings_on():
    s = GuardSettings(
        interval_s=0.2,
        soft_pct=70,
        hard_pct=80,
        min_available_mib=64,
        max_temp_c=85,
        resume_temp_c=75,
        thermal_file="/tmp/t",
        enforce_cgroup=True,
    )
    cmd = control.guard_command(42, "runs/r", 1 << 30, s)
    args = dict(zip(cmd[3::2], cmd[4::2], strict=False))  # a trailing flag has no value
    assert cmd[1:3] == ["-m", "odyssey.runtime.guard"] and cmd[-1] == "--enforce-cgroup"
    assert args["--pid"] == "42" and args["--ram-budget"] == str(1 << 30) and args["--thermal-file"] == "/tmp/t"
    assert [
        float(args[k])
        for k in ("--interval", "--soft-pct", "--hard-pct", "--min-available-mib", "--max-temp-c", "--resume-temp-c")
    ] == [0.2, 70, 80, 64, 85, 75]
    assert "--thermal-file" not in control.guard_command(42, "r", 1, GuardSettings())


def test_start_guard_and_stop_guard(run, tmp_path):
    thermal = tmp_path / "temp"
    thermal.write_text("50000")
    s = GuardSettings(interval_s=0.1, soft_pct=80, hard_pct=90, min_available_mib=1, thermal_file=str(thermal))
    g = start_guard(os.getpid(), run.root, TIB, s)
    try:
        ctl = Controller(run, s, guard=g)
        assert wait_for(lambda: run.read_heartbeat())
        assert ctl.guard_alive() and ctl.check_guard() == "continue"
        (start,) = [e for e in run.read_metrics("guard") if e["action"] == "start"]
        assert (start["soft_pct"], start["hard_pct"], start["interval_s"]) == (80.0, 90.0, 0.1)
        assert start["thermal_source"] == f"file {thermal}" and start["budget_mib"] == TIB / (1 << 20)
        hb = run.read_heartbeat()
        assert hb["pid"] == g.pid and hb["watched"] == os.getpid() and hb["temp_c"] == 50.0
    finally:
        assert stop_guard(g) == 0
    assert run.read_heartbeat()["state"] == "exited"
    assert [e["action"] for e in run.read_metrics("guard")][-1] == "exit"
    assert stop_guard(g) == 0 and stop_guard(None) is None


def test_guard_in_own_session_ignores_terminal_sigint(run):
    g = start_guard(os.getpid(), run.root, TIB, GuardSettings(interval_s=0.1, min_available_mib=1))
    try:
        assert wait_for(run.read_heartbeat)
        assert os.getsid(g.pid) == g.pid != os.getsid(0)
    finally:
        stop_guard(g)


def kill_guard_and_notice(run, with_popen) -> float:
    """Start a guard, SIGKILL it, and return the seconds until the controller says "stop"."""
    s = GuardSettings(interval_s=0.1, heartbeat_s=1.0, min_available_mib=1, on_guard_lost="stop")
    g = start_guard(os.getpid(), run.root, TIB, s)
    try:
        ctl = Controller(run, s, guard=g if with_popen else None)
        assert wait_for(run.read_heartbeat)
        time.sleep(0.3)
        assert ctl.check_guard() == "continue"
        os.kill(g.pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert wait_for(lambda: ctl.check_guard() == "stop", every_s=0.01)
        elapsed = time.monotonic() - t0
        assert ctl.check_guard() == "stop" and not ctl.guard_alive()
        (lost,) = events(run, "guard_lost")
        assert lost["level"] == "warning" and "guard process lost" in lost["message"]
        assert "on_guard_lost=stop" in lost["message"]
        return elapsed
    finally:
        g.kill()
        g.wait()


@pytest.mark.parametrize("with_popen", [True, False])
def test_killed_guard_is_noticed(run, with_popen):
    kill_guard_and_notice(run, with_popen)


@pytest.mark.slow
@pytest.mark.parametrize("with_popen", [True, False])
def test_killed_guard_noticed_within_2s(run, with_popen):
    """A speed claim, so `make test-slow`: a lost guard is noticed within 2 s (heartbeat 1 s)."""
    elapsed = kill_guard_and_notice(run, with_popen)
    assert elapsed < 2.0, elapsed


def test_lost_guard_continue_and_coming_back(run, monkeypatch):
    s = GuardSettings(heartbeat_s=0.3, on_guard_lost="continue")
    monkeypatch.setattr(control, "GUARD_START_GRACE_S", 0.2)
    ctl = Controller(run, s)
    assert ctl.guard_alive()  # no heartbeat yet, but just started: booting
    time.sleep(0.55)
    assert not ctl.guard_alive()
    assert ctl.check_guard() == "continue"
    assert "never wrote a heartbeat" in events(run, "guard_lost")[0]["message"]
    time.sleep(0.25)
    run.write_heartbeat(state="watching")
    assert ctl.check_guard() == "continue" and events(run, "guard_back")
    assert len(events(run, "guard_lost")) == 1


def test_stale_heartbeat_of_a_previous_run_is_not_a_live_guard(run, monkeypatch):
    run.write_heartbeat(state="exited")
    old = time.time() - 3600
    os.utime(run.guard_path, (old, old))
    monkeypatch.setattr(control, "GUARD_START_GRACE_S", 0.1)
    ctl = Controller(run, GuardSettings(heartbeat_s=0.2))
    assert ctl.guard_alive()  # booting
    time.sleep(0.35)
    assert not ctl.guard_alive()


def test_guard_disabled_never_lost(run):
    ctl = Controller(run, GuardSettings(enabled=False, heartbeat_s=0.1, on_guard_lost="stop"))
    time.sleep(0.15)
    assert ctl.check_guard() == "continue" and not events(run)


def test_guard_exits_when_its_trainer_dies(run):
    """The real arrangement: the trainer starts the guard on itself and is killed."""
    code = (
        "import os, sys, time\n"
        "from odyssey.config import GuardSettings\n"
        "from odyssey.runtime.control import start_guard\n"
        f"g = start_guard(os.getpid(), {str(run.root)!r}, 1 << 40,"
        " GuardSettings(interval_s=0.1, min_available_mib=1))\n"
        "print(g.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    trainer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        guard_pid = int(trainer.stdout.readline())
        assert wait_for(run.read_heartbeat)
        trainer.kill()
        trainer.wait()
        assert wait_for(lambda: (run.read_heartbeat() or {}).get("state") == "exited")
        (exit_event,) = [e for e in run.read_metrics("guard") if e["action"] == "exit"]
        assert "gone" in exit_event["reason"]
        assert wait_for(
            lambda: (
                not os.path.exists(f"/proc/{guard_pid}")
                or open(f"/proc/{guard_pid}/stat").read().split(") ")[1][0] == "Z"
            ),
            3,
        )
    finally:
        trainer.kill()
        trainer.wait()
        trainer.stdout.close()
