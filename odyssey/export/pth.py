"""Export to a `.pth` file: the state dict (HF names) exactly as `torch.save` writes it, streamed.

`torch.save(state_dict, f)` needs every tensor in memory at once. This writer produces the same
file one tensor at a time, so at most one unit is resident:

- The file is torch's zip format (`torch._C.PyTorchFileWriter`, the writer `torch.save` itself
  uses): records `data.pkl`, `.format_version`, `.storage_alignment`, `byteorder`, then
  `data/0`, `data/1`, ... (one storage per tensor, each aligned to 64 bytes, CRC32 as torch.save
  does), then `version` and `.data/serialization_id` written by `write_end_of_file`.
- `data.pkl` only needs names, dtypes and shapes, which the config gives before any weight is
  read: it is pickled from placeholders that reduce the way a tensor does
  (`torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())`, the storage
  a persistent id `("storage", torch.BFloat16Storage, key, "cpu", numel)`). A test checks the
  bytes equal `torch.save`'s for the same state dict.

`torch.load(path, mmap=True, weights_only=True)` then maps it without copying.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import time
from pathlib import Path

from odyssey import atomic
from odyssey.dtypes import DTYPES, numel
from odyssey.export import stream_tensors
from odyssey.store import unit_shapes

PICKLE_PROTOCOL = 2  # torch.serialization.DEFAULT_PROTOCOL
ZIP_OVERHEAD = 256  # bytes per record, upper bound: local header, name, 64-byte alignment padding


class _StorageRef:
    """Stands for the storage `data/<key>` while pickling (turned into a persistent id)."""

    def __init__(self, key: str, dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles like a contiguous CPU tensor of `shape` over `storage`, without any data."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        import torch

        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, self.shape, contiguous_stride(self.shape), False, collections.OrderedDict()),
        )


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


def _storage_class(dtype):
    """The typed storage class torch.save's pickle names for tensors of torch `dtype`."""
    import torch

    return {d.torch(): getattr(torch, d.torch_storage) for d in DTYPES.values()}[dtype]


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", _storage_class(obj.dtype), obj.key, "cpu", obj.numel)
        return None


def state_dict_pickle(entries: list[tuple[str, object, tuple[int, ...]]]) -> bytes:
    """[(name, torch dtype, shape)] -> the `data.pkl` torch.save writes for {name: tensor}, the
    i-th tensor in storage `data/i`."""
    refs = {
        name: _TensorRef(_StorageRef(str(i), dt, numel(shape)), shape) for i, (name, dt, shape) in enumerate(entries)
    }
    buf = io.BytesIO()
    _Pickler(buf, protocol=PICKLE_PROTOCOL).dump(refs)
    return buf.getvalue()


def estimate_bytes(source) -> int:
    per = DTYPES[source.dtype].itemsize
    shapes = source.config.all_shapes()
    return (
        sum(numel(s) * per for s in shapes.values()) + ZIP_OVERHEAD * (len(shapes) + 8) + 64 * len(shapes) + (1 << 20)
    )


def write_pth(source, path: str | os.PathLike, progress: bool = True) -> dict:
    """Writes `path` from `source` (a Store or MergedSource), one unit resident at a time.
    Returns {"path", "bytes", "seconds", "tensors"}."""
    import torch
    from torch.serialization import get_crc32_options
    from tqdm import tqdm

    path = Path(path)
    t0 = time.perf_counter()
    dt = DTYPES[source.dtype].torch()
    entries = [(name, dt, shape) for u in source.units for name, shape in unit_shapes(source.config, u).items()]
    pkl = state_dict_pickle(entries)
    total = sum(numel(s) * dt.itemsize for _, _, s in entries)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="pth", disable=not progress)
    with bar, atomic.atomic_open(path, "wb") as f:
        # A file object (not a name) makes the archive's inner folder "archive", as torch.save(obj, f).
        zw = torch._C.PyTorchFileWriter(f, get_crc32_options(), _storage_alignment())
        try:
            _write_records(zw, source, pkl, dt, bar)
        finally:
            # Also on error: the writer's destructor would otherwise finish the zip into a closed
            # file and abort the process. The temporary file is deleted by atomic_open then.
            zw.write_end_of_file()
            del zw
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "seconds": time.perf_counter() - t0,
        "tensors": len(entries),
    }


def _storage_alignment() -> int:
    import torch.utils.serialization

    return int(torch.utils.serialization.config.save.storage_alignment)  # bytes, 64 by default


def _write_records(zw, source, pkl: bytes, dt, bar) -> None:
    """The records torch.save writes, in its order; tensor data one unit at a time."""
    zw.write_record("data.pkl", pkl, len(pkl))
    zw.write_record(".format_version", "1", 1)
    align = str(_storage_alignment())
    zw.write_record(".storage_alignment", align, len(align))
    zw.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    key = 0  # data/<key>: the pickle's order. Not enumerate(): its cached result tuple would keep
    for t in stream_tensors(source, source.units, dt):  # the last tensor alive into the next unit's load
        t = _own_storage(t)
        zw.write_record(f"data/{key}", t.untyped_storage(), t.nbytes)
        bar.update(t.nbytes)
        key += 1
        del t


def _own_storage(t):
    """`t` (contiguous) with a storage holding exactly its bytes (torch.save writes whole storages)."""
    if t.storage_offset() or t.untyped_storage().nbytes() != t.nbytes:
        t = t.clone()
    return t
