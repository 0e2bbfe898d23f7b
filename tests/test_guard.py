"""The guard with real processes (a Python "hog" that holds memory on command), its policies on
synthetic samples, and memory cgroups (skipped without the rights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_procs import HANG_S, MIB, Hog, guard_env, wait_for  # noqa: E402

from odyssey.config import GuardSettings  # noqa: E402
from odyssey.runtime import cgroup, guard, guard_cli, memory, sensors  # noqa: E402
from odyssey.runtime.control import Controller  # noqa: E402
from odyssey.runtime.runlog import RunDir  # noqa: E402


def start_guard_proc(pid: int, run: RunDir, budget: str, *extra: str, interval: float = 0.1) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "odyssey.runtime.guard",
        "--pid",
        str(pid),
        "--run",
        str(run.root),
        "--ram-budget",
        budget,
        "--interval",
        str(interval),
        "--min-available-mib",
        "1",
        *extra,
    ]
    p = subprocess.Popen(cmd, env=guard_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(run.read_heartbeat), f"guard wrote no heartbeat: {p.communicate(timeout=5)}"
    return p


def guard_events(run: RunDir, action: str | None = None) -> list[dict]:
    return [e for e in run.read_metrics("guard") if action is None or e["action"] == action]


@pytest.fixture
def hog():
    h = Hog()
    yield h
    h.close()


@pytest.fixture
def run(tmp_path):
    return RunDir(tmp_path / "run")


# --------------------------------------------------------------------------------------------
# real processes


def test_guard_process_imports_no_torch(tmp_path):
    """The whole guard loop runs (watching a child that exits after 0.3 s) without torch."""
    code = (
        "import subprocess, sys\n"
        "from odyssey import config\n"
        "from odyssey.runtime import guard_cli, control, cgroup, runlog, memory\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.3)'])\n"
        f"rc = guard_cli.main(['--pid', str(child.pid), '--run', {str(tmp_path / 'run')!r}, '--ram-budget', '1GiB',"
        " '--interval', '0.05', '--min-available-mib', '1'])\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=guard_env(), capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "False"]
    exits = guard_events(RunDir(tmp_path / "run"), "exit")
    assert len(exits) == 1 and "gone" in exits[0]["reason"]


def test_soft_then_hard_limit_then_watched_killed(run, hog):
    """Budget 100 MiB, soft 50%, hard 90%: holding 60 MiB asks for one checkpoint per excursion,
    120 MiB asks to stop; killing the watched process (left a zombie) ends the guard with 0."""
    g = start_guard_proc(hog.pid, run, "100MiB", "--soft-pct", "50", "--hard-pct", "90")
    trainer = Controller(run, GuardSettings())  # plays the trainer: polls and acknowledges
    seen = []

    def handled(action):  # a new request with this action arrives; the trainer acknowledges it
        before = len(seen)

        def check():
            req = trainer.poll()
            if req:
                seen.append(req)
                trainer.ack(req, state="running", step=len(seen))
            return len(seen) > before and seen[-1]["action"] == action

        return check

    try:
        hog.hold(60)
        assert wait_for(handled("checkpoint")), seen
        assert seen[-1]["source"] == "guard" and "soft limit" in seen[-1]["reason"]
        time.sleep(0.5)  # still above: no second checkpoint in the same excursion
        assert not trainer.poll() and len(guard_events(run, "checkpoint")) == 1

        hog.hold(5)  # below 95% of the soft limit: re-armed
        assert wait_for(lambda: guard_events(run, "rearm"))
        hog.hold(60)
        assert wait_for(handled("checkpoint")) and len(guard_events(run, "checkpoint")) == 2

        hog.hold(120)
        assert wait_for(handled("stop")), seen
        stop = seen[-1]
        assert "hard limit" in stop["reason"] and "budget" in stop["reason"]
        (event,) = guard_events(run, "stop")
        assert event["level"] == "error" and event["value"] > event["limit"] == 90.0
        assert event["request_id"] == stop["id"] and event["unit"] == "MiB"
        assert wait_for(lambda: (run.read_heartbeat() or {}).get("state") == "stopping")

        mem = run.read_metrics("memory")
        assert mem and mem[0]["source"] == "guard" and mem[0]["budget_mib"] == 100.0
        assert event["value"] in [m["anon_mib"] for m in mem]  # a memory line goes with each decision

        hog.kill()  # not reaped: the guard must see the zombie as gone
        assert g.wait(timeout=HANG_S) == 0
        (exit_event,) = guard_events(run, "exit")
        assert f"watched process {hog.pid} is gone" in exit_event["reason"]
        assert run.read_heartbeat()["state"] == "exited"
    finally:
        g.kill()
        g.wait()
    assert "hard limit" in g.stderr.read()  # warnings also go to stderr


def test_memory_freed_lazily_is_not_held(run, hog):
    """Pages freed with MADV_FREE (a training run's allocator at a tight budget: allocator.
    hold_freed_pages) stay in RssAnon until the kernel takes them: process_memory(lazy=True) reads
    them as LazyFree, and the guard leaves them out. 120 MiB so freed with a 100 MiB budget (soft 50%,
    hard 90%) asks for nothing; 120 MiB held asks to stop."""
    hog.hold(5)
    hog.hold_lazy(120)
    m = memory.process_memory(hog.pid, lazy=True)
    assert m.lazy_bytes >= 110 * MIB and m.anon_bytes >= m.lazy_bytes + 5 * MIB
    assert m.held_bytes == m.anon_bytes - m.lazy_bytes < 50 * MIB
    assert memory.process_memory(hog.pid).lazy_bytes == 0  # not read unless asked (smaps_rollup walks page tables)

    g = start_guard_proc(hog.pid, run, "100MiB", "--soft-pct", "50", "--hard-pct", "90")
    trainer = Controller(run, GuardSettings())
    try:
        lines = wait_for(lambda: [m for m in run.read_metrics("memory") if m.get("lazy_mib")])
        assert lines, run.read_metrics("memory")
        assert lines[-1]["lazy_mib"] >= 110 and lines[-1]["anon_mib"] < 50
        time.sleep(0.5)  # five more samples
        assert trainer.poll() is None and not guard_events(run, "stop") and not guard_events(run, "checkpoint")

        hog.hold(120)
        assert wait_for(lambda: guard_events(run, "stop")), run.read_metrics("memory")[-3:]
    finally:
        g.kill()
        g.wait()


def test_thermal_file_pause_and_resume(run, hog, tmp_path):
    thermal = tmp_path / "temp"
    thermal.write_text("60000\n")
    g = start_guard_proc(hog.pid, run, "1GiB", "--thermal-file", str(thermal))
    try:
        assert wait_for(lambda: run.read_metrics("memory"))
        assert run.read_metrics("memory")[0]["temp_c"] == 60.0
        assert run.read_control() is None

        thermal.write_text("95000\n")
        assert wait_for(lambda: (run.read_control() or {}).get("action") == "pause")
        assert run.read_control()["source"] == "guard" and "95 C" in run.read_control()["reason"]
        assert wait_for(lambda: (run.read_heartbeat() or {}).get("state") == "paused")

        thermal.write_text("85000\n")  # between resume (80) and max (90): stays paused
        seen = len(run.read_metrics("memory"))  # event-driven: two samples of 85 C, then look
        assert wait_for(lambda: [m["temp_c"] for m in run.read_metrics("memory")[seen:]].count(85.0) >= 2)
        assert run.read_control()["action"] == "pause"

        thermal.write_text("70000\n")  # nobody acknowledges here: the resume waits <= 1.5 s
        assert wait_for(lambda: (run.read_control() or {}).get("action") == "resume")
        # the request is written before its metrics line: wait for the line too
        assert wait_for(lambda: guard_events(run, "resume"))
        (pause,), (resume,) = guard_events(run, "pause"), guard_events(run, "resume")
        assert (pause["value"], pause["limit"], pause["unit"]) == (95.0, 90.0, "C")
        assert (resume["value"], resume["limit"]) == (70.0, 80.0)
    finally:
        g.terminate()
        assert g.wait(timeout=HANG_S) == 0  # SIGTERM: clean exit
    assert guard_events(run, "exit")[0]["reason"].startswith("guard terminated")


def test_temperature_unavailable_is_fine(run, hog, tmp_path):
    g = start_guard_proc(hog.pid, run, "1GiB", "--thermal-file", str(tmp_path / "missing"))
    try:
        assert wait_for(lambda: (run.read_heartbeat() or {}).get("anon_mib"))
        time.sleep(0.3)
        assert g.poll() is None
        hb = run.read_heartbeat()
        assert hb["state"] == "watching" and hb["temp_c"] is None and hb["watched"] == hog.pid
        assert run.read_metrics("memory")[0]["temp_c"] is None
        assert run.read_control() is None
    finally:
        g.terminate()
        g.wait(timeout=HANG_S)
    # the default source (psutil, then sysfs): {} on VMs, a number on real hardware; never an error
    t = sensors.Thermometer().read()
    assert t is None or isinstance(t, float)
    assert sensors.read_millidegrees(tmp_path / "missing") is None
    (tmp_path / "junk").write_text("hot\n")
    assert sensors.read_millidegrees(tmp_path / "junk") is None


def test_bad_pid_and_bad_settings(run, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert guard_cli.main(["--pid", str(dead.pid), "--run", str(run.root), "--ram-budget", "1GiB"]) == 2
    assert "no such running process" in capsys.readouterr().err
    assert guard_cli.main(["--pid", str(os.getpid()), "--run", str(run.root), "--ram-budget", "lots"]) == 2
    assert "--ram-budget must be a size" in capsys.readouterr().err
    assert (
        guard_cli.main(
            [
                "--pid",
                str(os.getpid()),
                "--run",
                str(run.root),
                "--ram-budget",
                "1GiB",
                "--soft-pct",
                "95",
                "--hard-pct",
                "90",
            ]
        )
        == 2
    )
    assert "soft_pct <= hard_pct" in capsys.readouterr().err
    a_file = run.root.parent / "a-file"
    a_file.write_text("not a run directory")
    assert guard_cli.main(["--pid", str(os.getpid()), "--run", str(a_file), "--ram-budget", "1GiB"]) == 2  # at once
    assert "is a file, not a run directory" in capsys.readouterr().err


def test_guard_cli_table_round_trips_every_threshold():
    """One table (guard_cli.OPTIONS) builds the guard's parser, reads the settings back and writes the
    child's command line: every threshold in it, set away from its default, comes back unchanged."""
    d = GuardSettings()
    s = GuardSettings(
        interval_s=0.25,
        soft_pct=61.5,
        hard_pct=77.0,
        min_available_mib=64.0,
        max_temp_c=70.0,
        resume_temp_c=-5.0,
        thermal_file="/tmp/odyssey-temp",
        enforce_cgroup=True,
    )
    fields = [o.field for o in guard_cli.OPTIONS]
    assert all(getattr(s, f) != getattr(d, f) for f in fields), "each threshold must differ from its default"
    assert len(set(fields)) == len(fields) and len({o.flag for o in guard_cli.OPTIONS}) == len(fields)
    parser = guard_cli.build_parser()
    flags = {opt for a in parser._actions for opt in a.option_strings}
    assert {o.flag for o in guard_cli.OPTIONS} <= flags
    required = ["--pid", "1", "--run", "r", "--ram-budget", "1GiB"]
    assert guard_cli.settings_from_args(parser.parse_args(required + guard_cli.settings_argv(s))) == s
    # defaults: nothing set means the settings' defaults, and the child gets no switch or file
    assert guard_cli.settings_from_args(parser.parse_args(required)) == d
    argv = guard_cli.settings_argv(d)
    assert "--enforce-cgroup" not in argv and "--thermal-file" not in argv
    assert guard_cli.settings_from_args(parser.parse_args(required + argv)) == d


