"""The guard with a real trainer: a leak makes it stop training with a checkpoint that resumes, heat
pauses and cooling resumes, a killed guard is noticed by the trainer, a killed trainer ends the
guard. Tiny models: each scenario takes seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from odyssey.runtime.runlog import RunDir
from tests import hooks
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def setup(train_dir):
    return train_dir  # tests/conftest.py


def start_train(setup, run: Path, *overrides, steps=100000, env=None, budget="700MiB"):
    cmd = [
        sys.executable,
        "-m",
        "odyssey",
        "train",
        "--model",
        str(setup / "store"),
        "--data",
        str(setup / "tok"),
        "--out",
        str(run),
        "--ram-budget",
        budget,
        "--quiet",
        "--steps",
        str(steps),
        "seq_len=32",
        "eval_every=0",
        "guard.interval_s=0.1",
        *overrides,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )


def wait_for(cond, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def steps_done(run: Path) -> list[int]:
    return [r["step"] for r in RunDir(run).read_metrics("step")]


def events(run: Path, kind: str, **match) -> list[dict]:
    return [r for r in RunDir(run).read_metrics(kind) if all(r.get(k) == v for k, v in match.items())]


def finish(proc, timeout=60):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_leak_makes_the_guard_stop_with_a_checkpoint_that_resumes(setup, tmp_path):
    run = tmp_path / "run"
    # from step 3 the trainer leaks 8 MiB between layers, as a bug would (tests/hooks.py)
    proc = start_train(setup, run, "checkpoint_every=1000", steps=60, env=hooks.env("3:8"))
    code, err = finish(proc, timeout=120)
    assert code == 3, err
    assert "guard" in err and "--resume" in err and "Traceback" not in err
    stops = events(run, "guard", action="stop")
    assert stops and "hard limit" in stops[0]["reason"], stops
    assert RunDir(run).read_status()["state"] == "stopped"
    last = max(steps_done(run))
    assert last < 60
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    assert ckpt.name == f"step-{last:06d}"  # nothing lost: the checkpoint is the last completed step
    # resume (without the leak) from that checkpoint: the run's own config, to the end
    p = run_cli("train", "--out", run, "--resume", "--no-guard", "--quiet", timeout=120)
    assert p.returncode == 0, p.stderr
    done = steps_done(run)
    assert done[done.index(last) + 1] == last + 1 and sorted(set(done)) == list(range(1, 61))


def test_heat_pauses_and_cooling_resumes(setup, tmp_path):
    thermal = tmp_path / "temp"
    thermal.write_text("60000\n")
    run = tmp_path / "run"
    proc = start_train(setup, run, f"guard.thermal_file={thermal}", "checkpoint_every=1000", steps=400)
    rd = RunDir(run)
    wait_for(lambda: len(steps_done(run)) >= 2, what="first steps")
    thermal.write_text("95000\n")
    wait_for(lambda: (rd.read_status() or {}).get("state") == "paused", what="pause at 95 C")
    n = len(steps_done(run))
    time.sleep(1.0)
    assert len(steps_done(run)) <= n + 1, "training went on while paused"
    assert events(run, "guard", action="pause")
    thermal.write_text("70000\n")
    wait_for(lambda: (rd.read_status() or {}).get("state") in ("running", "finished"), what="resume at 70 C")
    code, err = finish(proc, timeout=300)
    assert code == 0, err
    assert events(run, "guard", action="resume")
    acts = [e.get("action") for e in rd.read_metrics("event")]
    assert "paused" in acts and "resumed" in acts
    assert steps_done(run)[-1] == 400
    temps = [m.get("temp_c") for m in rd.read_metrics("memory")]
    assert 95.0 in temps and 70.0 in temps


def kill_guard_during_training(setup, tmp_path) -> float:
    """SIGKILL the guard of a training run; the trainer notices, writes guard_lost and goes on.
    Returns the seconds from the kill to the guard_lost event."""
    run = tmp_path / "run"
    proc = start_train(setup, run, "checkpoint_every=1000")
    rd = RunDir(run)
    try:
        hb = wait_for(lambda: (rd.read_heartbeat() or {}).get("pid"), what="guard heartbeat")
        wait_for(lambda: len(steps_done(run)) >= 2, what="first steps")
        t_kill = time.time()
        os.kill(hb, signal.SIGKILL)
        lost = wait_for(lambda: events(run, "event", action="guard_lost"), what="guard_lost event")
        n = len(steps_done(run))
        wait_for(lambda: len(steps_done(run)) > n + 2, what="training to continue")  # default: continue
        rd.request("stop", source="test")
        code, err = finish(proc)
        assert code == 0, err
        return lost[0]["t"] - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killed_guard_is_noticed(setup, tmp_path):
    kill_guard_during_training(setup, tmp_path)


@pytest.mark.slow
def test_killed_guard_is_noticed_within_2s(setup, tmp_path):
    """A speed claim, so `make test-slow`: heartbeat 2 s, noticed within 2.6 s of the kill."""
    took = kill_guard_during_training(setup, tmp_path)
    assert took < 2.6, took


def test_killed_trainer_ends_the_guard(setup, tmp_path):
    run = tmp_path / "run"
    proc = start_train(setup, run, "checkpoint_every=1000")
    rd = RunDir(run)
    guard_pid = wait_for(lambda: (rd.read_heartbeat() or {}).get("pid"), what="guard heartbeat")
    wait_for(lambda: len(steps_done(run)) >= 1, what="a step")
    proc.kill()
    proc.wait()

    def gone():
        try:
            os.kill(guard_pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{guard_pid}/stat") as f:  # a zombie waiting for its reaper is gone too
            return f.read().split(") ")[1].startswith("Z")

    wait_for(gone, what="the guard to exit")
    exits = events(run, "guard", action="exit")
    assert exits and f"{proc.pid} is gone" in exits[-1]["reason"], exits
