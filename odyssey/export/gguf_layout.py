"""llama.cpp's view of a model: the architecture per family (`ARCHS`), tensor names, the Q/K
row permutation, Gemma's 1 + w norms, the Llama 3 `rope_freqs.weight`, what an architecture cannot
compute (refused by name), and the tensor plan (name, type, shape) of a file. See `gguf.py` for the
table of what differs per family; the writer is there too."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from odyssey.dtypes import DTYPES, GGUF_CODES, numel
from odyssey.errors import OdysseyError
from odyssey.gguf.blocks import BLOCKS
from odyssey.modelconfig import ModelConfig
from odyssey.store import unit_shapes

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
FLOAT_TYPES = ("f32", "f16", "bf16")
# --gguf-type -> (the GGML type of most matrices, general.file_type): llama.cpp's llama-quantize
# file types; q4_k and q5_k are its default "_M" mixes (see `tensor_type`)
QUANT_TYPES = {
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q4_k": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q5_k": ("Q5_K", "MOSTLY_Q5_K_M"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
}
# llama-quantize's fallback for a matrix whose rows are not whole blocks of the chosen type
# (llama-quant.cpp, llama_tensor_get_type); where the fallback's block does not fit either (or the
# type is a 32-element one, which llama-quantize refuses), F16, as llama.cpp's converter writes it
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE divisors (Llama 3 RoPE), not in the store
# HF names inside model.layers.N. -> llama.cpp names inside blk.N. (gguf-py's tensor_mapping.py).
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",  # Gemma 3: post_attention_norm (SANDWICH_NAMES)
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
# Families with norms after attention and MLP (Gemma 3): the pre-MLP norm is llama.cpp's ffn_norm.
SANDWICH_NAMES = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
OTHER_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@dataclass(frozen=True)
class Arch:
    """What llama.cpp's graph for one architecture computes, as far as an export must know it
    (`src/models/<name>.cpp` and `llama-model.cpp` of the llama.cpp that the Makefile's
    llama-cpp-python vendors)."""

    name: str
    """`general.architecture`."""
    permute_qk: bool
    """RoPE on adjacent pairs (LLAMA_ROPE_TYPE_NORM): q/k rows and biases permuted per head. The
    others rotate halves as HF does (NEOX) and take q/k as they are."""
    layer_tensors: frozenset
    """Names inside blk.N. the architecture loads (required and optional ones); a store tensor
    outside this set has nowhere to go, and is refused by name."""
    rope_types: tuple[str, ...]
    """Non-default RoPE types it computes: linear (`rope.scaling.factor`), llama3 (the
    `rope_freqs.weight` divisors, read by the llama graph only)."""
    sliding: bool
    """Per-layer sliding-window attention (`attention.sliding_window` + the layer pattern)."""


_QKV_BIAS = frozenset({"attn_q.bias", "attn_k.bias", "attn_v.bias"})
_BASE = frozenset(
    {
        "attn_norm.weight",
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_output.weight",
        "ffn_norm.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    }
    | _QKV_BIAS  # create_tensor_qkv loads q/k/v biases when present, for every architecture
)
_QK_NORM = frozenset({"attn_q_norm.weight", "attn_k_norm.weight"})
ARCHS = {
    "llama": Arch(
        "llama",
        permute_qk=True,
        layer_tensors=_BASE | {"attn_output.bias", "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"},
        rope_types=("linear", "llama3"),
        sliding=False,
    ),
    # o_proj bias: the qwen2/qwen3/gemma3 graphs never load one (Qwen2 has none; a Qwen3 or Gemma 3
    # with attention_bias has one, and is refused)
    "qwen2": Arch("qwen2", permute_qk=False, layer_tensors=_BASE, rope_types=("linear",), sliding=False),
    "qwen3": Arch("qwen3", permute_qk=False, layer_tensors=_BASE | _QK_NORM, rope_types=("linear",), sliding=False),
    "gemma3": Arch(
        "gemma3",
        permute_qk=False,
        layer_tensors=_BASE | _QK_NORM | {"post_attention_norm.weight", "post_ffw_norm.weight"},
        rope_types=("linear",),  # the global layers'; the local ones take rope.freq_base_swa
        sliding=True,
    ),
}
GEMMA3_SWA_PERIOD = 6  # llama.cpp's default Gemma 3 pattern: layer i is local unless i % 6 == 5
GEMMA3_27B_LAYERS = 62  # llama.cpp scales Gemma 3 27B's queries by (hidden / heads) ** -0.5


def base_type(gguf_type: str):
    """The GGML type of most matrices of a file of `gguf_type` (gguf.GGMLQuantizationType)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    return Q[QUANT_TYPES[gguf_type][0]] if gguf_type in QUANT_TYPES else Q[DTYPES[gguf_type].gguf]