def guard_footprint(run, hog) -> tuple[float, float]:
    """(RSS MiB, CPU % of a core) of a guard process at the default 0.5 s interval, over 3 s."""
    import psutil

    g = start_guard_proc(hog.pid, run, "1GiB", interval=0.5)
    try:
        p = psutil.Process(g.pid)
        time.sleep(0.5)
        c0, t0 = p.cpu_times(), time.monotonic()
        time.sleep(3.0)
        c1, t1 = p.cpu_times(), time.monotonic()
        cpu_pct = 100.0 * ((c1.user + c1.system) - (c0.user + c0.system)) / (t1 - t0)
        rss = p.memory_info().rss / MIB
        print(f"\nguard footprint: RSS {rss:.1f} MiB, CPU {cpu_pct:.2f}% of a core at 0.5 s")
        return rss, cpu_pct
    finally:
        g.terminate()
        g.wait(timeout=HANG_S)


def test_guard_own_footprint(run, hog):
    """The guard's RSS (figures printed with -s); its CPU share is checked in the slow test below."""
    rss, _ = guard_footprint(run, hog)
    assert rss < 60


@pytest.mark.slow
def test_guard_own_cpu_share(run, hog):
    """A speed claim, so `make test-slow`: the guard costs under 2% of a core at 0.5 s sampling."""
    _, cpu_pct = guard_footprint(run, hog)
    assert cpu_pct < 2.0


