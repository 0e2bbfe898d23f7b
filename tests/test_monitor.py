"""The monitor: feed logic, parsing and downsampling without a display, then a real window under
Xvfb on a recorded run (screenshot, Pause button, acknowledgement, a detached process).

The window tests start `Xvfb` themselves on a free display number. When Xvfb is missing they run
tools/ensure_xvfb.sh once; if it still cannot be had they skip with the reason (the only skip).
Set ODYSSEY_MONITOR_SCREENSHOT=docs/monitor.png to keep the screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from odyssey.errors import OdysseyError
from odyssey.monitor import launch_detached
from odyssey.monitor.charts import nice_ticks, strip_bars, time_ticks
from odyssey.monitor.feed import Feed, Series, downsample_minmax, fmt_duration
from odyssey.runlog import RunDir

from tests.conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]


record_run = load_tool("record_run")


def _step(step, loss=2.0, t=None, **kw):
    rec = {"t": t if t is not None else time.time(), "kind": "step", "step": step, "loss": loss,
           "lr": 1e-4, "tokens_per_s": 80.0, "step_s": 6.0, "pagein_mb_s": 1400.0, "stall_s": 0.3,
           "rss_anon_mib": 900.0, "budget_mib": 1536.0, "steps_total": 100}
    rec.update(kw)
    return json.dumps(rec) + "\n"


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------
# pure logic


def test_downsample_keeps_extremes_order_and_ends():
    n = 100_000
    xs = list(range(n))
    ys = [float(i % 97) for i in range(n)]
    ys[54_321] = 1e6  # a spike must survive
    ys[77_777] = -5.0  # and a dip
    pts = downsample_minmax(xs, ys, 800)
    assert len(pts) <= 800
    assert pts[0] == (0, ys[0]) and pts[-1] == (n - 1, ys[-1])
    assert [p[0] for p in pts] == sorted(p[0] for p in pts)
    got = dict(pts)
    assert got[54_321] == 1e6 and got[77_777] == -5.0
    assert downsample_minmax(xs[:10], ys[:10], 800) == list(zip(xs[:10], ys[:10]))
    assert downsample_minmax([], [], 10) == []


def test_series_breaks_on_gaps_and_truncates():
    s = Series(gap=120)
    for t in range(0, 100, 1):
        s.append(1000.0 + t, float(t))
    for t in range(0, 50, 1):
        s.append(2000.0 + t, float(t))  # a restart 900 s later
    segs = s.segments(64)
    assert len(segs) == 2 and segs[0][-1][0] == 1099.0 and segs[1][0][0] == 2000.0
    assert s.truncate_from(1050.0) == 100
    assert len(s) == 50 and len(s.segments(64)) == 1


def test_ticks_and_formatting():
    assert nice_ticks(0, 10, 5) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(1.93, 3.21, 4) == [2.0, 2.5, 3.0]
    ticks = time_ticks(1_700_000_000, 1_700_003_600, 6)
    assert len(ticks) >= 3 and all(b - a == ticks[1] - ticks[0] for a, b in zip(ticks, ticks[1:]))
    assert ticks[1] - ticks[0] in (600, 900)
    assert fmt_duration(59) == "59 s" and fmt_duration(3720) == "1 h 02 min" and fmt_duration(None) == "–"


def test_strip_marks_the_slow_layer():
    layers = [{"layer": "embed", "bytes": 131e6, "read_s": 0.092, "stall_s": 0.0, "mb_s": 1420.0}]
    layers += [{"layer": i, "bytes": 90e6, "read_s": 0.064, "stall_s": 0.002, "mb_s": 1400.0} for i in range(8)]
    layers[5] = {"layer": 4, "bytes": 90e6, "read_s": 0.45, "stall_s": 0.3, "mb_s": 200.0}
    layers.append({"layer": "head", "bytes": 131e6, "read_s": 0.093, "stall_s": 0.0, "mb_s": 1410.0})
    bars = strip_bars(layers)
    assert len(bars) == 10
    slow = [b["name"] for b in bars if b["slow"]]
    assert slow == ["4"]  # embed and head are bigger but not slower per byte
    assert strip_bars([{"layer": 0, "read_s": None}]) == []


def test_feed_parses_100k_lines_quickly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert record_run.write_lines(path, 100_000) == 100_000
    feed = Feed(tmp_path)
    t0 = time.perf_counter()
    polls = 0
    while True:
        feed.poll()
        polls += 1
        if not feed.more_waiting:
            break
    parse_s = time.perf_counter() - t0
    assert feed.records == 100_000 and feed.tail.bad_lines == 0
    assert polls > 1  # reads are capped per poll so the window stays responsive
    assert parse_s < 3.0, f"100,000 lines took {parse_s:.2f} s"
    t0 = time.perf_counter()
    segs = [s.segments(1400) for s in (feed.loss, feed.loss_ema, feed.pagein, feed.anon, feed.temp)]
    draw_s = time.perf_counter() - t0
    assert draw_s < 0.5, f"downsampling took {draw_s:.2f} s"
    assert all(sum(len(seg) for seg in sg) <= 1400 for sg in segs)
    assert len(feed.anon) > 80_000
    print(f"100,000 lines: parsed in {parse_s:.2f} s over {polls} polls, downsampled in {draw_s * 1000:.0f} ms")


def test_incremental_appends_and_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _append(path, _step(1, 3.0) + _step(2, 2.9))
    feed = Feed(tmp_path)
    assert feed.poll()
    assert len(feed.loss) == 2 and feed.values()["step"] == "2 / 100"
    line = _step(3, 2.8)
    _append(path, line[:25])  # a writer caught mid-line
    feed.poll()
    assert len(feed.loss) == 2 and feed.tail.bad_lines == 0
    _append(path, line[25:])
    feed.poll()
    assert len(feed.loss) == 3 and feed.values()["loss"] == "2.8000"
    v = feed.version
    assert not feed.poll() and feed.version == v  # nothing new: nothing to redraw
    _append(path, "{not json\n" + json.dumps({"t": time.time(), "kind": "val", "step": 3, "val_loss": 2.95}) + "\n")
    feed.poll()
    assert feed.tail.bad_lines == 1 and feed.values()["val_loss"] == "2.9500 (step 3)"
    assert "1 bad line" in feed.header_text()


def test_resumed_run_steps_go_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    t = 1_700_000_000.0
    _append(path, "".join(_step(s, 3.0 - s / 100, t=t + s) for s in range(1, 61)))
    _append(path, json.dumps({"t": t + 55, "kind": "val", "step": 50, "val_loss": 2.6}) + "\n")
    feed = Feed(tmp_path)
    feed.poll()
    assert feed.loss.last() == (60.0, pytest.approx(2.4))
    # killed at 60, resumed from the step-50 checkpoint 10 minutes later
    _append(path, "".join(_step(s, 3.0 - s / 100 + 0.01, t=t + 600 + s) for s in range(51, 71)))
    feed.poll()
    xs = list(feed.loss.xs)
    assert xs == sorted(xs) and xs == [float(s) for s in range(1, 71)]
    assert feed.loss.ys[-1] == pytest.approx(3.0 - 0.70 + 0.01)
    assert list(feed.val_loss.xs) == [50.0]  # evaluated before the checkpoint: kept
    assert feed.resume_steps == [51]
    assert any("resumed at step 51" in e.text for e in feed.log)
    assert len(feed.pagein.segments(100)) == 2  # the time series break over the restart
    assert feed.values()["step"] == "70 / 100"


def test_recorded_run_and_truncation(tmp_path):
    run = record_run.record_run(tmp_path / "run", steps=120, steps_total=500, seed=3)
    feed = Feed(run)
    feed.poll()
    assert not feed.more_waiting
    assert len(feed.loss) == 120 and feed.resume_steps  # the recording resumes once
    assert len(feed.layers) == 26 and feed.layers_step == 120
    assert feed.limits.max_temp_c == 90.0 and feed.limits.soft_pct == 90.0
    vals = feed.values()
    assert vals["budget"] == "1,536 MiB" and vals["temp"].endswith("°C")
    assert vals["headroom"].endswith("%)") and vals["eta"] not in ("–", "")
    assert any(e.level == "warning" and "guard checkpoint" in e.text for e in feed.log)
    # the file replaced by a shorter one (a new run in the same directory): start over
    (run / "metrics.jsonl").write_text(_step(1, 3.3), encoding="utf-8")
    feed.poll()
    assert len(feed.loss) == 1 and feed.resume_steps == []


def test_control_request_and_acknowledgement(tmp_path):
    run = RunDir(tmp_path)
    run.write_status(state="running", step=12, pid=os.getpid(), ack_id=0)
    feed = Feed(tmp_path)
    feed.poll()
    req_id = feed.request("pause")
    ctl = run.read_control()
    assert ctl["action"] == "pause" and ctl["source"] == "monitor" and ctl["id"] == req_id
    assert feed.ack_text().startswith("Pause requested… / 일시정지 요청됨…")
    run.write_status(state="paused", step=12, pid=os.getpid(), ack_id=req_id)
    feed.poll()
    assert feed.ack_text().startswith("Pause: acknowledged at step 12")
    # a later request from the guard overwrote ours before the trainer read it
    feed.request("checkpoint")
    newer = run.request("stop", source="guard")
    run.write_status(state="stopped", step=13, pid=os.getpid(), ack_id=newer)
    feed.poll()
    assert "replaced by a later request (guard: stop)" in feed.ack_text()
    with pytest.raises(ValueError):
        feed.request("explode")


def test_missing_run_dir_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "nope"
    p = subprocess.run([sys.executable, "-m", "odyssey.monitor", str(missing)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "run directory" in err[0] and str(missing) in err[0]
    assert "Traceback" not in p.stderr


def test_no_display_is_a_clear_error(tmp_path, monkeypatch):
    from odyssey.monitor import main

    if sys.platform in ("win32", "darwin"):
        pytest.skip("no DISPLAY needed on this platform")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(OdysseyError) as e:
        main([str(tmp_path)])
    msg = str(e.value)
    assert "DISPLAY is not set" in msg and "Xvfb" in msg and "\n" not in msg
    with pytest.raises(OdysseyError, match="DISPLAY is not set"):
        launch_detached(tmp_path)
    assert not (tmp_path / "monitor.log").exists()  # nothing started, nothing written


def test_pick_family_prefers_hangul_fonts():
    from odyssey.monitor.app import pick_family

    assert pick_family(["DejaVu Sans", "NanumGothic", "Noto Sans CJK KR"]) == "Noto Sans CJK KR"
    assert pick_family(["DejaVu Sans", "nanumgothic"]) == "nanumgothic"
    assert pick_family(["DejaVu Sans", "NanumSquareRound"]) == "NanumSquareRound"
    assert pick_family(["DejaVu Sans"]) is None


# --------------------------------------------------------------------------------------------
# a real window under Xvfb


@pytest.fixture(scope="module")
def xvfb():
    if sys.platform in ("win32", "darwin"):
        pytest.skip("Xvfb is for X11 platforms")
    exe = shutil.which("Xvfb")
    reason = ""
    if exe is None:
        p = subprocess.run(["bash", str(ROOT / "tools" / "ensure_xvfb.sh")], capture_output=True, text=True,
                           timeout=600)
        reason = (p.stdout + p.stderr).strip()
        exe = shutil.which("Xvfb")
    if exe is None:
        print(reason)
        pytest.skip(f"Xvfb is missing and could not be installed: {reason or 'no reason given'}")
    r, w = os.pipe()
    # -displayfd: Xvfb picks a free display number itself and writes it to the pipe when ready.
    proc = subprocess.Popen([exe, "-displayfd", str(w), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                            pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    number = b""
    deadline = time.monotonic() + 20
    with os.fdopen(r, "rb") as f:
        while not number.endswith(b"\n") and time.monotonic() < deadline:
            chunk = f.read(1)
            if not chunk:
                break
            number += chunk
    if not number.strip():
        proc.kill()
        raise RuntimeError("Xvfb did not report a display number")
    display = f":{number.decode().strip()}"
    yield display
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _pump(root, app, until, timeout_s=10.0):
    """Run Tk's event loop by hand until `until()` holds; returns the longest single update."""
    deadline = time.monotonic() + timeout_s
    longest = 0.0
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        root.update()
        longest = max(longest, time.perf_counter() - t0)
        if until():
            return longest
        time.sleep(0.01)
    raise AssertionError("the window did not reach the expected state in time")


