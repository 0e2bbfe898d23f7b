"""The training recipe: data, optimizer, schedule, checkpoints, resume, metrics.

One loop (`Trainer.fit`) serves both modes through a `Learner` (learners.py):
- `LoraLearner`: the frozen base paged layer by layer through the engine, PEFT LoRA adapters in RAM.
- `FullLearner`: every parameter in RAM (nano, small), ordinary autograd; ends with a new store.

The run directory (runlog.RunDir) is the hub: config.yaml, metrics.jsonl, status.json,
control.json, checkpoints/step-NNNNNN/, adapter/ (or model/ in full mode).

A checkpoint (`checkpoints.Checkpoints`) holds the weights being trained, the AdamW state, the step, the data
position and the RNG state as they were at the end of that step; it is written into a temporary
directory, synced and renamed, so a crash leaves the previous checkpoint or the new one.
`--resume` restores all of it, so the losses after a resume equal those of an uninterrupted run.

Control requests (pause, resume, checkpoint, stop) from the monitor, the guard or a signal reach
the loop through its `channel.ControlChannel`, between layers: a pause blocks there, a stop
abandons the step in flight (nothing of it has reached the weights yet) and checkpoints the last
completed step. What happens is told as typed events (report.py), which `report.TrainReport`
words for the run directory's log and the terminal.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from odyssey import atomic, compiling
from odyssey.channel import ControlChannel
from odyssey.checkpoints import Checkpoints, StepState
from odyssey.config import TrainConfig, dump_yaml, to_dict
from odyssey.dtypes import compute_dtype_line
from odyssey.errors import OdysseyError, StopRequested
from odyssey.learners import Learner, make_learner
from odyssey.report import (
    CheckpointWritten,
    CompileFellBack,
    ExamplesPacked,
    Finished,
    FitEnded,
    FitStarted,
    FitSummary,
    MonitorUnavailable,
    NoCheckpointYet,
    Started,
    StepDone,
    Stopped,
    TrainReport,
    WorldSizeChanged,
)
from odyssey.runsetup import prepare
from odyssey.runtime.runlog import RunDir

EXIT_GUARD_STOP = 3
MIB = 1 << 20
HOOK_ENV = "ODYSSEY_TRAIN_HOOK"
"""`module:factory` naming a `TrainHook` factory (see `load_hook`)."""


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup to cfg.lr over warmup_steps,
    then cosine decay to min_lr_ratio * lr at the last step."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * frac))


# ---------------------------------------------------------------------------------------------
# a hook point for tests and diagnostics


class TrainHook(Protocol):
    """Code run inside the trainer's process, named by ODYSSEY_TRAIN_HOOK (see `load_hook`)."""

    def between_layers(self, step: int) -> None:
        """Runs between layers, before the control channel looks for requests; `step` is the last
        completed step."""

    def stopping(self) -> None:
        """Runs once when the run stops on request, before the stop checkpoint is written."""