# --------------------------------------------------------------------------------------------
# policies on synthetic samples (in-process, deterministic)


def make_guard(run, budget_mib=100, **settings) -> guard.Guard:
    settings.setdefault("min_available_mib", 100.0)
    g = guard.Guard(os.getpid(), run, budget_mib * MIB, GuardSettings(**settings), log=lambda m: None)
    return g


def sample(anon_mib=10.0, avail_mib=10_000.0, temp=None, t=None) -> sensors.Sample:
    return sensors.Sample(time.time() if t is None else t, int(anon_mib * MIB), 0, int(avail_mib * MIB), 0, temp_c=temp)


def ack_all(run):
    """Play a trainer that handled everything so far."""
    ctl = run.read_control()
    if ctl:
        run.write_status(state="running", step=0, ack_id=ctl["id"])


def test_policy_order_and_once_per_excursion(run):
    g = make_guard(run, soft_pct=80, hard_pct=95)
    assert not g.apply(sample(50))
    assert g.apply(sample(81)) and run.read_control()["action"] == "checkpoint"
    ack_all(run)
    for _ in range(5):
        assert not g.apply(sample(85))
    assert len(guard_events(run, "checkpoint")) == 1
    assert not g.apply(sample(77))  # between 95% of the soft limit (76) and the limit: not re-armed
    assert g.apply(sample(70)) and guard_events(run, "rearm")
    assert g.apply(sample(82)) and len(guard_events(run, "checkpoint")) == 2
    # hard limit wins over everything, once
    assert g.apply(sample(96, temp=99)) and run.read_control()["action"] == "stop"
    stop_id = run.read_control()["id"]
    assert not g.apply(sample(99, temp=99)) and run.read_control()["id"] == stop_id
    assert not guard_events(run, "pause")
    # a request that overwrote the unhandled stop is overwritten back
    run.request("resume", source="user")
    assert g.apply(sample(99)) and run.read_control()["action"] == "stop"
    assert "re-issued" in guard_events(run, "stop")[-1]["reason"]
    # ...but not once the trainer acknowledged it
    ack_all(run)
    run.request("resume", source="user")
    assert not g.apply(sample(99)) and run.read_control()["action"] == "resume"
    assert g.state == "stopping"


