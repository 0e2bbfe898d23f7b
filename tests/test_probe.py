"""odyssey.probe: a real run writes the cache with sane figures; a valid entry is used without
measuring; a corrupt, foreign or stale entry (another thread count, other kernel limits) is
measured again and rewritten atomically; processes measure once between them; the store-precision
rule needs no measurement; `odyssey doctor` prints the figures and the choice."""

from __future__ import annotations

import json
import math
import os
import threading
import time

import pytest

from odyssey import probe as probe_mod
from odyssey.dtypes import COMPUTE_ENV, compute_dtype_line, compute_dtype_name
from odyssey.probe import CACHE_ENV, DEFAULT_SHAPE, Probe, ProbeKey, cache_dir, probe, shape_of
from tests.conftest import ROOT, run_cli

SMALL = (64, 128, 256)  # a real measurement in milliseconds


@pytest.fixture
def counted(monkeypatch):
    """Replace the measurement by one that counts its calls and answers bf16 70, fp32 140 GFLOP/s."""
    calls = []

    def fake(shape, *a, **k):
        calls.append(tuple(shape))
        return {"bf16": 70.0, "fp32": 140.0}, 2, 0.01

    monkeypatch.setattr(probe_mod, "measure", fake)
    return calls


def read(path):
    return json.loads(path.read_text())


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "odyssey"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "odyssey"


def test_shape_is_the_largest_projection(tiny_cfg):
    from odyssey.config import load_model_config

    assert shape_of(tiny_cfg) == (512, 64, 160)
    big = load_model_config(ROOT / "configs/odyssey-1.2b.yaml")
    assert shape_of(big) == DEFAULT_SHAPE == (512, 2048, 5632)


def test_a_real_probe_writes_the_cache_with_sane_figures(probe_cache):
    import torch

    p = probe(SMALL)
    assert not p.cached and p.rounds >= 1 and p.probe_s > 0 and not p.cache_error
    assert set(p.gflops) == {"bf16", "fp32"} and all(math.isfinite(v) and v > 0 for v in p.gflops.values())
    assert p.fastest in ("bf16", "fp32")
    files = list(probe_cache.directory.iterdir())
    assert files == [p.path]  # one file, no temporary left behind
    d = read(p.path)
    assert d["key"]["shape"] == list(SMALL) and d["key"]["threads"] == torch.get_num_threads()
    assert d["key"]["torch"] == torch.__version__ and d["gflops"] == {k: round(v, 1) for k, v in p.gflops.items()}
    again = probe(SMALL)  # the second call reads what the first wrote
    assert again.cached and again.gflops == pytest.approx(p.gflops, abs=0.051) and again.measured == p.measured
    assert again.summary().endswith(f"at 64x128x256, cached {p.measured[:10]}")


def test_a_planted_entry_is_used_without_measuring(probe_cache, counted):
    path = probe_cache(SMALL, bf16=11.0, fp32=22.0)
    before = path.read_bytes()
    p = probe(SMALL)
    assert counted == [] and p.cached and p.gflops == {"bf16": 11.0, "fp32": 22.0} and p.fastest == "fp32"
    assert p.summary() == "measured fp32 22 GFLOP/s vs bf16 11 at 64x128x256, cached 2026-01-02"
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: b"{not json",
        lambda d: b"\xff\xfe",
        lambda d: json.dumps({**d, "gflops": {"bf16": -1, "fp32": 5}}).encode(),
        lambda d: json.dumps({**d, "gflops": {"bf16": "NaN", "fp32": 5}}).encode(),
        lambda d: json.dumps({**d, "version": 99}).encode(),
        lambda d: json.dumps({**d, "key": {**d["key"], "cpu": "another CPU"}}).encode(),
        lambda d: json.dumps({k: v for k, v in d.items() if k != "rounds"}).encode(),
        lambda d: b"[]",
    ],
    ids=["not-json", "not-utf8", "negative", "nan", "version", "foreign-key", "missing-field", "list"],
)
def test_a_corrupt_entry_is_measured_again_and_rewritten_atomically(probe_cache, counted, monkeypatch, damage):
    path = probe_cache(SMALL, bf16=11.0, fp32=22.0)
    bad = damage(read(path))
    path.write_bytes(bad)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # a measurement that dies leaves the old file as it was
        m.setattr(probe_mod, "measure", interrupted)
        with pytest.raises(KeyboardInterrupt):
            probe(SMALL)
    assert path.read_bytes() == bad
    p = probe(SMALL)
    assert counted == [SMALL] and not p.cached and p.gflops == {"bf16": 70.0, "fp32": 140.0}
    assert read(path)["gflops"] == {"bf16": 70.0, "fp32": 140.0}
    assert list(probe_cache.directory.iterdir()) == [path]  # rewritten in place, no temporary left
    assert probe(SMALL).cached and counted == [SMALL]


