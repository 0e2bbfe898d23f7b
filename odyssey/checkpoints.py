"""Checkpoints of a training run: RUN/checkpoints/step-NNNNNN/, each written whole into a
temporary directory and renamed, so a crash leaves the previous checkpoint or the new one."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from odyssey import atomic
from odyssey.errors import OdysseyError
from odyssey.runtime.runlog import RunDir

if TYPE_CHECKING:
    from odyssey.learners import Learner

CKPT_PREFIX = "step-"
TRAINER_STATE = "trainer.pt"


def checkpoint_dirs(run: RunDir) -> list[Path]:
    """Complete checkpoints, oldest first (a complete one has its trainer state)."""
    d = run.checkpoints_dir
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


@dataclass
class StepState:
    """What a checkpoint needs besides weights and optimizer, taken at the end of a step."""

    step: int
    sampler: dict
    rng: torch.Tensor
    tokens: int


class Checkpoints:
    """RUN/checkpoints/step-NNNNNN/: the learner's weights and TRAINER_STATE (optimizer, step,
    tokens, data position, RNG state, number of ranks, config). A checkpoint is complete once its
    TRAINER_STATE is there; each is written whole into a temporary directory and renamed, and
    only the newest `keep` are kept."""

    def __init__(self, run: RunDir, keep: int):
        self.run, self.keep = run, keep

    def path(self, step: int) -> Path:
        return self.run.checkpoints_dir / f"{CKPT_PREFIX}{step:06d}"

    def is_complete(self, step: int) -> bool:
        return (self.path(step) / TRAINER_STATE).is_file()

    def write(self, done: StepState, learner: Learner, optimizer, *, world_size: int, config: dict) -> int:
        """Writes the checkpoint of step `done.step` (replacing an incomplete leftover of the same
        step), then drops the oldest beyond `keep`. Returns its size in bytes."""
        final = self.path(done.step)
        with atomic.atomic_dir(final) as tmp:
            learner.save(tmp, step=done.step)
            state = {
                "step": done.step,
                "tokens": done.tokens,
                "optimizer": optimizer.state_dict(),
                "world_size": world_size,
                "sampler": done.sampler,
                "rng": done.rng,
                "config": config,
            }
            with atomic.atomic_path(tmp / TRAINER_STATE) as p:
                torch.save(state, p)
        for old in checkpoint_dirs(self.run)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return sum(f.stat().st_size for f in final.rglob("*") if f.is_file())

    def latest(self) -> tuple[Path, dict] | None:
        """The newest complete checkpoint and its trainer state, or None when there is none."""
        ckpts = checkpoint_dirs(self.run)
        if not ckpts:
            return None
        path = ckpts[-1]
        try:
            state = torch.load(path / TRAINER_STATE, weights_only=False)
        except Exception as e:  # a damaged file: say which and what to do
            raise OdysseyError(
                f"checkpoint {path} is unreadable ({type(e).__name__}); remove it to resume from the one before"
            ) from None
        return path, state