def test_policy_low_system_memory_stops(run):
    g = make_guard(run, min_available_mib=150)
    assert not g.apply(sample(10, avail_mib=151))
    assert g.apply(sample(10, avail_mib=120))
    ctl = run.read_control()
    assert ctl["action"] == "stop" and "MemAvailable" in ctl["reason"] and "150 MiB" in ctl["reason"]


def test_policy_heat_and_pending_requests(run, monkeypatch):
    g = make_guard(run, max_temp_c=90, resume_temp_c=80)
    assert not g.apply(sample(temp=75))  # cool, and the guard never paused: no resume
    assert not g.apply(sample(temp=None))
    assert g.apply(sample(temp=91)) and run.read_control()["action"] == "pause" and g.state == "paused"
    assert not g.apply(sample(temp=95))  # already paused
    assert not g.apply(sample(temp=75))  # the pause is unacknowledged and fresh: resume waits
    ack_all(run)
    assert g.apply(sample(temp=75)) and run.read_control()["action"] == "resume" and g.state == "watching"
    ack_all(run)
    # paused, then the sensor vanishes: resume after THERMAL_LOST_RESUME_S rather than pause forever
    assert g.apply(sample(temp=92))
    ack_all(run)
    monkeypatch.setattr(guard, "THERMAL_LOST_RESUME_S", 0.05)
    assert g.apply(sample(temp=None)) is False and guard_events(run, "warn")
    time.sleep(0.06)
    assert g.apply(sample(temp=None)) and run.read_control()["action"] == "resume"
    ack_all(run)


