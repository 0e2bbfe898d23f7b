"""The trainer's control channel: what the people and processes around a run ask of it. No torch.

Three things can be asked, from three places:
- RUN/control.json requests (the monitor, the guard, a user; read through `control.Controller`):
  pause, resume, checkpoint, stop;
- a signal (SIGINT, SIGTERM) caught by `odyssey train`: stop;
- the guard's liveness: stop, when the guard is gone and guard.on_guard_lost is stop.

`collect` turns them into the channel's fields (never blocks; one stat when nothing changed) and
`act` applies them: a stop raises `StopRequested` (the cause with the highest rank wins: user <
signal < guard), a pause blocks until resume or stop, a checkpoint waits for the trainer to write
it at the end of the step in flight (`take_checkpoint`). Each request is acknowledged in
RUN/status.json: a stop or a checkpoint at once, a pause once paused, a resume once running.

On one process the trainer calls `between_layers` (collect, then act) between layers. On several
ranks it acts only at the end of each step (`end_of_step`), where every rank takes the element-wise
maximum of (stop, pause, checkpoint) over all ranks: any rank's stop or pause holds for all, and
they stop, pause or checkpoint together, at the same step.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from odyssey.errors import StopRequested
from odyssey.report import Paused, Resumed
from odyssey.runtime.control import Controller

STOP_USER, STOP_SIGNAL, STOP_GUARD = 1, 2, 3
"""Stop causes; the highest wins, here and across ranks."""
STOP_SOURCES = {STOP_USER: "user", STOP_SIGNAL: "signal", STOP_GUARD: "guard"}
PAUSE_POLL_S = 0.2
"""Seconds between looks at the channel while paused."""


class ControlChannel:
    """Requests, their acknowledgements, pause and stop, agreed across ranks.

    `ranks` is a `distributed.Ranks` (its `active`, and `flags` for the element-wise maximum);
    `report` receives the Paused and Resumed events."""

    def __init__(self, controller: Controller, ranks, report: Callable[[object], None]):
        self.controller = controller
        self.ranks = ranks
        self.report = report
        self.state = "running"
        """"running" or "paused": what status.json says between the trainer's own states."""
        self.stop_cause = 0
        """The highest stop cause asked for on this rank (STOP_*), 0 when none."""
        self.stop_reason = ""
        """Why, for that cause."""
        self.pause = False
        """A pause is asked for (and no resume since)."""
        self.checkpoint = False
        """A checkpoint is asked for and not written yet."""
        self.signal_received: int | None = None
        """The last SIGINT or SIGTERM caught (set by `on_signal`)."""
        self._pause_request: dict | None = None  # acknowledged once paused
        self._resume_request: dict | None = None  # acknowledged once running again

    # --- asking ---
    def on_signal(self, signum: int) -> None:
        """A signal handler's whole job: note the signal; the next `collect` turns it into a stop."""
        self.signal_received = signum

    def ask_stop(self, cause: int, reason: str) -> None:
        if cause > self.stop_cause:
            self.stop_cause, self.stop_reason = cause, reason

    def collect(self, step: int) -> None:
        """Signals, the guard's liveness and new control requests into the fields (never blocks).
        `step` is the last completed step (for acknowledgements)."""
        if self.signal_received is not None:
            self.ask_stop(STOP_SIGNAL, f"signal {signal.Signals(self.signal_received).name}")
        if self.controller.check_guard() == "stop":
            self.ask_stop(STOP_GUARD, "the guard is gone and guard.on_guard_lost is stop")
        req = self.controller.poll()
        while req is not None:
            action, source = req["action"], req.get("source", "user")
            reason = req.get("reason") or f"{action} requested by {source}"
            if action == "stop":
                self.ask_stop(STOP_GUARD if source == "guard" else STOP_USER, reason)
                self.controller.ack(req, "stopping", step)
            elif action == "pause":
                self.pause, self._pause_request = True, req  # acknowledged once paused
            elif action == "resume":
                self.pause, self._resume_request = False, req
                if self.state != "paused":
                    self.controller.ack(req, self.state, step)
            else:  # checkpoint: written at the end of the step in flight
                self.checkpoint = True
                self.controller.ack(req, self.state, step)
            req = self.controller.poll()

    # --- acting ---
    def between_layers(self, step: int) -> None:
        """Between layers: collect; act at once unless ranks act together at the end of the step."""
        self.collect(step)
        if not self.ranks.active:
            self.act(step)

    def end_of_step(self, step: int) -> None:
        """After the gradients of a step are averaged: the ranks act together."""
        if self.ranks.active:
            self.act(step)

    def act(self, step: int) -> None:
        """Apply what was asked: a stop raises StopRequested, a pause blocks until resume or stop.
        Across ranks the flags are combined (any rank's stop or pause holds for all)."""
        stop, pause, checkpoint = self.ranks.flags([self.stop_cause, int(self.pause), int(self.checkpoint)])
        self.checkpoint = bool(checkpoint)
        if stop:
            self._raise_stop(stop)
        if not pause:
            return
        self.state = "paused"
        req, self._pause_request = self._pause_request or {"id": None, "action": "pause"}, None
        self.controller.ack(req, "paused", step)
        self.report(Paused(step, by=req.get("source"), reason=req.get("reason") or ""))
        while pause:
            time.sleep(PAUSE_POLL_S)
            self.collect(step)
            stop, pause = self.ranks.flags([self.stop_cause, int(self.pause)])
            if stop:
                self._raise_stop(stop)
        self.state = "running"
        req, self._resume_request = self._resume_request or {"id": None, "action": "resume"}, None
        self.controller.ack(req, "running", step)
        self.report(Resumed(step, by=req.get("source")))

    def take_checkpoint(self) -> bool:
        """Whether a checkpoint was asked for (and agreed on); the request counts as handled."""
        asked, self.checkpoint = self.checkpoint, False
        return asked

    def _raise_stop(self, cause: int) -> None:
        reason = self.stop_reason if self.stop_cause == cause else "stop requested on another rank"
        raise StopRequested(reason, source=STOP_SOURCES[cause])

    # --- status ---
    def write_status(self, step: int, state: str | None = None, **fields) -> dict:
        """RUN/status.json (this rank's) with `state`, by default the channel's (running or paused)."""
        return self.controller.write_status(state or self.state, step, **fields)
