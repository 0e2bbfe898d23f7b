"""What a training run tells people: the trainer's typed events, and their words.

The trainer (train.py) and its control channel (channel.py) never write text for people: they emit
the events below, and a `TrainReport` words each one, in the two places people read:
- RUN/metrics.jsonl: one "event" record with a `message` (what the monitor shows in its log, and
  what `tools/record_run.py` imitates), in the rank's own run directory (RUN/ranks/rank-N on
  ranks other than 0) or, for checkpoints and the result, in the run's;
- the terminal: the progress bar, the resume notes and the stop hint on stderr, the summary on
  stdout; rank 0 only.
No torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import singledispatchmethod
from pathlib import Path

from odyssey.config import format_bytes
from odyssey.runtime.runlog import RunDir

MIB = 1 << 20

# ---------------------------------------------------------------------------------------------
# events


@dataclass(frozen=True)
class Started:
    """Training starts (or resumes) on this rank."""

    rank: int
    resumed_step: int | None
    """The step of the checkpoint resumed from; None for a new run."""
    checkpoint: str | None
    """Name of the checkpoint resumed from (step-NNNNNN)."""
    parameters: int
    mode: str
    lora_r: int
    steps: int
    world_size: int
    budget_bytes: int
    plan_bytes: int
    compute: str = ""
    """The compute dtype and the rule that picked it (`odyssey.dtypes.compute_dtype_line`)."""
    residency: str = ""
    """What the plan's residency does with the budget (`residency.Residency.summary`)."""
    compiled: str = ""
    """Whether the decoder layers go through torch.compile, and why (`compiling.choose`); "" when
    they run eager by default."""
    spill: str = ""
    """Whether layers spill their activations to disk, and why (`spill.choose`)."""
    offload: str = ""
    """Whether the AdamW moments wait on disk between steps, and why (`train.training_plan`)."""
    reads: str = ""
    """How the pager reads the layers it pages a step, and why (`readmode.choose`)."""


@dataclass(frozen=True)
class NoCheckpointYet:
    """--resume found no complete checkpoint: the run starts from step 0."""

    run: Path


@dataclass(frozen=True)
class WorldSizeChanged:
    """A run resumed on another number of ranks: the global batch and each rank's shard change."""

    saved_world_size: int
    world_size: int
    sequences_per_rank: int
    """batch_size * grad_accum: sequences one rank reads a step."""


@dataclass(frozen=True)
class ExamplesPacked:
    """Examples-layout data: per split, the examples kept, the windows, their fill, and how many
    were truncated or dropped (`odyssey.data.sampler.ExampleSet.summary`); said once."""

    lines: tuple


@dataclass(frozen=True)
class MonitorUnavailable:
    """--monitor could not open its window; training goes on without it."""

    problem: str
    run: Path


@dataclass(frozen=True)
class CompileFellBack:
    """The first compiled step compiled no graph (compiling.fell_back): the layers run eager."""


@dataclass(frozen=True)
class FitStarted:
    step: int
    steps_total: int


@dataclass(frozen=True)
class StepDone:
    """An optimizer step completed (every rank; the figures are this rank's, tokens_per_s all ranks')."""

    step: int
    loss: float
    tokens_per_s: float
    pagein_mb_s: float
    rss_anon_mib: float


@dataclass(frozen=True)
class FitEnded:
    step: int


@dataclass(frozen=True)
class CheckpointWritten:
    step: int
    path: Path
    reason: str
    size_bytes: int
    seconds: float


@dataclass(frozen=True)
class Paused:
    step: int
    by: str | None
    """The source of the pause request; None when another rank asked for it."""
    reason: str = ""


@dataclass(frozen=True)
class Resumed:
    step: int
    by: str | None
    """The source of the resume request; None when another rank asked for it."""


@dataclass(frozen=True)
class FitSummary:
    """What `Trainer.fit` returns: the figures of the steps it ran (on rank 0)."""

    steps: int
    first_loss: float | None
    last_loss: float | None
    val_before: float | None
    val_after: float | None
    step_s: float | None
    """Median seconds a step."""
    tokens_per_s: float | None
    """Mean over the steps, all ranks together."""
    rss_peak_mib: float


@dataclass(frozen=True)
class Finished:
    step: int
    result: Path
    """The adapter directory (LoRA) or the new store (full training)."""
    summary: FitSummary
    seconds: float
    plan_bytes: int
    budget_bytes: int


@dataclass(frozen=True)
class Stopped:
    """Training stopped on request (user, signal, guard, a lost peer)."""

    step: int
    rank: int
    reason: str
    exit_status: int
    checkpoint: Path | None
    """The checkpoint this rank wrote or found for the step (None: none by this rank)."""
    run: Path


# ---------------------------------------------------------------------------------------------
# the words


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


