"""GGUF export: a store (or anything with its reading API) -> one `.gguf` file that llama.cpp loads.

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
- norm weights and biases in f32 whatever the file type; q8_0 only for rows that are a multiple
  of 32 long (others fall back to f16, as llama.cpp's own converter does);
- what an architecture cannot compute (a dynamic RoPE; Llama 3 RoPE outside the llama graph; an
  o_proj bias outside it; a Gemma 3 query scale other than llama.cpp's) is refused by name
  (`layout`); a sliding window where the architecture has none makes the GGUF's context length
  the window (exact within it), with a note;
- the tokenizer as "gpt2" (byte-level BPE): tokens in GPT-2 byte-to-unicode form (as HF's
  tokenizer.json stores them), token types, merges "a b", special ids, the pre-tokenizer name
  whose regex matches the tokenizer's; padded with unused tokens up to the model's vocab_size.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from odyssey import atomic
from odyssey.config import ModelConfig, format_bytes
from odyssey.dtypes import DTYPES, GGUF_CODES, numel
from odyssey.errors import OdysseyError
from odyssey.export import DISK_MARGIN
from odyssey.store import drop_cache, unit_shapes

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
Q8_CHUNK_ELEMENTS = 1 << 22  # elements quantized per gguf.quants call: 16 MiB of f32 input
HEADER_SLACK_BYTES = 1 << 20  # bytes allowed for key-values and tensor infos beyond the vocabulary
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

# Pre-tokenizer regexes (as HF tokenizer.json writes them) whose llama.cpp name we know.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2/2.5/3: one digit at a time


def _types():
    import gguf

    Q = gguf.GGMLQuantizationType
    return {t: Q.Q8_0 if t == "q8_0" else Q[DTYPES[t].gguf] for t in GGUF_TYPES}


def _file_type(gguf_type: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[gguf_type]


def check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise OdysseyError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")


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

    @property
    def np_dtype(self) -> np.dtype:
        """The dtype of the array handed to the writer: raw bytes for bf16 and q8_0."""
        if self.qtype.name in ("F32", "F16"):  # the writer infers these from the array's dtype
            return np.dtype(GGUF_CODES[self.qtype.name].numpy)
        return np.dtype(np.uint8)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of that array: (rows, bytes per row) for bf16 and q8_0."""
        import gguf

        if self.np_dtype != np.uint8:
            return self.shape
        return tuple(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))

    @property
    def nbytes(self) -> int:
        return numel(self.stored_shape) * self.np_dtype.itemsize


