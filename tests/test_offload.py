"""Optimizer offload (odyssey/offload.py): the AdamW moments wait on disk between optimizer steps,
bit for bit; the plan counts them off the step's peak and in a phase of its own; `auto` offloads
only where that spares recompute or lets the plan fit; a run with it trains, checkpoints and
resumes as one without."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch

from odyssey import offload as offload_mod
from odyssey.config import LoraSettings, TrainConfig
from odyssey.errors import OdysseyError
from odyssey.monitor.feed import Feed
from odyssey.offload import MomentsOffload, moment_bytes
from odyssey.planner import plan_for_store
from odyssey.runtime.runlog import RunDir
from odyssey.stepmemory import lora_parameter_count
from tests.conftest import cli_in_process
from tests.test_train import step_losses, train_cli


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 16), (2048, 16), (16, 5), (3,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(params, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in params]


def test_offloaded_moments_are_exact_and_leave_ram(tmp_path, monkeypatch):
    """Five AdamW steps with the moments evicted after each and loaded before the next give the
    weights and the state of the same steps in RAM, bit for bit. Between steps the state holds
    meta tensors only (no RAM); a load allocates one buffer, and an evict after a load writes
    that buffer as it is (no second copy)."""
    ref, got = _params(), _params()
    o_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.01)
    o_got = torch.optim.AdamW(got, lr=1e-2, weight_decay=0.01)
    allocations = []
    real = offload_mod.aligned_buffer
    monkeypatch.setattr(offload_mod, "aligned_buffer", lambda n: allocations.append(n) or real(n))
    off = MomentsOffload(o_got, tmp_path)
    off.evict()  # before the first step there is no state: nothing to write
    assert not off.on_disk
    for step in range(5):
        for ps, gs in ((ref, _grads(ref, step)), (got, _grads(got, step))):
            for p, g in zip(ps, gs, strict=True):
                p.grad = g
        o_ref.step()
        off.load()
        o_got.step()
        off.evict()
        moments = [t for p in got for t in o_got.state[p].values() if t.dim() > 0]
        assert len(moments) == 2 * len(got) and all(t.device.type == "meta" for t in moments)
    assert len(allocations) == 5 and allocations[0] <= offload_mod.STAGING  # evict 1 stages; loads 2-5 reuse
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    off.load()
    for a, b in zip(ref, got, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(o_ref.state[a][key], o_got.state[b][key]), key
    assert off.take_stats() == 10 * off.size and off.size >= moment_bytes(got) > 0
    assert list(tmp_path.iterdir()) == []  # the file has no name
    off.close()


def test_a_step_without_load_fails_instead_of_starting_from_zero(tmp_path):
    params = _params()
    opt = torch.optim.AdamW(params, lr=1e-2)
    for p, g in zip(params, _grads(params, 0), strict=True):
        p.grad = g
    opt.step()
    off = MomentsOffload(opt, tmp_path)
    off.evict()
    with pytest.raises((RuntimeError, NotImplementedError)):
        opt.step()
    off.close()


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    params = _params()
    opt = torch.optim.AdamW(params, lr=1e-2)

    def no_space(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(offload_mod.os, "posix_fallocate", no_space)
        with pytest.raises(OdysseyError, match="cannot reserve .* optimizer_offload=off"):
            MomentsOffload(opt, tmp_path)
    off = MomentsOffload(opt, tmp_path)
    for p, g in zip(params, _grads(params, 0), strict=True):
        p.grad = g
    opt.step()
    monkeypatch.setattr(offload_mod.os, "pwrite", no_space)
    with pytest.raises(OdysseyError, match="writing the AdamW moments .* failed"):
        off.evict()
    assert all(t.device.type == "cpu" for p in params for t in opt.state[p].values())  # still in RAM
    off.close()


def _store(tmp_path, layers: int = 8):
    from odyssey.store import Store, init_store
    from tests.conftest import tiny_config

    cfg = tiny_config(num_hidden_layers=layers, hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    init_store(cfg, tmp_path / "m", dtype="f32", seed=1, progress=False)
    return Store.open(tmp_path / "m")


def test_plan_counts_the_moments_off_the_peak_and_the_optimizer_step_apart(tmp_path):
    """Offloaded, the adapters term holds the weights and the peak's gradients only (two moments
    fewer); where the activations are small the optimizer step, with the moments back and every
    gradient, is the peak."""
    store = _store(tmp_path)
    lora = LoraSettings(r=16)
    adapters = lora_parameter_count(store.config, lora) * 4
    kw = dict(mode="lora", seq_len=512, lora=lora, compute_dtype="fp32", runtime=100 << 20)
    ram, disk = plan_for_store(store, **kw), plan_for_store(store, offload=True, **kw)
    assert ram.offload == 0 and disk.offload == 2 * adapters
    assert ram.terms["adapters + AdamW"] - disk.terms["adapters"] == 2 * adapters
    assert ram.total - disk.total >= 2 * adapters and "wait on disk" in disk.table()
    small = dict(kw, seq_len=4, lora=LoraSettings(r=256))
    p = plan_for_store(store, offload=True, **small)
    assert p.peak.startswith("the optimizer step") and "activations" not in p.terms
    assert p.terms["adapters + AdamW"] == 4 * lora_parameter_count(store.config, small["lora"]) * 4
    assert p.total > plan_for_store(store, **small).total - 2 * lora_parameter_count(store.config, small["lora"]) * 4


def test_auto_offloads_where_it_spares_recompute_and_nowhere_else(tmp_path, monkeypatch):
    """`optimizer_offload: auto` (train.training_plan): at a budget where the moments' room keeps
    more layers' activations, the moments go to disk and the start line says how many layers it
    spares; where every layer is kept anyway they stay in RAM; `off` and `on` do as they say; a
    directory without O_DIRECT (tmpfs) keeps them in RAM with a line saying why."""
    from odyssey import planner
    from odyssey.train import training_plan

    monkeypatch.setattr(planner, "measured_runtime", lambda mode: 100 << 20)  # the same in every plan here
    monkeypatch.setattr(offload_mod, "offload_possible", lambda d: True)
    store = _store(tmp_path)
    lora = LoraSettings(r=64)

    def cfg(setting):
        return TrainConfig(seq_len=256, lora=lora, compute_dtype="fp32", spill="off", optimizer_offload=setting)

    kw = dict(mode="lora", seq_len=256, lora=lora, compute_dtype="fp32")
    budget = -(-plan_for_store(store, **kw).total >> 20) << 20  # whole MiB, as --ram-budget says it
    while plan_for_store(store, budget=budget, offload=True, **kw).residency.kept <= (
        plan_for_store(store, budget=budget, **kw).residency.kept
    ):
        budget += 1 << 20
    auto = training_plan(store, cfg("auto"), budget, tmp_path)
    off = training_plan(store, cfg("off"), budget, tmp_path)
    assert auto.offload and not off.offload and auto.plan.residency.kept > off.plan.residency.kept
    assert "optimizer offload: on (auto" in auto.offload_why and "spares" in auto.offload_why and not off.offload_why
    wide = 8 << 30
    assert not training_plan(store, cfg("auto"), wide, tmp_path).offload  # every layer kept without it
    on = training_plan(store, cfg("on"), wide, tmp_path)
    assert on.offload and on.plan.offload > 0 and "optimizer_offload=on" in on.offload_why
    monkeypatch.setattr(offload_mod, "offload_possible", lambda d: False)
    tmpfs = training_plan(store, cfg("auto"), budget, tmp_path)
    assert not tmpfs.offload and "no O_DIRECT" in tmpfs.offload_why
    # a budget that fits only with the moments on disk
    tight = plan_for_store(store, offload=True, **kw).total + (1 << 20)
    monkeypatch.setattr(offload_mod, "offload_possible", lambda d: True)
    assert not plan_for_store(store, budget=tight, **kw).fits
    fits = training_plan(store, cfg("auto"), tight, tmp_path)
    assert fits.offload and fits.plan.fits and "lets the plan fit" in fits.offload_why
    with pytest.raises(OdysseyError, match="is too small"):
        training_plan(store, cfg("off"), tight, tmp_path)
    shown = []  # fitting in neither way: no offload line, the error names the smaller plan's budget
    with pytest.raises(OdysseyError, match=f"use --ram-budget {-(-fits.plan.total >> 20)}MiB"):
        training_plan(store, cfg("auto"), 64 << 20, tmp_path, show=lambda p, lines: shown.extend(lines))
    assert not any("optimizer offload" in line for line in shown)
    # odyssey plan makes the same choice and shows it
    args = ["plan", "--model", str(tmp_path / "m"), "--ram-budget", f"{budget >> 20}MiB", "--seq-len", "256"]
    args += ["--lora-r", "64", "--compute-dtype", "fp32", "--spill", "off"]
    shown = cli_in_process(*args, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "optimizer: the AdamW moments" in shown.stdout and "optimizer offload: on (auto" in shown.stdout
    shown = cli_in_process(*args, "--optimizer-offload", "off", cwd=tmp_path)
    assert shown.returncode == 0 and "optimizer" not in shown.stdout


def test_offload_check_of_the_directory(tmp_path):
    import os

    from odyssey.offload import offload_possible
    from odyssey.spill import open_unlinked

    fd, direct = open_unlinked(str(tmp_path))
    os.close(fd)
    assert offload_possible(str(tmp_path / "run" / "not-yet")) == direct  # where the run dir will be
    assert list(tmp_path.iterdir()) == []


def test_train_with_offload_equals_without_and_resumes_exactly(train_dir, tmp_path):
    """`odyssey train --optimizer-offload on`: the losses of every step equal `off`'s, each step
    record counts the moments written and read back (the monitor shows it), and a run stopped at a checkpoint and
    resumed gives the losses of one that was not (the checkpoint holds the moments, not their
    placeholders)."""
    common = [
        "seq_len=32",
        "batch_size=2",
        "eval_every=0",
        "lr=3e-3",
        "warmup_steps=1",
        "checkpoint_every=3",
        "keep_checkpoints=2",
    ]
    runs = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        p = train_cli(train_dir, out, "--steps", "6", "--optimizer-offload", setting, *common)
        assert p.returncode == 0, p.stderr
        runs[setting] = step_losses(out)
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if r.get("kind") == "step"]
        if setting == "on":
            assert steps[0]["offload_bytes"] > 0 and all(r["offload_bytes"] > 0 for r in steps)
            feed = Feed(out)  # the monitor's Resident field says so
            feed.poll()
            while feed.more_waiting:
                feed.poll()
            assert "AdamW moments on disk" in feed.values()["resident"]
        else:
            assert all("offload_bytes" not in r for r in steps)
    assert runs["on"] == runs["off"] and len(runs["on"]) == 6
    out = tmp_path / "on"  # resume from the checkpoint of step 3: steps 4-6 again
    shutil.rmtree(out / "checkpoints" / "step-000006")
    p = train_cli(train_dir, out, "--resume", "--steps", "6", "--optimizer-offload", "on", *common)
    assert p.returncode == 0, p.stderr
    again = [r for r in RunDir(out).read_metrics("step") if r["step"] > 3]
    assert len(again) == 6 and {r["step"]: r["loss"] for r in again} == {s: runs["off"][s] for s in (4, 5, 6)}
