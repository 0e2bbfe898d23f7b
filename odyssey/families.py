"""Model families: what each differs in from a plain Llama decoder layer, in one declaration each.

A family is a `transformers` model class Odyssey reproduces exactly (logits, LoRA gradients), read
from that class's modeling file. The model (`odyssey.model`), the tensor names and shapes of a store
(`ModelConfig.layer_shapes`), import (which config keys and tensors a checkpoint may have), merge,
the PEFT adapter names and the exporters all read the declaration, so a new family is one entry
here plus its tests. No torch here: the planner, guard and `info` import this module.

All families share the Llama skeleton: embedding, L decoder layers (pre-norm attention with RoPE and
grouped-query heads, then a gated MLP), final RMSNorm, head; HF parameter names
(`model.layers.N.self_attn.q_proj.weight`, ...).

One module rather than a package of five files: each declaration is a dozen lines, and reading them
side by side is how one sees what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    """Odyssey's name (and the README's)."""
    model_type: str
    """config.json `model_type`."""
    architecture: str
    """config.json `architectures[0]`: the transformers class that loads a store of this family."""
    gguf_arch: str
    """llama.cpp's `general.architecture` for this family."""
    covers: str
    """Checkpoints it takes (README)."""
    qkv_bias: str = "config"
    """Biases of q/k/v_proj: "config" (the `attention_bias` key), "always" (Qwen2) or "never" (Mistral)."""
    o_bias: str = "config"
    """Bias of o_proj: "config" (`attention_bias`), "always" or "never"."""
    mlp_bias: bool = False
    """The `mlp_bias` key is honoured (Llama); elsewhere it must be absent or false."""
    qk_norm: bool = False
    """Per-head RMSNorm of queries and keys before RoPE (`self_attn.q_norm` / `k_norm`, width head_dim)."""
    gemma_norm: bool = False
    """RMSNorm scales by (1 + w), computed in fp32 then cast (Gemma); else w * x.to(dtype) (Llama)."""
    embed_scale: bool = False
    """Embeddings multiplied by sqrt(hidden), the factor rounded to the weights' dtype (Gemma)."""
    sandwich_norms: bool = False
    """Norms after attention and MLP as well as before (Gemma 3: four per layer)."""
    act_key: str = "hidden_act"
    """The config key naming the MLP activation (Gemma: hidden_activation)."""
    activations: tuple[str, ...] = ("silu",)
    """Activations of the gated MLP this family's checkpoints use."""
    sliding: str = "none"
    """Sliding-window attention: "none", "all" (Mistral's `sliding_window` on every layer), or
    "layer_types" (the per-layer `layer_types` list: Qwen2/3 with use_sliding_window, Gemma 3)."""
    local_rope: bool = False
    """Sliding layers have their own RoPE base (`rope_local_base_freq`; Gemma 3)."""
    attn_scale_key: str | None = None
    """Attention scores scaled by this key ** -0.5 instead of head_dim ** -0.5 (Gemma 3)."""
    must_be: dict = field(default_factory=dict)
    """Config keys whose other values change the math and are not implemented: key -> allowed values."""
    config_keys: tuple[str, ...] = ()
    """Family-specific config keys Odyssey reads (besides ModelConfig's): kept and checked."""

    def biases(self, attention_bias: bool, mlp_bias: bool) -> dict[str, bool]:
        """{module: has a bias} for the seven projections of a layer."""

        def has(rule: str) -> bool:
            return rule == "always" or (rule == "config" and attention_bias)

        qkv, o = has(self.qkv_bias), has(self.o_bias)
        mlp = self.mlp_bias and mlp_bias
        return {
            "q_proj": qkv,
            "k_proj": qkv,
            "v_proj": qkv,
            "o_proj": o,
            "gate_proj": mlp,
            "up_proj": mlp,
            "down_proj": mlp,
        }


_COMMON_MUST_BE = {"attention_dropout": (0, 0.0, None)}

LLAMA = Family(
    name="llama",
    model_type="llama",
    architecture="LlamaForCausalLM",
    gguf_arch="llama",
    covers="Llama 2, Llama 3.0-3.3 (RoPE default, linear, dynamic, llama3), TinyLlama, SmolLM/SmolLM2, "
    "Odyssey's own `init` models",
    mlp_bias=True,
    must_be=_COMMON_MUST_BE,
)
MISTRAL = Family(
    name="mistral",
    model_type="mistral",
    architecture="MistralForCausalLM",
    gguf_arch="llama",
    covers="Mistral 7B v0.1-v0.3 and other MistralForCausalLM checkpoints (sliding window as a windowed causal mask)",
    qkv_bias="never",
    o_bias="never",
    sliding="all",
    must_be=_COMMON_MUST_BE,
)
QWEN2 = Family(
    name="qwen2",
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    gguf_arch="qwen2",
    covers="Qwen2, Qwen2.5 (0.5B-72B, Instruct, Coder, Math)",
    qkv_bias="always",
    o_bias="never",
    sliding="layer_types",
    must_be=_COMMON_MUST_BE,
    config_keys=("use_sliding_window", "max_window_layers"),
)
QWEN3 = Family(
    name="qwen3",
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    gguf_arch="qwen3",
    covers="Qwen3 dense models (0.6B-32B); not the MoE ones",
    qk_norm=True,
    sliding="layer_types",
    must_be=_COMMON_MUST_BE,
    config_keys=("use_sliding_window", "max_window_layers"),
)
GEMMA3 = Family(
    name="gemma3",
    model_type="gemma3_text",
    architecture="Gemma3ForCausalLM",
    gguf_arch="gemma3",
    covers="Gemma 3 text models (gemma-3-1b, -1b-it, -270m; the text part of 4B+ is not a Gemma3ForCausalLM)",
    qk_norm=True,
    gemma_norm=True,
    embed_scale=True,
    sandwich_norms=True,
    act_key="hidden_activation",
    activations=("gelu_pytorch_tanh",),
    sliding="layer_types",
    local_rope=True,
    attn_scale_key="query_pre_attn_scalar",
    must_be={
        **_COMMON_MUST_BE,
        "final_logit_softcapping": (None,),
        "attn_logit_softcapping": (None,),
        "use_bidirectional_attention": (False, None),
    },
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3)}
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES.values()}
# architectures people try that are none of the above, for a precise refusal
KNOWN_OTHERS = {
    "gemma": "Gemma 1",
    "gemma2": "Gemma 2",
    "gemma3": "Gemma 3 multimodal (Gemma3ForConditionalGeneration); its text-only Gemma3ForCausalLM form is supported",
    "phi3": "Phi-3",
    "olmo2": "OLMo 2",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3_moe": "Qwen3-MoE",
    "mixtral": "Mixtral (mixture of experts)",
}


def family_of(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type or "llama")


def supported_line() -> str:
    return ", ".join(f"{f.name} ({f.architecture})" for f in FAMILIES.values())
