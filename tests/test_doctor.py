"""`odyssey doctor`: each fact, the cold-read test (and that it leaves nothing behind), the CLI."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from odyssey.errors import OdysseyError
from odyssey.runtime import doctor
from tests.conftest import assert_user_error, run_cli

MIB = 1 << 20
KEYS = ["memory", "disk", "cold_read", "cpu", "compute", "temperature", "cgroups", "allocator", "torch", "monitor"]
LABELS = ["memory", "disk", "cold read", "cpu", "compute", "temperature", "cgroups", "allocator", "torch", "monitor"]


# --- the cold read ---


def test_cold_read_reads_what_it_wrote_and_deletes_the_file(tmp_path):
    r = doctor.cold_read(tmp_path, 8 * MIB)
    assert r["bytes_written"] == r["bytes_read"] == 8 * MIB
    assert r["read_mb_s"] > 0 and r["write_mb_s"] > 0
    assert r["cache_dropped"] is True
    assert list(tmp_path.iterdir()) == []


def test_cold_read_of_a_size_that_is_not_a_whole_chunk(tmp_path):
    r = doctor.cold_read(tmp_path, doctor.CHUNK_BYTES + 12345)
    assert r["bytes_written"] == r["bytes_read"] == doctor.CHUNK_BYTES + 12345
    assert list(tmp_path.iterdir()) == []


def test_cold_read_deletes_the_file_when_reading_fails(tmp_path, monkeypatch):
    def broken(*_a):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", broken)
    fact = doctor.cold_read_fact(tmp_path, 4 * MIB)
    assert not fact.ok and "Input/output error" in fact.summary
    assert list(tmp_path.iterdir()) == []


def test_cold_read_in_a_directory_that_cannot_be_written_is_a_note(tmp_path, monkeypatch):
    def refused(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    fact = doctor.cold_read_fact(tmp_path, 4 * MIB)
    assert fact.verdict == "note" and "Permission denied" in fact.summary and str(tmp_path) in fact.summary


def test_cold_read_is_skipped_on_a_nearly_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(100 * MIB, 99 * MIB, 10 * MIB))
    fact = doctor.cold_read_fact(tmp_path, 4 * MIB)  # 10 MiB free < 4 x 4 MiB
    assert fact.verdict == "note" and fact.summary.startswith("skipped") and fact.data == {"skipped": True}
    assert list(tmp_path.iterdir()) == []


def test_cold_read_size_zero_skips(tmp_path):
    fact = doctor.cold_read_fact(tmp_path, 0)
    assert fact.ok and "skipped" in fact.summary and list(tmp_path.iterdir()) == []


# --- where models go ---


def test_models_dir_that_does_not_exist_is_measured_at_its_nearest_parent(tmp_path):
    asked, probe = doctor.resolve_models_dir(str(tmp_path / "a" / "b"))
    assert asked == tmp_path / "a" / "b" and probe == tmp_path
    fact = doctor.disk_fact(asked, probe)
    assert f"at {tmp_path} (where {asked} would be created)" in fact.summary
    assert fact.data["path"] == str(tmp_path) and fact.data["free_bytes"] > 0


def test_models_dir_that_is_a_file_is_a_user_error(tmp_path):
    f = tmp_path / "models"
    f.write_text("x")
    with pytest.raises(OdysseyError, match="--models-dir .* is a file"):
        doctor.resolve_models_dir(str(f))


def test_a_small_disk_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(int(20e9), int(15e9), int(5e9)))
    fact = doctor.disk_fact(tmp_path, tmp_path)
    assert fact.verdict == "note" and fact.summary.startswith("5.0 GB free of 20.0 GB") and "nano" in fact.hint


def test_filesystem_of_root():
    fstype, mount = doctor.filesystem(Path("/"))
    assert mount == "/" and fstype


# --- memory, temperature ---


def test_memory_inside_a_small_cgroup_is_a_note_with_a_budget_that_fits(monkeypatch):
    import odyssey.runtime.memory

    monkeypatch.setattr(odyssey.runtime.memory, "cgroup_usage_bytes", lambda _pid: (1 << 30, 2 << 30))
    fact = doctor.memory_fact()
    assert fact.data["cgroup_limit_bytes"] == 2 << 30 and fact.data["usable_bytes"] == 1 << 30
    assert "limited to 2.00 GiB (1.00 GiB used)" in fact.summary
    assert fact.verdict == "note" and "--ram-budget 819MiB" in fact.hint  # 80% of the 1 GiB left


def test_memory_without_a_cgroup_limit(monkeypatch):
    import odyssey.runtime.memory

    monkeypatch.setattr(odyssey.runtime.memory, "cgroup_usage_bytes", lambda _pid: (5 << 30, None))
    fact = doctor.memory_fact()
    assert fact.data["cgroup_limit_bytes"] is None and "no cgroup limit" in fact.summary
    assert fact.data["total_bytes"] >= fact.data["available_bytes"] > 0


def test_temperature_uses_the_guards_reader(tmp_path):
    f = tmp_path / "temp"
    f.write_text("51000\n")  # millidegrees C, as in /sys/class/thermal
    fact = doctor.temperature_fact(str(f))
    assert fact.ok and fact.data == {"temp_c": 51.0, "source": f"file {f}"} and fact.summary.startswith("51 C")


def test_temperature_unavailable_is_a_normal_note(tmp_path):
    fact = doctor.temperature_fact(str(tmp_path / "missing"))
    assert fact.verdict == "note" and fact.summary.startswith("unavailable") and fact.data["temp_c"] is None


# --- the command ---


def test_doctor_prints_every_fact_with_a_verdict(tmp_path):
    p = run_cli("doctor", "--models-dir", tmp_path, "--read-test-mib", "8")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("odyssey doctor")
    facts = [line for line in lines[1:] if not line.startswith(" ")]
    assert [line[6:18].strip() for line in facts] == LABELS
    assert all(line.split()[0] in ("ok", "note") for line in facts)
    assert "MB/s reading 8 MiB cold" in p.stdout and f"at {tmp_path}" in p.stdout
    assert list(tmp_path.iterdir()) == []  # the test file is gone


def test_doctor_json_is_one_object_with_every_fact(tmp_path):
    p = run_cli("doctor", "--json", "--models-dir", tmp_path, "--read-test-mib", "8", "--thermal-file", tmp_path / "t")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert list(d) == KEYS
    for key, fact in d.items():
        assert fact["verdict"] in ("ok", "note") and fact["summary"], key
    assert d["memory"]["total_bytes"] > 0 and d["disk"]["path"] == str(tmp_path)
    assert d["cold_read"]["bytes_read"] == 8 * MIB and d["cold_read"]["read_mb_s"] > 0
    assert d["cpu"]["cores"] >= 1 and set(d["cpu"]["flags"]) in (
        {"avx2", "avx512", "avx512_bf16", "amx"},
        {"bf16", "sve"},
    )
    assert d["compute"]["compute_dtype"] in ("bf16", "fp32")
    probe = d["compute"]["probe"]  # the session's cache (tests/conftest.py): measured once, then read
    assert probe["shape"] == [512, 2048, 5632] and all(v > 0 for v in probe["gflops"].values())
    assert d["compute"]["compute_dtype"] == probe["fastest"] or d["compute"]["source"] == "environment"
    assert d["temperature"] == {
        "verdict": "note",
        "summary": f"unavailable (source: file {tmp_path / 't'})",
        "hint": d["temperature"]["hint"],
        "temp_c": None,
        "source": f"file {tmp_path / 't'}",
    }
    assert isinstance(d["cgroups"]["available"], bool) and d["torch"]["version"][0].isdigit()
    assert list(tmp_path.iterdir()) == []


def test_doctor_models_dir_that_is_a_file(tmp_path):
    f = tmp_path / "models"
    f.write_text("x")
    p = run_cli("doctor", "--models-dir", f)
    assert_user_error(p, "--models-dir", "is a file")
    assert len(p.stderr.strip().splitlines()) == 1 and f.read_text() == "x"


def test_doctor_negative_read_test_size():
    p = run_cli("doctor", "--read-test-mib", "-1")
    assert_user_error(p, "--read-test-mib must be >= 0")
