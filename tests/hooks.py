"""Hooks that tests run inside a real `odyssey train` process (see odyssey.train.load_hook):

    ODYSSEY_TRAIN_HOOK=tests.hooks:hog ODYSSEY_TEST_HOG=FROM_STEP:MIB_PER_CALL odyssey train ...

makes the trainer allocate and touch MIB_PER_CALL MiB between layers from step FROM_STEP on, as a
leak would, and let it go when the run stops (before the stop checkpoint). The trainer's process
imports this module: run it from the checkout's root (tests/ is importable from there).
"""

from __future__ import annotations

import os

HOG_ENV = "ODYSSEY_TEST_HOG"


class Hog:
    """A leak between layers, from step `from_step` on: `mib` MiB a call."""

    def __init__(self, from_step: int, mib: int):
        import torch  # here, not at the top: the tests import this module for `env` alone

        self.from_step, self.mib, self.blocks = from_step, mib, []
        self._ones = torch.ones

    def between_layers(self, step: int) -> None:
        if step >= self.from_step:
            self.blocks.append(self._ones(self.mib << 18))  # MiB of fp32 ones, every page touched

    def stopping(self) -> None:
        self.blocks.clear()


def hog() -> Hog:
    """The Hog that ODYSSEY_TEST_HOG=FROM_STEP:MIB_PER_CALL describes."""
    a, b = os.environ[HOG_ENV].split(":")
    return Hog(int(a), int(b))


def env(spec: str) -> dict:
    """The environment variables that run the hog in `odyssey train` (spec FROM_STEP:MIB_PER_CALL)."""
    return {"ODYSSEY_TRAIN_HOOK": "tests.hooks:hog", HOG_ENV: spec}
