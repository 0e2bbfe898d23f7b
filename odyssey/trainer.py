"""The fit loop of `odyssey train`: `Trainer` runs optimizer steps of a learner (learners.py)
over the data, with evaluation, metrics (RUN/metrics.jsonl), checkpoints and resume; the learning
rate schedule (`lr_at`). train.py sets a run up around it (plan, guard, signals, events).

A checkpoint (`checkpoints.Checkpoints`) holds the weights being trained, the AdamW state, the step,
the data position and the RNG state as they were at the end of that step, so the losses after a
resume equal those of an uninterrupted run. Control requests reach the loop between layers through
its `channel.ControlChannel`; a stop abandons the step in flight (nothing of it has reached the
weights yet).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from odyssey import compiling
from odyssey.channel import ControlChannel
from odyssey.checkpoints import Checkpoints, StepState
from odyssey.config import TrainConfig, to_dict
from odyssey.errors import StopRequested
from odyssey.learners import Learner, make_learner
from odyssey.report import (
    CheckpointWritten,
    CompileFellBack,
    ExamplesPacked,
    FitEnded,
    FitStarted,
    FitSummary,
    StepDone,
    WorldSizeChanged,
)
from odyssey.runtime import allocator
from odyssey.runtime.runlog import RunDir

MIB = 1 << 20


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup to cfg.lr over warmup_steps,
    then cosine decay to min_lr_ratio * lr at the last step."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * frac))


class TrainHook(Protocol):
    """Code run inside the trainer's process, named by ODYSSEY_TRAIN_HOOK (see `load_hook`)."""

    def between_layers(self, step: int) -> None:
        """Runs between layers, before the control channel looks for requests; `step` is the last
        completed step."""

    def stopping(self) -> None:
        """Runs once when the run stops on request, before the stop checkpoint is written."""


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
        offload_dir: str | None = None,
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
        self.moments = None  # offload.MomentsOffload: the AdamW moments on disk between steps
        if offload_dir is not None:
            from odyssey.offload import MomentsOffload

            self.moments = MomentsOffload(self.optimizer, offload_dir)
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

    def close(self) -> None:
        self.learner.close()
        if self.moments is not None:
            self.moments.close()

    # --- resume ---
    def restore(self) -> Path | None:
        """Everything from the newest checkpoint; returns its path, or None when there is none."""
        found = self.checkpoints.latest()
        if found is None:
            return None
        path, state = found
        self.learner.load(path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.moments is not None:
            self.moments.evict()
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
        if self.moments is not None:  # the optimizer's state_dict holds them
            self.moments.load()
        size = self.checkpoints.write(
            done, self.learner, self.optimizer, world_size=self.ranks.world, config=to_dict(self.cfg)
        )
        if self.moments is not None:
            self.moments.evict()
        self.report(CheckpointWritten(done.step, path, reason, size, time.perf_counter() - t0))
        return path

    def _checkpoint_if_due(self) -> None:
        asked = self.channel.take_checkpoint()
        if asked or self.step % self.cfg.checkpoint_every == 0:
            self.checkpoint("requested" if asked else f"every {self.cfg.checkpoint_every} steps")

    # --- one step ---
    def _between(self) -> None:
        """Between layers: freed buffers back to the OS (allocator.release_freed), the hook, then the
        control channel (which may pause or raise a stop)."""
        allocator.release_freed()
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
        if self.moments is not None:
            self.moments.load()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.moments is not None:
            self.moments.evict()
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
            **({"offload_bytes": self.moments.take_stats()} if self.moments is not None else {}),
            steps_total=steps_total,
            tokens=self.tokens,
            world_size=self.ranks.world,
        )

    # --- the loop ---
    def fit(self, steps_total: int) -> FitSummary:
        from odyssey.runtime.memory import process_memory

        lazy = allocator.mode == "lazy"  # RssAnon counts the pages freed lazily: leave them out
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
            if self.moments is not None:
                self.moments.take_stats()
            t0 = time.perf_counter()
            try:
                loss, gnorm = self._step_once()
            except StopRequested:
                self.optimizer.zero_grad(set_to_none=True)
                raise
            step_s = time.perf_counter() - t0
            st = self.learner.take_stats(step_s)
            anon = process_memory(lazy=lazy).held_bytes / MIB
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
    buffers, the layers that kept activations, and those that spilled them to disk (bytes written
    and read back, seconds the compute waited for the disk)."""
    return {
        "pagein_bytes": st.pagein_bytes,
        "resident_bytes": st.unit_bytes - st.pagein_bytes,
        "pinned_units": st.pinned_units,
        "pinned_mib": round(st.pinned_bytes / MIB, 1),
        "kept_layers": st.kept_layers,
        "spilled_layers": st.spilled_layers,
        "spill_bytes": st.spill_bytes,
        "spill_wait_s": round(st.spill_wait_s, 3),
    }
