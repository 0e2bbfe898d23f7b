"""What one LoRA training step holds, phase by phase: the activation formulas of the memory plan
(planner.py). Each is measured against torch on one layer of every family (tests/test_planner.py).
"""

from __future__ import annotations

from odyssey.config import LoraSettings
from odyssey.dtypes import VOCAB_CHUNK
from odyssey.modelconfig import ModelConfig


def lora_parameter_count(cfg: ModelConfig, lora: LoraSettings) -> int:
    """Adapter parameters: r x (in + out) for every targeted Linear."""
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    dims = {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    per_layer = sum(lora.r * (i + o) for t, (i, o) in dims.items() if t in lora.targets)
    total = per_layer * cfg.num_hidden_layers
    if "lm_head" in lora.targets:
        total += lora.r * (d + cfg.vocab_size)
    return total


def saved_bytes(
    cfg: ModelConfig, tokens: int, seq_len: int, compute_itemsize: int, lora: LoraSettings, derived: bool = False
) -> int:
    """Bytes one layer's forward with grad saves for its backward (a kept or spilled layer holds
    them from its forward to its backward), not counting its input, its base weights (handles:
    saved.SavedWeights) nor the RoPE tables every layer shares. Per token (d hidden, q = heads x
    head_dim, kv, f intermediate, r LoRA rank, ci the compute itemsize):
      the two norms' outputs (LoRA's inputs to q/k/v and gate/up) and the residual between
      them, the second norm's input (model.RMSNorm keeps its input, not its fp32 copy)      3d x ci
      q after RoPE and SDPA's output (o_proj's input is a view of it); k, v     (2q + 2kv) x ci
      gate and up (model.glu keeps them, not act(gate)), down_proj's input           3f x ci
      rank-r activations of the seven LoRA targets                                   7r x ci
      SDPA's log-sum-exp                                                         heads x 4
      q/k norms' inputs (Qwen3, Gemma 3)                                    (q + kv) x ci
      Gemma 3's post-attention and post-feedforward norms' inputs                    2d x ci
    and once a layer, below fp32 compute, the LoRA weights cast to the compute dtype. LoRA dropout
    adds its output (fp32) and mask per target; a sliding window shorter than the sequence adds
    SDPA's (T, T) boolean mask and its float form. Measured with saved_tensors_hooks on one layer of each family
    (tests/test_planner.py): the 1.2B's shape, seq 512: bf16 28.4 MiB (was 39.9 before the norms
    and the GLU kept their inputs only), fp32 54.5 MiB (65.5).
    `derived`: a kept or spilled layer's graph (the engine's hooks), where the two norms' outputs
    and down_proj's input are recipes computed again in backward (saved.Derived): (2d + f) x ci a
    token fewer (without LoRA dropout, whose own outputs are saved in their place): 35.4 MiB in fp32
    at the 1.2B's shape."""
    d, q, kv, f, r = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, lora.r
    fam, ci = cfg.family, compute_itemsize
    per_token = (3 * d + 2 * q + 2 * kv + 3 * f + 7 * r) * ci + cfg.num_attention_heads * 4
    if derived and lora.dropout == 0:
        per_token -= (2 * d + f) * ci
    if fam.qk_norm:
        per_token += (q + kv) * ci
    if fam.sandwich_norms:
        per_token += 2 * d * ci
    if lora.dropout > 0:
        per_token += (5 * d + q + f) * (4 + 1)
    once = 0
    if ci < 4:  # A (r, in) and B (out, r) of each target cast for the matmuls
        once = r * (2 * (d + q) + 2 * (d + kv) + 2 * (d + f) + (f + d)) * ci
    windowed = any(w is not None and w < seq_len for w in map(cfg.window, range(cfg.num_hidden_layers)))
    mask = seq_len * seq_len * (1 + ci) * (tokens // seq_len)  # SDPA keeps the bool mask and its float form
    return tokens * per_token + once + (mask if windowed else 0)


def recompute_bytes(cfg: ModelConfig, tokens: int, seq_len: int, compute_itemsize: int, lora: LoraSettings) -> int:
    """Bytes live at the peak of one layer's backward (engine.train_step: the layer run again with
    grad from its saved input, or a kept or spilled layer's graph, then `autograd.backward`):
    what its forward saved (`saved_bytes`) and, at the peak (down_proj's and the GLU's backward),
    per token 3f + 2d in the compute dtype: the gradient flowing into down_proj's input, act(gate)
    computed again, the GLU's gradients, the layer's output and the gradient coming down.
    A sliding window shorter than the sequence makes SDPA's backward hold about 5 bytes per head
    and (T, T) pair more (measured on Gemma 3's shape). Measured with torch's profiler (live
    tensors of its CPU allocator) on one layer of each family (tests/test_planner.py) at width 256
    and at the real shapes, seq 512: 3-9 % above what torch holds."""
    d, f, ci = cfg.hidden_size, cfg.intermediate_size, compute_itemsize
    windowed = any(w is not None and w < seq_len for w in map(cfg.window, range(cfg.num_hidden_layers)))
    attn = 5 * cfg.num_attention_heads * seq_len * seq_len * (tokens // seq_len) if windowed else 0
    return saved_bytes(cfg, tokens, seq_len, ci, lora) + tokens * (3 * f + 2 * d) * ci + attn


def head_bytes(cfg: ModelConfig, tokens: int, compute_itemsize: int) -> int:
    """Bytes live at the peak of the training head pass (headloss.OnlineCrossEntropy over N = B x T
    rows), beyond the saved inputs and the last layer's output: per vocabulary chunk of C rows,
    the logits and their exponentials (N, C) fp32, three at once while `exp(l - m)` runs; the
    gradient's `e @ Wc.float()` needs the chunk in fp32 (C, d) (below fp32 compute: a copy; in fp32
    the chunk is the slot's view or the `weights` term's copy), with (N, d) fp32: G, G x alpha,
    e @ Wc, the target rows and the final norm's fp32 input, and the norm's output. Measured with
    torch's profiler, d 2048, seq 512, bf16: 118.0 MiB (formula 118.0); fp32: 60.0 beyond the
    chunk (60.0)."""
    d, ci = cfg.hidden_size, compute_itemsize
    C = min(VOCAB_CHUNK, cfg.vocab_size)
    rows = 8 * 4  # (N,) fp32: the running max and sum, their updates, the target mask
    at_exp = tokens * (3 * C * 4 + 3 * d * 4 + rows + (d * ci if ci < 4 else 0))  # below fp32: hf's copy
    if ci < 4:  # e (N, C) fp32 and its copy in the compute dtype for the matmul with the chunk as it is
        at_grad = tokens * (2 * C * 4 + C * ci + 5 * d * 4 + d * ci + rows)
    else:
        at_grad = tokens * (2 * C * 4 + 5 * d * 4 + d * ci + rows)
    return max(at_exp, at_grad)


def training_peak(
    cfg: ModelConfig,
    tokens: int,
    seq_len: int,
    compute_itemsize: int,
    lora: LoraSettings,
    grad_accum: int = 1,
    kept: int = 0,
    kept_bytes: int = 0,
) -> tuple[str, int, int, int]:
    """The phase of a LoRA step that holds the most: (its name, workspace, activations, LoRA
    gradient bytes). Activations: saved layer inputs (B, T, d) in the compute dtype, plus the
    last layer's output in the head pass or the gradient flowing down in backward. Backward
    frees layer i's saved input as layer i's LoRA gradients appear (zero_grad(set_to_none) at
    the end of each step); with grad_accum > 1 every gradient is already there from the first
    micro-batch. `kept` last layers keep what their backward needs (`kept_bytes`, all of them:
    see residency.py) from their forward until their backward, instead of a saved input each; the
    first layer recomputed after them then peaks with the saved inputs below it."""
    L = cfg.num_hidden_layers
    a = tokens * cfg.hidden_size * compute_itemsize
    grads = lora_parameter_count(cfg, lora) * 4
    earlier = grads if grad_accum > 1 else 0
    recompute = recompute_bytes(cfg, tokens, seq_len, compute_itemsize, lora)
    held = (L - kept + 1) * a + kept_bytes
    phases = [
        ("the head pass", head_bytes(cfg, tokens, compute_itemsize), held, earlier),
        (f"the backward of layer {L - 1}", recompute, held, earlier or grads // L),
        ("the backward of layer 0", recompute, 2 * a, grads),
    ]
    if 0 < kept < L - 1:
        j = L - kept - 1
        phases.append((f"the backward of layer {j}", recompute, (j + 2) * a, earlier or grads * (kept + 1) // L))
    return max(phases, key=lambda p: p[1] + p[2] + p[3])


def kept_layer_bytes(cfg: ModelConfig, tokens: int, seq_len: int, compute_itemsize: int, lora) -> int:
    """What one layer that keeps its activations holds from its forward to its backward: what its
    forward saved (`saved_bytes`, the norms' and the GLU's outputs as recipes) and its input. Not its
    weights, nor their copy in the compute dtype: autograd saves them as handles and backward binds
    the layer again (saved.SavedWeights); the `weights` term counts the one matrix converted at a
    time. The transients of its backward are the workspace's (`recompute_bytes`), one layer at a
    time."""
    ci = compute_itemsize
    return saved_bytes(cfg, tokens, seq_len, ci, lora, derived=True) + tokens * cfg.hidden_size * ci
