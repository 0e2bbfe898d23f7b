"""GGUF LoRA export: a PEFT adapter (odyssey/adapters.py) -> one llama.cpp LoRA adapter file, to run
on the base's own GGUF (`llama-cli -m base.gguf --lora adapter.gguf`, llama-cpp-python's
`Llama(model_path=base, lora_path=adapter)`) without merging.

What llama.cpp's loader (`src/llama-adapter.cpp`, llama_adapter_lora_init_impl) checks, and what
this writer therefore writes:
```
general.type          "adapter"
general.architecture  the base's llama.cpp architecture (gguf_layout.ARCHS): must equal the model's
adapter.type          "lora"
adapter.lora.alpha    f32; the loader scales by alpha / r, r read from lora_b's shape
blk.N.<name>.weight.lora_a   PEFT's A (r, in)   ggml ne [in, r]   ne[0] == base ne[0] (in)
blk.N.<name>.weight.lora_b   PEFT's B (out, r)  ggml ne [r, out]  ne[1] == base ne[1] (out)
```
<name> is the base tensor's (attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down:
`gguf_layout.gguf_name`), so every pair finds its base tensor by name; a pair missing either half,
or naming a tensor the base lacks, makes llama.cpp refuse the whole file.

The base export permutes q_proj/k_proj rows for the llama architecture (`gguf_layout.permute_qk`:
llama.cpp rotates adjacent pairs, HF rotates halves). The delta B @ A must land on the same rows,
and permuting the rows of B @ A is permuting the rows of B: lora_b of q and k gets the same
permutation (query heads for q, KV heads for k), lora_a none, as llama.cpp's own
convert_lora_to_gguf.py does. Architectures that take q/k as HF does (qwen2, qwen3, gemma3) get
the pairs as they are.

Refused before a byte is written (one line each): a type other than f32/f16; an adapter whose
config lacks r or lora_alpha (read_adapter would assume PEFT's defaults; a GGUF adapter states its
scale); DoRA or per-module alpha (llama.cpp computes plain W + alpha / r * B A); LoRA on lm_head
or the embeddings (this export writes decoder projections only); an adapter for another base
(`AdapterFile.check_base`); a base llama.cpp cannot compute (`gguf_layout.layout`'s refusal).
rsLoRA's scale alpha / sqrt(r) is kept by writing alpha = scale * r.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from odyssey import atomic
from odyssey.errors import OdysseyError

ADAPTER_TYPES = ("f32", "f16")
DEFAULT_TYPE = "f32"  # adapters are small: a few MB in f32 for a 1B model at r=16
HEADER_SLACK_BYTES = 64 << 10  # key-values and tensor infos: ~100 bytes per tensor
_REFUSED_MODULES = ("lm_head", "embed_tokens", "embed", "wte", "tok_embeddings")


def check_adapter_type(gguf_type: str) -> None:
    if gguf_type not in ADAPTER_TYPES:
        raise OdysseyError(
            f"--gguf-type for --formats gguf-lora must be f32 or f16 (an adapter is small; llama.cpp "
            f"applies it at f32 or f16), got {gguf_type!r}"
        )


def output_name(gguf_type: str) -> str:
    return f"adapter-{gguf_type}.gguf"


def check_adapter_file(adapter_dir) -> None:
    """What a GGUF adapter needs beyond what `read_adapter` checks, read from adapter_config.json
    and the weights' names only (before the weights are loaded): r and lora_alpha stated, plain
    LoRA, decoder projections only."""
    from safetensors import SafetensorError, safe_open

    from odyssey.adapters import CONFIG_NAME, WEIGHTS_NAME, read_adapter

    path = Path(adapter_dir)
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        read_adapter(path)  # the one-line refusal for a missing or unreadable adapter
        raise
    if not isinstance(cfg, dict):
        read_adapter(path)
        raise OdysseyError(f"{path / CONFIG_NAME} must hold a JSON object; re-save the adapter")
    missing = [k for k in ("r", "lora_alpha") if cfg.get(k) is None]
    if missing:
        raise OdysseyError(
            f"{path / CONFIG_NAME} has no {' and no '.join(missing)}: a GGUF adapter states its scale "
            f"(alpha / r); add the values it was trained with, or export the run's own RUN/adapter"
        )
    if cfg.get("use_dora"):
        raise OdysseyError(
            f"{path} is a DoRA adapter, which llama.cpp cannot apply (it adds alpha / r * B A only); "
            f"merge it instead: `odyssey export --adapter {path} --formats gguf`"
        )
    if cfg.get("alpha_pattern") or cfg.get("rank_pattern"):
        raise OdysseyError(
            f"{path / CONFIG_NAME} sets a per-module alpha_pattern/rank_pattern, but a GGUF adapter has "
            f"one alpha for all modules; merge it instead: `odyssey export --adapter {path} --formats gguf`"
        )
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    try:
        with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError):
        read_adapter(path)  # its one-line refusal for damaged weights
        raise
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys if ".lora_" in k}
    if any("lora_embedding" in k for k in keys):
        modules.add("embed_tokens")
    head = [m for m in (*targets, *sorted(modules)) if m in _REFUSED_MODULES]
    if head:
        raise OdysseyError(
            f"adapter {path} targets {head[0]}; a GGUF LoRA adapter here carries the decoder "
            f"projections (q k v o gate up down) only: merge it instead "
            f"(`odyssey export --adapter {path} --formats gguf`) or train without {head[0]}"
        )


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor of the adapter file, declared before any data is written."""

    name: str  # blk.N.<name>.weight.lora_a | .lora_b
    module: str  # HF module, "model.layers.N.self_attn.q_proj"
    part: int  # 0: A (r, in), 1: B (out, r)
    shape: tuple[int, int]  # numpy order (PEFT's); ggml's ne is reversed
    heads: int  # rows of B permuted per this many heads (0: as is)