def _korean_fonts() -> list[str]:
    if not shutil.which("fc-list"):
        return []
    out = subprocess.run(["fc-list", ":lang=ko", "family"], capture_output=True, text=True).stdout
    return [name for line in out.splitlines() for name in line.split(",") if name.strip()]


def test_window_screenshot_pause_and_ack(xvfb, tmp_path, monkeypatch):
    from PIL import ImageGrab

    from odyssey.monitor.app import open_window

    monkeypatch.setenv("DISPLAY", xvfb)
    run = record_run.record_run(tmp_path / "run", steps=240, steps_total=1000, pid=os.getpid())
    root, app = open_window(run, geometry="1280x800+0+0", interval_ms=100)
    try:
        app.start()
        _pump(root, app, lambda: app.feed.records > 2000 and not app.feed.more_waiting
              and app._drawn_version == app.feed.version)
        for _ in range(20):  # let geometry settle and charts redraw at their final size
            root.update()
            time.sleep(0.01)
        assert app.value_vars["step"].get() == "240 / 1,000"
        assert app.value_vars["budget"].get() == "1,536 MiB"
        korean = _korean_fonts()
        if korean:
            assert app.family in korean, f"picked {app.family!r}, Hangul fonts are {korean}"

        img = ImageGrab.grab(xdisplay=xvfb)
        assert img.size == (1280, 800)
        shot = tmp_path / "monitor.png"
        img.save(shot)
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 300, f"only {len(colors or [])} colors: blank window?"
        # the largest single colour must not cover nearly everything
        assert max(c for c, _ in colors) < 0.8 * 1280 * 800
        keep = os.environ.get("ODYSSEY_MONITOR_SCREENSHOT")
        if keep:
            Path(keep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, keep)

        # Pause: a control request from the monitor, then the trainer's acknowledgement
        app.buttons["pause"].invoke()
        ctl = json.loads((run / "control.json").read_text())
        assert ctl["action"] == "pause" and ctl["source"] == "monitor"
        assert app.ack_var.get().startswith("Pause requested… / 일시정지 요청됨…")
        RunDir(run).write_status(state="paused", step=241, pid=os.getpid(), ack_id=ctl["id"])
        _pump(root, app, lambda: "acknowledged at step 241" in app.ack_var.get())
        assert "state: paused" in app.header_var.get()

        # a 100,000-line file appended to the live window: no update blocks the UI for long
        big = tmp_path / "big.jsonl"
        record_run.write_lines(big, 100_000)
        with open(run / "metrics.jsonl", "ab") as f, open(big, "rb") as src:
            shutil.copyfileobj(src, f)
        before = app.feed.records
        longest = _pump(root, app, lambda: app.feed.records >= before + 100_000 and not app.feed.more_waiting
                        and app._drawn_version == app.feed.version, timeout_s=30)
        assert longest < 1.5, f"one UI update took {longest:.2f} s"
        print(f"longest UI update while loading 100,000 lines: {longest * 1000:.0f} ms")
        RunDir(run).write_status(state="finished", step=241, pid=os.getpid(), ack_id=ctl["id"])
        _pump(root, app, lambda: str(app.buttons["stop"].cget("state")) == "disabled")
    finally:
        app.close()


def test_launch_detached_opens_its_own_process(xvfb, tmp_path, monkeypatch):
    monkeypatch.setenv("DISPLAY", xvfb)
    run = record_run.record_run(tmp_path / "run", steps=30, steps_total=100)
    proc = launch_detached(run)
    try:
        time.sleep(3.0)
        log = (run / "monitor.log").read_text(errors="replace") if (run / "monitor.log").exists() else ""
        assert proc.poll() is None, f"monitor exited with {proc.returncode}: {log}"
        assert os.getsid(proc.pid) != os.getsid(0)  # its own session: Ctrl-C in training skips it
        assert "Traceback" not in log
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert not (run / "control.json").exists()  # closing the window asks nothing of the trainer
