"""Activation spill (odyssey/spill.py): a spilled layer's saved tensors go to disk in forward and
come back for backward, bit for bit; the plan counts one layer in flight; `auto` measures the disk;
a full disk or a tensor changed after it was saved is an error, never stale numbers."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from odyssey import spill as spill_mod
from odyssey.adapters import lora_parameters
from odyssey.config import LoraSettings
from odyssey.engine import Engine
from odyssey.errors import OdysseyError
from odyssey.planner import plan_for_store
from odyssey.spill import Spill, choose
from tests.helpers_lora import lora_skeleton, poison_released_slots
from tests.test_residency import four_layer_store

LORA = LoraSettings(r=4, alpha=8)


def batch(seed: int = 3, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, n), generator=g), torch.randint(0, 256, (1, n), generator=g)


def run(store, tmp_path, keep=0, spill=0, compute="fp32", steps=2, settings=None, min_bytes=0):
    ids, tgt = batch()
    skel = lora_skeleton(store, std=0.02, settings=settings)
    skel.train()
    torch.manual_seed(11)  # LoRA dropout draws from the global generator
    with Engine(store, compute_dtype=compute, model=skel, keep=keep, spill=spill, spill_dir=tmp_path) as eng:
        if spill:
            eng._spill.min_bytes = min_bytes
        losses = [eng.train_step(ids, tgt) for _ in range(steps)]
        st = eng.pass_stats(1.0)
    return losses, {k: p.grad.clone() for k, p in lora_parameters(skel).items()}, st


@pytest.mark.parametrize("dtype,compute", [("f32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")])
def test_spilled_layers_equal_recompute_bit_for_bit(tmp_path, monkeypatch, dtype, compute):
    """Spilled layers (all four; three after a kept one; one between recomputed and kept ones)
    give the losses and LoRA gradients of recomputing every layer, bit for bit, over two steps
    (the file is reused), while the pager scribbles NaNs over every slot it releases; the stats
    count the bytes that went through the disk."""
    store = four_layer_store(tmp_path, dtype=dtype)
    ref_losses, ref_grads, _ = run(store, tmp_path, compute=compute)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in ref_grads.values())
    poisoned = poison_released_slots(monkeypatch)
    for keep, spill in [(0, 4), (1, 3), (1, 1)]:
        poisoned.clear()
        losses, grads, st = run(store, tmp_path, keep=keep, spill=spill, compute=compute)
        assert losses == ref_losses, (keep, spill)
        assert all(torch.equal(grads[k], ref_grads[k]) for k in grads), (keep, spill)
        assert st.spilled_layers == spill and st.spill_bytes > 0 and st.kept_layers == keep
        assert 0 in poisoned or keep + spill < 4


def test_spill_with_lora_dropout_uses_the_forwards_masks(tmp_path):
    """LoRA dropout: a spilled layer's masks are drawn once in forward and saved (spilled with the
    rest), so its gradients equal the recompute's, which replays the forward's RNG state."""
    store = four_layer_store(tmp_path)
    settings = LoraSettings(r=4, alpha=8, dropout=0.3)
    ref_losses, ref_grads, _ = run(store, tmp_path, settings=settings)
    losses, grads, st = run(store, tmp_path, spill=4, settings=settings)
    assert st.spill_bytes > 0
    assert losses == ref_losses
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def test_small_tensors_and_shared_tables_stay_in_ram(tmp_path):
    """Below min_bytes nothing is written; the RoPE tables every layer saves never are."""
    store = four_layer_store(tmp_path)
    _, _, st = run(store, tmp_path, spill=4, min_bytes=1 << 30)
    assert st.spill_bytes == 0
    with Spill(tmp_path, min_bytes=0) as sp:
        cos = torch.randn(16, 8)
        sp.begin_step(shared=[cos])
        ls = sp.layer(0)
        assert ls.pack(cos) is cos
        x = torch.randn(16, 8)
        h = ls.pack(x)
        assert h is not x and ls.pack(x[2:]).index == h.index  # one storage, written once


def test_tensor_changed_in_place_after_it_was_saved_is_an_error(tmp_path):
    with Spill(tmp_path, min_bytes=0) as sp:
        sp.begin_step()
        ls = sp.layer(0)
        w = torch.randn(8, 8, requires_grad=True)
        x = torch.randn(4, 8)
        with torch.autograd.graph.saved_tensors_hooks(ls.pack, ls.unpack):
            y = (x.clone() * 2) @ w  # matmul saves its input (the product), a non-leaf
        assert len(ls.storages) == 1
        ls.pending[0][0].add_(1)  # changed after autograd saved it
        with pytest.raises(RuntimeError, match="changed in place"):
            sp.seal(0)
        del y


def test_views_come_back_with_their_geometry(tmp_path):
    """A storage saved through several views (a transpose, a slice, another dtype's view) is
    written once and each view comes back with its own size, stride and offset."""
    with Spill(tmp_path, min_bytes=0) as sp:
        sp.begin_step()
        ls = sp.layer(3)
        base = torch.randn(64, 48)
        views = [base, base.t(), base[5:9, 3:40], base.view(torch.int32)[1::2]]
        handles = [ls.pack(v) for v in views]
        want = [v.clone() for v in views]
        sp.seal(3)
        assert ls.written.wait(10) and ls.storages == []  # written by the worker, the RAM copy gone
        got = sp.fetch(3)
        for h, v, w in zip(handles, views, want, strict=True):
            back = got.unpack(h)
            assert back.shape == v.shape and back.stride() == v.stride() and back.dtype == v.dtype
            assert torch.equal(back, w)
        sp.release(3)


def test_full_disk_is_one_line(tmp_path, monkeypatch):
    """No room for a step's spill: an OdysseyError naming the directory and the fixes, at the
    start (the space is reserved); a write failing mid-step: the same kind of line."""

    def full(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = four_layer_store(tmp_path)
    monkeypatch.setattr(spill_mod.os, "posix_fallocate", full)
    with pytest.raises(OdysseyError, match=r"spill: cannot reserve .* --spill off"):
        Engine(
            store, compute_dtype="fp32", model=lora_skeleton(store), spill=4, spill_dir=tmp_path, spill_reserve=1 << 20
        )
    monkeypatch.undo()

    def pwrite(fd, data, off):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill_mod.os, "pwrite", pwrite)
    ids, tgt = batch()
    with Engine(store, compute_dtype="fp32", model=lora_skeleton(store), spill=4, spill_dir=tmp_path) as eng:
        eng._spill.min_bytes = 0
        with pytest.raises(OdysseyError, match=r"spill: writing activations in .* failed \(No space left"):
            eng.train_step(ids, tgt)


def test_the_spill_file_has_no_name(tmp_path):
    """Nothing is left in the directory, during the run or after it (O_TMPFILE or unlinked)."""
    store = four_layer_store(tmp_path / "s")
    d = tmp_path / "spill"
    with Engine(store, compute_dtype="fp32", model=lora_skeleton(store), spill=4, spill_dir=d) as eng:
        eng._spill.min_bytes = 0
        eng.train_step(*batch())
        assert list(d.iterdir()) == []
    assert list(d.iterdir()) == []


def test_choose(tmp_path, monkeypatch):
    """off and --recompute all never spill; on always does; auto spills when the disk measured
    moves a layer's activations and weights faster than the layer computes, and not where the
    file system takes no O_DIRECT files (tmpfs) or the free space is short."""
    store = four_layer_store(tmp_path)
    kw = dict(tokens=512, compute="fp32", lora=LORA)
    assert not choose("off", tmp_path, store, **kw).on
    assert not choose("on", tmp_path, store, recompute="all", **kw).on
    assert choose("on", tmp_path, store, **kw).on
    from odyssey import dtypes

    class Probe:
        gflops = {"bf16": 100.0, "fp32": 100.0}

    monkeypatch.setattr(dtypes, "probe_for", lambda cfg: Probe)
    monkeypatch.setattr(spill_mod, "probe_disk", lambda d: (2e12, 2e12, True))
    fast = choose("auto", tmp_path / "run" / "not-yet", store, **kw)  # measured where the run dir will be
    assert fast.on and "auto: disk 2,000,000 MB/s" in fast.why and fast.directory.endswith("not-yet")
    monkeypatch.setattr(spill_mod, "probe_disk", lambda d: (2e3, 2e3, True))
    slow = choose("auto", tmp_path, store, **kw)
    assert not slow.on and "longer than its" in slow.why
    monkeypatch.setattr(spill_mod, "probe_disk", lambda d: (2e12, 2e12, False))
    assert "no O_DIRECT" in choose("auto", tmp_path, store, **kw).why

    class Usage:
        free = 10

    monkeypatch.setattr(spill_mod.shutil, "disk_usage", lambda d: Usage)
    assert "GB free" in choose("auto", tmp_path, store, **kw).why


def test_probe_disk_measures_this_directory(tmp_path):
    write, read, direct = spill_mod.probe_disk(tmp_path, nbytes=16 << 20)
    assert write > 0 and read > 0 and isinstance(direct, bool)
    assert list(tmp_path.iterdir()) == []


def test_plan_spills_what_it_cannot_keep(tmp_path):
    """With spill, the layers the budget cannot keep in RAM spill instead of being recomputed;
    the plan counts one layer in flight and the staging buffer, and still fits its budget. A
    budget that keeps every layer spills none."""
    from odyssey.store import Store, init_store
    from tests.conftest import tiny_config

    cfg = tiny_config(num_hidden_layers=8, hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    init_store(cfg, tmp_path / "m", dtype="f32", seed=1, progress=False)
    store = Store.open(tmp_path / "m")
    kw = dict(mode="lora", seq_len=1024, lora=LORA, compute_dtype="fp32", runtime=100 << 20)
    wide = plan_for_store(store, budget=8 << 30, spill=True, **kw)
    assert wide.residency.kept == 8 and wide.residency.spilled == 0 and "spill in flight" not in wide.terms
    budget = plan_for_store(store, budget=None, **kw).total  # every layer recomputed
    while (tight := plan_for_store(store, budget=budget, **kw)).residency.kept < 2:
        budget += 4 << 20
    sp = plan_for_store(store, budget=budget, spill=True, **kw)
    assert 2 <= tight.residency.kept < 8
    r = sp.residency
    assert r.spilled == 8 - r.kept and r.kept <= tight.residency.kept  # a kept layer or two make room
    assert sp.terms["spill in flight"] > 0 and sp.fits and r.spill_bytes > 0
    assert any("spill:" in line for line in r.lines()) and "spill them to disk" in r.summary()


def test_train_cli_spills_and_records_it(train_dir, tmp_path, monkeypatch, capsys):
    """`odyssey train --spill on` with a budget that keeps fewer layers than there are: the start
    lines say so, metrics.jsonl records the spilled layers and bytes, and the losses equal
    --spill off's (which recomputes them)."""
    from odyssey import planner
    from odyssey.cli import main
    from odyssey.store import Store

    real = planner.kept_layer_bytes
    monkeypatch.setattr(planner, "kept_layer_bytes", lambda *a: real(*a) + (60 << 20))  # a tiny layer made big
    monkeypatch.setattr(spill_mod, "MIN_BYTES", 0)
    store = Store.open(train_dir / "store")
    kw = dict(mode="lora", seq_len=32, lora=LoraSettings(), compute_dtype="fp32")
    budget = plan_for_store(store, budget=None, **kw).total  # every layer recomputed
    while plan_for_store(store, budget=budget, spill=True, **kw).residency.spilled == 0:
        budget += 4 << 20
    no_room = budget - (40 << 20)  # fits recomputing, not with a layer in flight (about 70 MiB)
    budget += 24 << 20  # this process's memory (the plan's runtime term) may grow a little before train plans
    assert plan_for_store(store, budget=budget, spill=True, **kw).residency.spilled > 0
    losses = {}
    for mode in ("on", "off"):
        out = tmp_path / f"run-{mode}"
        args = ["train", "--no-guard", "--model", str(train_dir / "store"), "--data", str(train_dir / "tok")]
        args += ["--out", str(out), "--ram-budget", f"{budget >> 20}MiB", "--steps", "2", "--spill", mode]
        args += ["compute_dtype=fp32", "seq_len=32"]
        assert main(args) == 0
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "step_s" in r]
        losses[mode] = [r["loss"] for r in steps]
        if mode == "on":
            assert all(r["spilled_layers"] > 0 and r["spill_bytes"] > 0 for r in steps), steps
            said = capsys.readouterr()
            assert "spill: on (--spill on)" in said.out + said.err
    assert losses["on"] == losses["off"]
    # --spill on where the budget has no room for one layer in flight: nothing spills, the start says why
    out = tmp_path / "run-none"
    args = ["train", "--no-guard", "--model", str(train_dir / "store"), "--data", str(train_dir / "tok")]
    args += ["--out", str(out), "--ram-budget", f"{no_room >> 20}MiB", "--steps", "1", "--spill", "on"]
    capsys.readouterr()
    assert main([*args, "compute_dtype=fp32", "seq_len=32"]) == 0
    said = capsys.readouterr()
    assert "spill: none (one layer's activations in flight need" in said.out + said.err, said
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "step_s" in line]
    assert rec[0]["spilled_layers"] == 0 and rec[0]["loss"] == losses["off"][0]