def test_another_thread_count_measures_again(probe_cache, counted):
    import torch

    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    planted = probe_cache(SMALL, bf16=11.0, fp32=22.0, threads=other)  # measured under another count
    p = probe(SMALL)
    assert counted == [SMALL] and p.key.threads == threads and p.path != planted
    torch.set_num_threads(other)
    try:
        q = probe(SMALL)  # the planted entry is this key's
    finally:
        torch.set_num_threads(threads)
    assert counted == [SMALL] and q.cached and q.gflops["fp32"] == 22.0
    assert sorted(probe_cache.directory.iterdir()) == sorted([planted, p.path])


def test_a_kernel_limit_measures_again(probe_cache, counted, monkeypatch):
    """The same CPU with its kernels limited (ONEDNN_MAX_CPU_ISA=AVX2: bf16 matmul falls back to a
    slow path, 46 GFLOP/s against 379 on this EPYC) is another key: its figures are measured, not read."""
    for name in probe_mod.KERNEL_ENV:
        monkeypatch.delenv(name, raising=False)
    planted = probe_cache(SMALL, bf16=11.0, fp32=22.0)
    assert probe(SMALL).cached and counted == []
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    p = probe(SMALL)
    assert counted == [SMALL] and not p.cached and p.path != planted
    assert p.key.kernels.endswith(" ONEDNN_MAX_CPU_ISA=AVX2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert probe(SMALL).gflops["fp32"] == 22.0 and counted == [SMALL]


def test_remeasure_replaces_a_valid_entry(probe_cache, counted):
    path = probe_cache(SMALL, bf16=11.0, fp32=22.0)
    p = probe(SMALL, remeasure=True)
    assert counted == [SMALL] and not p.cached and read(path)["gflops"]["fp32"] == 140.0


def test_processes_waiting_on_the_lock_measure_once(probe_cache, monkeypatch):
    """Two probes at once (as data-parallel ranks start): the first measures under the cache
    directory's lock, the other waits and reads its answer, so both pick the same dtype."""
    calls = []

    def slow(shape, *a, **k):
        calls.append(shape)
        time.sleep(0.3)
        return {"bf16": 70.0, "fp32": 140.0}, 2, 0.3

    monkeypatch.setattr(probe_mod, "measure", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(probe(SMALL))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(r.cached for r in results) == [False, True]
    assert {r.fastest for r in results} == {"fp32"}


def test_a_cache_that_cannot_be_written_still_decides_and_measures_once(tmp_path, monkeypatch, counted):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "odyssey"))  # a directory under a file: cannot exist
    monkeypatch.setattr(probe_mod, "_UNCACHED", {})
    p = probe(SMALL)
    assert p.cache_error and p.path is None and p.fastest == "fp32" and p.summary().endswith("(not cached)")
    assert probe(SMALL) is p and counted == [SMALL]  # once per process
    assert blocker.read_text() == "x"


def test_the_store_precision_rule_needs_no_measurement(probe_cache, counted, tiny_cfg):
    probe_cache(shape_of(tiny_cfg), bf16=1000.0, fp32=1.0)  # bf16 far faster: still never below the store
    for store in ("f32", "f16"):
        assert compute_dtype_name("auto", store, tiny_cfg) == "fp32"
        assert "never computed below its precision" in compute_dtype_line("auto", store, tiny_cfg)
    assert compute_dtype_name("auto", "bf16", tiny_cfg) == "bf16"
    assert counted == []


def test_bf16_store_where_fp32_measured_faster_computes_fp32(probe_cache, counted, tiny_cfg, monkeypatch):
    probe_cache(shape_of(tiny_cfg), bf16=40.0, fp32=200.0)
    assert compute_dtype_name("auto", "bf16", tiny_cfg) == "fp32"
    assert compute_dtype_name("bf16", "bf16", tiny_cfg) == "bf16"  # an explicit choice wins
    monkeypatch.setenv(COMPUTE_ENV, "bf16")
    assert compute_dtype_name("auto", "bf16", tiny_cfg) == "bf16"  # and the environment
    assert counted == []


def test_probe_entry_round_trips():
    key = ProbeKey("cpu", "x86_64", ("avx2",), "2.13.0", 2, (512, 64, 160))
    p = Probe(key, {"bf16": 1.5, "fp32": 2.5}, "2026-01-02T03:04:05+00:00", 0.25, 3)
    q = Probe.from_json(json.loads(json.dumps(p.to_json())), key, None)
    assert q.gflops == p.gflops and q.rounds == 3 and q.cached and q.key == key
    assert Probe.from_json(p.to_json(), ProbeKey("cpu", "x86_64", ("avx2",), "2.13.0", 4, (512, 64, 160)), None) is None