def file_type(gguf_type: str) -> int:
    """`general.file_type`: llama.cpp's LLAMA_FTYPE for the mix (q4_k: MOSTLY_Q4_K_M)."""
    import gguf

    F = gguf.LlamaFileType
    if gguf_type in QUANT_TYPES:
        return F[QUANT_TYPES[gguf_type][1]]
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16}[gguf_type]


def check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise OdysseyError(
            f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r} "
            f"(q4_k and q5_k write llama.cpp's Q4_K_M and Q5_K_M mixes)"
        )


# --------------------------------------------------------------------------------------------
# architecture: the store's family as llama.cpp computes it, or a refusal naming what it cannot


@dataclass(frozen=True)
class Layout:
    """How one model goes into llama.cpp, decided from its config before a byte is written."""

    arch: Arch
    context_length: int
    """`context_length`: max_position_embeddings, or the sliding window where the architecture
    has none (within it, sliding and full attention are the same computation)."""
    note: str | None
    """Why context_length is below max_position_embeddings (printed by write_gguf)."""
    swa_pattern: list[bool] | None
    """Gemma 3: per-layer local flags, when not llama.cpp's default pattern (None: the default,
    or no sliding layers)."""


def _refusal(what: str) -> OdysseyError:
    return OdysseyError(
        f"cannot export GGUF: {what}, so llama.cpp would compute another model; "
        f"export --formats safetensors,pth instead (transformers loads them)"
    )


def rope_kind(cfg: ModelConfig) -> str:
    """The RoPE type of the global layers: default, linear, dynamic or llama3."""
    s = cfg.rope_scaling
    return s.get("rope_type", s.get("type")) if s else "default"


def layout(cfg: ModelConfig) -> Layout:
    """The GGUF form of `cfg`'s family (llama.cpp's architecture name, context length, sliding
    pattern); refuses, naming it, what llama.cpp's architecture cannot compute."""
    fam = cfg.family
    arch = ARCHS[fam.gguf_arch]
    for hf_name in cfg.layer_shapes(0):
        short = gguf_name(hf_name, fam).split(".", 2)[2]
        if short not in arch.layer_tensors:
            what = hf_name.split(".", 3)[3]
            raise _refusal(f"llama.cpp's {arch.name} architecture has no {short} ({fam.name} {what})")
    kind = rope_kind(cfg)
    if kind != "default" and kind not in arch.rope_types:
        raise _refusal(f"llama.cpp's {arch.name} architecture has no {kind} RoPE (rope_scaling of this {fam.name})")
    if arch.name == "qwen2" and cfg.q_size != cfg.hidden_size:
        raise _refusal(
            f"llama.cpp's qwen2 architecture needs heads x head_dim = hidden_size, this model has "
            f"{cfg.num_attention_heads} x {cfg.head_dim} != {cfg.hidden_size}"
        )
    if fam.attn_scale_key:  # Gemma 3: llama.cpp's fixed query scale (llama_model_gemma3::load_arch_hparams)
        big = cfg.num_hidden_layers == GEMMA3_27B_LAYERS
        want = cfg.hidden_size / cfg.num_attention_heads if big else cfg.head_dim
        if float(cfg.query_pre_attn_scalar) != float(want):
            raise _refusal(
                f"llama.cpp's gemma3 architecture scales queries by {'hidden_size / heads' if big else 'head_dim'} "
                f"= {want:g} ** -0.5, this model by query_pre_attn_scalar = {cfg.query_pre_attn_scalar} ** -0.5"
            )
    local = [cfg.layer_type(i) == "sliding_attention" for i in range(cfg.num_hidden_layers)]
    context, note, pattern = cfg.max_position_embeddings, None, None
    if any(local) and arch.sliding:
        default = [i % GEMMA3_SWA_PERIOD < GEMMA3_SWA_PERIOD - 1 for i in range(cfg.num_hidden_layers)]
        pattern = None if local == default else local
    elif any(local) and cfg.sliding_window < context:
        context = cfg.sliding_window
        note = (
            f"llama.cpp's {arch.name} architecture has no sliding window: the GGUF's context length is "
            f"the window, {context} tokens (max_position_embeddings {cfg.max_position_embeddings}), "
            f"within which it computes what this model computes; llama.cpp warns when run beyond it"
        )
    return Layout(arch, context, note, pattern)


