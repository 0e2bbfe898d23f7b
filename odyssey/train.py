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


@dataclasses.dataclass
class PlanChoice:
    """The plan a run trains by, and the choices made with it."""

    plan: object  # planner.Plan
    spill: object | None  # spill.SpillChoice; None where no layer would be recomputed
    offload: bool  # the AdamW moments wait on disk between steps (offload.py)
    offload_why: str  # that choice in words ("" when the moments stay in RAM by default)
    reads: object | None = None  # readmode.ReadChoice; None where the run pages nothing (no budget)

    @property
    def lines(self) -> list[str]:
        """The spill, offload and page-in choices in words, for the start of a run."""
        spill, reads = (x.why if x is not None else "" for x in (self.spill, self.reads))
        return [x for x in (spill, self.offload_why, reads) if x]


def training_plan(
    store, cfg: TrainConfig, budget: int | None, directory, show=None, runtime: int | None = None
) -> PlanChoice:
    """The plan of a training run, checked (raises OdysseyError as planner.check does), after
    `show(plan, lines)` when given (`odyssey plan` shows a plan that does not fit). Spilling and
    the optimizer offload only replace recompute: the disk is probed for a spill (spill.choose, in
    cfg.spill_dir or `directory`) when some layer would be recomputed, and `optimizer_offload:
    auto` offloads the AdamW moments only when that plan fits where the other does not, or
    recomputes fewer layers (a write and a read of the moments a step bought nothing otherwise).
    `runtime`: the process's own memory for the plan (measured now when None)."""
    from odyssey.config import format_bytes
    from odyssey.dtypes import compute_dtype_name
    from odyssey.offload import offload_possible
    from odyssey.planner import check, plan_for_store
    from odyssey.readmode import choose as choose_reads
    from odyssey.spill import SpillChoice, choose

    lora = cfg.mode == "lora"
    settings = dict(
        mode=cfg.mode,
        batch_size=cfg.batch_size,
        slots=cfg.slots,
        compute_dtype=cfg.compute_dtype,
        lora=cfg.lora if lora else None,
        budget=budget,
        grad_accum=cfg.grad_accum,
        pin=cfg.pin,
        recompute=cfg.recompute,
        runtime=runtime,
    )
    directory = str(cfg.spill_dir or directory)
    L = store.config.num_hidden_layers
    dtype = compute_dtype_name(cfg.compute_dtype, store.dtype, store.config)
    tokens = cfg.seq_len * cfg.batch_size

    def recomputed(p) -> int:
        return 0 if p.residency is None else L - p.residency.kept - p.residency.spilled

    setting = cfg.optimizer_offload if lora and budget is not None else "off"
    spill = None
    tried = []  # (offload, plan), without it first
    for offload in {"off": [False], "on": [True], "auto": [False, True]}[setting]:
        p = plan_for_store(store, seq_len=cfg.seq_len, offload=offload, **settings)
        if lora and spill is None and p.fits and p.residency is not None and p.residency.kept < L:
            spill = choose(
                cfg.spill, directory, store, tokens=tokens, compute=dtype, lora=cfg.lora, recompute=cfg.recompute
            )
        if spill is not None and spill.on:
            p = plan_for_store(store, seq_len=cfg.seq_len, offload=offload, spill=True, **settings)
        tried.append((offload, p))
    # a plan that fits, recomputing the fewest layers; none fits: the smaller, whose error names the
    # smallest budget. Ties: the first, without the offload
    offload, p = min(tried, key=lambda t: (0, recomputed(t[1])) if t[1].fits else (1, t[1].total))
    why = ""
    if setting == "on":
        why = (
            f"optimizer offload: on (optimizer_offload=on): the AdamW moments, {format_bytes(p.offload)}, "
            f"wait in {directory} between steps"
        )
    elif offload and p.fits:  # none fits: the error below says so, with the smaller plan's figures
        first = tried[0][1]
        gain = (
            "lets the plan fit" if not first.fits else f"spares {recomputed(first) - recomputed(p)} layer(s) recompute"
        )
        if not offload_possible(directory):
            offload, p = tried[0]
            why = (
                f"optimizer offload: off (auto: {directory} takes no O_DIRECT files (tmpfs?): "
                "the moments would stay in RAM)"
            )
        else:
            why = (
                f"optimizer offload: on (auto: the AdamW moments, {format_bytes(p.offload)}, wait on disk "
                f"between steps, which {gain}; optimizer_offload=off keeps them in RAM)"
            )
    if spill is not None and spill.on and p.residency is not None and not p.residency.spilled:
        room = format_bytes(p.residency.spill_room)  # the budget has no room for one layer in flight
        spill = SpillChoice(
            False, f"spill: none (one layer's activations in flight need {room} the budget does not have)"
        )
    if spill is not None and spill.on:
        p.residency.spill_dir = spill.directory
    reads = None
    if p.fits and p.residency is not None:
        reads = choose_reads(cfg.direct_io, store, read_bytes=p.residency.read_bytes, tokens=tokens, compute=dtype)
        p.residency.direct = reads.direct
    chosen = PlanChoice(p, spill, offload, why, reads)
    if show is not None:
        show(p, chosen.lines)
    check(
        p, lambda n: plan_for_store(store, seq_len=n, offload=offload, spill=spill is not None and spill.on, **settings)
    )
    return chosen


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
    chosen = training_plan(store, cfg, budget, run.root)
    plan, spill = chosen.plan, chosen.spill
    allocator.hold_freed_pages(None if budget is None else budget - plan.total)  # fewer page faults
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
        offload_dir=str(cfg.spill_dir or run.root) if chosen.offload else None,
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
            offload=chosen.offload_why,
            reads=chosen.reads.why if chosen.reads is not None else "",
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
        trainer.close()
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
