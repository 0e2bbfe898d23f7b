"""What the training loop trains, whatever the mode: the `Learner` protocol and its two kinds.

- `LoraLearner`: the frozen base paged layer by layer through the engine, PEFT LoRA adapters in RAM.
- `FullLearner`: every parameter in RAM (nano, small), ordinary autograd; ends with a new store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from odyssey import atomic
from odyssey.config import TrainConfig
from odyssey.errors import OdysseyError
from odyssey.runtime.runlog import RunDir

if TYPE_CHECKING:
    from odyssey.data.sampler import Batch


class Learner(Protocol):
    """What the loop trains, whatever the mode: its weights, a step, an evaluation, and their state
    on disk for checkpoints and the result."""

    def parameters(self) -> list:
        """The weights the optimizer sees (those with requires_grad are trained)."""

    def train(self, flag: bool) -> None:
        """Training mode (dropout on) or evaluation mode."""

    def step(self, batch: Batch, grad_scale: float, between: Callable[[], None] | None) -> float:
        """Forward and backward of one micro-batch (`odyssey.data.Batch`: x, y with IGNORE where not
        trained, positions and segments for packed examples): adds grad_scale * the gradient of
        the mean loss over its trained targets to the parameters' .grad, calls `between()` between
        layers, returns that mean loss (0 when the batch trains no target)."""

    def eval_loss(self, batch: Batch) -> float:
        """The mean loss over the trained targets of one batch, without gradients."""

    def take_stats(self, seconds: float):
        """The page-in figures (engine.PassStats) since the last call, which resets them."""

    def save(self, directory: Path, **extra) -> None:
        """The weights being trained into a checkpoint directory."""

    def load(self, directory: Path) -> None:
        """The weights being trained, back from a checkpoint directory."""

    def finish(self, run: RunDir, **extra) -> Path:
        """The run's result (RUN/adapter, RUN/model); returns its path."""

    def close(self) -> None:
        """Releases what the learner holds (the pager's buffers and thread)."""


class LoraLearner:
    """Frozen paged base + LoRA adapters (PEFT) in fp32. A `Learner`."""

    def __init__(self, store, cfg: TrainConfig, resident: bool = False, residency=None):
        from odyssey.adapters import inject, lora_parameters
        from odyssey.engine import Engine
        from odyssey.model import LlamaForCausalLM

        self.store, self.cfg = store, cfg
        with torch.device("meta"):
            model = LlamaForCausalLM(store.config)
        inject(model, cfg.lora, seed=cfg.seed)
        self.model = model
        self.named = lora_parameters(model)
        from odyssey.compiling import choose

        choice = choose(cfg.compile)
        self.compiled, self.compile_note = choice.on, choice.why
        self.engine = Engine(
            store,
            compute_dtype=cfg.compute_dtype,
            slots=cfg.slots,
            model=model,
            resident=resident,
            compile_layers=choice.on,
            **(residency.engine_kwargs(store) if residency is not None else {}),
        )

    def parameters(self) -> list:
        return list(self.named.values())

    def train(self, flag: bool) -> None:
        self.model.train(flag)

    def step(self, batch: Batch, grad_scale: float, between) -> float:
        return self.engine.train_step(batch.x, batch.y, grad_scale, between, batch.positions, batch.segments)

    def eval_loss(self, batch: Batch) -> float:
        return self.engine.eval_loss(batch.x, batch.y, batch.positions, batch.segments)

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
    """Every parameter in RAM in fp32 (small models trained from scratch or fully fine-tuned). A `Learner`."""

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
            raise OdysseyError(
                f"checkpoint does not match the model: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}; resume with the run's own model"
            )

    def parameters(self) -> list:
        return [p for p in self.model.parameters()]

    def train(self, flag: bool) -> None:
        self.model.train(flag)

    def step(self, batch: Batch, grad_scale: float, between) -> float:
        from odyssey.model import causal_lm_loss

        self._between = between
        try:
            logits = self.model(batch.x, positions=batch.positions, segments=batch.segments)
            loss = causal_lm_loss(logits, batch.y)
            (loss * grad_scale).backward()
        finally:
            self._between = None
        return float(loss.detach())  # float() of a tensor that requires grad warns on every step

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        from odyssey.model import causal_lm_loss

        return float(causal_lm_loss(self.model(batch.x, positions=batch.positions, segments=batch.segments), batch.y))

    def take_stats(self, seconds: float):
        from odyssey.pager import PassStats

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
        writer = StoreWriter(
            out,
            self.store.config,
            self.store.dtype,
            journal_key={"source": "odyssey train --mode full", "run": str(run.root)},
            force=True,
        )
        for unit in writer.units:
            writer.write_unit(unit, lambda name, shape: sd[name].detach())
        writer.finish()
        if self.store.tokenizer_path():
            from odyssey.store import tokenizer_dir

            copy_tokenizer(tokenizer_dir(self.store), out)
        return out

    def close(self) -> None:
        pass


def make_learner(store, cfg: TrainConfig, residency=None) -> Learner:
    """The learner for cfg.mode: "full" trains every parameter in RAM, "lora" adapters on the paged
    base, with the plan's residency (residency.Residency: pinned units, layers keeping activations)."""
    return FullLearner(store, cfg) if cfg.mode == "full" else LoraLearner(store, cfg, residency=residency)
