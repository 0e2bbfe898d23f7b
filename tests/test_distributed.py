"""Data-parallel training with torch.distributed (gloo over loopback, 2 processes on this machine):
2 ranks of batch b equal 1 rank of batch 2b, a killed rank stops the others with a checkpoint
instead of a hang, and the run resumes on 2 ranks exactly or on 1 rank with a message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from odyssey.runtime.runlog import RunDir
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def setup(train_dir):
    return train_dir  # tests/conftest.py


def cmd(setup, run, *extra, nproc=None):
    c = [
        sys.executable,
        "-m",
        "odyssey",
        "train",
        "--no-guard",
        "--quiet",
        "--model",
        str(setup / "store"),
        "--data",
        str(setup / "tok"),
        "--out",
        str(run),
        "--ram-budget",
        "1GiB",
        *map(str, extra),
    ]
    if nproc:
        c.insert(4, f"--nproc={nproc}")
    return c


def run_ok(c, timeout=300):
    p = subprocess.run(c, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def losses(run) -> dict:
    return {r["step"]: r["loss"] for r in RunDir(run).read_metrics("step")}


def test_two_ranks_of_batch_b_equal_one_rank_of_batch_2b(setup, tmp_path):
    # fp32 compute whatever this CPU would pick: the tolerances below are fp32's (in bf16 a sum over
    # ranks in another order moves the losses by bf16 rounding, about 1e-2 relative)
    common = [
        "--steps",
        4,
        "seq_len=32",
        "lr=1e-2",
        "warmup_steps=0",
        "eval_every=0",
        "checkpoint_every=4",
        "compute_dtype=fp32",
    ]
    run_ok(cmd(setup, tmp_path / "one", *common, "batch_size=4"))
    run_ok(cmd(setup, tmp_path / "two", *common, "batch_size=2", nproc=2))
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k)
    assert moved > 1e-3  # the adapters were trained, not left at init
    # Adam divides by sqrt(v): a gradient near zero that differs in its last fp32 bits (a sum over
    # ranks in another order) can move its weight by a visible fraction of one step (lr = 1e-2), so
    # the tolerance is 1% of one step's update
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert l1.keys() == l2.keys() and all(abs(l1[s] - l2[s]) < 1e-5 for s in l1)
    ranks = RunDir(tmp_path / "two").read_metrics("rank")
    assert {r["rank"] for r in ranks} == {0, 1}
    assert all({"rss_anon_mib", "pagein_mb_s", "step"} <= set(r) for r in ranks)
    steps = RunDir(tmp_path / "two").read_metrics("step")
    assert len(steps) == 4 and all(s["world_size"] == 2 for s in steps)  # only rank 0 writes steps


def test_killed_rank_stops_the_other_with_a_checkpoint_then_resumes(setup, tmp_path):
    common = [
        "--steps",
        40,
        "seq_len=32",
        "batch_size=2",
        "lr=3e-3",
        "eval_every=0",
        "checkpoint_every=1000",
        "dist_timeout_s=20",
    ]
    ref = tmp_path / "ref"
    run_ok(cmd(setup, ref, *common, nproc=2))
    run = tmp_path / "run"
    proc = subprocess.Popen(
        cmd(setup, run, *common, nproc=2),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        victim = None
        while time.time() < deadline and victim is None:
            rows = (
                [r for r in RunDir(run).read_metrics("rank") if r["rank"] == 1]
                if (run / "metrics.jsonl").exists()
                else []
            )
            if len(rows) >= 5:
                victim = rows[-1]["pid"]
            time.sleep(0.02)
        assert victim, "rank 1 never ran 5 steps"
        t_kill = time.time()
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)  # no hang: the other rank stops
        took = time.time() - t_kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    status = RunDir(run).read_status()
    assert status["state"] == "stopped", (status, err[-2000:])
    last = status["step"]
    assert 5 <= last < 40 and (run / "checkpoints" / f"step-{last:06d}" / "trainer.pt").is_file()
    print(f"killed rank noticed: rank 0 stopped with checkpoint step-{last} {took:.1f} s after the kill")

    # resume on 2 ranks: the data position of every rank is restored, the losses are the reference's
    run_ok(cmd(setup, run, "--resume", nproc=2))
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, 41))
    assert all(abs(got[s] - want[s]) < 1e-5 for s in got), {
        s: (got[s], want[s]) for s in got if abs(got[s] - want[s]) >= 1e-5
    }


def test_resume_on_another_number_of_ranks_says_what_changes(setup, tmp_path):
    run = tmp_path / "run"
    common = ["--steps", 6, "seq_len=32", "batch_size=2", "eval_every=0", "checkpoint_every=3"]
    run_ok(cmd(setup, run, *common, nproc=2))
    # drop the final checkpoint so the resume starts from step 3
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-000006")
    p = run_ok(cmd(setup, run, "--resume"))
    assert "resuming a run of 2 rank(s) on 1" in p.stderr and "global batch changes from 4 to 2" in p.stderr
    steps = [r["step"] for r in RunDir(run).read_metrics("step")]
    assert steps[-3:] == [4, 5, 6]
