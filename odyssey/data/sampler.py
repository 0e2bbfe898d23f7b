"""Training and eval batches from a prepared data directory: windows of its token files as (x, y).

A split of N tokens holds (N - 1) // T windows of T + 1 tokens with stride T; window w gives
x = tokens[w*T : w*T + T] and y, the same shifted by one. `BatchSampler` streams shuffled,
sharded, resumable batches of them; `eval_batches` is a fixed list in window order.
"""

from __future__ import annotations

import numpy as np

from odyssey.data.tokens import TokenData
from odyssey.errors import OdysseyError


def _num_windows(data: TokenData, split: str, seq_len: int) -> int:
    """Non-overlapping windows of seq_len+1 tokens with stride seq_len (x and its shifted y)."""
    if seq_len < 1:
        raise OdysseyError(f"--seq-len must be >= 1, got {seq_len}")
    n = data.num_tokens(split)
    windows = (n - 1) // seq_len
    if windows == 0:
        raise OdysseyError(
            f"the {split} split of {data.directory} has {n} tokens, too few for one window "
            f"of seq_len + 1 = {seq_len + 1}; use a smaller --seq-len or more data"
        )
    return windows


def _gather(tokens: np.ndarray, windows: np.ndarray, seq_len: int):
    """(B,) window indices -> x, y: (B, T) int64 torch tensors; y[:, t] is the token after x[:, t]."""
    import torch

    buf = np.empty((len(windows), seq_len + 1), dtype=np.int64)  # (B, T+1)
    for row, w in enumerate(windows):
        start = int(w) * seq_len
        buf[row] = tokens[start : start + seq_len + 1]  # one contiguous read from the memory map
    x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
    return x, y


class BatchSampler:
    """Endless, resumable, shardable stream of (x, y) batches from one split.

    Windows w = 0..W-1 cover tokens [w*T, w*T + T + 1). Epoch e visits them in the permutation
    `default_rng([seed, e]).permutation(W)`; rank r of world_size n takes entries r, r+n, r+2n, ...
    of it (disjoint shards), cut to W // n so every rank has the same count. Batches are the next
    B windows of that stream and may span an epoch boundary, so no window is skipped.
    `state_dict()` is (epoch, cursor) plus the settings it is valid for.
    """

    def __init__(
        self,
        data: TokenData,
        split: str,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise OdysseyError(f"--batch-size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise OdysseyError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.data, self.split = data, split
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_windows = _num_windows(data, split, seq_len)
        self.windows_per_epoch = self.num_windows // world_size  # per rank
        if self.windows_per_epoch == 0:
            raise OdysseyError(
                f"the {split} split has {self.num_windows} windows of seq_len {seq_len}, fewer "
                f"than the {world_size} ranks; use a smaller --seq-len or more data"
            )
        self.epoch = 0
        self.cursor = 0  # windows of this epoch's shard already given out
        self._order_epoch, self._order = -1, None

    def _shard(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order = perm[self.rank :: self.world_size][: self.windows_per_epoch]
            self._order_epoch = epoch
        return self._order

    @property
    def batches_per_epoch(self) -> float:
        return self.windows_per_epoch / self.batch_size

    def next_batch(self):
        """x, y: (B, T) int64 tensors; advances the position."""
        picked = []
        need = self.batch_size
        while need:
            shard = self._shard(self.epoch)
            take = shard[self.cursor : self.cursor + need]
            picked.append(take)
            need -= len(take)
            self.cursor += len(take)
            if self.cursor == len(shard):
                self.epoch, self.cursor = self.epoch + 1, 0
        return _gather(self.data.tokens(self.split), np.concatenate(picked), self.seq_len)

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "split": self.split,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (same data, seq_len, seed, rank and world_size)."""
        for key in ("split", "seed", "seq_len", "rank", "world_size", "num_windows"):
            if key in state and state[key] != getattr(self, key):
                raise OdysseyError(
                    f"the saved data position has {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                    f"resume with the same data and settings, or start a new run"
                )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.windows_per_epoch:
            raise OdysseyError(
                f"the saved data position (epoch {epoch}, cursor {cursor}) is out of range "
                f"for {self.windows_per_epoch} windows per epoch; start a new run"
            )
        self.epoch, self.cursor = epoch, cursor


def eval_batches(data: TokenData, seq_len: int, batch_size: int, n: int, split: str = "val") -> list:
    """The first `n` batches of `split` in window order 0, 1, 2, ... (wrapping): a fixed eval set.

    Returns a list of (x, y), each (B, T) int64; the same arguments always give the same tensors.
    """
    windows = _num_windows(data, split, seq_len)
    tokens = data.tokens(split)
    return [_gather(tokens, (np.arange(batch_size) + k * batch_size) % windows, seq_len) for k in range(n)]
