"""The monitor's formatted fields: numbers and durations as text, and `FeedText`, the text of a
`Feed`'s state (the read-only fields, the header, the Guard and ETA fields) that the window shows and
the tests read. Pure logic, no Tk."""

from __future__ import annotations

import math
import time

from odyssey.monitor.records import num

TERMINAL_STATES = ("stopped", "finished", "failed")
GUARD_NOTABLE_S = 60.0
"""A guard request (checkpoint, pause, stop) stays in the Guard field this long."""
_ENDING_TEXT = {
    "finished": "done / 완료",
    "stopped": "stopped / 중지됨",
    "failed": "failed / 실패",
    "stopping": "stopping / 중지 중",
}
"""The ETA field once the run has ended or is ending, whatever the trainer process is doing."""


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def fmt_ago(seconds: float) -> str:
    """Compact age: '40 s', '12 min', '3 h', '2 d'."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def fmt_num(v: float | None, digits: int = 0, unit: str = "") -> str:
    if v is None:
        return "–"
    if not math.isfinite(v):
        return str(v)  # nan / inf are worth seeing as such
    text = f"{v:,.{digits}f}"
    return f"{text} {unit}" if unit else text


def fmt_mb_s(v: float | None) -> str:
    """A page-in rate, with one decimal below 10 MB/s."""
    return fmt_num(v, 1 if (v or 0) < 10 else 0, "MB/s")


class FeedText:
    """The text of a Feed's state (mixed into `Feed`, which holds the state these read)."""

    def guard_text(self) -> str:
        """The Guard field, from guard.json (the heartbeat) and the guard's lines in metrics.jsonl."""
        now = time.time()
        hb = self.heartbeat
        if hb is None and not self.guard_started:
            return "none (--no-guard) / 없음" if self.records else "–"
        hb_state = (hb or {}).get("state")
        if hb_state == "exited":
            return "exited / 종료됨"
        age = now - (num((hb or {}).get("t")) or 0.0)
        stale = age > max(10.0, 5 * self.limits.heartbeat_s)
        if stale:
            if self.state() in TERMINAL_STATES or self.trainer_gone():
                return "not running / 실행 안 함"
            return f"lost, {fmt_ago(age)} ago / 끊김"
        if hb_state == "stopping":
            return "stop requested / 중지 요청"
        if hb_state == "paused":
            return "paused for heat / 과열로 일시정지"
        g = self.last_guard
        if g is not None:
            g_age = now - (num(g.get("t")) or 0.0)
            if g_age < GUARD_NOTABLE_S:
                return f"asked {g.get('action')} {fmt_ago(g_age)} ago / 요청"
        return "watching / 감시 중"

    def eta_text(self) -> str:
        state = self.state()
        if state in _ENDING_TEXT:
            return _ENDING_TEXT[state]
        if self.trainer_gone():
            return "not running / 멈춤"
        if state == "paused":
            return "paused / 일시정지"
        return fmt_duration(self.eta_s())

    def resident_text(self) -> str:
        """The Resident field: what the step's units came from, the layers that kept their
        activations and those that spilled them to disk (the step record's residency figures,
        trainer.residency_fields), and the AdamW moments when they wait on disk (offload_bytes)."""
        s = self.last_step or {}
        if self.mode == "full":
            return "everything (full mode) / 전체"
        read, held = num(s.get("pagein_bytes")), num(s.get("resident_bytes"))
        pinned, kept = num(s.get("pinned_units")), num(s.get("kept_layers"))
        if read is None or held is None or pinned is None:
            return "–"
        share = 100.0 * held / (read + held) if read + held > 0 else 0.0
        text = f"{share:.0f} % from RAM, {int(pinned)} pinned ({fmt_num(num(s.get('pinned_mib')), 0, 'MiB')})"
        if kept is not None:
            text += f", {int(kept)} layer(s) keep activations"
        spilled = num(s.get("spilled_layers"))
        if spilled:
            text += f", {int(spilled)} on disk ({fmt_num(num(s.get('spill_bytes') or 0) / 1e6, 0, 'MB')} a step)"
        moved = num(s.get("offload_bytes"))
        if moved:  # written after the optimizer step, read back before the next (offload.py)
            text += f", AdamW moments on disk ({fmt_num(moved / 2e6, 0, 'MB')})"
        return text

    def values(self) -> dict[str, str]:
        """The read-only fields, formatted (keys are FIELD names in app.py)."""
        s = self.last_step or {}
        total = self.steps_total()
        out: dict[str, str] = {}
        step = s.get("step")
        out["step"] = "–" if step is None else (f"{step:,} / {total:,}" if total else f"{step:,}")
        out["loss"] = fmt_num(num(s.get("loss")), 4)
        if self.last_val:
            out["val_loss"] = f"{fmt_num(num(self.last_val.get('val_loss')), 4)} (step {self.last_val.get('step')})"
        else:
            out["val_loss"] = "–"
        out["tokens_per_s"] = fmt_num(num(s.get("tokens_per_s")), 1)
        out["step_s"] = fmt_num(num(s.get("step_s")), 2, "s")
        out["eta"] = self.eta_text()
        if self.mode == "full":
            out["pagein"] = "none (full mode) / 없음"
        else:
            out["pagein"] = fmt_mb_s(num(s.get("pagein_mb_s")))
            read = num(s.get("pagein_bytes"))
            if read is not None:  # and what a step read (residency.py: pinned units are read once)
                out["pagein"] += f", {fmt_num(read / 2**20, 1, 'MiB')} a step"
        out["resident"] = self.resident_text()
        stall, step_s = num(s.get("stall_s")), num(s.get("step_s"))
        out["stall"] = fmt_num(100.0 * stall / step_s, 1, "%") if stall is not None and step_s else "–"
        out["rss"] = fmt_num(self.rss_mib(), 0, "MiB")
        out["budget"] = fmt_num(self.budget_mib, 0, "MiB")
        head = self.headroom_mib()
        if head is not None and self.budget_mib:
            out["headroom"] = f"{fmt_num(head, 0, 'MiB')} ({100 * head / self.budget_mib:.0f} %)"
        else:
            out["headroom"] = "–"
        temp = num((self.last_memory or {}).get("temp_c"))
        if temp is not None:
            out["temp"] = fmt_num(temp, 0, "°C")
        else:
            out["temp"] = "unavailable / 없음" if self.last_memory else "–"
        out["guard"] = self.guard_text()
        return out

    def header_text(self) -> str:
        state = self.state()
        parts = [f"{self.run.root}", f"state: {state}"]
        st = self.status or {}
        if st.get("pid") and self.trainer_gone():
            parts.append(
                f"trainer pid {st['pid']} not running (resume with odyssey train --out {self.run.root} --resume)"
            )
        world = (self.last_step or {}).get("world_size")
        if isinstance(world, int) and world > 1:  # data-parallel: RAM and page-in are rank 0's
            parts.append(f"{world} ranks (RAM, page-in: rank 0)")
        if self.t_last is not None:
            parts.append(f"last metrics {fmt_ago(time.time() - self.t_last)} ago")
        if self.tail.bad_lines:
            parts.append(f"{self.tail.bad_lines} bad line(s) skipped")
        if self.more_waiting:
            parts.append("reading…")
        return "  ·  ".join(parts)
