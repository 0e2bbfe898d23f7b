"""The decoder of every family in `odyssey.families`: RMSNorm (Llama's, or Gemma's (1 + w)), RoPE
(HF rotate-half; default, linear, dynamic and llama3 frequencies; a base per layer type), GQA
attention via SDPA with optional biases, q/k norms and sliding windows, a gated MLP (SwiGLU or
GeGLU), and Gemma 3's pre/post norms and scaled embeddings.

Pure compute, no I/O. Module and parameter names are those of the family's Hugging Face class
(`model.embed_tokens.weight`, `model.layers.N.self_attn.q_proj.weight`, ..., `model.norm.weight`,
`lm_head.weight`), so state dicts move between the two with no renaming, and PEFT adapters use the
same key names on both.

Shapes: B batch, T new tokens, S tokens in the cache (past + new), d hidden, H query heads,
Hkv key/value heads, hd head width, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from odyssey.dtypes import IGNORE
from odyssey.modelconfig import ModelConfig
from odyssey.saved import note


class _Recomputed(torch.autograd.Function):
    """`fn(*args)` whose backward runs it again from its inputs instead of keeping what its ops
    would save: for cheap elementwise chains (a norm's fp32 copy of its input, the gated MLP's
    act(gate)), where recomputing costs a pass over memory and keeping costs bytes from a layer's
    forward to its backward (kept and spilled layers, the recompute's peak). The same ops run
    again on the same inputs, so values and gradients are those of plain autograd, bit for bit.
    Its inputs are saved with save_for_backward, so saved_tensors_hooks (saved.SavedWeights, the
    spill) see them."""

    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn = fn
        ctx.save_for_backward(*args)
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, grad):
        args = [a.detach().requires_grad_(a.requires_grad) for a in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.fn(*args)
        wanted = [a for a in args if a.requires_grad]
        got = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
        return (None, *(next(got) if a.requires_grad else None for a in args))


class _GLU(torch.autograd.Function):
    """act(g) * u keeping g and u, not act(g) as well: backward computes act(g) again and applies
    the formulas autograd's own MulBackward0 and Silu/GeluBackward0 apply (grad * u, grad * act,
    silu_backward / gelu_backward), so gradients are autograd's bit for bit, without holding the
    product again as _Recomputed would while its backward runs."""

    @staticmethod
    def forward(ctx, g, u, gelu: bool):
        ctx.gelu = gelu
        ctx.save_for_backward(g, u)
        return _glu_value(g, u, gelu)

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        act = F.gelu(g, approximate="tanh") if ctx.gelu else F.silu(g)
        grad_u = grad * act if ctx.needs_input_grad[1] else None
        del act
        grad_g = None
        if ctx.needs_input_grad[0]:
            grad_act = grad * u
            if ctx.gelu:
                grad_g = torch.ops.aten.gelu_backward(grad_act, g, approximate="tanh")
            else:
                grad_g = torch.ops.aten.silu_backward(grad_act, g)
        return grad_g, grad_u, None


def _glu_value(g: torch.Tensor, u: torch.Tensor, gelu: bool) -> torch.Tensor:
    return (F.gelu(g, approximate="tanh") if gelu else F.silu(g)) * u


def glu(g: torch.Tensor, u: torch.Tensor, gelu: bool) -> torch.Tensor:
    """GeGLU (Gemma) or SwiGLU: act(g) * u; in a graph, saving g and u only (_GLU), and the
    output, which down_proj's LoRA saves, noted as computed again from them (saved.note)."""
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad) and not torch.compiler.is_compiling():
        return note(_GLU.apply(g, u, gelu), _glu_value, g, u, gelu)  # (compiled: inductor decides)
    # no graph: g is the projection's fresh output, so act (SiLU) and the product go in place: a
    # generation's forward holds one (tokens, intermediate) tensor fewer
    return (F.gelu(g, approximate="tanh") if gelu else F.silu(g, inplace=True)).mul_(u)


