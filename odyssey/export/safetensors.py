"""Export to a Hugging Face checkpoint directory: what `AutoModelForCausalLM.from_pretrained` loads
with the family's own class (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, Gemma3ForCausalLM).

```
DIR/config.json                       the store's: the family's architecture, model_type and every
                                      key of the source checkpoint (ModelConfig.to_hf_dict)
DIR/model.safetensors                 all tensors, when they fit in one shard; else
DIR/model-0000k-of-0000n.safetensors  consecutive units packed up to `max_shard_bytes` each (every
                                      tensor of the family: biases, q/k norms, Gemma's extra norms)
DIR/model.safetensors.index.json      {"metadata": {"total_size"}, "weight_map": {name: file}}
DIR/tokenizer.json ...                the store's tokenizer files, when it has them
```
Unlike the store's shards, headers are padded to 8 bytes only (the safetensors default) and the
index carries no Odyssey metadata: a plain checkpoint for other tools.

Streaming: one unit's tensors resident at a time. The directory is built under a temporary name
beside DIR and renamed into place when complete, so DIR is either absent, the old export, or the
whole new one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from odyssey import atomic
from odyssey.dtypes import DTYPES, numel
from odyssey.export import stream_tensors
from odyssey.export.chat import copy_tokenizer_and_template
from odyssey.store import INDEX_NAME, build_header, shard_name, tokenizer_dir, unit_shapes
from odyssey.tokenizer import tokenizer_files

DEFAULT_MAX_SHARD_BYTES = 2 << 30  # bytes; HF's save_pretrained default is 5 GB, smaller eases copying
HEADER_ALIGN = 8  # bytes: the safetensors default


def plan_shards(source, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[list]:
    """Consecutive units grouped so each group's tensor bytes stay under `max_shard_bytes` (a unit
    larger than that gets a shard of its own). -> [[unit, ...], ...]"""
    groups, size = [[]], 0
    for unit in source.units:
        b = unit_tensor_bytes(source, unit)
        if groups[-1] and size + b > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += b
    return groups


def unit_tensor_bytes(source, unit) -> int:
    per = DTYPES[source.dtype].itemsize
    return sum(numel(s) * per for s in unit_shapes(source.config, unit).values())


def estimate_bytes(source) -> int:
    """Bytes the export will take: tensors, headers (a few KiB per shard), config and tokenizer."""
    tok = sum(p.stat().st_size for p in tokenizer_files(tokenizer_dir(source)))
    return sum(unit_tensor_bytes(source, u) for u in source.units) + 64 * 1024 * len(source.units) + tok


def shard_file_name(k: int, n: int) -> str:
    return "model.safetensors" if n == 1 else shard_name(k, n)


def _write_shard(path: Path, source, units: list, on_bytes: Callable[[int], None]) -> dict[str, str]:
    """Writes one shard file (atomically) holding `units`; returns {tensor name: file name}."""
    import torch

    st, dt = DTYPES[source.dtype].st, DTYPES[source.dtype].torch()
    entries = [(name, st, shape) for u in units for name, shape in unit_shapes(source.config, u).items()]
    header, _ = build_header(entries, metadata={"format": "pt"}, align=HEADER_ALIGN)
    with atomic.atomic_open(path, "wb") as f:
        f.write(header)
        for t in stream_tensors(source, units, dt):  # header order
            f.write(memoryview(t.view(torch.uint8).numpy()).cast("B"))
            on_bytes(t.nbytes)
            del t
    return {name: path.name for name, _, _ in entries}


def write_safetensors(
    source, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True
) -> dict:
    """Writes the HF checkpoint directory `out_dir` from `source` (a Store or MergedSource).
    Returns {"path", "bytes", "seconds", "files"}."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    groups = plan_shards(source, max_shard_bytes)
    total = sum(unit_tensor_bytes(source, u) for u in source.units)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="safetensors", disable=not progress)
    with bar, atomic.atomic_dir(out_dir) as tmp:
        atomic.write_json(tmp / "config.json", source.config.to_hf_dict(DTYPES[source.dtype].hf_name))
        weight_map: dict[str, str] = {}
        for k, units in enumerate(groups):
            weight_map.update(_write_shard(tmp / shard_file_name(k, len(groups)), source, units, bar.update))
        if len(groups) > 1:
            atomic.write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        copy_tokenizer_and_template(tokenizer_dir(source), tmp, source.config.vocab_size)
        files = sorted(p.name for p in tmp.iterdir())
    size = sum((out_dir / f).stat().st_size for f in files)
    return {"path": str(out_dir), "bytes": size, "seconds": time.perf_counter() - t0, "files": files}
