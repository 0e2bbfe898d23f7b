"""A GGUF file as an Odyssey model: the `ModelConfig` its metadata describes, its tensors under HF
names, and each tensor in HF layout (dequantized, llama.cpp's Q/K row permutation undone).

llama.cpp's `llama` architecture (Llama 2/3, TinyLlama, SmolLM2, Mistral without a window), `qwen2`
(Qwen2, Qwen2.5: q/k/v biases always) and `qwen3` (q/k norms, explicit head_dim); the families of
`odyssey.families` whose `gguf_arch` they are (`odyssey.gguf.reader.ARCHITECTURES`). Only llama
permutes q/k rows (`gguf_layout.ARCHS`). Metadata keys (`llama.`, `qwen2.`, `qwen3.` prefix) ->
ModelConfig:
```
embedding_length -> hidden_size             block_count -> num_hidden_layers
feed_forward_length -> intermediate_size    attention.head_count(_kv) -> num_(key_value_)heads
attention.key_length -> head_dim            attention.layer_norm_rms_epsilon -> rms_norm_eps
rope.freq_base -> rope_theta                context_length -> max_position_embeddings
token_embd.weight rows -> vocab_size        no output.weight -> tie_word_embeddings
rope.scaling.type linear + factor -> rope_scaling linear
rope_freqs.weight -> rope_scaling llama3 (see below)
blk.0.attn_q.bias / ffn_gate.bias -> attention_bias / mlp_bias
tokenizer.ggml.bos/eos/padding_token_id -> bos/eos/pad_token_id
```
Llama 3 RoPE: llama.cpp keeps no parameters, only the per-frequency divisors (`rope_freqs.weight`).
They are mapped to HF's llama3 parameters when Meta's (factor = the largest divisor, low 1, high
4, original context 8192, as in every Llama 3.1-3.3) reproduce them to f32 precision; other
divisors are refused by name, not approximated. Values of f32 keys are read as the shortest
decimal that rounds to them (1e-05, as the writer was given)."""

from __future__ import annotations

import dataclasses

import numpy as np

from odyssey.errors import OdysseyError
from odyssey.export.gguf_layout import ARCHS, ROPE_FREQS, gguf_name, hf_name, unpermute_qk
from odyssey.gguf.reader import GGUFFile
from odyssey.modelconfig import ModelConfig

LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_ROPE_RTOL = 1e-6  # divisors agree to f32 precision


def _need(gf: GGUFFile, key: str):
    v = gf.arch_key(key)
    if v is None:
        raise OdysseyError(f"{gf.path} lacks metadata key {gf.architecture}.{key}; convert the model again")
    return v


def _int(gf: GGUFFile, key: str, default=None) -> int | None:
    v = gf.arch_key(key, default)
    if v is None:
        return None
    if isinstance(v, list):  # per-layer values (some converters write head counts per layer)
        if len(set(v)) != 1:
            raise OdysseyError(
                f"{gf.path}: {gf.architecture}.{key} differs between layers ({sorted(set(v))}); Odyssey's "
                f"{gf.architecture} has one value for every layer"
            )
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        raise OdysseyError(f"{gf.path}: {gf.architecture}.{key} must be an integer, got {v!r}; convert the model again")
    return v