def recomputed(fn, *args: torch.Tensor) -> torch.Tensor:
    """fn(*args), recomputed in backward rather than saved (_Recomputed) when it is part of a graph."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args) and not torch.compiler.is_compiling():
        return _Recomputed.apply(fn, *args)
    return fn(*args)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, gemma: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d) if gemma else torch.ones(d))
        self.eps = eps
        self.gemma = gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The graph keeps x (its own dtype), not the fp32 copy the norm computes with; the output,
        # which LoRA saves as its input, is noted as computed again from x (saved.note)
        out = recomputed(self._norm, x, self.weight)
        if not out.requires_grad or torch.compiler.is_compiling():
            return out
        return note(out, self._norm, x, self.weight)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As HF: normalise in fp32. Llama casts back, then scales (same rounding in bf16); Gemma
        # scales by (1 + w) in fp32, then casts.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (h * (1.0 + weight.float())).to(dtype)
        return weight * h.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, seq_len: int, max_pos: int) -> torch.Tensor:
    """Inverse frequencies (hd/2,) fp32 of one RoPE variant, as transformers' `modeling_rope_utils`
    computes them (checked against it in tests/test_families.py). `seq_len` (largest position + 1
    of the call) matters only to dynamic NTK scaling, which rescales the base beyond `max_pos`.

    Written out rather than called: transformers' functions take a full config object of the
    family, and its rotary classes cost 2.4 s and 110 MB to import in the paged engine."""
    dim = head_dim
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else "default"
    if kind == "dynamic":
        factor = scaling["factor"]
        seq_len = max(seq_len, max_pos)
        theta = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    scaling: dict | None = None,
    max_pos: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) or (B, T) int -> cos, sin of shape (B or 1, 1, T, hd), HF's convention
    (frequencies computed in fp32, halves duplicated: emb = cat(freqs, freqs))."""
    if positions.dim() == 1:
        positions = positions[None]
    seq_len = int(positions.max()) + 1 if positions.numel() else 0
    inv_freq = rope_inv_freq(head_dim, theta, scaling, seq_len, max_pos)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


Rope = dict  # layer type ("full_attention" / "sliding_attention") -> (cos, sin)


