"""The run directory: the one hub the trainer, the guard and the monitor share. No torch import.

```
RUN/config.yaml        effective config (model, data, budget, LoRA)
RUN/metrics.jsonl      one JSON object a line:
                       {"t": unix_s, "kind": "step"|"val"|"pagein"|"memory"|"guard"|"event", ...}
RUN/control.json       latest request: {"id": int, "action": "pause"|"resume"|"checkpoint"|"stop", "source": str,
                       "reason": str, "t": unix_s}
RUN/status.json        trainer state: {"state": "starting"|"running"|"paused"|"stopped"|"finished"|"failed",
                       "step": int, "pid": int, "ack_id": int (last control id handled), "t": unix_s, ...}
RUN/guard.json         guard heartbeat: {"pid": int, "t": unix_s, "state": str}
RUN/checkpoints/step-N/  adapter + optimizer + data position + RNG
RUN/adapter/           final adapter in PEFT format
```

Several processes append to metrics.jsonl: each line goes out in one `write` on an O_APPEND
descriptor, so lines never interleave. control.json and status.json are replaced atomically, so a
reader sees the old or the new object, never half of one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from odyssey import atomic

ACTIONS = ("pause", "resume", "checkpoint", "stop")
STATES = ("starting", "running", "paused", "stopped", "finished", "failed")


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # --- paths ---
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def control_path(self) -> Path:
        return self.root / "control.json"

    @property
    def status_path(self) -> Path:
        return self.root / "status.json"

    @property
    def guard_path(self) -> Path:
        return self.root / "guard.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    def exists(self) -> bool:
        return self.root.is_dir()

    # --- metrics ---
    def append(self, kind: str, **fields) -> dict:
        """Append one event line; returns the record written."""
        record = {"t": round(time.time(), 4), "kind": kind, **fields}
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return record

    def read_metrics(self, kind: str | None = None) -> list[dict]:
        """All records (optionally of one kind). For live following use `MetricsTail`."""
        tail = MetricsTail(self.metrics_path)
        return [r for r in tail.read_new() if kind is None or r.get("kind") == kind]

    # --- control requests ---
    def request(self, action: str, source: str = "user", reason: str = "") -> int:
        """Write a control request; returns its id (increasing: nanoseconds since the epoch)."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        req_id = time.time_ns()
        atomic.write_json(
            self.control_path, {"id": req_id, "action": action, "source": source, "reason": reason, "t": time.time()}
        )
        return req_id

    def read_control(self) -> dict | None:
        return _read_json(self.control_path)

    # --- status ---
    def write_status(self, **fields) -> dict:
        status = {"t": time.time(), **fields}
        atomic.write_json(self.status_path, status)
        return status

    def read_status(self) -> dict | None:
        return _read_json(self.status_path)

    # --- guard heartbeat ---
    def write_heartbeat(self, **fields) -> None:
        # Atomic but not durable: a heartbeat written every 0.5 s for hours must not force two
        # fsyncs (journal commits) each time, competing with the pager's reads; after a crash a
        # lost heartbeat means "guard gone", which is the truth.
        atomic.write_json(self.guard_path, {"t": time.time(), "pid": os.getpid(), **fields}, indent=None, durable=False)

    def read_heartbeat(self) -> dict | None:
        return _read_json(self.guard_path)


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`; None when it is missing, unreadable, malformed or not an object
    (a hand-edited control.json must never crash the trainer, the guard or the monitor)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


class MetricsTail:
    """Incremental reader of a metrics.jsonl: each `read_new()` returns only the complete lines added
    since the last call (a partial last line waits for its newline). If the file shrinks or is
    replaced, reading starts over. Malformed lines are counted and skipped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset = 0
        self.inode: int | None = None
        self.bad_lines = 0
        self.resets = 0
        """How many times the file was found replaced or truncated and reading started over."""
        self._partial = b""

    def read_new(self, max_bytes: int = 64 << 20) -> list[dict]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        if self.inode is not None and (st.st_ino != self.inode or st.st_size < self.offset):
            self.offset, self._partial = 0, b""  # replaced or truncated: start over
            self.resets += 1
        self.inode = st.st_ino
        if st.st_size <= self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(min(max_bytes, st.st_size - self.offset))
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when data ended with a newline
        return list(self._parse(lines))

    def _parse(self, lines: list[bytes]) -> Iterator[dict]:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.bad_lines += 1
                continue
            if isinstance(record, dict):
                yield record
            else:
                self.bad_lines += 1