def model_config(gf: GGUFFile) -> ModelConfig:
    """The ModelConfig of a llama-architecture GGUF, checked against its tensors (every tensor
    accounted for, shapes as the config implies)."""
    if _int(gf, "expert_count", 0):
        raise OdysseyError(
            f"{gf.path} is a mixture-of-experts model ({gf.architecture}.expert_count), which Odyssey does "
            f"not train; use a dense model"
        )
    for key in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count", "context_length"):
        _need(gf, key)
    heads = _int(gf, "attention.head_count")
    hidden = _int(gf, "embedding_length")
    head_dim = _int(gf, "attention.key_length", hidden // heads if heads > 0 else None)  # ModelConfig refuses 0
    if _int(gf, "attention.value_length", head_dim) != head_dim:
        raise OdysseyError(f"{gf.path}: key and value heads differ in width, which Odyssey's llama does not compute")
    if _int(gf, "rope.dimension_count", head_dim) != head_dim:
        raise OdysseyError(
            f"{gf.path}: RoPE turns {gf.arch_key('rope.dimension_count')} of {head_dim} head dimensions; "
            f"Odyssey implements RoPE on the whole head only"
        )
    embed = gf.tensor("token_embd.weight")
    meta = gf.metadata
    family = _family(gf)
    kw = dict(
        vocab_size=embed.shape[0],
        hidden_size=hidden,
        intermediate_size=_int(gf, "feed_forward_length"),
        num_hidden_layers=_int(gf, "block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_int(gf, "attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=_int(gf, "context_length"),
        rms_norm_eps=float(gf.arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gf.arch_key("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in gf.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        attention_bias=family.qkv_bias == "config" and "blk.0.attn_q.bias" in gf.tensors,
        mlp_bias=family.mlp_bias and "blk.0.ffn_gate.bias" in gf.tensors,
        model_type=family.model_type,
    )
    cfg = _config(gf, kw)
    scaling = _rope_scaling(gf, cfg)
    if scaling is not None:
        cfg = _config(gf, {**kw, "rope_scaling": scaling})
    _check_tensors(gf, cfg)
    return cfg


def _family(gf: GGUFFile):
    """The Odyssey family of the file's architecture (llama: Llama, not Mistral)."""
    from odyssey.families import FAMILIES

    return next(f for f in FAMILIES.values() if f.gguf_arch == gf.architecture and f.name != "mistral")


def _config(gf: GGUFFile, kw: dict) -> ModelConfig:
    try:
        return ModelConfig(**kw)
    except OdysseyError as e:  # a value ModelConfig refuses, named as the file holds it
        raise OdysseyError(f"{gf.path}: {e}") from None


def _rope_scaling(gf: GGUFFile, cfg: ModelConfig) -> dict | None:
    kind = gf.arch_key("rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise OdysseyError(
            f"{gf.path}: RoPE scaling {kind!r} ({gf.architecture}.rope.scaling.type) is not implemented; "
            f"Odyssey computes default, linear and llama3"
        )
    linear = None
    if kind == "linear":
        factor = gf.arch_key("rope.scaling.factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise OdysseyError(f"{gf.path}: linear RoPE scaling needs a positive {gf.architecture}.rope.scaling.factor")
        linear = {"rope_type": "linear", "factor": float(factor)}
    if ROPE_FREQS not in gf.tensors:
        return linear
    t = gf.tensor(ROPE_FREQS)
    if t.qtype != "F32" or t.shape != (cfg.head_dim // 2,):
        raise OdysseyError(
            f"{gf.path}: {ROPE_FREQS} must be F32 of shape [{cfg.head_dim // 2}], is {t.qtype} {list(t.shape)}"
        )
    divisors = gf.read_raw(ROPE_FREQS).view(np.float32).astype(np.float64)
    if np.all(divisors == 1.0):
        return linear
    if linear is not None:
        raise OdysseyError(
            f"{gf.path} has both linear RoPE scaling and {ROPE_FREQS}; Odyssey computes one or the other"
        )
    from odyssey.export.gguf_layout import rope_factors

    factor = float(f"{divisors.max():.6g}")
    llama3 = {"rope_type": "llama3", "factor": factor, **LLAMA3_ROPE}
    cand = dataclasses.replace(cfg, rope_scaling=llama3)
    if not np.allclose(rope_factors(cand).astype(np.float64), divisors, rtol=_ROPE_RTOL, atol=0):
        raise OdysseyError(
            f"{gf.path}: {ROPE_FREQS} holds RoPE divisors that Llama 3's parameters (factor {factor:g}, "
            f"low_freq_factor 1, high_freq_factor 4, original context 8192) do not reproduce; import the "
            f"Hugging Face checkpoint instead (`odyssey import`: its config.json states the RoPE parameters)"
        )
    return llama3


def _check_tensors(gf: GGUFFile, cfg: ModelConfig) -> None:
    """Every tensor the config implies is in the file with its shape, and nothing else is."""
    fam = cfg.family
    want = {gguf_name(n, fam): (n, tuple(s)) for n, s in cfg.all_shapes().items()}
    for name, (hf, shape) in want.items():
        if name not in gf.tensors:
            raise OdysseyError(
                f"{gf.path} lacks tensor {name} ({hf}), which its metadata's {cfg.num_hidden_layers}-layer "
                f"{gf.architecture} model has; convert the model again"
            )
        if gf.tensors[name].shape != shape:
            raise OdysseyError(
                f"{gf.path}: tensor {name} has shape {list(gf.tensors[name].shape)}, the metadata implies "
                f"{list(shape)}; convert the model again"
            )
    extra = [n for n in gf.tensors if n not in want and n != ROPE_FREQS]
    if extra:
        raise OdysseyError(
            f"{gf.path} has tensor {extra[0]}, which Odyssey's {gf.architecture} model does not compute; "
            f"it cannot train this model"
        )


def hf_names(gf: GGUFFile, cfg: ModelConfig) -> dict[str, str]:
    """{HF name: GGUF name} of the model's tensors, in store order (rope_freqs.weight, which has no
    HF counterpart, left out)."""
    return {n: gguf_name(n, cfg.family) for n in cfg.all_shapes()}


def load_tensor(gf: GGUFFile, name: str, cfg: ModelConfig, dtype=None):
    """The tensor of HF name `name`, dequantized (bit-exact, f32) and in HF layout (q/k rows back
    in HF's order), then cast to `dtype` (default f32)."""
    import torch

    from odyssey.gguf.dequant import dequantize

    t = gf.tensor(gguf_name(name, cfg.family))
    w = dequantize(gf.read_raw(t.name), t.qtype, t.shape)
    if not ARCHS[gf.architecture].permute_qk:  # qwen2, qwen3: halves rotated as in HF
        pass
    elif name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        w = unpermute_qk(w, cfg.num_attention_heads).contiguous()
    elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        w = unpermute_qk(w, cfg.num_key_value_heads).contiguous()
    return w if dtype in (None, torch.float32) else w.to(dtype)


__all__ = ["hf_name", "hf_names", "load_tensor", "model_config"]