def plan_adapter(store, adapter) -> tuple[object, list[AdapterTensor]]:
    """(llama.cpp Arch, tensors in write order: layer by layer, the base's module order, A then B).
    Refuses an adapter for another base and a base llama.cpp cannot compute."""
    from odyssey.export.gguf_layout import gguf_name, layout

    cfg = store.config
    adapter.check_base(store)
    arch = layout(cfg).arch  # the base export's refusal, by name
    order = {name: i for i, name in enumerate(cfg.all_shapes())}
    pairs = sorted(adapter.pairs.items(), key=lambda kv: order.get(f"{kv[0]}.weight", len(order)))
    plan = []
    for module, (A, B) in pairs:
        if not module.startswith("model.layers."):  # read_adapter's pairs; check_adapter_file names these
            raise OdysseyError(
                f"adapter {adapter.path} has LoRA on {module}; a GGUF LoRA adapter carries decoder "
                f"projections only: merge it instead (`odyssey export --adapter ... --formats gguf`)"
            )
        base = gguf_name(f"{module}.weight", cfg.family)
        heads = 0
        if arch.permute_qk and module.endswith("self_attn.q_proj"):
            heads = cfg.num_attention_heads
        elif arch.permute_qk and module.endswith("self_attn.k_proj"):
            heads = cfg.num_key_value_heads
        plan.append(AdapterTensor(f"{base}.lora_a", module, 0, tuple(A.shape), 0))
        plan.append(AdapterTensor(f"{base}.lora_b", module, 1, tuple(B.shape), heads))
    return arch, plan


def gguf_alpha(adapter) -> float:
    """The alpha llama.cpp needs to scale by the adapter's own scale (it computes alpha / r)."""
    return float(adapter.alpha) if math.isclose(adapter.scale, adapter.alpha / adapter.r) else adapter.scale * adapter.r


def _np_dtype(gguf_type: str):
    return np.float32 if gguf_type == "f32" else np.float16


def _tensor_bytes(plan: list[AdapterTensor], gguf_type: str) -> int:
    item = np.dtype(_np_dtype(gguf_type)).itemsize
    return sum(-(-t.shape[0] * t.shape[1] * item // 32) * 32 for t in plan)  # 32-byte aligned


def adapter_bytes(source, gguf_type: str) -> int:
    """Checks what `write_gguf_lora` would refuse and returns an upper bound of the file size."""
    check_adapter_type(gguf_type)
    _, plan = plan_adapter(source.store, source.adapter)
    return _tensor_bytes(plan, gguf_type) + HEADER_SLACK_BYTES


def tensor_data(adapter, t: AdapterTensor, gguf_type: str) -> np.ndarray:
    """The array written for `t`: PEFT's A or B (fp32), B's q/k rows permuted, cast."""
    from odyssey.export.gguf_layout import permute_qk

    w = adapter.pairs[t.module][t.part].float()
    if t.heads:
        w = permute_qk(w, t.heads)
    return np.ascontiguousarray(w.numpy().astype(_np_dtype(gguf_type)))


def write_gguf_lora(source, path, gguf_type: str = DEFAULT_TYPE, progress: bool = True) -> dict:
    """Write `source.adapter` (an AdapterFile) for `source.store` (its base; `source` is the
    export's MergedSource) as a llama.cpp LoRA adapter GGUF at `path`, under a temporary name
    renamed when complete. Returns {"path", "gguf_type", "bytes", "tensors", "alpha", "seconds",
    "mb_s"}."""
    import gguf
    from tqdm import tqdm

    t0 = time.perf_counter()
    check_adapter_type(gguf_type)
    store, adapter = source.store, source.adapter
    arch, plan = plan_adapter(store, adapter)
    path = Path(path)
    alpha = gguf_alpha(adapter)

    writer = gguf.GGUFWriter(None, arch.name)  # general.architecture
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(f"{Path(store.root).name} LoRA")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32 if gguf_type == "f32" else gguf.LlamaFileType.MOSTLY_F16))
    dtype = np.dtype(_np_dtype(gguf_type))
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, dtype, t.shape[0] * t.shape[1] * dtype.itemsize)
    total = sum(t.shape[0] * t.shape[1] * dtype.itemsize for t in plan)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"gguf-lora {gguf_type}", disable=not progress)
    try:
        with atomic.atomic_path(path) as tmp:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in plan:
                data = tensor_data(adapter, t, gguf_type)
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
            writer.close()
    finally:
        writer.close()
        bar.close()
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    return {
        "path": str(path),
        "gguf_type": gguf_type,
        "bytes": size,
        "tensors": len(plan),
        "alpha": alpha,
        "seconds": seconds,
        "mb_s": size / 1e6 / max(seconds, 1e-9),
    }
