"""`odyssey train`: a run set up around the fit loop (trainer.py `Trainer`), which serves both
modes through a `Learner` (learners.py):
- `LoraLearner`: the frozen base paged layer by layer through the engine, PEFT LoRA adapters in RAM.
- `FullLearner`: every parameter in RAM (nano, small), ordinary autograd; ends with a new store.

Here: the run's inputs checked and its effective config written (runsetup.py), the memory plan
checked against the budget, the ranks, the guard process, signals, a test hook, and the events of
start and end.

The run directory (runlog.RunDir) is the hub: config.yaml, metrics.jsonl, status.json,
control.json, checkpoints/step-NNNNNN/, adapter/ (or model/ in full mode).

A checkpoint (`checkpoints.Checkpoints`) is written into a temporary directory, synced and renamed,
so a crash leaves the previous checkpoint or the new one; `--resume` restores all of it.

Control requests (pause, resume, checkpoint, stop) from the monitor, the guard or a signal reach
the loop through its `channel.ControlChannel`, between layers: a pause blocks there, a stop
abandons the step in flight (nothing of it has reached the weights yet) and checkpoints the last
completed step. What happens is told as typed events (report.py), which `report.TrainReport`
words for the run directory's log and the terminal.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import time

from odyssey import atomic
from odyssey.channel import ControlChannel
from odyssey.config import TrainConfig, dump_yaml
from odyssey.dtypes import compute_dtype_line
from odyssey.errors import OdysseyError, StopRequested
from odyssey.report import (
    Finished,
    MonitorUnavailable,
    NoCheckpointYet,
    Started,
    Stopped,
    TrainReport,
)
from odyssey.runsetup import prepare
from odyssey.runtime.runlog import RunDir
from odyssey.trainer import Trainer, TrainHook

EXIT_GUARD_STOP = 3
MIB = 1 << 20
HOOK_ENV = "ODYSSEY_TRAIN_HOOK"
"""`module:factory` naming a `TrainHook` factory (see `load_hook`)."""


# ---------------------------------------------------------------------------------------------
# a hook point for tests and diagnostics


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
# entry point (odyssey train)


def check_plan(store, cfg: TrainConfig, budget: int, spill=None):
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
        spill=spill is not None and spill.on,
    )


def choose_spill(store, cfg: TrainConfig, run_root):
    """Whether this run spills activations, and where (spill.choose; LoRA only)."""
    from odyssey.dtypes import compute_dtype_name
    from odyssey.spill import SpillChoice, choose

    if cfg.mode != "lora":
        return SpillChoice(False, "")
    return choose(
        cfg.spill,
        cfg.spill_dir or run_root,
        store,
        tokens=cfg.seq_len * cfg.batch_size,
        compute=compute_dtype_name(cfg.compute_dtype, store.dtype, store.config),
        lora=cfg.lora,
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
    from odyssey.runtime import allocator
    from odyssey.runtime.control import Controller, start_guard, stop_guard

    run, store, data_set, cfg, budget, eff = prepare(out, model, data, budget, config_path, list(overrides), resume)
    plan = check_plan(store, cfg, budget)  # fits without spilling: spilling only replaces recompute
    spill = (
        choose_spill(store, cfg, run.root)
        if plan.residency is not None and plan.residency.kept < store.config.num_hidden_layers
        else None
    )
    if spill is not None and spill.on:
        plan = check_plan(store, cfg, budget, spill)
        plan.residency.spill_dir = spill.directory
        if not plan.residency.spilled:  # the budget has no room for one layer in flight
            from odyssey.config import format_bytes
            from odyssey.spill import SpillChoice

            room = format_bytes(plan.residency.spill_room)
            spill = SpillChoice(
                False, f"spill: none (one layer's activations in flight need {room} the budget does not have)"
            )
    allocator.keep_freed_pages(None if budget is None else budget - plan.total)  # fewer page faults
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
            spill=spill.why if spill is not None else "",
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
