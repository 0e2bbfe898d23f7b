"""The training loop: data, optimizer, schedule, checkpoints, resume, metrics, control.

One loop serves both modes through a `Learner`:
- `LoraLearner`: the frozen base paged layer by layer through the engine, PEFT LoRA adapters in RAM.
- `FullLearner`: every parameter in RAM (nano, small), ordinary autograd; ends with a new store.

The run directory (runlog.RunDir) is the hub: config.yaml, metrics.jsonl, status.json,
control.json, checkpoints/step-NNNNNN/, adapter/ (or model/ in full mode).

A checkpoint holds the weights being trained, the AdamW state, the step, the data position and the
RNG state as they were at the end of that step; it is written into a temporary directory, synced
and renamed, so a crash leaves the previous checkpoint or the new one. `--resume` restores all of
it, so the losses after a resume equal those of an uninterrupted run.

Control requests (pause, resume, checkpoint, stop) from the monitor or the guard are read between
layers (`_between`): a pause blocks there, a stop abandons the step in flight (nothing of it has
reached the weights yet) and checkpoints the last completed step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from odyssey import atomic
from odyssey.config import TrainConfig, dump_yaml, format_bytes, from_dict, to_dict
from odyssey.errors import OdysseyError, StopRequested
from odyssey.runtime.runlog import RunDir

CKPT_PREFIX = "step-"
TRAINER_STATE = "trainer.pt"
# Effective-config paths that may differ on --resume: they change neither the maths nor the data
# order (a path covers everything below it). The rest must match the run's.
RESUME_FREE = {"model", "data", "ram_budget", "ram_budget_bytes", "world_size", "train.guard", "train.slots",
               "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every", "train.eval_batches",
               "train.dist_timeout_s"}
EXIT_GUARD_STOP = 3
STOP_USER, STOP_SIGNAL, STOP_GUARD = 1, 2, 3  # stop causes, highest wins across ranks


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
# learners


class LoraLearner:
    """Frozen paged base + LoRA adapters (PEFT) in fp32."""

    def __init__(self, store, cfg: TrainConfig, resident: bool = False):
        from odyssey.adapters import inject, lora_parameters
        from odyssey.engine import Engine
        from odyssey.model import LlamaForCausalLM

        self.store, self.cfg = store, cfg
        with torch.device("meta"):
            model = LlamaForCausalLM(store.config)
        inject(model, cfg.lora, seed=cfg.seed)
        self.model = model
        self.named = lora_parameters(model)
        self.engine = Engine(store, compute_dtype=cfg.compute_dtype, slots=cfg.slots, model=model,
                             resident=resident)

    def parameters(self) -> list:
        return list(self.named.values())

    def train(self, flag: bool) -> None:
        self.model.train(flag)

    def step(self, x, y, grad_scale: float, between) -> float:
        return self.engine.train_step(x, y, grad_scale, between)

    def eval_loss(self, x, y) -> float:
        return self.engine.eval_loss(x, y)

    def take_stats(self, seconds: float):
        return self.engine.pass_stats(seconds)

    def save(self, directory: Path, **extra) -> None:
        from odyssey.adapters import save_adapter

        save_adapter(self.model, self.cfg.lora, directory / "adapter", self.store, **extra)

    def load(self, directory: Path) -> None:
        from odyssey.adapters import load_into, read_adapter

        adapter = read_adapter(directory / "adapter")
        adapter.check_base(self.store)
        load_into(self.model, adapter)

    def finish(self, run: RunDir, **extra) -> Path:
        from odyssey.adapters import save_adapter

        return save_adapter(self.model, self.cfg.lora, run.adapter_dir, self.store, **extra)

    def close(self) -> None:
        self.engine.close()


class FullLearner:
    """Every parameter in RAM in fp32 (small models trained from scratch or fully fine-tuned)."""

    def __init__(self, store, cfg: TrainConfig):
        from odyssey.model import LlamaForCausalLM

        self.store, self.cfg = store, cfg
        self.model = LlamaForCausalLM(store.config)
        self._load_state(store.state_dict(torch.float32))
        self._between = None
        for layer in self.model.model.layers:  # control requests between layers, as out-of-core
            layer.register_forward_hook(lambda *a: self._between and self._between())

    def _load_state(self, sd: dict) -> None:
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and self.store.config.tie_word_embeddings)]
        if missing or unexpected:
            raise OdysseyError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected "
                               f"{unexpected[:3]}; resume with the run's own model")

    def parameters(self) -> list:
        return [p for p in self.model.parameters()]

    def train(self, flag: bool) -> None:
        self.model.train(flag)

    def step(self, x, y, grad_scale: float, between) -> float:
        from odyssey.model import causal_lm_loss

        self._between = between
        try:
            loss = causal_lm_loss(self.model(x), y)
            (loss * grad_scale).backward()
        finally:
            self._between = None
        return float(loss)

    @torch.no_grad()
    def eval_loss(self, x, y) -> float:
        from odyssey.model import causal_lm_loss

        return float(causal_lm_loss(self.model(x), y))

    def take_stats(self, seconds: float):
        from odyssey.engine import PassStats

        return PassStats(seconds=seconds)

    def save(self, directory: Path, **extra) -> None:
        from safetensors.torch import save_file

        with atomic.atomic_path(directory / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.model.tied_state_dict().items()}, str(tmp))

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        self._load_state(load_file(str(directory / "model.safetensors")))

    def finish(self, run: RunDir, **extra) -> Path:
        """The trained model as a new store in RUN/model (same format and dtype as the base)."""
        from odyssey.store import StoreWriter
        from odyssey.tokenizer import copy_tokenizer

        out = run.root / "model"
        sd = self.model.tied_state_dict()
        writer = StoreWriter(out, self.store.config, self.store.dtype,
                             journal_key={"source": "odyssey train --mode full", "run": str(run.root)}, force=True)
        for unit in writer.units:
            writer.write_unit(unit, lambda name, shape: sd[name].detach())
        writer.finish()
        if self.store.tokenizer_path():
            copy_tokenizer(self.store.root, out)
        return out

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_dirs(run: RunDir) -> list[Path]:
    """Complete checkpoints, oldest first (a complete one has its trainer state)."""
    d = run.checkpoints_dir
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


@dataclass
class StepState:
    """What a checkpoint needs besides weights and optimizer, taken at the end of a step."""

    step: int
    sampler: dict
    rng: torch.Tensor
    tokens: int


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    def __init__(self, *, store, data, run: RunDir, cfg: TrainConfig, budget: int, progress: bool = True,
                 log=print, ranks=None, local: Optional[RunDir] = None):
        from odyssey.data import BatchSampler, eval_batches
        from odyssey.distributed import Ranks

        self.dist = ranks or Ranks()
        self.store, self.data, self.run, self.cfg = store, data, run, cfg
        self.budget, self.progress, self.log = budget, progress, log
        torch.manual_seed(cfg.seed)
        self.learner = FullLearner(store, cfg) if cfg.mode == "full" else LoraLearner(store, cfg)
        self.params = [p for p in self.learner.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.999), eps=1e-8)
        self.sampler = BatchSampler(data, "train", cfg.seq_len, cfg.batch_size, seed=cfg.seed,
                                    rank=self.dist.rank, world_size=self.dist.world)
        self.val = eval_batches(data, cfg.seq_len, cfg.batch_size, cfg.eval_batches) if cfg.eval_batches else []
        self.step = 0
        self.tokens = 0
        self.last_done: Optional[StepState] = None
        self.controller = None
        self.local = local or run  # this rank's own run directory (status, control, guard); the run on rank 0
        self.state = "running"
        self.want = {"stop": 0, "reason": "", "pause": 0, "checkpoint": 0}  # asked for, not yet done
        self._signal: Optional[int] = None
        self._hog = _TestHog.from_env()

    # --- resume ---
    def restore(self) -> Optional[Path]:
        ckpts = checkpoint_dirs(self.run)
        if not ckpts:
            return None
        path = ckpts[-1]
        try:
            state = torch.load(path / TRAINER_STATE, weights_only=False)
        except Exception as e:  # a damaged file: say which and what to do
            raise OdysseyError(f"checkpoint {path} is unreadable ({type(e).__name__}); remove it to resume "
                               f"from the one before") from None
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
        old_per_epoch = saved["num_windows"] // saved.get("world_size", 1)
        consumed = saved["epoch"] * old_per_epoch + saved["cursor"]
        epoch, cursor = divmod(consumed, s.windows_per_epoch)
        if self.dist.is_main:
            b = self.cfg.batch_size * self.cfg.grad_accum
            self.log(f"resuming a run of {saved.get('world_size', 1)} rank(s) on {s.world_size}: the global batch "
                     f"changes from {saved.get('world_size', 1) * b} to {s.world_size * b} sequences a step and each "
                     f"rank reads another shard of the data, so the steps from here differ from an uninterrupted run")
        return {**saved, "epoch": epoch, "cursor": cursor, "rank": s.rank, "world_size": s.world_size,
                "num_windows": s.num_windows}

    # --- checkpoints ---
    def checkpoint(self, reason: str) -> Optional[Path]:
        s = self.last_done
        if s is None or s.step == 0 or not self.dist.is_main:
            return None
        final = self.run.checkpoints_dir / f"{CKPT_PREFIX}{s.step:06d}"
        if (final / TRAINER_STATE).is_file():
            return final  # this step is already saved
        t0 = time.perf_counter()
        with atomic.atomic_dir(final) as tmp:  # replaces an incomplete leftover of the same step
            self.learner.save(tmp, step=s.step)
            state = {"step": s.step, "tokens": s.tokens, "optimizer": self.optimizer.state_dict(),
                     "world_size": self.dist.world, "sampler": s.sampler, "rng": s.rng, "config": to_dict(self.cfg)}
            with atomic.atomic_path(tmp / TRAINER_STATE) as p:
                torch.save(state, p)
        for old in checkpoint_dirs(self.run)[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
        self.run.append("event", level="info", source="trainer", action="checkpoint", step=s.step,
                        message=f"checkpoint {final.name} written ({reason}; {size / 1e6:.1f} MB in "
                                f"{time.perf_counter() - t0:.1f} s)")
        return final

    # --- control, between layers ---
    def _collect(self) -> None:
        """Signals, the guard's liveness and new control requests into `self.want` (never blocks)."""
        w = self.want
        if self._signal is not None:
            self._stop(STOP_SIGNAL, f"signal {signal.Signals(self._signal).name}")
        if self._hog is not None:
            self._hog.grow(self.step)
        if self.controller is None:
            return
        if self.controller.check_guard() == "stop":
            self._stop(STOP_GUARD, "the guard is gone and guard.on_guard_lost is stop")
        req = self.controller.poll()
        while req is not None:
            action, source = req["action"], req.get("source", "user")
            reason = req.get("reason") or f"{action} requested by {source}"
            if action == "stop":
                self._stop(STOP_GUARD if source == "guard" else STOP_USER, reason)
                self.controller.ack(req, "stopping", self.step)
            elif action == "pause":
                w["pause"], w["pause_req"] = 1, req  # acknowledged once paused
            elif action == "resume":
                w["pause"], w["resume_req"] = 0, req
                if self.state != "paused":
                    self.controller.ack(req, self.state, self.step)
            else:  # checkpoint: written at the end of the step in flight
                w["checkpoint"] = 1
                self.controller.ack(req, self.state, self.step)
            req = self.controller.poll()

    def _stop(self, code: int, reason: str) -> None:
        if code > self.want["stop"]:
            self.want["stop"], self.want["reason"] = code, reason

    def _between(self) -> None:
        self._collect()
        if not self.dist.active:  # distributed ranks act together at the end of the step
            self._act()

    def _act(self) -> None:
        """Apply what was asked: a stop raises StopRequested, a pause blocks until resume or stop.
        Across ranks the flags are combined (any rank's stop or pause holds for all)."""
        stop, pause, self.want["checkpoint"] = self.dist.flags([self.want["stop"], self.want["pause"],
                                                                self.want["checkpoint"]])
        if stop:
            self._raise_stop(stop)
        if not pause:
            return
        self.state = "paused"
        req = self.want.pop("pause_req", None) or {"id": None, "action": "pause"}
        self.controller.ack(req, "paused", self.step)
        self.local.append("event", level="warning", source="trainer", action="paused", step=self.step,
                        message=f"paused by {req.get('source', 'another rank')}"
                                f"{': ' + req['reason'] if req.get('reason') else ''} / 일시정지")
        while pause:
            time.sleep(0.2)
            self._collect()
            stop, pause = self.dist.flags([self.want["stop"], self.want["pause"]])
            if stop:
                self._raise_stop(stop)
        self.state = "running"
        req = self.want.pop("resume_req", None) or {"id": None, "action": "resume"}
        self.controller.ack(req, "running", self.step)
        self.local.append("event", level="info", source="trainer", action="resumed", step=self.step,
                        message=f"resumed by {req.get('source', 'another rank')} / 재개")

    def _raise_stop(self, code: int) -> None:
        reason = self.want["reason"] if self.want["stop"] == code else "stop requested on another rank"
        raise StopRequested(reason, source={STOP_USER: "user", STOP_SIGNAL: "signal", STOP_GUARD: "guard"}[code])

    # --- the loop ---
    def _step_once(self) -> tuple[float, float]:
        cfg = self.cfg
        step = self.step + 1
        lr = lr_at(cfg, step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss = 0.0
        for _ in range(cfg.grad_accum):
            x, y = self.sampler.next_batch()
            loss += self.learner.step(x, y, 1.0 / cfg.grad_accum, self._between) / cfg.grad_accum
        loss = self.dist.average_grads(self.params, loss)
        if self.dist.active:
            self._act()  # the ranks stop, pause or checkpoint together, at the same step
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        self.tokens += cfg.grad_accum * cfg.batch_size * cfg.seq_len * self.dist.world
        self.last_done = StepState(step, self.sampler.state_dict(), torch.get_rng_state(), self.tokens)
        return loss, float(norm)

    def evaluate(self) -> Optional[float]:
        if not self.val or not self.dist.is_main:
            return None
        self.learner.train(False)
        try:
            losses = [self.learner.eval_loss(x, y) for x, y in self.val]
        finally:
            self.learner.train(True)
        v = sum(losses) / len(losses)
        self.run.append("val", step=self.step, val_loss=round(v, 6), batches=len(losses))
        return v

    def fit(self, steps_total: int) -> dict:
        from tqdm import tqdm

        from odyssey.runtime.memory import process_memory

        cfg = self.cfg
        budget_mib = self.budget / (1 << 20)
        first_val = self.evaluate() if (cfg.eval_every and self.step == 0) else None
        last_val = first_val
        bar = tqdm(total=steps_total, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        self.controller.write_status("running", self.step, steps_total=steps_total)
        losses, times = [], []
        self.learner.train(True)
        rss_peak = 0.0
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
            anon = process_memory().anon_bytes / (1 << 20)
            rss_peak = max(rss_peak, anon)
            tps = cfg.grad_accum * cfg.batch_size * cfg.seq_len * self.dist.world / step_s  # all ranks
            if self.dist.active:
                self.run.append("rank", rank=self.dist.rank, pid=os.getpid(), step=self.step, step_s=round(step_s, 4),
                                pagein_mb_s=round(st.pagein_mb_s, 1), stall_s=round(st.stall_s, 4),
                                rss_anon_mib=round(anon, 1), budget_mib=round(budget_mib, 1))
            if not self.dist.is_main:
                bar.update(1)
                continue
            if st.layers:
                self.run.append("pagein", step=self.step, layers=st.layers)
            self.run.append("step", step=self.step, loss=round(loss, 6), lr=lr_at(cfg, self.step),
                            grad_norm=round(gnorm, 6), tokens_per_s=round(tps, 2), step_s=round(step_s, 4),
                            pagein_mb_s=round(st.pagein_mb_s, 1), stall_s=round(st.stall_s, 4),
                            rss_anon_mib=round(anon, 1), budget_mib=round(budget_mib, 1),
                            steps_total=steps_total, tokens=self.tokens, world_size=self.dist.world)
            losses.append(loss)
            times.append(step_s)
            bar.update(1)
            bar.set_postfix_str(f"loss {loss:.3f} | {tps:.0f} tok/s | {st.pagein_mb_s:.0f} MB/s | "
                                f"RSS {anon:.0f} MiB", refresh=False)
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == steps_total):
                last_val = self.evaluate()
            if self.want["checkpoint"] or self.step % cfg.checkpoint_every == 0:
                self.checkpoint("requested" if self.want["checkpoint"] else f"every {cfg.checkpoint_every} steps")
                self.want["checkpoint"] = 0
            self.controller.write_status(self.state, self.step, steps_total=steps_total)
        bar.close()
        return {"steps": len(losses), "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "val_before": first_val, "val_after": last_val,
                "step_s": sorted(times)[len(times) // 2] if times else None,
                "tokens_per_s": (cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.dist.world
                                 / (sum(times) / len(times))) if times else None,
                "rss_peak_mib": rss_peak}


class _TestHog:
    """Test hook (issue: guard): ODYSSEY_TEST_HOG=FROM_STEP:MIB_PER_CALL makes the trainer allocate
    and touch MIB_PER_CALL MiB between layers from step FROM_STEP on, as a leak would."""

    def __init__(self, from_step: int, mib: int):
        self.from_step, self.mib, self.blocks = from_step, mib, []

    @classmethod
    def from_env(cls) -> Optional["_TestHog"]:
        spec = os.environ.get("ODYSSEY_TEST_HOG")
        if not spec:
            return None
        a, b = spec.split(":")
        return cls(int(a), int(b))

    def grow(self, step: int) -> None:
        if step >= self.from_step:
            self.blocks.append(torch.ones(self.mib << 18))  # MiB of fp32 ones, every page touched

    def release(self) -> None:
        self.blocks.clear()


# ---------------------------------------------------------------------------------------------
# entry point (odyssey train)


def _effective(model_dir: Path, data_dir: Path, budget: int, cfg: TrainConfig, store, data) -> dict:
    return {"model": str(model_dir.resolve()), "model_fingerprint": store.fingerprint(),
            "data": str(data_dir.resolve()), "data_tokens": data.num_tokens("train"),
            "ram_budget": format_bytes(budget), "ram_budget_bytes": budget, "train": to_dict(cfg)}


def _diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'path (run A, now B)' for every value that differs, outside RESUME_FREE."""
    out = []
    for k in sorted(set(saved) | set(now)):
        if f"{prefix}{k}" in RESUME_FREE:
            continue
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} (run {a!r}, now {b!r})")
    return out


def _read_run_config(run: RunDir) -> dict:
    import yaml

    try:
        saved = yaml.safe_load(run.config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise OdysseyError(f"{run.config_path} is unreadable ({type(e).__name__}); the run cannot resume, "
                           f"start a new --out") from None
    if not isinstance(saved, dict) or "train" not in saved:
        raise OdysseyError(f"{run.config_path} is not an odyssey run config; start a new --out")
    return saved


def prepare(out: str, model: Optional[str], data_dir: Optional[str], budget: Optional[int],
            config_path: Optional[str], overrides: list[str], resume: bool):
    """Checks everything a user can get wrong before anything is written. Returns
    (run, store, data, cfg, budget, effective config)."""
    from odyssey.config import load_train_config, parse_bytes
    from odyssey.data import TokenData
    from odyssey.store import Store

    run = RunDir(out)
    saved = None
    if resume:
        if not run.config_path.is_file():
            raise OdysseyError(f"--resume: {out} is not a run directory (no config.yaml); drop --resume to start it")
        saved = _read_run_config(run)
        model = model or saved.get("model")
        data_dir = data_dir or saved.get("data")
        budget = budget or saved.get("ram_budget_bytes")
        if config_path is None and not overrides:
            cfg = from_dict(TrainConfig, saved["train"])
        else:
            cfg = load_train_config(config_path, overrides)
    else:
        if run.root.exists() and any(run.root.iterdir()):
            raise OdysseyError(f"run directory {out} already holds a run; pass --resume to continue it or "
                               f"choose a new --out")
        cfg = load_train_config(config_path, overrides)
    if model is None or data_dir is None:
        raise OdysseyError("pass --model STORE and --data DIR (made by `odyssey prepare-data`)")
    if budget is None:
        raise OdysseyError("pass --ram-budget, e.g. --ram-budget 2GiB (see `odyssey plan`)")
    budget = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    store = Store.open(model)
    data = TokenData(data_dir)
    if data.vocab_size > store.config.vocab_size:
        raise OdysseyError(f"the tokenizer of {data_dir} has {data.vocab_size} tokens but the model has "
                           f"{store.config.vocab_size}; prepare the data with the model's tokenizer "
                           f"(`odyssey prepare-data ... --tokenizer {model}`) or a smaller --vocab-size")
    eff = _effective(Path(model), Path(data_dir), budget, cfg, store, data)
    if cfg.mode == "lora":
        from odyssey.adapters import check_targets

        check_targets(cfg.lora.targets)
    if saved is not None:
        diffs = _diff(saved, eff)
        if diffs:
            raise OdysseyError(f"--resume with a different config: {', '.join(diffs[:4])}; resume with the "
                               f"run's settings (in {run.config_path}) or start a new --out")
    return run, store, data, cfg, budget, eff


def check_plan(store, cfg: TrainConfig, budget: int):
    from odyssey.planner import check, plan_for_store

    def replan(seq_len):
        return plan_for_store(store, mode=cfg.mode, seq_len=seq_len, batch_size=cfg.batch_size, slots=cfg.slots,
                              compute_dtype=cfg.compute_dtype, lora=cfg.lora if cfg.mode == "lora" else None,
                              budget=budget)

    p = replan(cfg.seq_len)
    check(p, replan)
    return p


def train(out: str, *, model: Optional[str] = None, data: Optional[str] = None, budget=None,
          config_path: Optional[str] = None, overrides: list[str] = (), resume: bool = False, monitor: bool = False, guard: bool = True, progress: bool = True) -> int:
    """`odyssey train`; returns the exit status (0 finished or stopped by request, 3 stopped by the
    guard, 128 + signal after SIGINT/SIGTERM)."""
    from odyssey.runtime.control import Controller, start_guard, stop_guard

    run, store, data_set, cfg, budget, eff = prepare(out, model, data, budget, config_path, list(overrides), resume)
    plan = check_plan(store, cfg, budget)
    from odyssey.distributed import PeerLost, Ranks

    ranks = Ranks(cfg.dist_timeout_s)  # after every rank checked its inputs: nothing is written before
    main = ranks.is_main
    local = run if main else RunDir(run.root / "ranks" / f"rank-{ranks.rank}")  # status, guard, events
    eff["world_size"] = ranks.world
    if main:
        run.root.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run.config_path, "# effective config written by odyssey train\n" + dump_yaml(eff))
    log = (lambda msg: print(msg, file=sys.stderr)) if main else (lambda msg: None)
    trainer = Trainer(store=store, data=data_set, run=run, cfg=cfg, budget=budget, progress=progress and main,
                      ranks=ranks, log=log, local=local)
    restored = trainer.restore() if resume else None
    controller = Controller(local, cfg.guard if guard else dataclasses.replace(cfg.guard, enabled=False))
    trainer.controller = controller
    if resume and restored is None:
        log(f"--resume: {run.root} has no checkpoint yet; starting from step 0")
    guard_proc = None
    if guard and cfg.guard.enabled:
        guard_proc = start_guard(os.getpid(), local.root, budget, cfg.guard)
        controller.attach_guard(guard_proc)
    what = f"LoRA r={cfg.lora.r}" if cfg.mode == "lora" else "full training"
    on = f", {ranks.world} ranks" if ranks.active else ""
    local.append("event", level="info", source="trainer", rank=ranks.rank, action="start",
                 resumed_from=trainer.step if restored else None,
                 message=(f"{'resumed from ' + restored.name if restored else 'training started'}: "
                          f"{store.config.num_parameters() / 1e9:.3f} B parameters, {what}, {cfg.steps} steps{on}, "
                          f"RAM budget {format_bytes(budget)}, plan {format_bytes(plan.total)}"))
    if monitor and main:
        _open_monitor(run)
    old = {s: signal.signal(s, lambda signum, frame: setattr(trainer, "_signal", signum))
           for s in (signal.SIGINT, signal.SIGTERM)}
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
            adapter = trainer.learner.finish(run, step=trainer.step)
            trainer.checkpoint("end of run")
            controller.write_status("finished", trainer.step, steps_total=cfg.steps)
            run.append("event", level="info", source="trainer", action="finished", step=trainer.step,
                       message=f"finished at step {trainer.step}; result in {adapter}")
            _print_summary(summary, adapter, time.perf_counter() - t0, plan, budget)
        ranks.barrier()  # no rank leaves while rank 0 still writes the result
    except StopRequested as stop:
        if trainer._hog is not None:
            trainer._hog.release()
        where = trainer.checkpoint(f"stop: {stop}")
        controller.write_status("stopped", trainer.step, steps_total=cfg.steps, reason=str(stop))
        if stop.source in ("guard", "peer"):
            code = EXIT_GUARD_STOP
        elif stop.source == "signal":
            code = 128 + (trainer._signal or signal.SIGTERM)
        local.append("event", level="warning" if code else "info", source="trainer", action="stopped",
                     step=trainer.step, rank=ranks.rank,
                     message=f"stopped at step {trainer.step} ({stop}); "
                             f"{'checkpoint ' + where.name if where else 'no checkpoint written by this rank'}")
        if main:
            print(f"\nstopped at step {trainer.step}: {stop}. {'Checkpoint ' + str(where) + '. ' if where else ''}"
                  f"Resume with: odyssey train --out {run.root} --resume", file=sys.stderr)
    except BaseException as e:  # a crash: say so in status.json before the traceback
        controller.write_status("failed", trainer.step, steps_total=cfg.steps, reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        stop_guard(guard_proc)
        trainer.learner.close()
        ranks.close(clean=not peer_lost)
    return code


def _open_monitor(run: RunDir) -> None:
    from odyssey.monitor import display_problem, launch_detached

    problem = display_problem()
    if not problem:
        try:
            launch_detached(run.root)
            return
        except OdysseyError as e:  # a window that cannot start never stops training
            problem = str(e)
    print(f"--monitor: {problem}; training continues without the window "
          f"(attach later with `odyssey monitor {run.root}`)", file=sys.stderr)


def _print_summary(s: dict, result: Path, seconds: float, plan, budget: int) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"trained {s['steps']} steps in {seconds:.1f} s: loss {f(s['first_loss'], '.4f')} -> {f(s['last_loss'], '.4f')}"
          f", val {f(s['val_before'], '.4f')} -> {f(s['val_after'], '.4f')}; median step {f(s['step_s'], '.2f')} s, "
          f"{f(s['tokens_per_s'], '.0f')} tokens/s; peak anonymous RSS {s['rss_peak_mib']:.0f} MiB "
          f"(plan {plan.total / (1 << 20):.0f} MiB, budget {budget / (1 << 20):.0f} MiB); saved {result}")
