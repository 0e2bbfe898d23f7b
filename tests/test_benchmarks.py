"""The benchmarks' pure logic: tables, the budget ladder (with a fake runner), parsing of metrics and
of generation output, the combined README. Nothing here is timed and nothing runs a model."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import floor  # noqa: E402
import goals  # noqa: E402
import io_tax  # noqa: E402
import pagein  # noqa: E402
import peer_report  # noqa: E402
import peers  # noqa: E402
import profile_step  # noqa: E402
import run_all  # noqa: E402
import scaling  # noqa: E402
import smallest  # noqa: E402

GIB, MIB = common.GIB, common.MIB


# --------------------------------------------------------------------------------------------
# tables and files


def test_markdown_table_aligns_and_escapes():
    t = common.markdown_table(["a", "b", "c"], [(1, "x|y", "two\nlines")], "lrc")
    assert t.splitlines() == ["| a | b | c |", "|---|---:|:---:|", "| 1 | x\\|y | two lines |"]


def test_markdown_table_rejects_a_short_row():
    with pytest.raises(ValueError, match="2 cells, table has 3"):
        common.markdown_table(["a", "b", "c"], [(1, 2)])


@pytest.mark.parametrize(
    "value, digits, want",
    [(None, 2, "-"), (True, 2, "yes"), (False, 2, "no"), (1234.567, 1, "1,234.6"), (12345, 2, "12,345"), ("x", 2, "x")],
)
def test_fmt(value, digits, want):
    assert common.fmt(value, digits) == want


def test_last_line_skips_progress_bars_and_blank_lines():
    log = "Traceback...\nRuntimeError: boom\n\ntrain:  50%|#####     | 2/4 [00:10<00:10]\r\n"
    assert common.last_line(log) == "RuntimeError: boom"
    assert common.last_line("") == ""


def test_write_markdown_and_json(tmp_path):
    md = common.write_markdown(tmp_path / "x.md", "Title", [("caption", "| a |\n|---|\n| 1 |")], ["a note"])
    text = md.read_text()
    assert text.startswith("## Title\n\ncaption\n\n| a |") and "- a note" in text
    common.write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_machine_description_names_cpu_cores_and_dtype():
    m = common.machine()
    assert m["cores"] and m["compute_dtype"] in ("bf16", "fp32")
    line = common.describe_machine(m)
    assert f"{m['cores']} cores" in line and m["compute_dtype"] in line
    assert set(m["matmul_gflops"]) == {"bf16", "fp32"} and m["compute_dtype"] == max(
        m["matmul_gflops"], key=m["matmul_gflops"].get
    )
    assert f"matmul {m['matmul_shape']} bf16 " in line and "GFLOP/s" in line


# --------------------------------------------------------------------------------------------
# the budget ladder


def test_ladder_starts_at_the_budget_and_respects_the_cap():
    assert peers.ladder(2 * GIB) == [int(g * GIB) for g in (2, 3, 4, 6, 8, 12, 16)]
    assert peers.ladder(int(2.5 * GIB), cap_bytes=6 * GIB) == [int(2.5 * GIB), 3 * GIB, 4 * GIB, 6 * GIB]
    assert peers.ladder(20 * GIB) == [20 * GIB]


class FakeRunner:
    """Plays back outcomes by budget: 'ok', 'oom', or an error string."""

    def __init__(self, outcomes: dict):
        self.outcomes = outcomes
        self.calls = []

    def __call__(self, budget):
        self.calls.append(budget)
        out = self.outcomes.get(budget / GIB, "oom")
        if out == "ok":
            return peers.Attempt(budget, True, 0, False, budget // 2, "", 1.0, {"step_s": 3.0})
        if out == "oom":
            return peers.Attempt(budget, False, -9, True, budget, "OOM-killed")
        return peers.Attempt(budget, False, 1, False, budget // 3, out)


def quiet(*_):
    pass


def test_climb_retries_after_oom_and_reports_the_smallest_budget_that_ran():
    run = FakeRunner({2: "oom", 3: "oom", 4: "ok"})
    res = peers.climb(run, peers.ladder(2 * GIB), progress=quiet)
    assert run.calls == [2 * GIB, 3 * GIB, 4 * GIB]
    assert res["status"] == "runs" and not res["ran_within_budget"]
    assert res["smallest_ok_bytes"] == 4 * GIB and res["ok_result"] == {"step_s": 3.0}
    assert res["error"] == "OOM-killed" and res["ok_peak_bytes"] == 2 * GIB


def test_climb_runs_within_budget_on_the_first_try():
    res = peers.climb(FakeRunner({2: "ok"}), peers.ladder(2 * GIB), progress=quiet)
    assert res["ran_within_budget"] and res["smallest_ok_bytes"] == 2 * GIB and res["error"] == ""


def test_climb_stops_on_the_same_crash_at_two_budgets():
    err = "RuntimeError: Function MmBackward0 returned an invalid gradient at index 1"
    run = FakeRunner({2: "oom", 3: err, 4: err, 6: "ok"})
    res = peers.climb(run, peers.ladder(2 * GIB), progress=quiet)
    assert run.calls == [2 * GIB, 3 * GIB, 4 * GIB]
    assert res["status"] == "does not run" and res["error"] == err and "not a memory limit" in res["stopped"]


def test_climb_keeps_climbing_when_crashes_differ():
    run = FakeRunner({2: "error A", 3: "error B", 4: "ok"})
    res = peers.climb(run, peers.ladder(2 * GIB), progress=quiet)
    assert res["smallest_ok_bytes"] == 4 * GIB


def test_climb_gives_up_at_the_top_of_the_ladder():
    run = FakeRunner({})
    res = peers.climb(run, peers.ladder(2 * GIB, cap_bytes=4 * GIB), progress=quiet)
    assert run.calls == [2 * GIB, 3 * GIB, 4 * GIB]
    assert res["status"] == "does not run" and res["smallest_ok_bytes"] is None and res["error"] == "OOM-killed"


def test_climb_jumps_to_the_budget_the_planner_suggests():
    msg = "odyssey: error: the plan needs 4.20 GiB (...); use --ram-budget 4400MiB or more, seq_len 900 fits"
    sugg = 4400 * MIB
    run = FakeRunner({2: msg, sugg / GIB: "ok"})
    res = peers.climb(
        run,
        peers.ladder(2 * GIB),
        progress=quiet,
        suggest=lambda a: common.suggested_budget(a.error),
        cap_bytes=16 * GIB,
    )
    assert run.calls == [2 * GIB, sugg]
    assert res["smallest_ok_bytes"] == sugg


def test_climb_stops_at_the_deadline_after_one_attempt():
    run = FakeRunner({})
    res = peers.climb(run, peers.ladder(2 * GIB), progress=quiet, deadline=time.monotonic() - 1)
    assert run.calls == [2 * GIB] and "time limit" in res["stopped"]


# --------------------------------------------------------------------------------------------
# parsing


def test_suggested_budget():
    assert common.suggested_budget("use --ram-budget 1490MiB or more, no sequence length fits") == 1490 * MIB
    assert common.suggested_budget("OOM-killed") is None and common.suggested_budget(None) is None


def test_read_metrics_and_summarize_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"t": 0, "kind": "event", "event": "start"}]
    for i, s in enumerate([9.0, 5.0, 7.0, 6.0], start=1):
        lines.append(
            {
                "t": i,
                "kind": "step",
                "step": i,
                "loss": 10.0 - i,
                "step_s": s,
                "tokens_per_s": 512 / s,
                "rss_anon_mib": 500.0 + i,
                "stall_s": 0.1,
                "pagein_mb_s": 900.0,
            }
        )
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"kind": "step", "ste')  # torn last line
    recs = common.read_metrics(path)
    assert len(recs) == 5
    s = common.summarize_steps(recs)
    assert s["steps"] == 4 and s["measured_steps"] == 3
    assert s["step_s"] == 6.0  # median of 5, 7, 6: the first (warm-up) is left out
    assert s["peak_rss_anon_mib"] == 504.0 and s["losses"][0] == 9.0
    assert common.summarize_steps([])["step_s"] is None
    assert common.read_metrics(tmp_path / "missing.jsonl") == []


def test_train_cmd_follows_the_contract(tmp_path):
    cmd = common.train_cmd(Path("S"), Path("D"), Path("R"), 2 * GIB, 4)
    assert cmd[1:3] == ["-m", "odyssey"] and cmd[3] == "train"
    for want in ("--no-guard", "seq_len=512", "batch_size=1", "lora.r=16", "lora.alpha=32", "eval_every=0"):
        assert want in cmd
    assert cmd[cmd.index("--ram-budget") + 1] == "2048MiB" and cmd[cmd.index("--steps") + 1] == "4"
    ck = [c for c in cmd if c.startswith("checkpoint_every=")]
    assert ck and int(ck[0].split("=")[1]) > 4  # no checkpoint inside the measured steps


def test_bf16_peers_run_unless_bf16_matmul_is_under_half_of_fp32():
    assert peers.bf16_skip({"bf16": 379.0, "fp32": 146.0}) == ""  # AVX512-BF16 (this EPYC)
    assert peers.bf16_skip({"bf16": 145.0, "fp32": 244.0}) == ""  # the Xeon: bf16 slower, still tried
    why = peers.bf16_skip({"bf16": 1.2, "fp32": 110.0})  # AVX2-only: bf16 has no fast path
    assert why.startswith("not run: bf16 matmul 1 GFLOP/s here against fp32 110")
    assert peers.bf16_skip({"bf16": 0.0, "fp32": 110.0}) == ""  # no figure: nothing to judge by


def test_machine_caption_says_when_the_kernels_were_limited():
    m = {"cpu": "AMD EPYC", "cores": 2, "ram_gib": 23.5, "matmul_flags": ["avx2", "avx512_bf16"]}
    native = peer_report.machine_caption({**m, "kernels": "AVX512"}, {"bf16": 379, "fp32": 146}, "512x2048x5632", 2)
    assert "matmul flags avx2 avx512_bf16; matmul 512x2048x5632" in native and "limited" not in native
    limits = "AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"
    emulated = peer_report.machine_caption({**m, "kernels": limits}, {"bf16": 1, "fp32": 146}, "512x2048x5632", 2)
    assert "avx512_bf16 (kernels limited: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2); matmul" in emulated


def test_generation_summary_leaves_out_the_first_token():
    s = peers.generation_summary([5.0, 6.0, 6.5, 7.5], 4)
    assert s["first_token_s"] == 5.0 and s["decode_steps"] == 3 and s["s_per_token"] == 1.0
    assert peers.generation_summary([], 0)["s_per_token"] is None


def test_count_new_tokens_waits_for_the_space(tmp_path):
    out = tmp_path / "out"
    arrivals = []
    out.write_text("12 ")
    seen = peers._count_new(out, 0, arrivals, 1.0)
    out.write_text("12 345 67")  # 67 is still being written
    seen = peers._count_new(out, seen, arrivals, 2.0)
    out.write_text("12 345 67 \n")
    seen = peers._count_new(out, seen, arrivals, 3.0)
    assert seen == 3 and arrivals == [1.0, 2.0, 3.0]


def test_parse_generate_stderr():
    text = "plan...\n8 tokens in 12.5 s (1.56 s/token)\n"
    assert peers._parse_generate_stderr(text) == {"tokens": 8, "seconds": 12.5, "s_per_token": 1.56}
    assert peers._parse_generate_stderr("nothing") == {}


# --------------------------------------------------------------------------------------------
# result tables


def _climb(status="runs", ok_bytes=2 * GIB, first_ok=True, result=None, error="", peak=1500 * MIB):
    return {
        "attempts": [],
        "budget_bytes": 2 * GIB,
        "ran_within_budget": first_ok,
        "smallest_ok_bytes": ok_bytes,
        "status": status,
        "error": error,
        "stopped": "",
        "ok_result": result or {},
        "ok_peak_bytes": peak,
    }


def _peer_row(config, climb, seq_len=512, **extra):
    return peer_report.train_row(
        config.name,
        config.label,
        config.short,
        climb,
        seq_len,
        kind=config.peer,
        dtype=config.dtype,
        compute=config.compute,
        checkpointing=config.checkpointing,
        cpu_weights=0,
        **extra,
    )


def fake_peers_result():
    ody = _climb(
        ok_bytes=1 * GIB,
        result={"step_s": 20.0, "cpu_s": 30.0, "measured_steps": 3, "peak_rss_anon_mib": 600.0, "losses": [10.8069]},
    )
    ody["budget_bytes"] = 1 * GIB
    ody4 = _climb(ok_bytes=4 * GIB, result={"step_s": 9.0, "cpu_s": 17.0, "measured_steps": 3, "losses": [10.81]})
    ody4["budget_bytes"] = 4 * GIB
    c_fp32, c_ckpt, c_bf16, c_bf16_ckpt = peers.peer_configs("inram")
    fp32 = _climb(
        ok_bytes=16 * GIB,
        peak=10842 * MIB,
        result={"step_s": 13.0, "cpu_s": 25.0, "measured_steps": 3, "peak_anon_mib": 8620.0, "losses": [10.8069]},
    )
    fp32["budget_bytes"] = 16 * GIB
    search = {
        "smallest_ok_bytes": 9 * GIB,
        "largest_failed_bytes": int(8.75 * GIB),
        "lo_bytes": 8 * GIB,
        "hi_bytes": 16 * GIB,
        "resolution_bytes": 256 * MIB,
        "resolved": True,
        "stopped": "",
        "attempts": [],
    }
    bf16 = _climb(
        ok_bytes=16 * GIB,
        peak=5200 * MIB,
        result={"step_s": 10.0, "cpu_s": 19.0, "measured_steps": 3, "peak_anon_mib": 4900.0, "losses": [10.9]},
    )
    bf16["budget_bytes"] = 16 * GIB
    failed = _climb(status="does not run", ok_bytes=None, first_ok=False, peak=None, error="OOM-killed")
    failed["budget_bytes"] = 16 * GIB
    off = _climb(
        status="does not run",
        ok_bytes=None,
        first_ok=False,
        peak=None,
        error="RuntimeError: Function MmBackward0 returned an invalid gradient at index 1 - expected device "
        "meta but got cpu",
    )
    train = [
        peer_report.train_row(
            "odyssey",
            "Odyssey, 1 GiB (headline)",
            "O",
            ody,
            512,
            kind="odyssey",
            dtype="bf16",
            compute="auto (bf16)",
            layers_kept=None,
        ),
        peer_report.train_row(
            "odyssey-4g-auto",
            "Odyssey, 4 GiB",
            "O4",
            ody4,
            512,
            kind="odyssey",
            dtype="bf16",
            compute="auto (bf16)",
            layers_kept=6,
            page_in="O_DIRECT",
        ),
        _peer_row(c_fp32, fp32, search=search),
        _peer_row(c_ckpt, failed),
        _peer_row(c_bf16, bf16, search_skipped="not searched: time limit of the benchmark reached"),
        _peer_row(c_bf16_ckpt, failed),
        _peer_row(peers.PeerConfig("offload", "fp32", False), off, device_map={"disk_share": 0.75}),
    ]
    gody = _climb(result={"s_per_token": 2.0, "decode_steps": 7})
    goff = _climb(result={"s_per_token": 5.0, "decode_steps": 7, "device_map": {"disk_share": 0.9}})
    gen = [peer_report._gen_row("odyssey", gody, 2.0), peer_report._gen_row("offload", goff, 2.0)]
    settings = {
        "model_label": "1.21B",
        "seq_len": 512,
        "lora_r": 16,
        "lora_alpha": 32,
        "targets": peers.TARGETS,
        "budget_gib": 2.0,
        "measured_steps": 3,
        "prompt_len": 32,
        "new_tokens": 8,
        "peer_allocator": "system (glibc)",
        "offload_reserve_gib": 1.0,
        "threads": 2,
    }
    machine = {"cpu": "Test CPU", "cores": 2, "ram_gib": 23.5, "matmul_flags": ["avx2", "avx512_bf16"]}
    result = {"settings": settings, "machine": machine, "train": train, "generate": gen, "climbs": {}}
    return result


def finished_fake_result():
    """fake_peers_result() with the fastest peer, the loss check and the targets worked out as
    TrainBench.finish and run() do."""
    res = fake_peers_result()
    rows = res["train"]
    best = smallest.fastest([r for r in rows if r["kind"] != "odyssey"])
    for r in rows:
        r["x_fastest_peer"] = peer_report._ratio(r["step_s"], best["step_s"])
        if r["kind"] != "odyssey":
            r["smallest"] = peer_report.smallest_text(r)
    res["loss_problems"] = goals.check_losses(rows, 10.8069)
    res["fastest_peer"] = best["name"]
    res["matmul"] = {"best_gflops": {"bf16": 145.0, "fp32": 244.0}, "shape": "512x2048x5632"}
    res["compute_limit"] = {
        "fastest_dtype": "fp32",
        "fastest_gflops": 244.0,
        "flop_per_token": 7.26e9,
        "layers_kept": 0,
        "tokens_per_s": 33.6,
    }
    res["targets"] = goals.targets(rows[0], rows[1], best, 33.6, 512)
    return res


def test_train_table_every_configuration_with_ratios_searches_and_errors():
    res = finished_fake_result()
    rows = res["train"]
    assert res["fastest_peer"] == "inram-bf16"  # 10 s; the failed configurations are never chosen
    assert [r["x_fastest_peer"] for r in rows] == [2.0, 0.9, 1.3, None, 1.0, None, None]
    lines = peer_report.train_table(rows).splitlines()[2:]
    assert len(lines) == 7
    assert lines[0].startswith("| Odyssey, 1 GiB (headline) | auto (bf16) | 1 GiB | - | 20.00 | 30.0 | 25.6 | 2.00 |")
    assert "| 9.00 GiB (8.75 GiB did not) | 13.00 |" in lines[2] and "| 16 GiB |" in lines[2]
    assert "<= 16.00 GiB (not searched: time limit" in lines[4]
    assert "does not run" in lines[3] and "OOM-killed" in lines[3]
    assert "expected device meta but got cpu" in lines[6] and "75% of the weights on disk" in lines[6]
    assert "6 layers not recomputed; page-in O_DIRECT" in lines[1] and "page-in" not in lines[0]
    # losses: fp32 within 1e-4 relative, bf16 within 1e-2
    assert "| 10.80690 | agrees |" in lines[0] and "| 10.90000 | agrees |" in lines[4]
    assert res["loss_problems"] == []


def test_peers_markdown_states_the_machine_and_the_targets_first():
    res = finished_fake_result()
    sections = peer_report.markdown_sections(res)
    caption, table = sections[0]
    assert caption.startswith("**Machine:** Test CPU, 2 cores, torch threads 2")
    assert "avx2 avx512_bf16" in caption and "bf16 145 GFLOP/s, fp32 244 GFLOP/s" in caption
    assert "the fastest peer is transformers + peft, in RAM, bf16 autocast, no checkpointing" in caption
    assert table.splitlines()[0] == "| target | figures | ratio | goal | verdict |"
    assert len(sections) == 3 and "median of 3 steps" in sections[1][0] and "1.21B" in sections[1][0]
    g = sections[2][1]
    assert "| 2.50 |" in g and "90% of the weights on disk" in g


def test_peers_png(tmp_path):
    if common.pyplot() is None:
        pytest.skip("matplotlib not installed")
    assert peer_report.png(finished_fake_result(), tmp_path / "p.png").stat().st_size > 1000


def test_scaling_cases_reuse_and_table(tmp_path):
    assert scaling.cases() == [
        ("nano", 512),
        ("small", 512),
        ("odyssey-1.2b", 128),
        ("odyssey-1.2b", 512),
        ("odyssey-1.2b", 2048),
    ]
    model = tmp_path / "m"
    model.mkdir()
    pj = tmp_path / "peers.json"
    climb = _climb(result={"step_s": 20.0})
    pj.write_text(
        json.dumps(
            {"settings": {"model": str(model), "steps": 4, "seq_len": 512}, "climbs": {"train": {"odyssey": climb}}}
        )
    )
    assert scaling.reusable(pj, model, 4)["reused_from"] == str(pj)
    assert scaling.reusable(pj, model, 5) is None  # other step count
    assert scaling.reusable(pj, tmp_path / "other", 4) is None
    assert scaling.reusable(tmp_path / "missing.json", model, 4) is None
    rows = [
        {
            "config": "nano",
            "label": "2.8M",
            "seq_len": 512,
            "status": "runs",
            "budget_gib": 2.0,
            "step_s": 0.5,
            "cpu_s": 0.9,
            "measured_steps": 3,
            "tokens_per_s": 1024.0,
            "peak_anon_mib": 300.0,
            "peak_cgroup_mib": 400,
            "stall_s": 0.01,
            "error": "",
            "reused_from": None,
        },
        {
            "config": "odyssey-1.2b",
            "label": "1.21B",
            "seq_len": 2048,
            "status": "does not run",
            "budget_gib": None,
            "step_s": None,
            "measured_steps": None,
            "tokens_per_s": None,
            "peak_anon_mib": None,
            "peak_cgroup_mib": None,
            "stall_s": None,
            "error": "timed out after 1200 s",
            "reused_from": None,
        },
    ]
    t = scaling.table(rows)
    assert "| nano (2.8M) | 512 | 2.00 | 0.50 | 0.90 | 3 | 1,024.0 | 300 | 400 | 0.01 |" in t
    assert "timed out after 1200 s" in t


def test_pagein_grid_table():
    res = {
        "rows": [
            {"slots": 2, "read_mib": 16, "mb_s": 1400.4, "raw_mb_s": 1500.0, "ratio_to_raw": 0.934, "default": True}
        ]
    }
    assert pagein.grid_table(res).splitlines()[2] == "| 2 | 16 | 1400 | 1500 | 0.93 | yes |"


def test_run_all_commands_and_readme(tmp_path):
    cmd = run_all.command("peers", tmp_path, 100 * 60, 4)
    assert cmd[1].endswith("peers.py") and cmd[cmd.index("--steps") + 1] == "4"
    assert float(cmd[cmd.index("--time-limit-s") + 1]) == 100 * 60 - run_all.RESERVE_AFTER_S["peers"]
    cmd = run_all.command("gguf", tmp_path, 50 * 60, 4)
    assert cmd[1].endswith("gguf_bases.py") and cmd[cmd.index("--out-dir") + 1] == str(tmp_path)
    cmd = run_all.command("scaling", tmp_path, 10 * 60, 4)
    assert cmd[cmd.index("--reuse-peers") + 1] == str(tmp_path / "peers.json")
    (tmp_path / "peers.md").write_text("## Peers\n\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "peers.png").write_bytes(b"png")
    runs = [
        {"part": "peers", "status": "ok", "seconds": 600.0},
        {"part": "scaling", "status": "failed (exit 1)", "seconds": 5.0},
    ]
    text = run_all.readme(tmp_path, common.machine(), runs, "2026-11-21 10:00")
    assert "Measured 2026-11-21 10:00 on" in text and "### Peers" in text and "![peers.png](peers.png)" in text
    assert "| peers | ok | 10.0 |" in text and "No result (failed (exit 1))." in text


def test_attempt_timeout_shrinks_to_the_time_left_but_keeps_a_floor():
    assert peers.attempt_timeout(900, None) == 900
    t = peers.attempt_timeout(900, time.monotonic() + 400, floor_s=180)
    assert 390 < peers._seconds(t) <= 400
    t = peers.attempt_timeout(900, time.monotonic() - 50, floor_s=180)
    assert peers._seconds(t) == 180


def test_cpu_between_interpolates_and_refuses_to_extrapolate():
    samples = [(0.0, 0.0), (1.0, 2.0), (2.0, 2.0), (4.0, 6.0)]
    assert peers.cpu_between(samples, 0.5, 1.0) == 1.0
    assert peers.cpu_between(samples, 1.0, 3.0) == 2.0
    assert peers.cpu_between(samples, -1.0, 1.0) is None and peers.cpu_between(samples, 1.0, 5.0) is None
    assert peers.cpu_between(samples[:1], 0.0, 0.0) is None


def test_step_cpu_from_metrics_lines():
    samples = [(100.0, 0.0), (110.0, 20.0), (120.0, 30.0)]
    recs = [
        {"kind": "step", "step": 2, "t": 120.0, "step_s": 10.0},
        {"kind": "event", "t": 101.0},
        {"kind": "step", "step": 1, "t": 110.0, "step_s": 10.0},
        {"kind": "step", "step": 3, "t": 130.0, "step_s": 5.0},
    ]
    assert peers.step_cpu(recs, samples) == [20.0, 10.0, None]


def test_child_cpu_counts_a_busy_child():
    import subprocess

    with peers.ChildCpu(interval_s=0.05) as cpu:
        subprocess.run(
            [sys.executable, "-c", "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass"]
        )
    # the child is gone at the end (its counter vanishes), but samples taken while it ran saw it
    assert max(c for _, c in cpu.samples) >= 0.1


def test_climb_screen_skips_and_stops_but_always_runs_the_first_budget():
    run = FakeRunner({2: "oom", 6: "oom", 8: "ok"})
    screens = peers.peer_screens(int(4.5 * GIB), 1 * GIB)
    res = peers.climb(run, peers.ladder(2 * GIB), progress=quiet, screen=screens["inram"])
    assert run.calls == [2 * GIB, 6 * GIB, 8 * GIB]  # 3 and 4 GiB cannot hold 4.5 GiB of weights
    assert [s["budget_bytes"] for s in res["skipped"]] == [3 * GIB, 4 * GIB]
    run = FakeRunner({})
    res = peers.climb(run, peers.ladder(2 * GIB), progress=quiet, screen=screens["offload"])
    assert run.calls == [2 * GIB, 3 * GIB, 4 * GIB]  # at 6 GiB, 5 GiB of weights share holds every weight
    assert res["status"] == "does not run" and "nothing is offloaded" in res["stopped"]
    row = peer_report._gen_row("offload", res, 20.0)
    assert "stopped: from here nothing is offloaded" in peer_report._note(row)
    run = FakeRunner({2: "ok"})
    peers.climb(run, [2 * GIB], progress=quiet, screen=lambda b: ("skip", "never"))
    assert run.calls == [2 * GIB]


def test_short_error_condenses_the_planner_refusal():
    msg = (
        "odyssey: error: --ram-budget 2.00 GiB is too small: the plan needs 2.44 GiB (runtime 263.93 MiB, ...); "
        "use --ram-budget 2498MiB or more, or --seq-len 1450 fits this budget"
    )
    assert common.short_error(msg) == "planner: 2.00 GiB too small, plan needs 2.44 GiB"
    assert common.short_error("RuntimeError: boom") == "RuntimeError: boom"
    assert len(common.short_error("x" * 500)) == 200


def test_readme_puts_the_headline_first_and_states_each_title_once(tmp_path):
    (tmp_path / "overhead.md").write_text("## Out-of-core overhead\n\n\n\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "peers.md").write_text("## Odyssey against transformers + peft (+ accelerate)\n\n| b |\n|---|\n| 2 |\n")
    runs = [{"part": "overhead", "status": "ok", "seconds": 60.0}, {"part": "peers", "status": "ok", "seconds": 60.0}]
    text = run_all.readme(tmp_path, common.machine(), runs, "2026-11-21")
    assert text.index("## Odyssey against") < text.index("## Out-of-core overhead")
    assert text.count("Out-of-core overhead") == 1 and "\n\n\n" not in text


def test_run_all_readme_only(tmp_path):
    (tmp_path / "peers.md").write_text("## Peers\n\n| b |\n|---|\n| 2 |\n")
    common.write_json(
        tmp_path / "run_all.json",
        {
            "date": "2026-11-21",
            "machine": common.machine(),
            "parts": [{"part": "peers", "status": "ok", "seconds": 6.0}],
        },
    )
    assert run_all.main(["--readme-only", "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "| b |" in text and "another day" not in text


def test_readme_only_adds_parts_run_on_their_own_and_says_when_each_was_measured(tmp_path):
    """A whole run on 2026-11-21, then peers and gguf rerun on their own on 2026-12-01 on another
    machine: the README shows gguf too, and both say their own date and machine; overhead, from the
    whole run, says nothing of its own."""
    old = dict(common.machine(), cpu="Old CPU")
    new = dict(common.machine(), cpu="New CPU")
    for part, date, m in (("overhead", "2026-11-21 09:19", old), ("peers", "2026-12-01 20:24", new)):
        common.write_json(tmp_path / run_all.RESULT_JSON[part], {"date": date, "machine": m})
    common.write_json(tmp_path / "gguf.json", {"date": "2026-11-30 19:29", "machine": new})
    (tmp_path / "gguf.md").write_text("## GGUF\n\n| g |\n|---|\n| 3 |\n")
    runs = [{"part": "overhead", "status": "ok", "seconds": 60.0}, {"part": "peers", "status": "ok", "seconds": 0.0}]
    common.write_json(tmp_path / "run_all.json", {"date": "2026-11-21 09:12", "machine": old, "parts": runs})
    assert run_all.main(["--readme-only", "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "Measured 2026-11-21 09:12 on Old CPU" in text and "say when and where" in text
    assert (
        "| gguf | run on its own | - |" in text
        and "| peers | ok; results rerun on their own since | 0.0 |" in text
        and "| g |" in text
    )
    assert "Measured 2026-12-01 20:24 on New CPU" in text and "Measured 2026-11-30 19:29 on New CPU" in text
    assert "Measured 2026-11-21 09:19" not in text  # overhead: the run's own day and machine
    assert text.index("2026-12-01 20:24") < text.index("2026-11-30 19:29")  # peers' section before gguf's


# --------------------------------------------------------------------------------------------
# the smallest cgroup (bisection), the fastest configuration, the targets


class Threshold:
    """A fake run that fits from `need` bytes up; each attempt takes `seconds` on a fake clock."""

    def __init__(self, need: int, seconds: float = 60.0, error: str = "OOM-killed"):
        self.need, self.seconds, self.error = need, seconds, error
        self.calls: list[int] = []
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def __call__(self, budget: int) -> peers.Attempt:
        self.calls.append(budget)
        self.now += self.seconds
        if budget >= self.need:
            return peers.Attempt(budget, True, 0, False, budget - MIB, "", self.seconds, {"step_s": 1.0})
        oom = self.error == "OOM-killed"
        return peers.Attempt(budget, False, -9 if oom else 1, oom, budget, self.error, self.seconds)


@pytest.mark.parametrize("need_gib", [4.6, 7.3, 9.05, 15.9])
def test_bisect_finds_the_threshold_within_the_resolution(need_gib):
    need = int(need_gib * GIB)
    run = Threshold(need)
    res = smallest.bisect_budget(run, 4 * GIB, 16 * GIB, 256 * MIB, progress=quiet, clock=run.clock)
    assert res["resolved"] and res["stopped"] == ""
    assert need <= res["smallest_ok_bytes"] <= need + 256 * MIB
    assert res["largest_failed_bytes"] is None or res["largest_failed_bytes"] < need
    assert all(4 * GIB < b < 16 * GIB for b in run.calls)  # the bounds are not run again
    assert len(run.calls) <= 6  # log2(12 GiB / 256 MiB) = 5.6
    assert len(res["attempts"]) == len(run.calls)


def test_bisect_tries_the_first_guess_and_counts_any_failure_as_too_small():
    run = Threshold(int(8.6 * GIB), error="RuntimeError: DefaultCPUAllocator: can't allocate memory")
    res = smallest.bisect_budget(
        run, 8 * GIB, 16 * GIB, 256 * MIB, first_guess=int(10.75 * GIB), progress=quiet, clock=run.clock
    )
    assert run.calls[0] == int(10.75 * GIB)
    assert res["resolved"] and int(8.6 * GIB) <= res["smallest_ok_bytes"] <= int(8.6 * GIB) + 256 * MIB
    assert any("DefaultCPUAllocator" in a["error"] for a in res["attempts"])
    # a guess outside the bracket is ignored
    run = Threshold(12 * GIB)
    smallest.bisect_budget(run, 8 * GIB, 16 * GIB, 256 * MIB, first_guess=20 * GIB, progress=quiet, clock=run.clock)
    assert run.calls[0] == 12 * GIB


def test_bisect_respects_the_time_limit():
    run = Threshold(int(5.1 * GIB), seconds=100.0)
    # 250 s left, the measurement run took 100 s: two attempts fit, the third would end past the deadline
    res = smallest.bisect_budget(
        run, 4 * GIB, 16 * GIB, 256 * MIB, deadline=250.0, last_seconds=100.0, progress=quiet, clock=run.clock
    )
    assert len(run.calls) == 2 and run.now <= 250.0
    assert not res["resolved"] and "time limit" in res["stopped"]
    assert res["smallest_ok_bytes"] >= int(5.1 * GIB)  # what is reported still ran
    assert "search stopped: time limit" in peer_report.smallest_text(
        {"status": "runs", "search": res, "budget_bytes": 16 * GIB}
    )
    # no time left at all: nothing runs, the timed run's cap stands
    run = Threshold(int(5.1 * GIB))
    res = smallest.bisect_budget(
        run, 4 * GIB, 16 * GIB, deadline=10.0, last_seconds=60.0, progress=quiet, clock=run.clock
    )
    assert run.calls == [] and res["smallest_ok_bytes"] == 16 * GIB and not res["resolved"]


def test_bisect_runs_nothing_when_the_bracket_is_already_within_the_resolution():
    run = Threshold(GIB)
    res = smallest.bisect_budget(run, GIB, GIB + 200 * MIB, 256 * MIB, progress=quiet, clock=run.clock)
    assert run.calls == [] and res["resolved"] and res["smallest_ok_bytes"] == GIB + 200 * MIB
    assert peer_report.smallest_text({"status": "runs", "search": res}) == "1.20 GiB (floor 1.00 GiB)"


def test_search_floor_and_alignment():
    assert smallest.search_floor(4 * GIB, 8 * GIB, swap=False) == 8 * GIB
    assert smallest.search_floor(4 * GIB, 8 * GIB, swap=True) == 4 * GIB  # swapped pages can leave RAM
    assert smallest.search_floor(4 * GIB, None, swap=False) == 4 * GIB
    assert smallest.align_up(10842 * MIB, 256 * MIB) == 11008 * MIB
    assert smallest.midpoint(4 * GIB, 4 * GIB + 16 * MIB) == 4 * GIB + 16 * MIB
    assert smallest.swap_present("/nonexistent") is False


def test_fastest_wins_and_a_failed_configuration_is_never_chosen():
    rows = [
        {"name": "a", "status": "runs", "step_s": 13.0},
        {"name": "b", "status": "does not run", "step_s": 1.0},  # a partial figure from a crashed run
        {"name": "c", "status": "runs", "step_s": 10.5},
        {"name": "d", "status": "not measured", "step_s": None},
        {"name": "e", "status": "runs", "step_s": None},
    ]
    assert smallest.fastest(rows)["name"] == "c"
    assert smallest.fastest([rows[1], rows[3]]) is None


def test_targets_ratios_and_verdicts():
    peer = {"status": "runs", "step_s": 13.0, "label": "peft fp32"}
    t = goals.targets(
        {"status": "runs", "step_s": 16.0},
        {"status": "runs", "step_s": 13.5},
        peer,
        limit_tokens_s=40.0,
        tokens_per_step=512,
    )
    assert [x["value"] for x in t] == [1.23, 1.04, 0.8]
    assert [x["verdict"] for x in t] == ["pass", "FAIL", "pass"]
    assert [x["goal"] for x in t] == ["<= 1.25", "<= 1", ">= 0.8"]
    assert t[0]["figures"] == "16.0 s / 13.0 s (peft fp32)"
    # what did not run is "not measured", with the reason
    t = goals.targets({"status": "does not run", "step_s": None, "error": "OOM-killed"}, None, None, None, 512)
    assert [x["verdict"] for x in t] == ["not measured"] * 3
    assert "no peer ran" in t[0]["figures"] and "OOM-killed" in t[0]["figures"]
    table = goals.table(t).splitlines()
    assert table[0] == "| target | figures | ratio | goal | verdict |" and len(table) == 5


def test_fp32_evidence_holds_odyssey_fp32_against_the_fastest_fp32_peer():
    """On a machine where `auto` picked bf16, the fp32 rows give the step ratios an AVX2-only
    machine would be held to (evidence, no verdict); where auto picked fp32 there are none."""

    def row(name, dtype, step, label=""):
        return {
            "name": name,
            "dtype": dtype,
            "status": "runs" if step else "does not run",
            "step_s": step,
            "label": label,
        }

    rows = [
        row("odyssey", "bf16", 10.0),
        row("odyssey-1g-fp32", "fp32", 21.0),
        row("odyssey-4g-fp32", "fp32", 17.0),
        row("inram-fp32", "fp32", 20.0, "peft fp32"),
        row("inram-fp32-ckpt", "fp32", 24.0, "peft fp32 ckpt"),
        row("inram-bf16", "bf16", 8.0, "peft bf16"),
        row("offload-fp32", "fp32", None),
    ]
    e = goals.fp32_evidence(rows)
    assert [x["value"] for x in e] == [1.05, 0.85] and all(x["verdict"] == "-" for x in e)
    assert "1 GiB" in e[0]["target"] and "(peft fp32)" in e[0]["figures"] and e[0]["goal"] == "(<= 1.25 there)"
    rows[0]["dtype"] = "fp32"
    assert goals.fp32_evidence(rows) == []
    assert goals.fp32_evidence([row("odyssey", "bf16", 10.0), row("odyssey-1g-fp32", "fp32", 21.0)]) == []


def test_paired_rounds_decide_the_step_targets_by_their_median():
    """Round 0 (the table's rows) ran on a slowed machine: 13 s against the peer's 9.5 s; two more
    rounds back to back give 1.10 and 1.05, so the median (1.10) decides, and the figures say so."""
    peer = {"status": "runs", "step_s": 9.5, "label": "peft bf16"}
    rounds = [
        {"round": 0, "odyssey": 13.0, "peer": 9.5, "odyssey-4g": 9.6},
        {"round": 1, "odyssey": 11.0, "peer": 10.0, "odyssey-4g": 8.1},
        {"round": 2, "odyssey": 9.45, "peer": 9.0, "odyssey-4g": None},  # 4 GiB failed in round 2
    ]
    one, four = ({"status": "runs", "step_s": s} for s in (13.0, 9.6))
    t = goals.targets(one, four, peer, 80.0, 512, rounds=rounds)
    assert goals.round_ratios(rounds, "odyssey") == [1.37, 1.1, 1.05]
    assert goals.round_ratios(rounds, "odyssey-4g") == [1.01, 0.81]
    assert [x["value"] for x in t[:2]] == [1.1, 0.91] and [x["verdict"] for x in t[:2]] == ["pass", "pass"]
    assert t[0]["figures"] == "median of 3 paired rounds (1.37, 1.10, 1.05); 13.0 s / 9.5 s (peft bf16)"
    # without rounds (or with round 0 alone) the rows decide, as before
    assert goals.targets(one, four, peer, 80.0, 512, rounds=rounds[:1])[0]["value"] == 1.37
    res = finished_fake_result()
    res["rounds"] = rounds
    caption, table = peer_report.markdown_sections(res)[1]
    assert caption.startswith("**Paired rounds**")
    lines = table.splitlines()
    assert lines[0] == "| round | Odyssey 1 GiB s | fastest peer s | Odyssey 4 GiB s | 1 GiB / peer | 4 GiB / peer |"
    assert lines[2] == "| 0 | 13.00 | 9.50 | 9.60 | 1.37 | 1.01 |" and lines[4].endswith("| 1.05 | - |")
    assert lines[5] == "| median |  |  |  | 1.10 | 0.91 |"


def test_paired_rounds_decide_the_compute_target_against_the_matmul_measured_beside_each():
    """The machine sped up 1.8x within the hour: the run's fastest matmul (142 GFLOP/s, at its
    end) against a 1 GiB step timed at its slow start gives 0.53; each round's step against the
    matmul measured just before it gives 0.73, 0.81 and 0.86, and their median (0.81) decides."""
    flop = 5.12e9  # FLOP a token
    rounds = [  # 512 tokens a step: tokens/s over (GFLOP/s * 1e9 / flop)
        {"round": 0, "odyssey": 34.7, "peer": 30.9, "odyssey-4g": 28.0, "gflops": {"bf16": 20.0, "fp32": 103.0}},
        {"round": 1, "odyssey": 28.0, "peer": 24.8, "odyssey-4g": 22.8, "gflops": {"bf16": 20.0, "fp32": 115.0}},
        {"round": 2, "odyssey": 21.5, "peer": 17.6, "odyssey-4g": 20.6, "gflops": {"bf16": 21.0, "fp32": 142.0}},
        {"round": 3, "odyssey": 20.0, "peer": 17.0, "odyssey-4g": 19.0},  # no measurement: left out
    ]
    assert goals.round_limit_ratios(rounds, 512, flop) == [0.73, 0.81, 0.86]
    assert goals.round_limit_ratios(rounds, 512, None) == []
    one, four, peer = ({"status": "runs", "step_s": s, "label": "peft fp32"} for s in (34.7, 28.0, 30.9))
    limit = 142.0e9 / flop  # the run's fastest rate: 27.7 tokens/s
    t = goals.targets(one, four, peer, limit, 512, rounds=rounds, flop=flop)
    assert t[2]["value"] == 0.81 and t[2]["verdict"] == "pass"
    assert t[2]["figures"] == (
        "median of 3 paired rounds, each against the matmul measured beside it (0.73, 0.81, 0.86); "
        "against the run's fastest matmul: 14.8 / 27.7 tokens/s"
    )
    # without the rounds' measurements the run's fastest rate decides, as before
    plain = [{k: v for k, v in r.items() if k != "gflops"} for r in rounds]
    t = goals.targets(one, four, peer, limit, 512, rounds=plain, flop=flop)
    assert t[2]["value"] == 0.53 and t[2]["verdict"] == "FAIL" and t[2]["figures"] == "14.8 / 27.7 tokens/s"
    res = finished_fake_result()
    res["rounds"], res["compute_limit"]["flop_per_token"] = rounds, flop
    caption, table = peer_report.markdown_sections(res)[1]
    assert "measured the matmul just before its Odyssey 1 GiB run" in caption
    lines = table.splitlines()
    assert lines[0].endswith("| 4 GiB / peer | matmul GFLOP/s beside | 1 GiB / compute limit |")
    assert lines[2].endswith("| 103 | 0.73 |") and lines[5].endswith("| - | - |")
    assert lines[6].endswith("|  | 0.81 |")


def test_kernel_floor_rows_are_evidence_against_the_peer_and_the_1gib_step():
    peer = {"status": "runs", "step_s": 8.0, "label": "peft bf16"}
    t = goals.targets({"status": "runs", "step_s": 10.0}, None, peer, 80.0, 512, floor_s=6.0)
    assert [x["target"] for x in t[3:]] == [
        "kernel floor / the fastest peer's step (evidence)",
        "kernel floor / Odyssey's 1 GiB step (evidence)",
    ]
    assert [x["value"] for x in t[3:]] == [0.75, 0.6] and [x["verdict"] for x in t[3:]] == ["-", "-"]
    assert t[3]["figures"] == "6.0 s / 8.0 s"
    res = finished_fake_result()
    res["kernel_floor"] = {"seconds": 6.0, "parts": {"q (forward + input gradient)": 1.0}, "dtype": "bf16"}
    assert "kernel floor is the step's unavoidable kernels timed" in peer_report.markdown_sections(res)[0][0]
    assert "q (forward + input gradient) 1.00 s" in peer_report.markdown_sections(res)[0][0]


def test_kernel_floor_measures_every_projection_attention_and_the_head():
    from odyssey.modelconfig import ModelConfig

    cfg = ModelConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    fl = floor.measure(cfg, 32, "fp32", reps=1, vocab_chunk=128)
    names = [k.split(" ")[0] for k in fl["parts"]]
    assert names == ["q", "k", "v", "o", "gate", "up", "down", "attention", "head"]
    assert all(v > 0 for v in fl["parts"].values())
    assert fl["seconds"] == pytest.approx(sum(fl["parts"].values()), abs=0.01)
    # q and o share a shape (64 x 64), so their times are one measurement; k and v likewise
    assert fl["parts"]["k (forward + input gradient)"] == fl["parts"]["v (forward + input gradient)"]


def test_compute_limit_counts_4x_for_layers_not_recomputed():
    assert goals.flop_per_token(1000, 100) == 6000
    assert goals.flop_per_token(1000, 100, kept=3) == 5400
    lim = goals.compute_limit_tokens_s({"bf16": 145.0, "fp32": 244.0}, 1_210_000_000, 50_000_000)
    assert lim == pytest.approx(244e9 / (6 * 1.21e9))
    assert goals.compute_limit_tokens_s({}, 10, 1) is None
    recs = [
        {"kind": "event", "message": "training started: ...; compute dtype: bf16 (auto: measured ...)"},
        {"kind": "step", "step": 1, "layers_recomputed": 20},
    ]
    assert goals.layers_kept(recs, 22) == 2 and goals.compute_dtype_of(recs) == "bf16"
    assert goals.layers_kept([{"kind": "plan", "layers_kept": [19, 20, 21]}], 22) == 3
    spilled = [{"kind": "step", "kept_layers": 1, "spilled_layers": 21}]  # spilled layers are not recomputed
    assert goals.layers_kept(spilled, 22) == 22
    assert goals.layers_kept([{"kind": "step", "step": 1}], 22) is None
    assert goals.compute_dtype_of([{"kind": "step"}]) is None
    said = [{"kind": "event", "message": "training started: ...; page-in: O_DIRECT (auto: the store reads ...)"}]
    assert goals.page_in_of(said) == "O_DIRECT" and goals.page_in_of(recs) is None
    said = [{"kind": "event", "message": "...; residency: 15 of 26 units pinned (1.21 GiB), 24 of 24 layers keep"}]
    assert goals.pinned_of(said) == "15 of 26 units pinned (1.21 GiB)" and goals.pinned_of(recs) is None
    row = {"name": "odyssey", "status": "runs", "pinned": goals.pinned_of(said), "layers_kept": 24}
    assert peer_report.train_notes(row) == "15 of 26 units pinned (1.21 GiB); 24 layers not recomputed"


def test_loss_check_flags_a_disagreement_beyond_the_dtype_precision():
    rows = [
        {"label": "a", "first_loss": 10.8069, "dtype": "fp32"},
        {"label": "b", "first_loss": 10.809, "dtype": "fp32"},  # 2e-4 > 1e-4 relative
        {"label": "c", "first_loss": 10.85, "dtype": "bf16"},  # 0.04 < 1e-2 relative
        {"label": "d", "first_loss": None, "dtype": "bf16"},
    ]
    problems = goals.check_losses(rows, 10.8069)
    assert [r["loss_check"] for r in rows][:3] == ["agrees", rows[1]["loss_check"], "agrees"]
    assert rows[1]["loss_check"].startswith("DIFFERS by 0.0021") and rows[3]["loss_check"] == ""
    assert len(problems) == 1 and problems[0].startswith("b: loss of step 1 10.80900")


# --------------------------------------------------------------------------------------------
# the peers' worker and the whole benchmark on a tiny store


def _worker_args(train_dir, tmp_path, config, **kw):
    import argparse

    base = dict(
        task="train",
        peer=config.peer,
        model=str(train_dir / "store"),
        data=str(train_dir / "tok"),
        result=str(tmp_path / f"{config.name}.json"),
        offload_folder=str(tmp_path / "offload"),
        prompt_ids="1,2,3",
        steps=2,
        seq_len=32,
        budget=0,
        reserve=0,
        new_tokens=2,
        cpu_weights=0,
        dtype=config.dtype,
        checkpointing=config.checkpointing,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_peer_worker_runs_every_in_ram_configuration(train_dir, tmp_path):
    """In this process (no cgroup): fp32 and bf16 autocast, checkpointing off and on, on the same
    batches: the first losses agree within each dtype's precision, LoRA stays fp32, checkpointing
    is on exactly where asked."""
    out = {}
    for config in peers.peer_configs("inram"):
        assert peers.worker(_worker_args(train_dir, tmp_path, config)) == 0
        out[config.name] = json.loads((tmp_path / f"{config.name}.json").read_text())
    for name, r in out.items():
        assert r["done"] and len(r["losses"]) == 2 and r["measured_steps"] == 1 and r["step_s"] > 0
        assert r["lora_dtypes"] == ["float32"] and r["checkpointing"] == name.endswith("-ckpt")
    ref = out["inram-fp32"]["losses"][0]
    assert out["inram-fp32-ckpt"]["losses"][0] == pytest.approx(ref, rel=1e-5)
    for name in ("inram-bf16", "inram-bf16-ckpt"):
        assert out[name]["losses"][0] == pytest.approx(ref, rel=1e-2)
    assert (
        goals.check_losses([{"label": "x", "first_loss": out["inram-bf16"]["losses"][0], "dtype": "bf16"}], ref) == []
    )


@pytest.mark.slow
def test_peers_end_to_end_on_a_tiny_store(train_dir, tmp_path, capsys):
    """The whole benchmark, training only, on the tiny store: every configuration has its row,
    the targets table and the machine line lead peers.md. Several minutes on 2 cores (a dozen
    processes that import torch, transformers and peft)."""
    out = tmp_path / "out"
    rc = peers.main(
        [
            "--model", str(train_dir / "store"), "--data", str(train_dir / "tok"), "--work", str(tmp_path / "work"),
            "--out-dir", str(out), "--steps", "2", "--probe-steps", "1", "--seq-len", "32", "--tasks", "train",
            "--max-budget", "1GiB", "--resolution", "512MiB", "--rounds", "1",
        ]
    )  # fmt: skip
    assert rc == 0
    res = json.loads((out / "peers.json").read_text())
    names = [r["name"] for r in res["train"]]
    want = ["odyssey", "odyssey-spill-off", "odyssey-1g-fp32", "odyssey-4g-auto", "odyssey-4g-fp32"]
    want += [c.name for c in peers.peer_configs("inram") + peers.peer_configs("offload")]
    assert names == want
    ran = {r["name"]: r for r in res["train"]}
    assert ran["odyssey"]["status"] == "runs" and ran["inram-fp32"]["status"] == "runs"
    assert ran["odyssey"]["loss_check"] == "agrees" and res["loss_problems"] == []
    assert res["fastest_peer"] in names and len(res["targets"]) == 5  # 3 targets, 2 rows of the kernel floor
    assert res["kernel_floor"]["seconds"] > 0 and "kernel floor is" in (out / "peers.md").read_text()
    assert [r["round"] for r in res["rounds"]] == [0, 1] and res["rounds"][1]["odyssey"] > 0
    assert res["rounds"][1]["peer"] > 0 and "median of 2 paired rounds" in res["targets"][0]["figures"]
    md = (out / "peers.md").read_text()
    assert md.splitlines()[2].startswith("**Machine:** ") and "**Targets**" in md
    for r in res["train"]:
        assert r["label"] in md
    assert "| target | figures | ratio | goal | verdict |" in capsys.readouterr().out


def test_run_all_prints_the_targets_of_peers_json(tmp_path):
    assert run_all.targets_text(tmp_path) is None
    res = finished_fake_result()
    res["date"] = "2026-11-30 19:00"
    common.write_json(tmp_path / "peers.json", res)
    text = run_all.targets_text(tmp_path)
    assert text.startswith("Targets (2026-11-30 19:00; Test CPU, 2 threads, matmul 512x2048x5632: bf16 145, fp32 244")
    assert "| Odyssey step in 1 GiB / fastest peer's step | 20.0 s / 10.0 s" in text and "| FAIL |" in text


def test_gguf_bench_counts_only_bytes_read_and_renders_its_tables():
    import gguf_bases as gguf_bench  # benchmarks/gguf_bases.py (not "gguf": that name is the gguf package)

    records = [
        {"kind": "pagein", "layers": [{"bytes": 100, "reused": False}, {"bytes": 50, "reused": True}]},
        {"kind": "step", "step": 1},
        {"kind": "pagein", "layers": [{"bytes": 70}]},
    ]
    assert gguf_bench._pagein_bytes(records) == [100, 70]
    q = {"rows": [{"base": "bf16 store", "bytes": 8 << 20, "val_loss": 1.5, "vs_bf16": 1.0, "train_loss": 1.1,
                   "seconds": 10.0}]}  # fmt: skip
    assert "| bf16 store | 8.0 | 1.5000 | 1.0000 |" in gguf_bench.quality_table(q)
    b = {"step_s": [3.0, 2.0], "pagein_bytes": [1 << 20, 2 << 20], "pagein_mb_s": [1.0, 2.0], "stall_s": [0.1, 0.2],
         "rss_anon_mib": [10, 11], "losses": [5.0, 4.0]}  # fmt: skip
    table = gguf_bench.big_table(b)
    assert table.count("\n") == 3 and "| 2 | 2.0 | 2 |" in table


def test_generation_part_and_table():
    import generation

    cmd = run_all.command("generation", Path("/r"), 10 * 60, 4)
    assert cmd[1].endswith("generation.py") and cmd[cmd.index("--out-dir") + 1] == "/r"
    row = dict(dtype="fp32", tokens_per_s=20.0, s_per_token=0.05, cpu_ms_per_token=48.0, same_tokens=True)
    res = {
        "disk_mb_s": 1000.0,
        "rows": [
            {**row, "name": "transformers in RAM", "vs_transformers": 1.0},
            {
                **row,
                "name": "Odyssey paged",
                "paged": True,
                "tokens_per_s": 2.0,
                "s_per_token": 0.5,
                "vs_transformers": 0.1,
                "pagein_bytes_per_token": 270e6,
                "bound_s_per_token": 0.27,
                "read_s_per_token": 0.3,
            },
        ],
    }
    lines = generation.table(res).splitlines()
    assert lines[2] == "| transformers in RAM | fp32 | 20.0 | 50 | 48 | 1.00 | yes |  |"
    assert (
        lines[3]
        == "| Odyssey paged | fp32 | 2.0 | 500 | 48 | 0.10 | yes | 270.0 MB; at 1,000 MB/s 270 ms; read at 900 MB/s |"
    )
    head = dict(model="m", parameters=135e6, store_bytes=269e6, prompt_tokens=19, new_tokens=32, rounds=3, threads=2)
    head.update(date="2026-12-02 05:42", machine={"cpu": "AMD EPYC", "cores": 2})
    auto = "compute dtype: bf16 (auto: measured bf16 8.9 GFLOP/s vs fp32 2.4 at 1x576x1536 (one token a pass), x)"
    page = generation.markdown({**res, **head, "auto": auto})
    assert "`odyssey generate` with `--compute-dtype auto`: bf16 (auto: measured bf16 8.9 GFLOP/s" in page
    assert "--compute-dtype auto" not in generation.markdown({**res, **head})  # a result from before


# --------------------------------------------------------------------------------------------
# profile_step: the profile of one LoRA step


def test_profile_step_reports_phases_matmul_share_and_keeps_findings(tmp_path, monkeypatch):
    """A tiny store profiled at two budgets: every phase of the step appears, the split adds up to
    the ops' self time, matmul is among the top ops, the plans count the process's memory as it was
    before either ran, and a hand-written Findings section survives a rerun."""
    from odyssey import planner
    from odyssey.store import Store
    from odyssey.store.init import init_store
    from tests.conftest import tiny_config

    runtimes = []

    def counted(mode):  # the process's memory as 64 MiB: the budgets below are planned as in a small process
        runtimes.append(64 * MIB)
        return runtimes[-1]

    monkeypatch.setattr(planner, "measured_runtime", counted)

    init_store(tiny_config(num_hidden_layers=2), tmp_path / "s", dtype="bf16", seed=1, progress=False)
    Store.open(tmp_path / "s")
    out = tmp_path / "prof"
    argv = ["--store", str(tmp_path / "s"), "--budgets", "120MiB,4GiB", "--seq-len", "16", "--r", "4"]
    argv += ["--tokens", "random", "--out", str(out)]
    assert profile_step.main(argv) == 0
    data = json.loads((tmp_path / "prof.json").read_text())
    assert [r["budget_label"] for r in data["results"]] == ["120MiB", "4GiB"]
    for r in data["results"]:
        assert {"forward", "head_loss", "backward", "optimizer"} <= set(r["phases"])
        assert abs(sum(r["split"].values()) - r["ops_self_s"]) < 1e-6
        assert r["split"]["matmul"] > 0 and "aten::mm" in [o["op"] for o in r["top"]]
    assert data["results"][1]["pinned_units"] > data["results"][0]["pinned_units"]
    assert runtimes == [runtimes[0]]  # the process's memory measured once, before either budget ran
    md = tmp_path / "prof.md"
    md.write_text(md.read_text() + "\n## Findings\n\nthe LoRA path costs passes\n")
    argv[argv.index("--budgets") + 1] = "4GiB"  # one budget is enough for the rerun
    assert profile_step.main(argv) == 0
    assert md.read_text().count("## Findings") == 1 and "the LoRA path costs passes" in md.read_text()


def test_profile_step_plans_as_odyssey_train_does(tmp_path, monkeypatch):
    """The profiled engine is the one `odyssey train` would run at that budget: the same plan
    (train.training_plan), so a budget too small to keep every layer spills them (--spill on, as
    train's spill) and the profiled step writes the spill; with --spill off it keeps fewer and
    recomputes the rest. (Before, profile_step planned without the spill: at the 1.2B's 1 GiB it
    profiled 4 layers kept and 20 recomputed where `odyssey train` spills all 24.) The process's
    own memory is fixed at 64 MiB for both plans, the compute dtype at fp32 (the window of budgets
    between "keeps every layer" and "too small" depends on both)."""
    from odyssey import planner
    from odyssey.config import LoraSettings, TrainConfig
    from odyssey.store import Store
    from odyssey.store.init import init_store
    from odyssey.train import training_plan
    from tests.conftest import tiny_config

    runtime = 64 * MIB
    monkeypatch.setattr(planner, "measured_runtime", lambda mode: runtime)
    cfg = tiny_config(num_hidden_layers=4, hidden_size=128, intermediate_size=512, max_position_embeddings=2048)
    init_store(cfg, tmp_path / "s", dtype="bf16", seed=1, progress=False)
    store = Store.open(tmp_path / "s")
    base = ["--store", str(tmp_path / "s"), "--budgets", "230MiB", "--seq-len", "2048", "--r", "4"]
    base += ["--tokens", "random", "--compute-dtype", "fp32", "--spill-dir", str(tmp_path / "spill")]
    for spill in ("on", "off"):
        out = tmp_path / f"prof-{spill}"
        assert profile_step.main([*base, "--spill", spill, "--out", str(out)]) == 0
        r = json.loads(out.with_suffix(".json").read_text())["results"][0]
        train_cfg = TrainConfig(
            seq_len=2048, batch_size=1, lora=LoraSettings(r=4, alpha=8), compute_dtype="fp32", spill=spill
        )
        res = training_plan(store, train_cfg, 230 * MIB, tmp_path / "d", runtime=runtime).plan.residency
        assert (r["kept_layers"], r["spilled_layers"], r["pinned_units"]) == (res.kept, res.spilled, len(res.pinned))
        if spill == "on":
            assert r["spilled_layers"] > 0 and r["spill_bytes"] > 0, r
        else:
            assert r["spilled_layers"] == 0 and r["kept_layers"] < 4, r
    small = [*base, "--budgets", "100MiB", "--out", str(tmp_path / "small")]
    assert profile_step.main(small) == 2  # a budget `odyssey train` refuses: refused, with its one line
    assert not (tmp_path / "small.json").exists()


def test_io_tax_measures_the_matmul_alone_and_beside_a_reader_of_the_store(tmp_path):
    """Each round times the matmul alone and while a thread streams the store's units (O_DIRECT
    where the file system takes it), and reports what the reader read and what the matmuls lost."""
    from odyssey.store import Store
    from odyssey.store.init import init_store
    from tests.conftest import tiny_config

    init_store(tiny_config(), tmp_path / "s", dtype="bf16", seed=1, progress=False)
    out = tmp_path / "io"
    args = ["--model", str(tmp_path / "s"), "--rounds", "2", "--seconds", "0.3", "--readers", "2", "--out", str(out)]
    assert io_tax.main(args) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["round"] for r in res["rounds"]] == [0, 1] and res["dtype"] in ("bf16", "fp32") and res["readers"] == 2
    for r in res["rounds"]:
        assert r["alone_gflops"] > 0 and r["beside_gflops"] > 0 and r["read_gb"] > 0 and r["read_mb_s"] > 0
        assert abs(r["ratio"] - r["beside_gflops"] / r["alone_gflops"]) < 0.02
        assert r["core_s_lost_per_gb"] is not None and r["core_s_lost_per_gb"] >= 0
        assert r["read_alone_mb_s"] > 0
    assert res["median"]["read_mb_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert "core-s lost / GB" in md and f"in {res['dtype']}" in md
    assert "2 threads (a share of the units each) read" in md and "steal s, cores idle" in md
    # the two readers share the store's units, every unit read by one of them
    store = Store.open(tmp_path / "s")
    shared = sum((s.spans for s in io_tax.Readers(store, 2).streamers), [])
    assert sorted(shared) == sorted(io_tax.StoreStreamer(store).spans) and len(shared) > 2
    assert io_tax.steal_jiffies() is None or io_tax.steal_jiffies() >= 0