def load_hook() -> TrainHook | None:
    """The hook named by ODYSSEY_TRAIN_HOOK=module:factory (factory() makes it), or None when the
    variable is unset. It lets a test act inside a real `odyssey train` process; the guard tests
    make a leak with tests/hooks.py this way."""
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise OdysseyError(f"{HOOK_ENV}={spec!r} names no importable module:factory ({e})") from None
    return factory()


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Optimizer steps of a learner over the data, with evaluation, metrics and checkpoints. The
    control channel acts between layers; events go to `report`; metrics to RUN/metrics.jsonl."""

    def __init__(
        self,
        *,
        store,
        data,
        run: RunDir,
        cfg: TrainConfig,
        budget: int,
        ranks,
        channel: ControlChannel,
        report: Callable[[object], None],
        hook: TrainHook | None = None,
        residency=None,
    ):
        from odyssey.data import BatchSampler, eval_batches

        self.store, self.data, self.run, self.cfg, self.budget = store, data, run, cfg, budget
        self.ranks, self.channel, self.report, self.hook = ranks, channel, report, hook
        torch.manual_seed(cfg.seed)
        self.learner: Learner = make_learner(store, cfg, residency)
        self.params = [p for p in self.learner.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8
        )
        self.sampler = BatchSampler(
            data,
            "train",
            cfg.seq_len,
            cfg.batch_size,
            seed=cfg.seed,
            rank=ranks.rank,
            world_size=ranks.world,
            packing=cfg.packing,
            too_long=cfg.too_long,
        )
        self.val = (
            eval_batches(
                data, cfg.seq_len, cfg.batch_size, cfg.eval_batches, packing=cfg.packing, too_long=cfg.too_long
            )
            if cfg.eval_batches
            else []
        )
        lines = [x for x in (self.sampler.summary, getattr(self.val, "summary", None)) if x]
        if lines:
            self.report(ExamplesPacked(tuple(lines)))
        self.checkpoints = Checkpoints(run, keep=cfg.keep_checkpoints)
        self.step = 0
        self.tokens = 0
        self.last_done: StepState | None = None

    # --- resume ---
    def restore(self) -> Path | None:
        """Everything from the newest checkpoint; returns its path, or None when there is none."""
        found = self.checkpoints.latest()
        if found is None:
            return None
        path, state = found
        self.learner.load(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(self._sampler_state(state["sampler"]))
        torch.set_rng_state(state["rng"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.last_done = StepState(self.step, state["sampler"], state["rng"], self.tokens)
        return path

    def _sampler_state(self, saved: dict) -> dict:
        """The saved data position for this rank. Every rank has the same (epoch, cursor) after a
        step, so rank 0's position serves all; on another number of ranks the windows each rank
        has consumed carry over onto the new shards."""
        s = self.sampler
        if saved.get("world_size", 1) == s.world_size and saved.get("num_windows") == s.num_windows:
            return {**saved, "rank": s.rank}
        self.report(
            WorldSizeChanged(saved.get("world_size", 1), s.world_size, self.cfg.batch_size * self.cfg.grad_accum)
        )
        return s.rebase(saved)

    # --- checkpoints ---
    def checkpoint(self, reason: str) -> Path | None:
        """The checkpoint of the last completed step, written on rank 0 unless it is there already;
        returns its path (None on other ranks and before the first step)."""
        done = self.last_done
        if done is None or done.step == 0 or not self.ranks.is_main:
            return None
        path = self.checkpoints.path(done.step)
        if self.checkpoints.is_complete(done.step):
            return path  # this step is already saved
        t0 = time.perf_counter()
        size = self.checkpoints.write(
            done, self.learner, self.optimizer, world_size=self.ranks.world, config=to_dict(self.cfg)
        )
        self.report(CheckpointWritten(done.step, path, reason, size, time.perf_counter() - t0))
        return path

    def _checkpoint_if_due(self) -> None:
        asked = self.channel.take_checkpoint()
        if asked or self.step % self.cfg.checkpoint_every == 0:
            self.checkpoint("requested" if asked else f"every {self.cfg.checkpoint_every} steps")

    # --- one step ---
    def _between(self) -> None:
        """Between layers: the hook, then the control channel (which may pause or raise a stop)."""
        if self.hook is not None:
            self.hook.between_layers(self.step)
        self.channel.between_layers(self.step)

    def _step_once(self) -> tuple[float, float]:
        cfg = self.cfg
        step = self.step + 1
        lr = lr_at(cfg, step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        # The step's loss is the mean over the trained targets of all its micro-batches: each
        # micro-batch's mean weighs by its share of them (1/grad_accum when they all train as many,
        # as windows of text do), so the gradient is that of one big batch.
        batches = [self.sampler.next_batch() for _ in range(cfg.grad_accum)]
        counts = [b.trained for b in batches]
        total = sum(counts)
        equal = len(set(counts)) == 1
        loss = 0.0
        for b, n in zip(batches, counts, strict=True):
            share = 1.0 / cfg.grad_accum if equal else n / total
            step_loss = self.learner.step(b, share, self._between)
            loss += step_loss / cfg.grad_accum if equal else step_loss * share
        weight = None if self.sampler.examples is None else total  # ranks weigh by trained targets
        loss = self.ranks.average_grads(self.params, loss, weight)
        self.channel.end_of_step(self.step)  # the ranks stop, pause or checkpoint together, at the same step
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        self.tokens += cfg.grad_accum * cfg.batch_size * cfg.seq_len * self.ranks.world
        self.last_done = StepState(step, self.sampler.state_dict(), torch.get_rng_state(), self.tokens)
        return loss, float(norm)

    def evaluate(self) -> float | None:
        if not self.val or not self.ranks.is_main:
            return None
        self.learner.train(False)
        try:
            losses = [self.learner.eval_loss(b) for b in self.val]
        finally:
            self.learner.train(True)
        counts = [b.trained for b in self.val]
        if len(set(counts)) == 1:
            v = sum(losses) / len(losses)
        else:  # the mean over the answer tokens of the eval set: each batch weighs by its own
            v = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / max(sum(counts), 1)
        self.run.append("val", step=self.step, val_loss=round(v, 6), batches=len(losses))
        return v

    def _write_metrics(
        self, steps_total: int, loss: float, gnorm: float, step_s: float, st, anon_mib: float, tokens_per_s: float
    ) -> None:
        """The step's records: "rank" (every rank, when there are several), then on rank 0 "pagein" and "step"."""
        budget_mib = self.budget / MIB
        if self.ranks.active:
            self.run.append(
                "rank",
                rank=self.ranks.rank,
                pid=os.getpid(),
                step=self.step,
                step_s=round(step_s, 4),
                pagein_mb_s=round(st.pagein_mb_s, 1),
                stall_s=round(st.stall_s, 4),
                rss_anon_mib=round(anon_mib, 1),
                budget_mib=round(budget_mib, 1),
            )
        if not self.ranks.is_main:
            return
        if st.layers:
            self.run.append("pagein", step=self.step, layers=st.layers)
        self.run.append(
            "step",
            step=self.step,
            loss=round(loss, 6),
            lr=lr_at(self.cfg, self.step),
            grad_norm=round(gnorm, 6),
            tokens_per_s=round(tokens_per_s, 2),
            step_s=round(step_s, 4),
            pagein_mb_s=round(st.pagein_mb_s, 1),
            stall_s=round(st.stall_s, 4),
            rss_anon_mib=round(anon_mib, 1),
            budget_mib=round(budget_mib, 1),
            **residency_fields(st),
            steps_total=steps_total,
            tokens=self.tokens,
            world_size=self.ranks.world,
        )

    # --- the loop ---
    def fit(self, steps_total: int) -> FitSummary:
        from odyssey.runtime.memory import process_memory

        cfg = self.cfg
        first_val = self.evaluate() if (cfg.eval_every and self.step == 0) else None
        last_val = first_val
        self.report(FitStarted(self.step, steps_total))
        self.channel.write_status(self.step, "running", steps_total=steps_total)
        losses, times = [], []
        self.learner.train(True)
        rss_peak = 0.0
        tokens_a_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len * self.ranks.world  # all ranks
        while self.step < steps_total:
            self.learner.take_stats(0.0)  # reset page-in counters
            t0 = time.perf_counter()
            try:
                loss, gnorm = self._step_once()
            except StopRequested:
                self.optimizer.zero_grad(set_to_none=True)
                raise
            step_s = time.perf_counter() - t0
            st = self.learner.take_stats(step_s)
            anon = process_memory().anon_bytes / MIB
            rss_peak = max(rss_peak, anon)
            tps = tokens_a_step / step_s
            self._write_metrics(steps_total, loss, gnorm, step_s, st, anon, tps)
            if self.ranks.is_main:
                losses.append(loss)
                times.append(step_s)
            self.report(StepDone(self.step, loss, tps, st.pagein_mb_s, anon))
            if getattr(self.learner, "compiled", False) and len(times) == 1 and compiling.fell_back():
                self.report(CompileFellBack())
            if not self.ranks.is_main:
                continue
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == steps_total):
                last_val = self.evaluate()
            self._checkpoint_if_due()
            self.channel.write_status(self.step, steps_total=steps_total)
        self.report(FitEnded(self.step))
        return FitSummary(
            steps=len(losses),
            first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None,
            val_before=first_val,
            val_after=last_val,
            step_s=sorted(times)[len(times) // 2] if times else None,
            tokens_per_s=tokens_a_step / (sum(times) / len(times)) if times else None,
            rss_peak_mib=rss_peak,
        )


def residency_fields(st) -> dict:
    """The step record's residency figures (engine.PassStats): bytes read this step, bytes used
    from RAM without a read (pinned units, units still in a slot), the pinned units and their
    buffers, and the layers that kept activations."""
    return {
        "pagein_bytes": st.pagein_bytes,
        "resident_bytes": st.unit_bytes - st.pagein_bytes,
        "pinned_units": st.pinned_units,
        "pinned_mib": round(st.pinned_bytes / MIB, 1),
        "kept_layers": st.kept_layers,
    }


# ---------------------------------------------------------------------------------------------
# entry point (odyssey train)


def check_plan(store, cfg: TrainConfig, budget: int):
    from odyssey.planner import plan_checked

    return plan_checked(
        store,
        mode=cfg.mode,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        slots=cfg.slots,
        compute_dtype=cfg.compute_dtype,
        lora=cfg.lora if cfg.mode == "lora" else None,
        budget=budget,
        grad_accum=cfg.grad_accum,
        pin=cfg.pin,
        recompute=cfg.recompute,
    )


def train(
    out: str,
    *,
    model: str | None = None,
    data: str | None = None,
    budget=None,
    config_path: str | None = None,
    overrides: list[str] = (),
    resume: bool = False,
    monitor: bool = False,
    guard: bool = True,
    progress: bool = True,
) -> int:
    """`odyssey train`; returns the exit status (0 finished or stopped by request, 3 stopped by the
    guard, 128 + signal after SIGINT/SIGTERM)."""
    from odyssey.distributed import PeerLost, Ranks
    from odyssey.runtime.control import Controller, start_guard, stop_guard

    run, store, data_set, cfg, budget, eff = prepare(out, model, data, budget, config_path, list(overrides), resume)
    plan = check_plan(store, cfg, budget)
    hook = load_hook()
    ranks = Ranks(cfg.dist_timeout_s)  # after every rank checked its inputs: nothing is written before
    main = ranks.is_main
    local = run if main else RunDir(run.root / "ranks" / f"rank-{ranks.rank}")  # status, guard, events
    eff["world_size"] = ranks.world
    if main:
        run.root.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run.config_path, "# effective config written by odyssey train\n" + dump_yaml(eff))
    report = TrainReport(run, local, is_main=main, progress=progress)
    controller = Controller(local, cfg.guard if guard else dataclasses.replace(cfg.guard, enabled=False))
    channel = ControlChannel(controller, ranks, report)
    trainer = Trainer(
        store=store,
        data=data_set,
        run=run,
        cfg=cfg,
        budget=budget,
        ranks=ranks,
        channel=channel,
        report=report,
        hook=hook,
        residency=plan.residency,
    )
    restored = trainer.restore() if resume else None
    if resume and restored is None:
        report(NoCheckpointYet(run.root))
    guard_proc = None
    if guard and cfg.guard.enabled:
        guard_proc = start_guard(os.getpid(), local.root, budget, cfg.guard)
        controller.attach_guard(guard_proc)
    report(
        Started(
            rank=ranks.rank,
            resumed_step=trainer.step if restored else None,
            checkpoint=restored.name if restored else None,
            parameters=store.config.num_parameters(),
            mode=cfg.mode,
            lora_r=cfg.lora.r,
            steps=cfg.steps,
            world_size=ranks.world,
            budget_bytes=budget,
            plan_bytes=plan.total,
            compute=compute_dtype_line(cfg.compute_dtype, store.dtype, store.config),
            residency=plan.residency.summary() if plan.residency is not None else "",
            compiled=getattr(trainer.learner, "compile_note", ""),
        )
    )
    if monitor and main:
        problem = _open_monitor(run)
        if problem:
            report(MonitorUnavailable(problem, run.root))
    old = {
        s: signal.signal(s, lambda signum, frame: channel.on_signal(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    t0 = time.perf_counter()
    code = 0
    peer_lost = False
    try:
        try:
            summary = trainer.fit(cfg.steps)
        except PeerLost as e:
            peer_lost = True
            raise StopRequested(f"another rank was lost ({e})", source="peer") from None
        if main:
            result = trainer.learner.finish(run, step=trainer.step)
            trainer.checkpoint("end of run")
            channel.write_status(trainer.step, "finished", steps_total=cfg.steps)
            report(Finished(trainer.step, result, summary, time.perf_counter() - t0, plan.total, budget))
        ranks.barrier()  # no rank leaves while rank 0 still writes the result
    except StopRequested as stop:
        if hook is not None:
            hook.stopping()
        where = trainer.checkpoint(f"stop: {stop}")
        channel.write_status(trainer.step, "stopped", steps_total=cfg.steps, reason=str(stop))
        if stop.source in ("guard", "peer"):
            code = EXIT_GUARD_STOP
        elif stop.source == "signal":
            code = 128 + (channel.signal_received or signal.SIGTERM)
        report(Stopped(trainer.step, ranks.rank, str(stop), code, where, run.root))
    except BaseException as e:  # a crash: say so in status.json before the traceback
        channel.write_status(trainer.step, "failed", steps_total=cfg.steps, reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        stop_guard(guard_proc)
        trainer.learner.close()
        ranks.close(clean=not peer_lost)
    return code


def _open_monitor(run: RunDir) -> str | None:
    """Starts the monitor window on `run` in its own process; returns why it could not (one line),
    or None. A window that cannot start never stops training."""
    from odyssey.monitor import display_problem, launch_detached

    problem = display_problem()
    if problem:
        return problem
    try:
        launch_detached(run.root)
    except OdysseyError as e:
        return str(e)
    return None