class TrainReport:
    """Words the trainer's events: event records in the run directories, lines and a progress bar
    on the terminal (rank 0). Call it with an event."""

    def __init__(self, run: RunDir, local: RunDir | None = None, *, is_main: bool = True, progress: bool = True):
        self.run = run
        self.local = local or run  # this rank's own run directory; the run's on rank 0
        self.is_main = is_main
        self.progress = progress and is_main
        self._bar = None

    def _note(self, msg: str) -> None:
        if self.is_main:
            print(msg, file=sys.stderr)

    @singledispatchmethod
    def __call__(self, event) -> None:
        raise TypeError(f"not a training event: {event!r}")

    @__call__.register
    def _started(self, e: Started) -> None:
        what = f"LoRA r={e.lora_r}" if e.mode == "lora" else "full training"
        on = f", {e.world_size} ranks" if e.world_size > 1 else ""
        begun = f"resumed from {e.checkpoint}" if e.checkpoint else "training started"
        self.local.append(
            "event",
            level="info",
            source="trainer",
            rank=e.rank,
            action="start",
            resumed_from=e.resumed_step,
            message=(
                f"{begun}: {e.parameters / 1e9:.3f} B parameters, {what}, {e.steps} steps{on}, "
                f"RAM budget {format_bytes(e.budget_bytes)}, plan {format_bytes(e.plan_bytes)}"
                + (f"; {e.compute}" if e.compute else "")
                + (f"; {e.residency}" if e.residency else "")
                + (f"; {e.compiled}" if e.compiled else "")
                + (f"; {e.spill}" if e.spill else "")
                + (f"; {e.offload}" if e.offload else "")
                + (f"; {e.reads}" if e.reads else "")
            ),
        )
        if self.progress:  # --quiet: an error is then the one line on stderr (both stay in the event)
            for note in (e.compute, e.spill, e.offload, e.reads, e.residency, e.compiled):
                if note:
                    self._note(note)

    @__call__.register
    def _no_checkpoint_yet(self, e: NoCheckpointYet) -> None:
        self._note(f"--resume: {e.run} has no checkpoint yet; starting from step 0")

    @__call__.register
    def _world_size_changed(self, e: WorldSizeChanged) -> None:
        b = e.sequences_per_rank
        self._note(
            f"resuming a run of {e.saved_world_size} rank(s) on {e.world_size}: the global batch "
            f"changes from {e.saved_world_size * b} to {e.world_size * b} sequences a step and each "
            f"rank reads another shard of the data, so the steps from here differ from an uninterrupted run"
        )

    @__call__.register
    def _examples_packed(self, e: ExamplesPacked) -> None:
        for line in e.lines:
            self.local.append("event", level="info", source="trainer", action="data", message=line)
            self._note(line)

    @__call__.register
    def _monitor_unavailable(self, e: MonitorUnavailable) -> None:
        print(
            f"--monitor: {e.problem}; training continues without the window "
            f"(attach later with `odyssey monitor {e.run}`)",
            file=sys.stderr,
        )

    @__call__.register
    def _compile_fell_back(self, e: CompileFellBack) -> None:
        msg = "torch.compile compiled nothing (see `odyssey doctor`); the layers run eager, with the same results"
        self.local.append("event", level="warning", source="trainer", action="compile", message=msg)
        if self.progress:
            self._note(msg)

    @__call__.register
    def _fit_started(self, e: FitStarted) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=e.steps_total,
            initial=e.step,
            desc="train",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )

    @__call__.register
    def _step_done(self, e: StepDone) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        if self.is_main:
            self._bar.set_postfix_str(
                f"loss {e.loss:.3f} | {e.tokens_per_s:.0f} tok/s | {e.pagein_mb_s:.0f} MB/s | "
                f"RSS {e.rss_anon_mib:.0f} MiB",
                refresh=False,
            )

    @__call__.register
    def _fit_ended(self, e: FitEnded) -> None:
        self._close_bar()

    @__call__.register
    def _checkpoint_written(self, e: CheckpointWritten) -> None:
        self.run.append(
            "event",
            level="info",
            source="trainer",
            action="checkpoint",
            step=e.step,
            message=f"checkpoint {e.path.name} written ({e.reason}; {e.size_bytes / 1e6:.1f} MB in {e.seconds:.1f} s)",
        )

    @__call__.register
    def _paused(self, e: Paused) -> None:
        by = "another rank" if e.by is None else e.by
        self.local.append(
            "event",
            level="warning",
            source="trainer",
            action="paused",
            step=e.step,
            message=f"paused by {by}{': ' + e.reason if e.reason else ''} / 일시정지",
        )

    @__call__.register
    def _resumed(self, e: Resumed) -> None:
        by = "another rank" if e.by is None else e.by
        self.local.append(
            "event", level="info", source="trainer", action="resumed", step=e.step, message=f"resumed by {by} / 재개"
        )

    @__call__.register
    def _finished(self, e: Finished) -> None:
        self.run.append(
            "event",
            level="info",
            source="trainer",
            action="finished",
            step=e.step,
            message=f"finished at step {e.step}; result in {e.result}",
        )
        s = e.summary
        print(
            f"trained {s.steps} steps in {e.seconds:.1f} s: loss {_fmt(s.first_loss, '.4f')} -> "
            f"{_fmt(s.last_loss, '.4f')}, val {_fmt(s.val_before, '.4f')} -> {_fmt(s.val_after, '.4f')}; "
            f"median step {_fmt(s.step_s, '.2f')} s, {_fmt(s.tokens_per_s, '.0f')} tokens/s; peak anonymous "
            f"RSS {s.rss_peak_mib:.0f} MiB (plan {e.plan_bytes / MIB:.0f} MiB, budget {e.budget_bytes / MIB:.0f} "
            f"MiB); saved {e.result}"
        )

    @__call__.register
    def _stopped(self, e: Stopped) -> None:
        where = e.checkpoint
        self.local.append(
            "event",
            level="warning" if e.exit_status else "info",
            source="trainer",
            action="stopped",
            step=e.step,
            rank=e.rank,
            message=f"stopped at step {e.step} ({e.reason}); "
            f"{'checkpoint ' + where.name if where else 'no checkpoint written by this rank'}",
        )
        if self.is_main:
            print(
                f"\nstopped at step {e.step}: {e.reason}. {'Checkpoint ' + str(where) + '. ' if where else ''}"
                f"Resume with: odyssey train --out {e.run} --resume",
                file=sys.stderr,
            )

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