# --------------------------------------------------------------------------------------------
# tensors


def gguf_name(hf_name: str, family=None) -> str:
    """HF tensor name -> llama.cpp GGUF name (`model.layers.3.mlp.up_proj.weight` ->
    `blk.3.ffn_up.weight`). `family` (odyssey.families; default Llama) decides the names of the
    norms around the MLP: Gemma 3's post_attention_layernorm is post_attention_norm, not ffn_norm."""
    if hf_name in OTHER_NAMES:
        return OTHER_NAMES[hf_name]
    names = {**LAYER_NAMES, **SANDWICH_NAMES} if family is not None and family.sandwich_norms else LAYER_NAMES
    parts = hf_name.split(".", 3)  # "model", "layers", N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in names:
        return f"blk.{int(parts[2])}.{names[parts[3]]}"
    raise ValueError(f"no GGUF name for tensor {hf_name!r}")


def hf_name(name: str, family=None) -> str:
    """llama.cpp GGUF name -> HF tensor name, the inverse of `gguf_name` (`blk.3.ffn_up.weight` ->
    `model.layers.3.mlp.up_proj.weight`); ValueError for a name with no HF counterpart
    (`rope_freqs.weight`, or a tensor the family does not have)."""
    names = {**LAYER_NAMES, **SANDWICH_NAMES} if family is not None and family.sandwich_norms else LAYER_NAMES
    for hf, gg in OTHER_NAMES.items():
        if name == gg:
            return hf
    parts = name.split(".", 2)  # "blk", N, rest
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        for hf, gg in names.items():
            if gg == parts[2]:
                return f"model.layers.{int(parts[1])}.{hf}"
    raise ValueError(f"no HF name for GGUF tensor {name!r}")


def permute_qk(w, n_head: int):
    """Rows of q_proj (n_head = query heads) or k_proj (n_head = KV heads), (n_head * hd, d),
    or their biases (n_head * hd,): within each head, HF's order [x0..x_{hd/2-1}, y0..y_{hd/2-1}]
    (halves rotated together) becomes llama.cpp's [x0, y0, x1, y1, ...] (adjacent pairs rotated
    together). Same as llama.cpp's convert_hf_to_gguf.py. Works on torch tensors and numpy arrays."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head: int):
    """The inverse of `permute_qk` (for checks: GGUF rows back to HF order)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_factors(cfg: ModelConfig) -> np.ndarray:
    """`rope_freqs.weight` (head_dim / 2,) f32 for Llama 3 RoPE: llama.cpp turns pair i by
    position * base ** (-2i / head_dim) / factor_i. Taken from Odyssey's own frequencies (those
    of transformers), so llama.cpp turns the angles the engine turns."""
    from odyssey.model import rope_inv_freq

    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None, 0, cfg.max_position_embeddings)
    scaled = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, 0, cfg.max_position_embeddings)
    return (plain.double() / scaled.double()).float().numpy()


