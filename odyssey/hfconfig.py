"""A family's Hugging Face config.json read into `ModelConfig` keys (transformers v4 and v5 forms):
the family from `model_type` / `architectures`, RoPE from `rope_theta` + `rope_scaling` (v4) or
`rope_parameters` (v5, per layer type for Gemma 3), sliding windows and layer types as the family's
config class derives them. Values that change the math and are not implemented are refused, naming
the key; keys Odyssey does not model are kept (`extra`) and written back. No torch here.
"""

from __future__ import annotations

import math

from odyssey.errors import OdysseyError

ROPE_TYPES = {
    # rope_type: (required parameters, optional parameters), HF's names
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, {"original_max_position_embeddings"}),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
}


def check_rope_scaling(rope: dict, key: str) -> None:
    """Refuse, naming the key, a RoPE variant the model does not implement."""
    if not isinstance(rope, dict):
        raise OdysseyError(f"{key} must be a mapping like {{rope_type: llama3, factor: 8.0, ...}}, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type"))
    if kind not in ROPE_TYPES:
        raise OdysseyError(
            f"{key}: RoPE type {kind!r} is not supported; Odyssey implements default, {', '.join(ROPE_TYPES)}"
        )
    required, optional = ROPE_TYPES[kind]
    params = set(rope) - {"rope_type", "type", "rope_theta"}
    missing = sorted(required - params)
    if missing:
        raise OdysseyError(f"{key}: RoPE type {kind} needs {missing[0]}; add it")
    unknown = sorted(params - required - optional - {"partial_rotary_factor"})
    if unknown:
        raise OdysseyError(f"{key}.{unknown[0]} is not supported for RoPE type {kind}; remove it")
    for name in params:
        value = rope[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise OdysseyError(f"{key}.{name} must be a positive number, got {value!r}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise OdysseyError(f"{key}.partial_rotary_factor {rope['partial_rotary_factor']} is not supported (only 1.0)")


# keys `from_hf` reads itself (the rest of a family's config.json is ModelConfig's or kept as `extra`)
_HF_HANDLED = {
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "rope_local_base_freq",
    "hidden_activation",
    "hidden_act",
    "use_sliding_window",
    "sliding_window_pattern",
    "attention_dropout",
    "use_cache",
}


def from_hf(hf: dict, fields: set[str]) -> dict:
    """An HF config.json (v4 or v5) -> ModelConfig keys (`fields`), the unmodelled ones under `extra`."""
    from odyssey.families import FAMILIES, KNOWN_OTHERS, supported_line

    data = dict(hf)
    archs = data.get("architectures") or []
    mt = data.get("model_type")
    if mt is None:  # an old config without model_type: the architecture names the family
        by_arch = {f.architecture: f for f in FAMILIES.values()}
        mt = next((by_arch[a].model_type for a in archs if a in by_arch), "llama")
    if mt not in FAMILIES:
        what = KNOWN_OTHERS.get(mt, f"architectures {archs}")
        raise OdysseyError(f"model_type {mt!r} ({what}) is not supported; Odyssey takes {supported_line()}")
    fam = FAMILIES[mt]
    if not isinstance(archs, list) or any(a != fam.architecture for a in archs):
        raise OdysseyError(
            f"architectures {archs} does not match model_type {mt!r} ({fam.architecture}); "
            f"the checkpoint's config.json is inconsistent"
        )
    for key, allowed in fam.must_be.items():
        if key in data and data[key] not in allowed:
            raise OdysseyError(f"{key}={data[key]!r} is not supported for {fam.name} (only {allowed[0]!r})")
    if data.get("mlp_bias") and not fam.mlp_bias:
        raise OdysseyError(f"mlp_bias=true is not part of {fam.architecture}")

    out: dict = {"model_type": mt}
    act = data.get(fam.act_key, data.get("hidden_act") if fam.act_key != "hidden_act" else None)
    if act is not None:
        out["hidden_act"] = act
    theta, scaling, local = _rope_from_hf(data, fam)
    if theta is not None:
        out["rope_theta"] = theta
    out["rope_scaling"] = scaling
    if fam.local_rope and local is not None:
        out["rope_local_base_freq"] = local
    _sliding_from_hf(data, fam, out)

    known = fields - {"extra", "model_type"}
    for k, v in data.items():
        if k in known and k not in out and k not in ("rope_scaling", "sliding_window", "layer_types"):
            out[k] = v
    if fam.qkv_bias != "config":
        out.pop("attention_bias", None)  # the family's class ignores the key
    if not fam.mlp_bias:
        out.pop("mlp_bias", None)
    if not fam.attn_scale_key:
        out.pop("query_pre_attn_scalar", None)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(out.get(k), list):  # Llama 3 lists several eos ids
            out[k] = out[k][0] if out[k] else None
    out["extra"] = {
        **{k: v for k, v in data.items() if k not in known and k not in _HF_HANDLED},
        **out.get("extra", {}),
    }
    return out


def _rope_from_hf(data: dict, fam) -> tuple[float | None, dict | None, float | None]:
    """(global RoPE base, non-default RoPE parameters or None, local base) from v4 keys
    (rope_theta, rope_scaling, rope_local_base_freq) or v5's rope_parameters."""
    params = data.get("rope_parameters")
    local = data.get("rope_local_base_freq")
    if fam.local_rope and isinstance(params, dict) and "full_attention" in params:
        loc = params.get("sliding_attention") or {}
        if loc.get("rope_type", "default") != "default":
            raise OdysseyError(
                f"rope_parameters.sliding_attention: RoPE type {loc.get('rope_type')!r} is not supported (only default)"
            )
        local = loc.get("rope_theta", local)
        params = params.get("full_attention") or {}
    if params is not None and not isinstance(params, dict):
        raise OdysseyError(f"rope_parameters must be a mapping, got {params!r}")
    rope = dict(params or {})
    scaling = data.get("rope_scaling")
    if scaling:
        if not isinstance(scaling, dict):
            raise OdysseyError(f"rope_scaling must be a mapping, got {scaling!r}")
        rope.update(scaling)
    theta = rope.get("rope_theta", data.get("rope_theta"))
    top = data.get("rope_theta")
    if top is not None and theta is not None and top != theta:  # v4 readers take one, v5 the other
        raise OdysseyError(
            f"rope_theta {top!r} disagrees with rope_parameters' rope_theta {theta!r}; "
            f"the checkpoint's config.json is inconsistent"
        )
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        extra_params = sorted(set(rope) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise OdysseyError(f"partial_rotary_factor {rope['partial_rotary_factor']} is not supported (only 1.0)")
        if extra_params and any(k != "factor" or rope[k] not in (1, 1.0) for k in extra_params):
            raise OdysseyError(f"rope_parameters.{extra_params[0]} is not supported with default RoPE; remove it")
        return theta, None, local
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = kind
    check_rope_scaling(scaling, "rope_parameters" if params is not None else "rope_scaling")
    scaling.pop("partial_rotary_factor", None)
    return theta, scaling, local


def _sliding_from_hf(data: dict, fam, out: dict) -> None:
    """sliding_window and layer_types as the family's HF config class derives them."""
    window = data.get("sliding_window")
    n = data.get("num_hidden_layers")
    if fam.sliding != "layer_types":  # the family's class ignores layer_types: keep them, unused
        if data.get("layer_types") is not None:
            out.setdefault("extra", {})["layer_types"] = data["layer_types"]
        if fam.sliding == "all":  # Mistral: one window for every layer, or none
            out["sliding_window"] = window
        elif window is not None:
            out.setdefault("extra", {})["sliding_window"] = window
        return
    if fam.name in ("qwen2", "qwen3") and not data.get("use_sliding_window", False):
        window = None  # as Qwen2Config: the window applies only with use_sliding_window
    types = data.get("layer_types")
    if types is None and isinstance(n, int):
        if fam.name in ("qwen2", "qwen3"):
            first = data.get("max_window_layers", 28)
            types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
        else:  # gemma3: every `sliding_window_pattern`-th layer is global
            pattern = data.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if fam.name == "gemma3" and window is None and "sliding_window" not in data:
        window = 4096  # Gemma3TextConfig's default
    if types is not None and "sliding_attention" not in types:
        window = None if fam.name != "gemma3" else window
    out["sliding_window"] = window
    out["layer_types"] = types
