"""Model and training configuration: typed dataclasses, strict YAML, dotted overrides.

No torch import here: the guard and the monitor import this module and must stay light.

Model configs use Hugging Face `LlamaConfig` key names one-to-one, so a `ModelConfig` becomes a
`config.json` that `transformers` reads unchanged, and an HF `config.json` becomes a `ModelConfig`.
Training configs (`configs/lora.yaml`) nest `lora:` and `guard:` sections; any key can be overridden
on the command line as `key=value` or `section.key=value` (the value is parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from odyssey.dtypes import numel
from odyssey.errors import OdysseyError

# --------------------------------------------------------------------------------------------
# sizes


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int | float, flag: str = "--ram-budget") -> int:
    """'1.5GiB', '1500MiB', '2G', '2GB', '123456' -> bytes. K/M/G/T with or without 'i' are 1024-based
    (RAM sizes are binary on every OS; '2G' meaning 2 GiB is what users expect of a RAM budget)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise OdysseyError(f"{flag} must be a size like 1.5GiB, 1500MiB or 2G, got {text!r}")
        number, unit = float(m.group(1)), m.group(2).upper()
        value = int(number * 1024 ** " KMGT".index(unit or " "))
    if value <= 0:
        raise OdysseyError(f"{flag} must be > 0, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# --------------------------------------------------------------------------------------------
# strict loading of nested dataclasses


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raises OdysseyError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except OdysseyError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # "q_proj,v_proj" on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise OdysseyError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise OdysseyError(f"{key} must be a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .nan, .inf in YAML: never a meaningful setting
                raise OdysseyError(f"{key} must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise OdysseyError(f"{key} must be of type {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls, data: dict, prefix: str = "", ignore: tuple[str, ...] = ()):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(k for k in data if k not in names and k not in ignore)
    if unknown:
        raise OdysseyError(f"unknown config key {prefix}{unknown[0]!s}; known keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items() if k in names}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise OdysseyError(f"{prefix or cls.__name__}: {e}; add the missing key") from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings to a nested dict (values parsed as YAML, so `lr=1e-4` is a float)."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise OdysseyError(f"override {item!r} must look like key=value, e.g. lora.r=32")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d*\.?\d+[eE][-+]?\d+", value):
            value = float(value)  # YAML 1.1 reads '1e-4' as a string
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise OdysseyError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _floatify(data):
    """YAML 1.1 (PyYAML) reads 1e-4 as a string; read such strings as floats."""
    if isinstance(data, dict):
        return {k: _floatify(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_floatify(v) for v in data]
    if isinstance(data, str) and re.fullmatch(r"[-+]?\d*\.?\d+[eE][-+]?\d+", data):
        return float(data)
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise OdysseyError(f"config file {path} not found; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise OdysseyError(f"config file {path} is not valid YAML{where}; fix its syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OdysseyError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return _floatify(data)


# --------------------------------------------------------------------------------------------
# model


@dataclass
class ModelConfig:
    """A decoder of one of the families in `odyssey.families` (Llama unless `model_type` says
    otherwise). Keys and meanings are those of the family's HF config class (`LlamaConfig`, ...)."""

    vocab_size: int
    """Number of token ids; the embedding and head have this many rows."""
    hidden_size: int
    """Width d of the residual stream."""
    intermediate_size: int
    """Width of the gated MLP (gate/up project d -> this, down projects back)."""
    num_hidden_layers: int
    """Number of decoder layers L; the store has one shard per layer."""
    num_attention_heads: int
    """Query heads; must divide hidden_size unless head_dim is given."""
    num_key_value_heads: int | None = None
    """Key/value heads for grouped-query attention; must divide num_attention_heads. None = MHA."""
    head_dim: int | None = None
    """Width of one head; None = hidden_size / num_attention_heads."""
    max_position_embeddings: int = 2048
    """Longest sequence the model is meant for (RoPE works beyond it, quality may not)."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm's square root."""
    rope_theta: float = 10000.0
    """RoPE base (of the global layers). HF v5 writes it under rope_parameters.rope_theta; both are read."""
    tie_word_embeddings: bool = False
    """True: the head reuses model.embed_tokens.weight and the store has no lm_head.weight."""
    initializer_range: float = 0.02
    """Standard deviation of the normal init; output projections are scaled by 1/sqrt(2L)."""
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    hidden_act: str = "silu"
    """Activation of the gated MLP: silu (SwiGLU), or gelu_pytorch_tanh for gemma3 (GeGLU)."""
    attention_bias: bool = False
    """Biases on the attention projections (llama, qwen3, gemma3 read it; qwen2 always has q/k/v
    biases, mistral never)."""
    mlp_bias: bool = False
    """Biases on the MLP projections (llama only)."""
    model_type: str = "llama"
    """The family: llama, mistral, qwen2, qwen3 or gemma3_text (see odyssey.families)."""
    rope_scaling: dict | None = None
    """RoPE of the global layers other than default: {"rope_type": "linear"|"dynamic"|"llama3",
    "factor": ..., ...} with HF's parameter names; None = default RoPE."""
    sliding_window: int | None = None
    """Keys a sliding-window layer attends to (the query's own position included); None = none."""
    layer_types: list[str] | None = None
    """Per layer: full_attention or sliding_attention (None: every layer full, or every layer
    sliding for a mistral with a sliding_window)."""
    rope_local_base_freq: float | None = None
    """RoPE base of the sliding layers (gemma3)."""
    query_pre_attn_scalar: int | None = None
    """Attention scores scaled by this ** -0.5 instead of head_dim ** -0.5 (gemma3)."""
    extra: dict = field(default_factory=dict)
    """Keys of the source config.json that Odyssey does not model; written back unchanged."""

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise OdysseyError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.head_dim is not None and self.head_dim <= 0:
            raise OdysseyError(f"head_dim must be > 0, got {self.head_dim}; or leave it out (hidden_size / heads)")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise OdysseyError(
                    f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                    f"({self.hidden_size}); change one of them or set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise OdysseyError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise OdysseyError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        fam = self.family
        if self.hidden_act not in fam.activations:
            raise OdysseyError(
                f"{fam.act_key} must be {' or '.join(fam.activations)} for {fam.name}, got {self.hidden_act!r}"
            )
        if self.mlp_bias and not fam.mlp_bias:
            raise OdysseyError(f"mlp_bias is not part of {fam.name} ({fam.architecture} has no MLP biases); drop it")
        for name in ("rms_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise OdysseyError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.initializer_range < 0:
            raise OdysseyError(f"initializer_range must be >= 0, got {self.initializer_range}")
        self._check_attention()
        if not isinstance(self.extra, dict):
            raise OdysseyError(f"extra must be a mapping of config keys, got {self.extra!r}")

    def _check_attention(self) -> None:
        fam = self.family
        if self.rope_scaling is not None:
            from odyssey.hfconfig import check_rope_scaling

            check_rope_scaling(self.rope_scaling, "rope_scaling")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise OdysseyError(f"sliding_window must be > 0 or null, got {self.sliding_window}")
        if fam.sliding == "layer_types" and self.layer_types is None and self.sliding_window is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers  # as the family's HF config lists them
        if fam.sliding == "layer_types" and self.layer_types is None and self.sliding_window is not None:
            if not fam.local_rope:
                raise OdysseyError(f"{fam.name} with a sliding_window needs layer_types (which layers slide); add it")
            # Gemma 3's pattern, as Gemma3TextConfig derives it: every 6th layer global
            self.layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise OdysseyError(
                    f"layer_types lists {len(self.layer_types)} layers, the model has {self.num_hidden_layers}"
                )
            bad = [t for t in self.layer_types if t not in ("full_attention", "sliding_attention")]
            if bad:
                raise OdysseyError(
                    f"layer_types: unknown layer type {bad[0]!r}; use full_attention or sliding_attention"
                )
            if fam.sliding != "layer_types" and "sliding_attention" in self.layer_types:
                raise OdysseyError(f"layer_types with sliding_attention is not part of {fam.name}; drop it")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise OdysseyError("layer_types has sliding_attention layers but sliding_window is null; set it")
        if fam.sliding == "none" and self.sliding_window is not None:
            raise OdysseyError(f"sliding_window is not part of {fam.name}; drop it or use model_type mistral")
        if fam.local_rope and self.rope_local_base_freq is None:
            self.rope_local_base_freq = 10000.0
        if not fam.local_rope and self.rope_local_base_freq is not None:
            raise OdysseyError(f"rope_local_base_freq is not part of {fam.name}; drop it")
        if fam.attn_scale_key and self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        if not fam.attn_scale_key and self.query_pre_attn_scalar is not None:
            raise OdysseyError(f"query_pre_attn_scalar is not part of {fam.name}; drop it")
        if self.query_pre_attn_scalar is not None and not self.query_pre_attn_scalar > 0:
            raise OdysseyError(f"query_pre_attn_scalar must be > 0, got {self.query_pre_attn_scalar}")

    # --- the family and its layers ---
    @property
    def family(self):
        from odyssey.families import KNOWN_OTHERS, family_of, supported_line

        fam = family_of(self.model_type)
        if fam is None:
            what = KNOWN_OTHERS.get(self.model_type, self.model_type)
            raise OdysseyError(
                f"model_type {self.model_type!r} ({what}) is not supported; Odyssey takes {supported_line()}"
            )
        return fam

    def layer_type(self, i: int) -> str:
        """full_attention or sliding_attention."""
        if self.layer_types is not None:
            return self.layer_types[i]
        return "sliding_attention" if self.sliding_window is not None else "full_attention"

    def window(self, i: int) -> int | None:
        """The sliding window of layer i (None: full causal attention)."""
        return self.sliding_window if self.layer_type(i) == "sliding_attention" else None

    def rope_of(self, i: int) -> tuple[float, dict | None]:
        """(RoPE base, non-default RoPE parameters or None) of layer i."""
        if self.family.local_rope and self.layer_type(i) == "sliding_attention":
            return self.rope_local_base_freq, None
        return self.rope_theta, self.rope_scaling

    # --- derived sizes (parameters, not bytes) ---
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """HF names and shapes of decoder layer i's tensors, in store order (a Llama layer without
        biases keeps the order of stores written before families existed)."""
        fam = self.family
        d, f, p = self.hidden_size, self.intermediate_size, f"model.layers.{i}."
        bias = fam.biases(self.attention_bias, self.mlp_bias)
        proj = {
            "self_attn.q_proj": (self.q_size, d),
            "self_attn.k_proj": (self.kv_size, d),
            "self_attn.v_proj": (self.kv_size, d),
            "self_attn.o_proj": (d, self.q_size),
            "mlp.gate_proj": (f, d),
            "mlp.up_proj": (f, d),
            "mlp.down_proj": (d, f),
        }
        shapes = {p + "input_layernorm.weight": (d,)}
        for name, shape in proj.items():
            if name == "mlp.gate_proj":
                shapes[p + "post_attention_layernorm.weight"] = (d,)
                if fam.sandwich_norms:
                    shapes[p + "pre_feedforward_layernorm.weight"] = (d,)
                    shapes[p + "post_feedforward_layernorm.weight"] = (d,)
            shapes[p + name + ".weight"] = shape
            if bias[name.split(".")[1]]:
                shapes[p + name + ".bias"] = (shape[0],)
            if name == "self_attn.v_proj" and fam.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (self.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (self.head_dim,)
        return shapes

    def embed_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size)}

    def head_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"model.norm.weight": (self.hidden_size,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    def all_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = dict(self.embed_shapes())
        for i in range(self.num_hidden_layers):
            shapes.update(self.layer_shapes(i))
        shapes.update(self.head_shapes())
        return shapes

    def num_parameters(self) -> int:
        return sum(numel(shape) for shape in self.all_shapes().values())

    # --- HF config.json ---
    def to_hf_dict(self, dtype: str = "bfloat16") -> dict:
        """The family's HF config.json: the source's own keys (`extra`) and Odyssey's, in the form
        transformers v5 writes (rope_parameters), which v5 loads with the family's class."""
        fam = self.family
        d = dict(self.extra)
        core = to_dict(self)
        for k in ("extra", "rope_scaling", "rope_local_base_freq", "hidden_act", "model_type"):
            core.pop(k)
        if fam.name != "llama":
            core.pop("mlp_bias")
        if fam.qkv_bias != "config":
            core.pop("attention_bias")
        if fam.sliding == "none":
            core.pop("sliding_window")
        if fam.sliding != "layer_types":
            core.pop("layer_types")
        elif core["layer_types"] is None:
            core["layer_types"] = [self.layer_type(i) for i in range(self.num_hidden_layers)]
        if not fam.attn_scale_key:
            core.pop("query_pre_attn_scalar")
        d.update(core)
        d[fam.act_key] = self.hidden_act
        glob = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        if fam.local_rope:
            local = {"rope_type": "default", "rope_theta": self.rope_local_base_freq}
            d["rope_parameters"] = {"full_attention": glob, "sliding_attention": local}
        else:
            d["rope_parameters"] = glob
        d.update(
            {
                "architectures": [fam.architecture],
                "model_type": fam.model_type,
                "attention_dropout": 0.0,
                "use_cache": True,
                "torch_dtype": dtype,
                "dtype": dtype,
            }
        )
        if fam.name == "qwen2" or fam.name == "qwen3":
            d["use_sliding_window"] = self.sliding_window is not None
        return d

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> ModelConfig:
        """Read a family's HF config.json (transformers v4 or v5); refuse, naming the key, any value
        that changes the math and is not implemented (see odyssey.hfconfig)."""
        from odyssey.hfconfig import from_hf

        if not isinstance(hf, dict):
            raise OdysseyError(f"{source} must hold a JSON object of config keys")
        try:
            return from_dict(cls, from_hf(hf, {f.name for f in dataclasses.fields(cls)}))
        except OdysseyError as e:
            raise OdysseyError(f"{source}: {e}") from None


# --------------------------------------------------------------------------------------------
# training


LORA_TARGETS_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS_ALLOWED = set(LORA_TARGETS_DEFAULT) | {"lm_head"}


@dataclass
class LoraSettings:
    r: int = 16
    """LoRA rank: adapter matrices are (r, in) and (out, r)."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the LoRA input path (0 keeps recompute in backward exact and cheap)."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS_DEFAULT))
    """Module names that get adapters; lm_head only if listed."""

    def __post_init__(self):
        if self.r <= 0:
            raise OdysseyError(f"lora.r must be > 0, got {self.r}")
        if self.alpha <= 0:
            raise OdysseyError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise OdysseyError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS_ALLOWED]
        if bad or not self.targets:
            raise OdysseyError(
                f"lora.targets: unknown module {bad[0] if bad else '(empty list)'}; "
                f"choose from {', '.join(sorted(LORA_TARGETS_ALLOWED))}"
            )


@dataclass
class GuardSettings:
    enabled: bool = True
    """Start the guard process with `odyssey train` (--no-guard turns it off)."""
    interval_s: float = 0.5
    """Seconds between samples."""
    soft_pct: float = 90.0
    """Anonymous RAM above this % of the budget: ask for a checkpoint and warn."""
    hard_pct: float = 97.0
    """Anonymous RAM above this % of the budget: ask to stop (checkpoint, exit status 3)."""
    min_available_mib: float = 150.0
    """System MemAvailable below this many MiB: ask to stop."""
    max_temp_c: float = 90.0
    """CPU temperature above this: ask to pause."""
    resume_temp_c: float = 80.0
    """CPU temperature back below this: ask to resume."""
    heartbeat_s: float = 2.0
    """The trainer reports the guard lost when its heartbeat is older than this."""
    on_guard_lost: str = "continue"
    """continue (with a warning) or stop, when the guard process disappears."""
    thermal_file: str | None = None
    """A file holding the temperature in millidegrees C (like /sys/class/thermal/*/temp)."""
    enforce_cgroup: bool = False
    """Also run the trainer inside a memory cgroup set to the budget (Linux, root)."""

    def __post_init__(self):
        if self.interval_s <= 0:
            raise OdysseyError(f"guard.interval_s must be > 0, got {self.interval_s}")
        if not 0 < self.soft_pct <= self.hard_pct:
            raise OdysseyError(f"guard: need 0 < soft_pct <= hard_pct, got {self.soft_pct} and {self.hard_pct}")
        if self.resume_temp_c >= self.max_temp_c:
            raise OdysseyError(
                f"guard.resume_temp_c ({self.resume_temp_c}) must be below max_temp_c ({self.max_temp_c})"
            )
        if self.on_guard_lost not in ("continue", "stop"):
            raise OdysseyError(f"guard.on_guard_lost must be continue or stop, got {self.on_guard_lost!r}")


@dataclass
class TrainConfig:
    seq_len: int = 512
    """Tokens per sequence."""
    batch_size: int = 1
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    steps: int = 100
    """Optimizer steps in the run (--steps overrides)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW), reached after warmup, then cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm over trained parameters); 0 disables."""
    seed: int = 0
    checkpoint_every: int = 50
    """Steps between checkpoints (also written on stop, SIGINT and SIGTERM)."""
    keep_checkpoints: int = 2
    """How many step-N checkpoints to keep (older ones are removed after a new one is complete)."""
    eval_every: int = 50
    """Steps between validation-loss evaluations; 0 disables."""
    eval_batches: int = 4
    mode: str = "lora"
    """lora: frozen paged base + adapters. full: all parameters in RAM (small models only)."""
    compute_dtype: str = "auto"
    """auto (bf16 where the CPU has native bf16, else fp32; the environment variable
    ODYSSEY_COMPUTE_DTYPE overrides that choice), bf16 or fp32."""
    slots: int = 2
    """Pager buffer slots (layers resident at once)."""
    dist_timeout_s: float = 300.0
    """Distributed runs: seconds a rank waits for the others in a collective before it stops with
    a checkpoint (a dead rank is usually noticed at once)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "checkpoint_every", "slots", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise OdysseyError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_batches"):
            if getattr(self, name) < 0:
                raise OdysseyError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise OdysseyError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise OdysseyError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise OdysseyError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.dist_timeout_s <= 0:
            raise OdysseyError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if self.mode not in ("lora", "full"):
            raise OdysseyError(f"mode must be lora or full, got {self.mode!r}")
        if self.compute_dtype not in ("auto", "bf16", "fp32"):
            raise OdysseyError(f"compute_dtype must be auto, bf16 or fp32, got {self.compute_dtype!r}")


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """A model YAML (configs/nano.yaml ...) -> ModelConfig, strict."""
    data = apply_overrides(read_yaml(path), list(overrides))
    try:
        return from_dict(ModelConfig, data)
    except OdysseyError as e:
        raise OdysseyError(f"{path}: {e}") from None


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A training YAML (configs/lora.yaml) plus `key=value` overrides -> TrainConfig, strict."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    return from_dict(TrainConfig, data, prefix="")


def dump_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=False, allow_unicode=True)
