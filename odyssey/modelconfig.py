"""The model's configuration: `ModelConfig`, a decoder of one family of `odyssey.families`, with the
keys and meanings of that family's Hugging Face config class, so it becomes a `config.json` that
`transformers` loads with the family's class, and an HF `config.json` becomes one (`hfconfig`).

No torch here: the guard and the monitor import configs and must stay light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from odyssey.config import from_dict, to_dict
from odyssey.dtypes import numel
from odyssey.errors import OdysseyError


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