def rope_tables(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
    """cos/sin for every layer type of the model (one table when all layers share a RoPE)."""
    out: Rope = {}
    done: dict = {}
    for kind in dict.fromkeys(cfg.layer_type(i) for i in range(cfg.num_hidden_layers)):
        i = next(i for i in range(cfg.num_hidden_layers) if cfg.layer_type(i) == kind)
        theta, scaling = cfg.rope_of(i)
        key = (theta, repr(scaling))
        if key not in done:
            done[key] = rope_cos_sin(positions, cfg.head_dim, theta, dtype, scaling, cfg.max_position_embeddings)
        out[kind] = done[key]
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_mask(T: int, S: int, window: int | None, segments: torch.Tensor | None = None) -> torch.Tensor | None:
    """(T, S) bool: new token t (at position S - T + t) sees key s when s <= its position and, with
    a sliding window, s > position - window (HF's sliding_window_overlay). None: plain causal
    attention with the keys all visible to the last query, where SDPA needs no mask.

    With segments (B, T) (packed examples, no cache: S == T): (B, 1, T, T), block-diagonal causal:
    a token sees the earlier tokens of its own segment only (and, with a window, only the last
    `window` of them), as if each example ran alone."""
    if segments is not None:
        q = torch.arange(T)[:, None]
        k = torch.arange(T)[None]
        allowed = k <= q
        if window is not None and window < T:
            allowed = allowed & (k > q - window)
        same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
        return (same & allowed)[:, None]
    if window is None or window >= S:
        return None
    q = torch.arange(S - T, S)[:, None]
    k = torch.arange(S)[None]
    return (k <= q) & (k > q - window)


class KVCache:
    """Per-layer key/value tensors for generation: k, v of shape (B, Hkv, S, hd)."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[i] is not None:
            k = torch.cat((self.k[i], k), dim=2)
            v = torch.cat((self.v[i], v), dim=2)
        self.k[i], self.v[i] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        fam = cfg.family
        d, hd = cfg.hidden_size, cfg.head_dim
        bias = fam.biases(cfg.attention_bias, cfg.mlp_bias)
        self.layer_idx = layer_idx
        self.layer_type = cfg.layer_type(layer_idx)
        self.window = cfg.window(layer_idx)
        self.H, self.Hkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        # None: SDPA's default 1/sqrt(hd), HF's scaling for every family but Gemma 3
        self.scale = cfg.query_pre_attn_scalar**-0.5 if fam.attn_scale_key else None
        self.q_proj = nn.Linear(d, self.H * hd, bias=bias["q_proj"])
        self.k_proj = nn.Linear(d, self.Hkv * hd, bias=bias["k_proj"])
        self.v_proj = nn.Linear(d, self.Hkv * hd, bias=bias["v_proj"])
        self.o_proj = nn.Linear(self.H * hd, d, bias=bias["o_proj"])
        if fam.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, fam.gemma_norm)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, fam.gemma_norm)
        self.qk_norm = fam.qk_norm

    def forward(
        self, x: torch.Tensor, rope: Rope, cache: KVCache | None = None, segments: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T, d); segments (B, T) int or None: attention stays within a segment (packing)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.hd)
        k = self.k_proj(x).view(B, T, self.Hkv, self.hd)
        v = self.v_proj(x).view(B, T, self.Hkv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.qk_norm:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, Hkv, T, hd)
        cos, sin = rope[self.layer_type]
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        past = 0
        if cache is not None:
            past = cache.k[self.layer_idx].shape[2] if cache.k[self.layer_idx] is not None else 0
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, hd)
        gqa = self.H != self.Hkv
        S = k.shape[2]
        if segments is not None and cache is not None:
            raise ValueError("segments (packed examples) are for training passes, not with a KV cache")
        mask = attention_mask(T, S, self.window, segments)
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        elif T == 1:
            # One new token sees every cached key; is_causal=True would align top-left (PITFALLS).
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=gqa)
        else:  # several new tokens after a cache: causal mask aligned bottom-right
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        bias = cfg.family.biases(cfg.attention_bias, cfg.mlp_bias)
        self.gate_proj = nn.Linear(d, f, bias=bias["gate_proj"])
        self.up_proj = nn.Linear(d, f, bias=bias["up_proj"])
        self.down_proj = nn.Linear(f, d, bias=bias["down_proj"])
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the graph keeps gate and up, not act(gate) as well (recomputed in backward)
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), self.gelu))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        fam = cfg.family
        d, eps, gemma = cfg.hidden_size, cfg.rms_norm_eps, fam.gemma_norm
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(d, eps, gemma)
        self.post_attention_layernorm = RMSNorm(d, eps, gemma)
        self.sandwich = fam.sandwich_norms
        if self.sandwich:  # Gemma 3: post_attention_layernorm normalises the attention's output
            self.pre_feedforward_layernorm = RMSNorm(d, eps, gemma)
            self.post_feedforward_layernorm = RMSNorm(d, eps, gemma)

    def forward(
        self, x: torch.Tensor, rope: Rope, cache: KVCache | None = None, segments: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.sandwich:
            h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, cache, segments))
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = x + self.self_attn(self.input_layernorm(x), rope, cache, segments)  # (B, T, d)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.family.gemma_norm)


def embed_scale(cfg: ModelConfig, dtype: torch.dtype) -> torch.Tensor | None:
    """Gemma's sqrt(hidden) embedding factor, rounded to the weights' dtype as HF does; else None."""
    if not cfg.family.embed_scale:
        return None
    return torch.tensor(cfg.hidden_size**0.5).to(dtype)


class CausalLM(nn.Module):
    """The whole model in RAM (tests, full training of small models, the in-RAM baseline)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        dtype: torch.dtype | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, d). positions (B, T): each token's
        RoPE position (default past..past+T-1); segments (B, T): packed examples, attention within
        a segment only (see attention_mask)."""
        cfg = self.config
        x = self.model.embed_tokens(input_ids)
        scale = embed_scale(cfg, x.dtype)
        if scale is not None:
            x = x * scale
        if dtype is not None:
            x = x.to(dtype)
        past = cache.length() if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + input_ids.shape[1])
        rope = rope_tables(cfg, positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, cache, segments)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) in the weights' dtype (positions, segments: see
        hidden_states)."""
        return self.lm_head(self.hidden_states(input_ids, cache, positions=positions, segments=segments))

    def tied_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with HF names, without lm_head.weight when the head is tied (as HF saves)."""
        sd = self.state_dict()
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd


LlamaForCausalLM = CausalLM  # the name before families; every family uses the same class
LlamaModel = DecoderModel


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in fp32 over the trained targets: logits (B, T, V), targets (B, T) int64,
    IGNORE (-100) where not trained (no loss, no gradient). With no trained target at all: 0, with
    a zero gradient (not NaN)."""
    flat = targets.reshape(-1)
    if not bool((flat != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE)