def test_heat_respects_the_users_pause(run):
    g = make_guard(run, max_temp_c=90, resume_temp_c=80)
    run.write_status(state="paused", step=3)  # the user paused before it got hot
    assert not g.apply(sample(temp=95)) and run.read_control() is None
    run.write_status(state="running", step=3)
    assert g.apply(sample(temp=95)) and run.read_control()["action"] == "pause"
    ack_all(run)
    run.request("pause", source="monitor")  # the user pauses too, after the guard
    assert g.apply(sample(temp=70)) and run.read_control()["source"] == "monitor"
    assert "not resuming" in guard_events(run, "resume")[-1]["reason"] and g.state == "watching"


def test_memory_lines_are_compact(run):
    g = make_guard(run, budget_mib=1000)
    t0 = 1000.0
    for i in range(600):  # 60 s steady at 10 Hz: a line at the start and one every 10 s
        g._memory_line(sample(100, t=t0 + i * 0.1))
    assert len(run.read_metrics("memory")) == 6
    for i in range(600):  # 60 s growing 5 MiB a tick: at most one line a second
        g._memory_line(sample(100 + 5 * i, t=t0 + 60 + i * 0.1))
    lines = run.read_metrics("memory")
    assert 6 + 55 <= len(lines) <= 6 + 61
    assert set(lines[-1]) >= {"anon_mib", "file_mib", "anon_pct", "avail_mib", "swap_mib", "cgroup_mib", "temp_c"}
    assert len(json.dumps(lines[-1])) < 260


# --------------------------------------------------------------------------------------------
# memory cgroups

needs_cgroup = pytest.mark.skipif(not cgroup.available()[0], reason=f"no memory cgroup: {cgroup.available()[1]}")


@needs_cgroup
def test_run_in_cgroup_oom_and_pass():
    big = cgroup.run_in_cgroup([sys.executable, "-c", "b = b'1' * (300 << 20)"], 128 * MIB, stderr=subprocess.DEVNULL)
    assert big.oom_killed and big.returncode != 0
    assert big.peak_bytes is not None and big.peak_bytes <= 128 * MIB
    small = cgroup.run_in_cgroup([sys.executable, "-c", "b = b'1' * (20 << 20)"], 128 * MIB)
    assert small == (0, small.peak_bytes, False)
    assert 20 * MIB < small.peak_bytes < 128 * MIB


@needs_cgroup
def test_memory_cgroup_life_cycle(hog):
    with cgroup.MemoryCgroup.create(f"odyssey-test-{os.getpid()}", 256 * MIB) as cg:
        assert cg.path.is_dir() and cg.limit() == 256 * MIB
        cg.add(hog.pid)
        assert cg.pids() == [hog.pid]
        hog.hold(40)  # charged to the group from now on
        assert cg.usage() >= 40 * MIB and cg.peak() >= cg.usage() and cg.oom_kills() == 0
    assert not cg.path.exists()  # removed, the hog moved back to the parent
    assert hog.proc.poll() is None


@needs_cgroup
def test_guard_enforces_cgroup(run, hog):
    g = start_guard_proc(hog.pid, run, "128MiB", "--enforce-cgroup")
    try:
        (event,) = wait_for(lambda: guard_events(run, "cgroup"))
        assert event["level"] == "info" and event["limit"] == 128.0
        path = Path(event["path"])
        assert (
            path.name == f"odyssey-{hog.pid}"
            and hog.pid in cgroup.MemoryCgroup(path, cgroup.find_hierarchy().version).pids()
        )
        hog.proc.stdin.write("alloc 300\n")  # the kernel kills it at the cap
        hog.proc.stdin.flush()
        assert g.wait(timeout=HANG_S) == 0
    finally:
        g.kill()
        g.wait()
    (exit_event,) = guard_events(run, "exit")
    assert "OOM-killed" in exit_event["reason"] and exit_event["level"] == "error"
    assert not path.exists()


def test_cgroup_unavailable_says_so_once(run, monkeypatch):
    monkeypatch.setattr(cgroup, "available", lambda: (False, "no write access (test)"))
    messages = []
    g = guard.Guard(os.getpid(), run, 1 << 30, GuardSettings(enforce_cgroup=True), log=messages.append)
    g.start()
    assert g.cgroup is None
    (event,) = guard_events(run, "cgroup")
    assert event["level"] == "warning" and "no write access (test)" in event["reason"]
    assert len(messages) == 1 and "guard alone" in messages[0]
    assert g.step()  # and it goes on guarding