# --- odyssey doctor ---


def test_doctor_prints_the_planted_figures_and_the_choice(probe_cache, counted, monkeypatch):
    from odyssey.runtime.doctor_compute import compute_fact

    path = probe_cache(DEFAULT_SHAPE, bf16=123.0, fp32=456.0)
    one = (1, *DEFAULT_SHAPE[1:])
    probe_cache(one, bf16=12.0, fp32=5.9, copies=probe_mod.decode_copies(one))  # one token a pass: generate, chat
    fact = compute_fact()
    text = fact.lines()
    assert "; generating (generate, chat): bf16, measured bf16 12 GFLOP/s vs fp32 5.9 at 1x2048x5632" in text
    assert text.startswith(
        "ok    compute      fp32 (`--compute-dtype auto`): measured fp32 456 GFLOP/s vs bf16 123 at 512x2048x5632, "
        "cached 2026-01-02"
    )
    assert f"cache: {path}" in text and "--remeasure" in text
    c = fact.to_json()
    assert c["compute_dtype"] == "fp32" and c["source"] == "probe" and c["f32_store_compute_dtype"] == "fp32"
    assert c["probe"]["gflops"] == {"bf16": 123.0, "fp32": 456.0} and c["probe"]["cached"] is True
    assert c["probe"]["shape"] == list(DEFAULT_SHAPE) and c["probe"]["measured"].startswith("2026-01-02")
    assert c["generate_compute_dtype"] == "bf16" and c["decode_probe"]["shape"] == [1, *DEFAULT_SHAPE[1:]]
    probe_cache(DEFAULT_SHAPE, bf16=457.0, fp32=456.0)
    assert compute_fact().summary.startswith("bf16 for bf16 stores (`--compute-dtype auto`): measured bf16 457")
    monkeypatch.setenv(COMPUTE_ENV, "fp32")
    forced = compute_fact()
    assert forced.data["compute_dtype"] == "fp32" and forced.data["source"] == "environment"
    assert "forced by ODYSSEY_COMPUTE_DTYPE); the probe measured bf16 457" in forced.summary
    assert counted == []


def test_doctor_remeasure_rewrites_the_entry(probe_cache):
    path = probe_cache(DEFAULT_SHAPE, bf16=1e9, fp32=2e9)  # no CPU does that: a real run replaces it
    p = run_cli("doctor", "--json", "--read-test-mib", "0", "--remeasure", env={**os.environ})
    assert p.returncode == 0, p.stderr
    c = json.loads(p.stdout)["compute"]
    d = read(path)
    assert c["probe"]["cached"] is False and d["gflops"] == c["probe"]["gflops"]
    assert all(0 < v < 1e6 for v in d["gflops"].values()) and c["compute_dtype"] == max(
        d["gflops"], key=d["gflops"].get
    )


def test_the_measurement_runs_in_a_child_process_and_falls_back_here(monkeypatch):
    """`measure` times the matmuls in a child with this process's thread count, so the operands and
    what oneDNN keeps after them stay out of the memory the plan measures next; where no child can
    run it measures here."""
    import sys

    def here(shape, *a):
        raise AssertionError("measured in the parent")

    monkeypatch.setattr(probe_mod, "measure_here", here)
    gflops, rounds, seconds = probe_mod.measure(SMALL, reps=2, budget_s=0.5)
    assert set(gflops) == {"bf16", "fp32"} and all(v > 0 for v in gflops.values()) and rounds >= 1
    monkeypatch.setattr(probe_mod, "measure_here", lambda shape, *a: ({"bf16": 1.0, "fp32": 2.0}, 1, 0.1))
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    assert probe_mod.measure(SMALL) == ({"bf16": 1.0, "fp32": 2.0}, 1, 0.1)


# --- generating: one token a pass ---


def test_a_decode_probe_streams_the_models_bytes_up_to_a_cap():
    """At one token a pass the probe multiplies copies of W in turn, their fp32 bytes reaching the
    model's fp32 weights or DECODE_BYTES, whichever is less: a pass streams every weight, and a
    model that fits in the cache decodes from it."""
    from odyssey.probe import DECODE_BYTES, decode_copies, measure_here

    W = 4 * 576 * 1536  # SmolLM2-135M's gate, fp32
    assert decode_copies((512, 576, 1536), 4 * 135_000_000) == 1  # a training shape: one W, as before
    n = decode_copies((1, 576, 1536), 4 * 135_000_000)
    assert n == math.ceil(DECODE_BYTES / W) and (n - 1) * W < DECODE_BYTES <= n * W
    assert decode_copies((1, 576, 1536)) == n  # no model: the cap
    assert decode_copies((1, 576, 1536), 5 * W) == 5  # a small model: its own bytes
    assert decode_copies((1, 8192, 8192 * 4), 4 * 8_000_000_000) == 1  # one W is already larger
    gflops, rounds, seconds = measure_here((1, 256, 512), reps=2, budget_s=0.5, copies=3)
    assert rounds >= 1 and all(math.isfinite(v) and v > 0 for v in gflops.values()) and seconds > 0