@dataclass
class TensorPlan:
    """One tensor of the GGUF file, declared before any data is written."""

    hf_name: str | None  # None: computed from the config (rope_freqs.weight)
    name: str  # llama.cpp name
    shape: tuple[int, ...]  # numpy order, HF (out_features, in_features); GGUF stores it reversed
    qtype: object  # gguf.GGMLQuantizationType
    fallback_from: str | None = None  # the type the mix chose, when the rows were not whole blocks of it

    @property
    def np_dtype(self) -> np.dtype:
        """The dtype of the array handed to the writer: raw bytes for bf16 and the block types."""
        if self.qtype.name in ("F32", "F16"):  # the writer infers these from the array's dtype
            return np.dtype(GGUF_CODES[self.qtype.name].numpy)
        return np.dtype(np.uint8)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of that array: (rows, bytes per row) for bf16 and the block types."""
        import gguf

        if self.np_dtype != np.uint8:
            return self.shape
        return tuple(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))

    @property
    def nbytes(self) -> int:
        return numel(self.stored_shape) * self.np_dtype.itemsize


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama-quantize's layers that get more bits in the _M mixes (llama-quant.cpp): the first and
    last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _mix_type(gguf_type: str, name: str, n_layers: int, tied: bool) -> str:
    """The GGML type llama-quantize (no importance matrix) gives matrix `name` in a `gguf_type` file,
    before the fallback for rows that are not whole blocks (llama_tensor_get_type, for dense models):
    - the head (output.weight; token_embd.weight when the head is tied, as llama.cpp then uses it
      for both): Q6_K, unless the mix is q8_0 (Q8_0 then);
    - q4_k, q5_k (Q4_K_M, Q5_K_M): attn_v and ffn_down of the `use_more_bits` layers Q6_K;
    - everything else the mix's type."""
    base = QUANT_TYPES[gguf_type][0]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return base if base == "Q8_0" else "Q6_K"
    if gguf_type in ("q4_k", "q5_k") and name.endswith(("attn_v.weight", "ffn_down.weight")):
        return "Q6_K" if use_more_bits(int(name.split(".")[1]), n_layers) else base
    return base


def tensor_type(gguf_type: str, shape: tuple[int, ...], name: str = "", n_layers: int = 1, tied: bool = False):
    """The GGML type of one tensor (`choose_type` without the fallback's origin)."""
    return choose_type(gguf_type, shape, name, n_layers, tied)[0]


def choose_type(gguf_type: str, shape: tuple[int, ...], name: str = "", n_layers: int = 1, tied: bool = False):
    """The GGML type of one tensor, and the type the mix chose when it had to fall back (else None).
    Vectors (norm weights, biases) are F32 whatever the file type, as llama.cpp expects; f32, f16,
    bf16 files hold every matrix in that type; the block types follow llama-quantize's mixes
    (`_mix_type`), and a matrix whose rows (shape[-1]) are not whole blocks of its type falls back as
    llama-quantize does (`FALLBACK`: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), else to F16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32, None
    if gguf_type in FLOAT_TYPES:
        return base_type(gguf_type), None
    chosen = _mix_type(gguf_type, name, n_layers, tied)
    qtype = chosen
    if shape[-1] % BLOCKS[qtype][0]:
        qtype = FALLBACK.get(qtype, "F16")
        if shape[-1] % BLOCKS[qtype][0]:
            qtype = "F16"
    return Q[qtype], (chosen if qtype != chosen else None)


def plan_tensors(cfg: ModelConfig, units, gguf_type: str) -> list[tuple[object, list[TensorPlan]]]:
    """[(unit, [TensorPlan in write order])] for the units a source lists, in that order; first,
    as unit None, the tensors computed from the config (Llama 3 RoPE: rope_freqs.weight)."""
    import gguf

    fam = cfg.family
    plan = []
    if rope_kind(cfg) == "llama3":
        plan.append((None, [TensorPlan(None, ROPE_FREQS, (cfg.head_dim // 2,), gguf.GGMLQuantizationType.F32)]))
    n, tied = cfg.num_hidden_layers, cfg.tie_word_embeddings
    for unit in units:
        tensors = []
        for hf, shape in unit_shapes(cfg, unit).items():
            name = gguf_name(hf, fam)
            qtype, chosen = choose_type(gguf_type, tuple(shape), name, n, tied)
            tensors.append(TensorPlan(hf, name, tuple(shape), qtype, chosen))
        plan.append((unit, tensors))
    return plan


def prepare_tensor(hf_name: str, t, cfg: ModelConfig):
    """HF tensor -> the layout llama.cpp's architecture for the family expects: q/k rows (weights
    and biases) permuted where it rotates adjacent pairs; Gemma's norm weights w stored as 1 + w
    (its RMSNorm scales by (1 + w), llama.cpp's by the stored weight, as convert_hf_to_gguf.py's
    Gemma3Model writes it), the sum formed in f32 also from a bf16 store (norms are written in f32,
    so 1 + w keeps w's low bits); all else as is."""
    fam = cfg.family
    if ARCHS[fam.gguf_arch].permute_qk:
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return permute_qk(t, cfg.num_attention_heads)
        if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return permute_qk(t, cfg.num_key_value_heads)
    if fam.gemma_norm and hf_name.endswith("norm.weight"):
        import torch

        return t.to(torch.float32) + 1.0
    return t