def tensor_type(gguf_type: str, shape: tuple[int, ...]):
    """The GGML type of one tensor: vectors (norm weights, biases) in f32 as llama.cpp expects;
    q8_0 needs rows that are a multiple of its 32-element block, else f16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    qtype = _types()[gguf_type]
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def plan_tensors(cfg: ModelConfig, units, gguf_type: str) -> list[tuple[object, list[TensorPlan]]]:
    """[(unit, [TensorPlan in write order])] for the units a source lists, in that order; first,
    as unit None, the tensors computed from the config (Llama 3 RoPE: rope_freqs.weight)."""
    import gguf

    fam = cfg.family
    plan = []
    if rope_kind(cfg) == "llama3":
        plan.append((None, [TensorPlan(None, ROPE_FREQS, (cfg.head_dim // 2,), gguf.GGMLQuantizationType.F32)]))
    for unit in units:
        shapes = unit_shapes(cfg, unit).items()
        plan.append(
            (unit, [TensorPlan(n, gguf_name(n, fam), tuple(s), tensor_type(gguf_type, tuple(s))) for n, s in shapes])
        )
    return plan


def encode(t, plan: TensorPlan) -> np.ndarray:
    """A torch tensor (any float dtype, HF layout, already permuted) -> the array written for
    `plan` (f32, f16, or uint8 bytes for bf16/q8_0, shape `plan.stored_shape`)."""
    import gguf
    import torch

    Q = gguf.GGMLQuantizationType
    if plan.qtype != Q.Q8_0:  # f32, f16, bf16: a cast
        t = t.to(GGUF_CODES[plan.qtype.name].torch()).contiguous()
        return t.numpy() if plan.np_dtype != np.uint8 else t.view(torch.uint8).numpy()  # bf16: (rows, 2 * cols) bytes
    out = np.empty(plan.stored_shape, dtype=np.uint8)  # (rows, cols / 32 * 34) bytes
    step = max(1, Q8_CHUNK_ELEMENTS // t.shape[1])  # rows per call: bounds gguf.quants' f32 temporaries
    for r0 in range(0, t.shape[0], step):
        out[r0 : r0 + step] = gguf.quants.quantize(t[r0 : r0 + step].to(torch.float32).numpy(), Q.Q8_0)
    return out


def _prepare(hf_name: str, t, cfg: ModelConfig):
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


# --------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class GGUFVocab:
    """The tokenizer as GGUF stores it: one entry per model vocabulary row, and the settings
    llama.cpp tokenizes with. `model` is llama.cpp's tokenizer model: "gpt2" (byte-level BPE: Llama
    3, Qwen, SmolLM2, Odyssey's own; tokens in GPT-2 byte-to-unicode form, merges) or "llama"
    (SentencePiece-style BPE or Unigram: TinyLlama, Llama 2, Gemma; "▁" for a space, <0xXX> byte
    tokens, a score per token that orders the merges)."""

    model: str  # "gpt2" | "llama"
    tokens: list[str]  # "[PAD<i>]" for rows the tokenizer lacks
    types: list[int]  # gguf.TokenType: NORMAL, CONTROL (special), USER_DEFINED, BYTE, UNKNOWN, UNUSED (padding)
    scores: list[float] | None  # "llama" only: higher merges first (-rank of the merge making the token)
    pre: str  # llama.cpp pre-tokenizer name ("default" for "llama")
    special: object  # gguf.SpecialVocab: merges, special ids, add_bos/add_eos, chat template
    add_space_prefix: bool | None  # "llama" only: a "▁" before the text (Metaspace / Prepend)

    @property
    def merges(self) -> list[str]:
        return self.special.merges

    @property
    def bos_id(self) -> int | None:
        return self.special.special_token_ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self.special.special_token_ids.get("eos")


_REDO = "use the tokenizer the model was made for (`odyssey import` copies a checkpoint's)"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OdysseyError(f"{path} cannot be read as JSON ({e}); {_REDO}") from None
    if not isinstance(data, dict):
        raise OdysseyError(f"{path} is not a tokenizer.json object; {_REDO}")
    return data


def _parts(component: dict | None, key: str) -> list[dict]:
    """A tokenizer.json component (pre_tokenizer, normalizer, decoder) as its list of parts."""
    if not isinstance(component, dict):
        return []
    if component.get("type") == "Sequence":
        return [p for p in component.get(key) or [] if isinstance(p, dict)]
    return [component]


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer: "gpt-2" for a plain ByteLevel with its
    regex (what Odyssey trains), "llama-bpe" for Llama 3's split, "qwen2" for Qwen's, "smollm" for
    single digits then GPT-2's regex (SmolLM2); "default" for another byte-level split; None when
    the tokenizer is not byte-level."""
    parts = _parts(pre, "pretokenizers")
    kinds = [p.get("type") for p in parts]
    if "ByteLevel" not in kinds:
        return None
    gpt2_regex = parts[kinds.index("ByteLevel")].get("use_regex", True)
    if kinds == ["ByteLevel"] and gpt2_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and gpt2_regex and parts[0].get("individual_digits"):
        return "smollm"
    regexes = [(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if regexes == [LLAMA3_REGEX]:
        return "llama-bpe"
    if regexes == [QWEN2_REGEX]:
        return "qwen2"
    return "default"


def _space_prefix(tok: dict) -> bool | None:
    """For a SentencePiece-style tokenizer: does it put "▁" before the text (Metaspace with
    prepend_scheme always/first, or a Prepend("▁") normalizer as in Llama 2), or not (Gemma:
    spaces replaced, nothing prepended)? None: not SentencePiece-style."""
    for p in _parts(tok.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace":
            if "prepend_scheme" in p:
                return p["prepend_scheme"] in ("always", "first")
            return bool(p.get("add_prefix_space", True))
    norms = _parts(tok.get("normalizer"), "normalizers")
    if any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in norms):
        return True
    if any(n.get("type") == "Replace" and (n.get("content") == "▁") for n in norms):
        return False
    return None


def tokenizer_model(tok: dict) -> str | None:
    """llama.cpp's tokenizer model for a tokenizer.json: "gpt2" for byte-level BPE, "llama" for
    SentencePiece-style BPE (byte fallback or "▁" spaces) and Unigram; None for anything else
    (WordPiece, a BPE with neither)."""
    model = tok.get("model") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and pre_tokenizer_name(tok.get("pre_tokenizer")):
        return "gpt2"
    if model.get("type") in ("BPE", "Unigram") and (model.get("byte_fallback") or _space_prefix(tok) is not None):
        return "llama"
    return None


def _merge_scores(model: dict, by_id: dict[int, str]) -> list[float]:
    """A SentencePiece-style score per id: the BPE merge that makes a token first ranks it (score
    -rank: llama.cpp's "llama" tokenizer merges the highest-scoring pair first, as the BPE applies
    its merges in rank order), the Unigram model's own log-probability; 0 for tokens no merge makes
    (characters, bytes, specials)."""
    ids = {t: i for i, t in by_id.items()}
    scores = [0.0] * (max(by_id, default=-1) + 1)
    if model.get("type") == "Unigram":
        for i, (_, score) in enumerate(model.get("vocab") or []):
            scores[i] = float(score)
        return scores
    for rank, m in reversed(list(enumerate(model.get("merges") or []))):  # the lowest rank wins
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = ids.get(a + b)
        if i is not None:
            scores[i] = -float(rank)
    return scores


def _special_vocab(directory: Path, merges: bool, n_vocab: int):
    """gguf's `SpecialVocab` of `directory`, without its log lines: it guesses add_bos/add_eos from
    the post-processor's template and warns where that guess is unsure (Llama 2's pair template),
    and read_vocab replaces that guess with what transformers does."""
    import logging

    import gguf

    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(directory, load_merges=merges, n_vocab=n_vocab)
    finally:
        log.setLevel(level)


def read_vocab(tokenizer_path: Path, cfg: ModelConfig) -> GGUFVocab:
    """The tokenizer in `tokenizer_path`'s directory -> the GGUF vocabulary for a model with
    `cfg.vocab_size` rows. Tokens, types and scores come from tokenizer.json; special ids and
    whether a BOS/EOS is added from the tokenizer as transformers loads it; merges and the chat
    template through gguf's own `SpecialVocab` (as llama.cpp's converter). Raises OdysseyError
    naming the fix for what llama.cpp cannot load."""
    import gguf

    from odyssey.tokenizer import load_model_tokenizer

    tok = _read_json(tokenizer_path)
    model = tok.get("model") or {}
    kind = tokenizer_model(tok)
    if kind is None:
        raise OdysseyError(
            f"{tokenizer_path} is neither a byte-level BPE (GPT-2, Llama 3, Qwen) nor a SentencePiece-style "
            f"tokenizer (model {model.get('type')!r}); llama.cpp has no tokenizer model for it: {_REDO}"
        )
    if model.get("type") == "Unigram":
        by_id = {i: piece for i, (piece, _) in enumerate(model.get("vocab") or [])}
    else:
        by_id = {int(i): t for t, i in (model.get("vocab") or {}).items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    n_tok = max(by_id, default=-1) + 1
    if n_tok > cfg.vocab_size:
        raise OdysseyError(
            f"{tokenizer_path} has {n_tok} tokens, the model only {cfg.vocab_size} embedding rows; {_REDO}"
        )
    if kind == "gpt2" and not model.get("merges"):
        raise OdysseyError(
            f"{tokenizer_path} has no BPE merges (llama.cpp refuses a byte-level vocabulary without "
            f"them); train one with a --vocab-size above 259 (`odyssey prepare-data --vocab-size`)"
        )
    hf = load_model_tokenizer(tokenizer_path.parent)
    unk = hf.unk_id if kind == "llama" else None
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # the model has rows the tokenizer never produces
            types.append(T.UNUSED)
            continue
        t, a = by_id[i], added.get(i)
        tokens.append(t)
        if a is not None and i != unk:
            types.append(T.CONTROL if a.get("special") else T.USER_DEFINED)
        elif i == unk:
            types.append(T.UNKNOWN)
        elif kind == "llama" and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    scores = None
    if kind == "llama":
        scores = _merge_scores(model, by_id)
        scores += [-1000.0] * (cfg.vocab_size - len(scores))  # padding rows, as llama.cpp's converter
    special = _special_vocab(tokenizer_path.parent, kind == "gpt2", cfg.vocab_size)
    # the ids and the BOS/EOS rules transformers uses win over SpecialVocab's reading of the files
    for typ, i in (("bos", hf.bos_id), ("eos", hf.eos_id), ("unk", hf.unk_id), ("pad", hf.pad_id)):
        if i is not None and i < cfg.vocab_size:
            special.special_token_ids[typ] = i
    around = hf.added  # the ids the tokenizer puts around any text
    bos, eos = special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    special.add_special_token = {
        "bos": bool(around) and around[0] == bos,
        "eos": bool(around) and around[-1] == eos and (len(around) > 1 or around[0] != bos),
    }
    return GGUFVocab(
        model=kind,
        tokens=tokens,
        types=[int(t) for t in types],
        scores=scores,
        pre=pre_tokenizer_name(tok.get("pre_tokenizer")) if kind == "gpt2" else "default",
        special=special,
        add_space_prefix=_space_prefix(tok) if kind == "llama" else None,
    )


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
    writer.add_file_type(int(_file_type(gguf_type)))
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    vocab.special.add_to_gguf(writer, quiet=True)  # merges, special ids, add_bos/add_eos, chat template


def _vocab_bytes(vocab: GGUFVocab) -> int:
    """Bytes the token, merge and score arrays and the chat template take in the file (8-byte
    length + UTF-8 per string, 4 bytes per type and score)."""
    strings = sum(len(s.encode("utf-8")) + 8 for s in vocab.tokens + vocab.merges)
    template = vocab.special.chat_template
    template = json.dumps(template) if isinstance(template, list) else template or ""
    arrays = 4 * len(vocab.types) * (2 if vocab.scores is not None else 1)
    return strings + arrays + 8 + len(template.encode("utf-8"))


def _tensor_bytes(plan) -> int:
    """Bytes of tensor data in the file: each tensor starts 32-byte aligned."""
    return sum(-(-p.nbytes // 32) * 32 for _, plans in plan for p in plans)


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
    return FilePlan(lay, vocab, plan, _tensor_bytes(plan) + _vocab_bytes(vocab) + HEADER_SLACK_BYTES)


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
    Returns {"path", "gguf_type", "bytes" (file size), "tensors", "seconds", "mb_s" (file MB/s)}."""
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
    if vocab.model == "gpt2" and vocab.pre == "default":
        print(
            f"warning: the pre-tokenizer of {source.tokenizer_path()} is not one llama.cpp knows by name; "
            f"it will split text by its default rules, so its tokens may differ from this tokenizer's"
        )

    writer = gguf.GGUFWriter(None, fp.layout.arch.name)
    add_model_metadata(writer, cfg, gguf_type, Path(source.root).name, fp.layout)
    add_vocab(writer, vocab)
    for _, plans in plan:
        for p in plans:  # raw bytes (bf16, q8_0) need their type; f32/f16 follow the numpy dtype
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
        data = encode(_prepare(p.hf_name, t, cfg), p)
        del t
        writer.write_tensor_data(data)
        bar.update(p.nbytes)
        del data
