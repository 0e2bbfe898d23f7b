"""GGUF export: a store (or anything with its reading API) -> one `.gguf` file that llama.cpp loads.
This module writes the file; `gguf_layout` holds the architecture, names and tensor plan per family,
`gguf_vocab` the tokenizer.

Written with the `gguf` package, streamed: every tensor's info (name, shape, type) is declared
first, then the header, key-values and tensor infos go out, then the tensor data one unit
(embedding, decoder layer, head) at a time, so the process holds one unit plus one converted
tensor, never the model. The file is written under a temporary name and renamed when complete
(`odyssey.atomic.atomic_path`).

Each family goes into llama.cpp's architecture for it (`Family.gguf_arch`, `ARCHS`), as
llama.cpp's convert_hf_to_gguf.py writes it (LlamaModel, Qwen2Model, Qwen3Model, Gemma3Model):
```
family          architecture  q/k rows    other tensors (blk.N.)                  keys ({arch}.)
llama, mistral  llama         permuted    biases; rope_freqs.weight (Llama 3)     rope.scaling.* (linear)
qwen2           qwen2         as HF       attn_{q,k,v}.bias                       -
qwen3           qwen3         as HF       attn_{q,k}_norm                         -
gemma3          gemma3        as HF       attn_{q,k}_norm, post_attention_norm,   attention.sliding_window,
                                          ffn_norm (pre_feedforward_layernorm),   rope.freq_base_swa,
                                          post_ffw_norm; every norm as 1 + w      [sliding_window_pattern]
```
What llama.cpp needs that a Hugging Face checkpoint does not say the same way:
- tensor names: `token_embd`, `blk.N.attn_q` ..., `output_norm`, `output` (absent when the head
  is tied: llama.cpp then reuses `token_embd`);
- Q/K rows permuted for the llama architecture: HF rotates the two halves of each head
  (`rotate_half`), llama.cpp's llama graph rotates adjacent pairs, so the rows of q_proj/k_proj
  (and their biases) are reordered per head (`permute_qk`); position 0 is unaffected, later
  positions drift without it. qwen2, qwen3 and gemma3 rotate halves (NEOX) like HF;
- Gemma's RMSNorm scales by (1 + w), llama.cpp's by the stored weight: 1 + w is stored;
- norm weights and biases in f32 whatever the file type; the matrices in the file type's mix
  (below);
- what an architecture cannot compute (a dynamic RoPE; Llama 3 RoPE outside the llama graph; an
  o_proj bias outside it; a Gemma 3 query scale other than llama.cpp's) is refused by name
  (`layout`); a sliding window where the architecture has none makes the GGUF's context length
  the window (exact within it), with a note;
- the tokenizer as "gpt2" (byte-level BPE): tokens in GPT-2 byte-to-unicode form (as HF's
  tokenizer.json stores them), token types, merges "a b", special ids, the pre-tokenizer name
  whose regex matches the tokenizer's; padded with unused tokens up to the model's vocab_size.

Types (`--gguf-type`; `gguf_layout.choose_type`). f32, f16, bf16: every matrix in that type. The
block types write what llama.cpp's `llama-quantize` writes from an f32/f16 GGUF without an
importance matrix (llama-quant.cpp, `llama_tensor_get_type`, for dense models), with the same
`general.file_type` and `general.quantization_version` 2; quantized by `odyssey.gguf.quantize`
(gguf.quants for Q8_0 and Q4_0-Q5_1, llama.cpp's reference algorithms in torch for the k-quants):
```
--gguf-type  general.file_type  most matrices  head (output.weight; token_embd if tied)  more bits
q8_0         MOSTLY_Q8_0        Q8_0           Q8_0                                     -
q4_0         MOSTLY_Q4_0        Q4_0           Q6_K                                     -
q4_1         MOSTLY_Q4_1        Q4_1           Q6_K                                     -
q5_0         MOSTLY_Q5_0        Q5_0           Q6_K                                     -
q5_1         MOSTLY_Q5_1        Q5_1           Q6_K                                     -
q4_k         MOSTLY_Q4_K_M      Q4_K           Q6_K                                     attn_v, ffn_down: Q6_K
q5_k         MOSTLY_Q5_K_M      Q5_K           Q6_K                                     attn_v, ffn_down: Q6_K
q6_k         MOSTLY_Q6_K        Q6_K           Q6_K                                     -
```
"more bits": in the layers llama-quantize's `use_more_bits` picks (the first and last eighth and
every third between; 16 of 32). q4_k and q5_k are the _M mixes, the ones people download most; the
_S mixes are not offered. A matrix whose rows are not a whole number of its type's blocks (32
elements; 256 for the k-quants) falls back as llama-quantize does, Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, and where that block does not fit either (or for the 32-element types, which
llama-quantize refuses there) F16, as llama.cpp's converter writes such rows; the export says how
many in one line. The size check before writing counts each tensor's bytes in its own type.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from odyssey import atomic
from odyssey.config import format_bytes
from odyssey.dtypes import GGUF_CODES
from odyssey.errors import OdysseyError
from odyssey.export import DISK_MARGIN
from odyssey.export.gguf_layout import (
    QUANT_TYPES,
    Layout,
    TensorPlan,
    check_gguf_type,
    file_type,
    layout,
    plan_tensors,
    prepare_tensor,
    rope_factors,
    rope_kind,
)
from odyssey.export.gguf_vocab import GGUFVocab, add_vocab, read_vocab, vocab_bytes
from odyssey.modelconfig import ModelConfig
from odyssey.store import drop_cache

HEADER_SLACK_BYTES = 1 << 20  # bytes allowed for key-values and tensor infos beyond the vocabulary


def encode(t, plan: TensorPlan) -> np.ndarray:
    """A torch tensor (any float dtype, HF layout, already permuted) -> the array written for
    `plan` (f32, f16, or uint8 bytes for bf16 and the block types, shape `plan.stored_shape`).
    Block types are quantized in chunks of rows (`odyssey.gguf.quantize`), so the temporaries are
    bounded by a chunk whatever the tensor."""
    import torch

    name = plan.qtype.name
    if name in ("F32", "F16", "BF16"):  # a cast
        t = t.to(GGUF_CODES[name].torch()).contiguous()
        return t.numpy() if plan.np_dtype != np.uint8 else t.view(torch.uint8).numpy()  # bf16: (rows, 2 * cols) bytes
    from odyssey.gguf.quantize import quantize

    return quantize(t, name, plan.name)  # (rows, blocks per row * block bytes)


# --------------------------------------------------------------------------------------------
# metadata


def add_model_metadata(writer, cfg: ModelConfig, gguf_type: str, name: str, lay: Layout) -> None:
    """The architecture's hyperparameters, as convert_hf_to_gguf.py writes them for the family."""
    import gguf

    writer.add_name(name)
    writer.add_context_length(lay.context_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)  # explicit: head_dim need not be hidden / heads
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    if rope_kind(cfg) == "linear":  # llama3: the rope_freqs.weight tensor instead
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if lay.arch.sliding and any(cfg.window(i) for i in range(cfg.num_hidden_layers)):
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_rope_freq_base_swa(float(cfg.rope_local_base_freq))
        if lay.swa_pattern is not None:  # else llama.cpp's default: local unless i % 6 == 5
            writer.add_sliding_window_pattern(lay.swa_pattern)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(int(file_type(gguf_type)))
    if gguf_type in QUANT_TYPES:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensor_bytes(plan) -> int:
    """Bytes of tensor data in the file: each tensor starts 32-byte aligned."""
    return sum(-(-p.nbytes // 32) * 32 for _, plans in plan for p in plans)


def type_mix(plan) -> dict[str, dict]:
    """{GGML type: {"tensors": count, "bytes": data bytes}}, largest share first."""
    mix: dict[str, dict] = {}
    for _, plans in plan:
        for p in plans:
            m = mix.setdefault(p.qtype.name, {"tensors": 0, "bytes": 0})
            m["tensors"] += 1
            m["bytes"] += p.nbytes
    return dict(sorted(mix.items(), key=lambda kv: -kv[1]["bytes"]))


def fallback_note(plan) -> str | None:
    """One line naming how many matrices have rows that are not whole blocks of the type the mix
    chose for them, and what they were written as instead (None when there are none)."""
    falls: dict[tuple[str, str], list[int]] = {}
    for _, plans in plan:
        for p in plans:
            if p.fallback_from:
                falls.setdefault((p.fallback_from, p.qtype.name), []).append(p.shape[-1])
    if not falls:
        return None
    from odyssey.gguf.blocks import BLOCKS

    parts = [
        f"{len(cols)} as {got} instead of {want} (rows of {', '.join(str(c) for c in sorted(set(cols)))}, "
        f"not a multiple of {BLOCKS[want][0]})"
        for (want, got), cols in falls.items()
    ]
    return f"{sum(len(c) for c in falls.values())} matrices fall back as llama-quantize does: {'; '.join(parts)}"


@dataclass
class FilePlan:
    """Everything decided before a byte is written."""

    layout: Layout
    vocab: GGUFVocab
    tensors: list  # [(unit, [TensorPlan])], unit None for tensors computed from the config
    bytes: int  # an upper bound of the file size


def _plan_file(source, gguf_type: str) -> FilePlan:
    """Refuses a bad type, a model llama.cpp cannot compute, or a tokenizer it cannot load."""
    check_gguf_type(gguf_type)
    lay = layout(source.config)
    vocab = read_vocab(_tokenizer_of(source), source.config)
    plan = plan_tensors(source.config, source.units, gguf_type)
    return FilePlan(lay, vocab, plan, _tensor_bytes(plan) + vocab_bytes(vocab) + HEADER_SLACK_BYTES)


def gguf_bytes(source, gguf_type: str) -> int:
    """Checks what `write_gguf` would refuse (type, architecture, tokenizer) and returns an upper
    bound of the file size in bytes, for a free-disk check over several outputs before any is
    written."""
    return _plan_file(source, gguf_type).bytes


# --------------------------------------------------------------------------------------------
# writing


def _tokenizer_of(source) -> Path:
    path = source.tokenizer_path()
    if path is None:
        raise OdysseyError(
            f"{source.root} has no tokenizer.json, which GGUF needs; place one in the store with "
            f"`odyssey prepare-data CORPUS --out DATA --model {source.root}`"
        )
    return Path(path)


def _check_disk(path: Path, need: int) -> None:
    probe = atomic.existing_parent(path.parent)
    free = shutil.disk_usage(probe).free
    if free < need + DISK_MARGIN:
        raise OdysseyError(
            f"not enough free disk at {probe}: the GGUF file needs about {format_bytes(need)}, "
            f"{format_bytes(free)} is free; free some space or choose another --out"
        )


def write_gguf(source, path, gguf_type: str = "f16", progress: bool = True) -> dict:
    """Write `source` (a Store, or anything with `.config`, `.units`, `.load_tensors(unit)`,
    `.tokenizer_path()`, `.root`) as a llama.cpp GGUF file at `path`, one unit at a time.

    Everything that can be refused (type, what llama.cpp cannot compute, tokenizer, disk) is
    checked before a byte is written.
    Returns {"path", "gguf_type", "bytes" (file size), "tensors", "types" (`type_mix`: GGML type ->
    tensors and bytes), "seconds", "mb_s" (file MB/s)}."""
    import gguf
    from tqdm import tqdm

    t0 = time.perf_counter()
    cfg: ModelConfig = source.config
    path = Path(path)
    fp = _plan_file(source, gguf_type)
    vocab, plan = fp.vocab, fp.tensors
    _check_disk(path, fp.bytes)
    if fp.layout.note:
        print(f"note: {fp.layout.note}")
    fallback = fallback_note(plan)
    if fallback:
        print(f"note: {fallback}")
    if vocab.model == "gpt2" and vocab.pre == "default":
        print(
            f"warning: the pre-tokenizer of {source.tokenizer_path()} is not one llama.cpp knows by name; "
            f"it will split text by its default rules, so its tokens may differ from this tokenizer's"
        )

    writer = gguf.GGUFWriter(None, fp.layout.arch.name)
    add_model_metadata(writer, cfg, gguf_type, Path(source.root).name, fp.layout)
    add_vocab(writer, vocab)
    for _, plans in plan:
        for p in plans:  # raw bytes (bf16, block types) need their type; f32/f16 follow the numpy dtype
            writer.add_tensor_info(
                p.name, p.stored_shape, p.np_dtype, p.nbytes, raw_dtype=p.qtype if p.np_dtype == np.uint8 else None
            )
    total = sum(p.nbytes for _, plans in plan for p in plans)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"gguf {gguf_type}", disable=not progress)
    try:
        with atomic.atomic_path(path) as tmp:
            writer.write_header_to_file(path=tmp)  # opens tmp
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for unit, plans in plan:
                _write_unit(writer, source, cfg, unit, plans, bar)
            writer.close()
    finally:
        writer.close()
        bar.close()
    drop_cache(path)  # written once, read later by another program: keep RAM for work
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    return {
        "path": str(path),
        "gguf_type": gguf_type,
        "bytes": size,
        "tensors": sum(len(p) for _, p in plan),
        "types": type_mix(plan),
        "seconds": seconds,
        "mb_s": size / 1e6 / max(seconds, 1e-9),
    }


def _write_unit(writer, source, cfg: ModelConfig, unit, plans: list[TensorPlan], bar) -> None:
    """Load one unit (store dtype), convert and write its tensors in plan order (unit None: the
    tensors computed from the config)."""
    if unit is None:
        for p in plans:
            writer.write_tensor_data(rope_factors(cfg))
            bar.update(p.nbytes)
        return
    tensors = source.load_tensors(unit)
    for p in plans:
        t = tensors.pop(p.hf_name, None)  # dropped after its conversion: one unit + one output at a time
        if t is None or tuple(t.shape) != p.shape:
            got = "is missing" if t is None else f"has shape {list(t.shape)}"
            raise OdysseyError(
                f"{p.hf_name} {got}, the model config implies {list(p.shape)}; "
                f"check the store with `odyssey verify {source.root}`"
            )
        data = encode(prepare_tensor(p.hf_name, t, cfg), p)
        del t
        writer.write_tensor_data(data)
        bar.update(p.nbytes)
        del data