def test_a_decode_entry_is_its_own_and_a_training_entry_keeps_its_old_key(probe_cache, counted):
    """The copies are part of a decode probe's key; a training key's JSON is what it was before
    decode probes existed (no "copies"), so the entries a machine cached stay valid."""
    one = ProbeKey.current((1, 64, 160), copies=7)
    assert one.to_json()["copies"] == 7 and "copies" not in ProbeKey.current((512, 64, 160)).to_json()
    assert one.digest() != ProbeKey.current((1, 64, 160), copies=8).digest()
    probe((1, 64, 160), copies=7)
    assert counted == [(1, 64, 160)]
    probe((1, 64, 160), copies=7)  # cached
    assert counted == [(1, 64, 160)]


def test_generating_decides_at_one_token_and_training_at_512(probe_cache, counted, tiny_cfg):
    """A CPU without native bf16 (an AVX2 EPYC, 2026-12-02): bf16 17 against fp32 88 GFLOP/s at a
    training step's 512 tokens, but 8.9 against 2.4 at one token a pass, where the weights' bytes
    decide. Each workload's auto follows its own figures."""
    from odyssey.probe import DECODE_TOKENS, decode_copies

    one = shape_of(tiny_cfg, DECODE_TOKENS)
    probe_cache(shape_of(tiny_cfg), bf16=17.0, fp32=88.0)
    probe_cache(one, bf16=8.9, fp32=2.4, copies=decode_copies(one, 4 * tiny_cfg.num_parameters()))
    assert compute_dtype_name("auto", "bf16", tiny_cfg) == "fp32"
    assert compute_dtype_name("auto", "bf16", tiny_cfg, DECODE_TOKENS) == "bf16"
    assert compute_dtype_name("auto", "f32", tiny_cfg, DECODE_TOKENS) == "fp32"  # never below the store
    assert compute_dtype_line("auto", "bf16", tiny_cfg, DECODE_TOKENS) == (
        "compute dtype: bf16 (auto: measured bf16 8.9 GFLOP/s vs fp32 2.4 at 1x64x160 (one token a pass), "
        "cached 2026-01-02)"
    )
    assert counted == []


def test_generate_and_the_forward_plan_compute_in_what_one_token_measured_faster(
    probe_cache, counted, tiny_cfg, tmp_path
):
    """`odyssey generate` (and chat, through the same engine) and `odyssey plan --mode forward` take
    the one-token figures; `odyssey plan` of a LoRA step keeps the training ones."""
    from odyssey.probe import DECODE_TOKENS, decode_copies
    from odyssey.store import init_store
    from tests.conftest import cli_in_process

    store = tmp_path / "bf16-store"
    init_store(tiny_cfg, store, dtype="bf16", seed=1, progress=False)
    one = shape_of(tiny_cfg, DECODE_TOKENS)
    probe_cache(shape_of(tiny_cfg), bf16=17.0, fp32=88.0)
    probe_cache(one, bf16=8.9, fp32=2.4, copies=decode_copies(one, 4 * tiny_cfg.num_parameters()))
    args = ("generate", "--model", store, "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--temperature", "0")
    auto = cli_in_process(*args)
    assert auto.returncode == 0, auto.stderr
    assert "compute dtype: bf16 (auto: measured bf16 8.9 GFLOP/s vs fp32 2.4 at 1x64x160 (one token a pass)" in (
        auto.stderr
    )
    bf16 = cli_in_process(*args, "--compute-dtype", "bf16")
    fp32 = cli_in_process(*args, "--compute-dtype", "fp32")
    assert bf16.returncode == 0 and fp32.returncode == 0
    assert auto.stdout == bf16.stdout  # the same tokens as bf16 asked for by name
    forward = cli_in_process("plan", "--model", store, "--mode", "forward", "--seq-len", "32")
    assert forward.returncode == 0, forward.stderr
    assert "compute dtype: bf16 (auto: measured bf16 8.9" in forward.stdout
    lora = cli_in_process("plan", "--model", store, "--seq-len", "32")
    assert lora.returncode == 0, lora.stderr
    assert "compute dtype: fp32 (auto: measured fp32 88 GFLOP/s vs bf16 17 at 512x64x160" in lora.stdout
    assert counted == []
