"""How the pager reads the store in training (odyssey/readmode.py, `direct_io`): `auto` reads
O_DIRECT where the store's measured O_DIRECT rate is MARGIN times what a step needs, buffered
otherwise or where the file system refuses O_DIRECT; `odyssey train` gives the same losses either
way and says which it chose."""

from __future__ import annotations

import errno
import json
import math

import pytest

from odyssey import dtypes, readmode
from odyssey.config import TrainConfig
from odyssey.errors import OdysseyError
from odyssey.readmode import MARGIN, choose, probe_direct
from odyssey.spill import STEP_EFFICIENCY
from tests.test_residency import four_layer_store


class Probe:
    gflops = {"bf16": 100.0, "fp32": 50.0}


def need_of(store, read_bytes: int, tokens: int, gflops: float) -> float:
    """Bytes/s a step reads over its compute time, as the module docstring defines it."""
    cfg = store.config
    params = cfg.num_hidden_layers * sum(math.prod(s) for s in cfg.layer_shapes(0).values())
    return read_bytes / (4 * params * tokens / (gflops * 1e9 * STEP_EFFICIENCY))


def test_choose(tmp_path, monkeypatch):
    """off and on as said; auto: O_DIRECT at MARGIN times the step's need and above, buffered
    below it, buffered where O_DIRECT is refused, and nothing to say where nothing is paged."""
    store = four_layer_store(tmp_path)
    monkeypatch.setattr(dtypes, "probe_for", lambda cfg: Probe)
    kw = dict(read_bytes=300 << 20, tokens=512, compute="fp32")
    need = need_of(store, 300 << 20, 512, Probe.gflops["fp32"])
    assert choose("off", store, **kw) == readmode.ReadChoice(False, "")
    assert choose("on", store, **kw).direct and "direct_io=on" in choose("on", store, **kw).why
    nothing = choose("auto", store, **{**kw, "read_bytes": 0}, probe=lambda s: pytest.fail("probed"))
    assert nothing == readmode.ReadChoice(False, "")
    fast = choose("auto", store, **kw, probe=lambda s: MARGIN * need * 1.01)
    assert fast.direct and fast.why.startswith("page-in: O_DIRECT (auto: the store reads")
    assert f"a step needs ~{need / 1e6:,.0f}" in fast.why
    slow = choose("auto", store, **kw, probe=lambda s: MARGIN * need * 0.99)
    assert not slow.direct and slow.why.startswith("page-in: buffered (auto:") and f"under {MARGIN}x" in slow.why
    # the same rate with bf16's faster compute: a step needs twice the bytes a second
    assert not choose("auto", store, **{**kw, "compute": "bf16"}, probe=lambda s: MARGIN * need * 1.5).direct

    def refused(s):
        raise OSError(errno.EINVAL, "Invalid argument")

    tmpfs = choose("auto", store, **kw, probe=refused)
    assert not tmpfs.direct and "takes no O_DIRECT reads: Invalid argument" in tmpfs.why


def test_probe_reads_the_largest_unit_without_the_page_cache(tmp_path):
    """A rate in bytes/s, or OSError where the file system refuses O_DIRECT (tmpfs); the store is
    not written to."""
    store = four_layer_store(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in store.root.iterdir()}
    try:
        rate = probe_direct(store, nbytes=1 << 20)
    except OSError as e:
        assert e.errno == errno.EINVAL
    else:
        assert rate > 0
    assert {p: p.stat().st_mtime_ns for p in store.root.iterdir()} == before


def test_config_takes_auto_on_off_and_yaml_booleans():
    assert TrainConfig(direct_io=True).direct_io == "on" and TrainConfig(direct_io=False).direct_io == "off"
    with pytest.raises(OdysseyError, match="direct_io must be auto, on or off"):
        TrainConfig(direct_io="sometimes")


def test_train_reads_direct_or_buffered_with_the_same_losses(train_dir, tmp_path, monkeypatch, capsys):
    """`odyssey train` at a budget that pages layers every step: direct_io=on opens the pager
    O_DIRECT (where the file system allows it) and gives direct_io=off's losses at every step;
    auto says what it chose and why at the start."""
    from odyssey import engine as engine_mod
    from odyssey.cli import main

    made = []
    real = engine_mod.Pager

    def spy(*a, **k):
        pager = real(*a, **k)
        made.append(pager)
        return pager

    monkeypatch.setattr(engine_mod, "Pager", spy)
    losses = {}
    for mode in ("on", "off", "auto"):
        out = tmp_path / f"run-{mode}"
        args = ["train", "--no-guard", "--model", str(train_dir / "store"), "--data", str(train_dir / "tok")]
        args += ["--out", str(out), "--ram-budget", "2GiB", "--steps", "3", "--no-pin", f"direct_io={mode}"]
        args += ["compute_dtype=fp32", "seq_len=32"]
        assert main(args) == 0
        said = capsys.readouterr()
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "step_s" in r]
        assert all(r["pagein_bytes"] > 0 for r in steps), steps
        losses[mode] = [r["loss"] for r in steps]
        pager = made[-1]
        if mode == "on":
            assert pager.direct and "page-in: O_DIRECT (direct_io=on)" in said.out + said.err
            assert pager.direct_fallback is None or "O_DIRECT" in pager.direct_fallback
        elif mode == "off":
            assert not pager.direct and "page-in:" not in said.out + said.err
        else:
            assert "page-in: " in said.out + said.err and "(auto: " in said.out + said.err
            assert pager.direct == ("page-in: O_DIRECT" in said.out + said.err)
    assert losses["on"] == losses["off"] == losses["auto"]
