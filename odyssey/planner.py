"""Memory plan for a RAM budget: the resident memory of a run, term by term, and the verdict.

Every command that takes `--ram-budget` plans first and refuses early, listing the terms, the
smallest budget that fits and the longest sequence that fits in the given budget.

Terms (bytes of anonymous memory, which is what a budget must bound; the pager's pool is a shared
mapping, `RssShmem`, counted here all the same):
- runtime      the interpreter with torch (and peft when training) imported and torch's meta-device
               kernels loaded (the skeleton needs them), measured in-process
- buffer pool  `slots` page-aligned buffers of the largest pager unit (pager.py): the largest
               decoder layer, since the embedding and head are read in row blocks no larger
               (`Paging`; a 128k vocabulary no longer sizes the pool)
- pinned units what the budget left over holds resident (residency.py); in generation they are held
               in the compute dtype (engine.Engine `hold_pinned`): their buffers' bytes scaled by
               compute / store itemsize
- weights      what is converted to the compute dtype when it differs from the store dtype: a
               layer's largest matrix (engine: CastWeight converts each matrix at its use, again
               in backward) and its vectors, or one head chunk
- workspace    generation: one layer's activations, about 3d + 3f values a token (the MLP's peak).
               Training: what the phase at the peak holds for a moment (`recompute_bytes`,
               `head_bytes`): one layer recomputed with grad and its backward, or the head pass
- activations  generation: none kept. Training: the saved layer inputs (B x T x d, compute dtype)
               and the gradient flowing down, as many as the phase at the peak holds
- kv cache     generation: L x 2 x B x T x kv
- adapters     LoRA weights (fp32); training adds two AdamW moments and the LoRA gradients the
               phase at the peak holds
- logits       generation: the last position's logits
- margin       what the process holds beyond the terms: allocator slack and fragmentation, 5 % of
               the rest + 16 MiB; training adds `TRAINING_SLACK` (memory outside torch's tensors)

Training peaks in one of three phases of a step, and the plan is the largest (`Plan.peak` names it):
the head pass (every saved input, no LoRA gradient yet), the backward of the last layer (every
saved input, that layer's gradients) or that of layer 0 (one saved input, every gradient). Backward
frees layer i's saved input as it makes layer i's gradients, so the two are never both whole; with
grad_accum > 1 the gradients of the earlier micro-batches are whole in every phase.

Below the terms, `Paging` says how the pager reads the model: slot size, the row blocks of the
embedding and head, and the reads of one step (each head block counted; a head of more units than
the slots spare evicts the last layer, which backward then reads again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from odyssey.config import LoraSettings, format_bytes
from odyssey.dtypes import DTYPES, MIB, VOCAB_CHUNK, compute_dtype_info, numel
from odyssey.errors import OdysseyError
from odyssey.modelconfig import ModelConfig
from odyssey.paging import Paging, paging_for_config, paging_for_store
from odyssey.residency import FILL, Residency, UnitSizes, decide, sizes_for_paging, sizes_for_store

SPILL_STAGING = 8 * MIB  # spill.py: the page-aligned buffer a spilled layer is written through

# Measured (RssAnon, torch 2.13, peft 0.21.2, transformers 5.24, Linux x86-64, jemalloc or glibc): torch
# and its meta kernels 212-215 MiB; with peft 260-266 MiB (`odyssey plan` and `odyssey train` both
# measured 264-266 in-process). Used where no measurement can be made (not Linux).
RUNTIME_FALLBACK = {"forward": 230 * MIB, "lora": 270 * MIB, "full": 270 * MIB}

# Training's extra margin. A LoRA step holds more than its tensors: measured at the peak of steps
# 2-8 (anonymous + pool - the terms without margin), 43-57 MiB on the six real-model shapes and
# the 1.2B model (bf16 compute, `odyssey train`) and 30-64 MiB on the small config (fp32 and bf16).
# jemalloc's counters split it: 24-31 MiB allocated outside torch's tensors after the first step
# (MKL keeps 18-21 MiB of them: MKL_DISABLE_FAST_MM=1 frees those), and 10-48 MiB of freed pages
# not yet returned (dirty_decay_ms 1000, odyssey.runtime.allocator; a run with KEEP_ROOM over its
# plan keeps them all instead). 5 % + 16 MiB alone fell short by up to 25 MiB (small config, fp32).
TRAINING_SLACK = 32 * MIB


@dataclass
class Plan:
    mode: str  # "forward" (generate) | "lora" (train with adapters) | "full" (train everything)
    terms: dict[str, int] = field(default_factory=dict)
    budget: int | None = None
    seq_len: int = 0
    batch_size: int = 1
    paging: Paging | None = None  # None in full mode (no pager)
    slots: int = 2
    peak: str = ""  # training: the phase of a step the plan is sized by
    residency: Residency | None = None  # with a budget: pinned units, layers keeping activations

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def table(self) -> str:
        width = max(len(k) for k in self.terms)
        lines = [f"memory plan ({self.mode}, batch {self.batch_size} x seq {self.seq_len}):"]
        for k, v in self.terms.items():
            lines.append(f"  {k:<{width}}  {format_bytes(v):>12}")
        lines.append(f"  {'total':<{width}}  {format_bytes(self.total):>12}")
        if self.peak:
            lines.append(f"  (the peak of a step: {self.peak})")
        if self.budget is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(
                f"  {'budget':<{width}}  {format_bytes(self.budget):>12}   -> {verdict} "
                f"(headroom {format_bytes(self.budget - self.total)})"
            )
        if self.paging is not None:
            lines += self.paging.lines(self.mode, self.slots, reads=self.residency is None)
        if self.residency is not None:
            lines += self.residency.lines()
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "terms": self.terms,
            "total": self.total,
            "budget": self.budget,
            "fits": self.fits,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "slots": self.slots,
            "peak": self.peak,
            "paging": self.paging.to_json() if self.paging is not None else None,
            "residency": self.residency.to_json() if self.residency is not None else None,
        }


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


def saved_bytes(cfg: ModelConfig, tokens: int, seq_len: int, compute_itemsize: int, lora: LoraSettings) -> int:
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
    and the GLU kept their inputs only), fp32 54.5 MiB (65.5)."""
    d, q, kv, f, r = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, lora.r
    fam, ci = cfg.family, compute_itemsize
    per_token = (3 * d + 2 * q + 2 * kv + 3 * f + 7 * r) * ci + cfg.num_attention_heads * 4
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
    forward saved (`saved_bytes`) and its input. Not its weights, nor their copy in the compute
    dtype: autograd saves them as handles and backward binds the layer again
    (saved.SavedWeights); the `weights` term counts the one matrix converted at a time. The
    transients of its backward are the workspace's (`recompute_bytes`), one layer at a time."""
    ci = compute_itemsize
    return saved_bytes(cfg, tokens, seq_len, ci, lora) + tokens * cfg.hidden_size * ci


def measured_runtime(mode: str) -> int:
    """Anonymous RSS of this process with what `mode` imports (torch; peft for training)."""
    try:
        import torch

        # The model skeleton is built on the meta device, whose kernels torch loads on first use
        # (torch._refs, _decomp, sympy: about 70 MiB; peft's imports load them too): load them now.
        torch.empty(1, device="meta").normal_()
        if mode == "lora":
            import peft  # noqa: F401
        from odyssey.runtime.memory import process_memory

        return process_memory().anon_bytes
    except Exception:  # not Linux, or imports failing: a measured constant of this machine
        return RUNTIME_FALLBACK[mode]


def plan(
    cfg: ModelConfig,
    *,
    mode: str,
    seq_len: int,
    batch_size: int = 1,
    slots: int = 2,
    store_itemsize: int = 2,
    compute_itemsize: int = 4,
    paging: Paging | None = None,
    layer_params: int | None = None,
    lora: LoraSettings | None = None,
    budget: int | None = None,
    runtime: int | None = None,
    grad_accum: int = 1,
    dequant_workspace: int | None = None,
    pin: bool = True,
    recompute: str = "auto",
    sizes: UnitSizes | None = None,
    spill: bool = False,
) -> Plan:
    """The plan of a run of `cfg`; `paging` from the store (`paging_for_store`), else as `odyssey
    init` would write it. `grad_accum`: micro-batches a training step sums gradients over.
    `dequant_workspace`: a GGUF file's matrices are dequantized one at a time into a workspace of
    this many bytes (GGUFStore.workspace_bytes), counted as a term. With a budget, what the step
    does not need of it is given to residency (residency.py): layers that keep their activations
    (`recompute` auto) and pinned units (`pin`); `sizes` are the pager units' sizes
    (`residency.sizes_for_store`), else estimated from `paging`."""
    d, f, kv, L, V = (cfg.hidden_size, cfg.intermediate_size, cfg.kv_size, cfg.num_hidden_layers, cfg.vocab_size)
    B, T = batch_size, seq_len
    BT = B * T
    ci = compute_itemsize
    if layer_params is None:  # converted at once: the largest matrix and the vectors (CastWeight)
        shapes = list(cfg.layer_shapes(0).values())
        layer_params = max(numel(s) for s in shapes if len(s) == 2) + sum(numel(s) for s in shapes if len(s) != 2)
    if paging is None:
        paging = paging_for_config(cfg, store_itemsize)
    runtime = runtime if runtime is not None else measured_runtime(mode)
    if mode == "full":
        params = cfg.num_parameters()
        per_token = 6 * d + 2 * kv + 4 * f  # values live in one layer's forward
        terms = {
            "runtime": runtime,
            "parameters": params * 4,
            "gradients + AdamW": params * 4 * 3,
            "activations": L * BT * per_token * 4 * 2,
            "logits": BT * V * 4 * 3,
        }
        terms["margin"] = int(sum(terms.values()) * 0.05) + 16 * MIB + TRAINING_SLACK
        return Plan(mode, terms, budget, seq_len, batch_size, None, slots, "")
    settings = lora if lora is not None else LoraSettings()
    kept_one = kept_layer_bytes(cfg, BT, T, ci, settings) if mode != "forward" else 0

    def paged_terms(pinned_bytes: int, kept: int, paged_any: bool, spilled: bool = False) -> tuple[dict[str, int], str]:
        terms: dict[str, int] = {"runtime": runtime}
        peak = ""
        terms["buffer pool"] = slots * paging.slot_bytes if paged_any else 0  # untouched slots cost nothing
        if pinned_bytes:  # generation holds them converted to the compute dtype, their buffers given back
            terms["pinned units"] = pinned_bytes * ci // store_itemsize if mode == "forward" else pinned_bytes
        if ci != store_itemsize:  # the matrix being converted (the workspace stays), a head chunk:
            pair = (layer_params, VOCAB_CHUNK * d)  # a float store's share it (Engine.head_ws), a GGUF's not
            terms["weights"] = (max(pair) if dequant_workspace is None else sum(pair)) * ci
        if dequant_workspace is not None:  # GGUF: one matrix (again in backward) and a head chunk
            terms["dequant workspace"] = dequant_workspace
        if mode == "forward":
            terms["workspace"] = BT * (3 * d + 3 * f) * ci  # no grad: the MLP's peak is live
            terms["kv cache"] = L * 2 * BT * kv * ci
            terms["logits"] = B * V * ci * 2
            if lora is not None:
                terms["adapters"] = lora_parameter_count(cfg, lora) * 4
        else:
            peak, workspace, activations, grads = training_peak(
                cfg, BT, T, ci, settings, grad_accum, kept, kept * kept_one
            )
            terms["workspace"] = workspace
            terms["activations"] = activations
            if spilled:  # one spilled layer's tensors in flight (written, or read ahead) and the staging buffer
                terms["spill in flight"] = kept_one + SPILL_STAGING
            if lora is not None:  # weights and two AdamW moments, fp32, and the gradients at the peak
                terms["adapters + AdamW"] = lora_parameter_count(cfg, lora) * 4 * 3 + grads
        rest = sum(terms.values())
        terms["margin"] = int(rest * 0.05) + 16 * MIB + (TRAINING_SLACK if mode != "forward" else 0)
        return terms, peak

    res = None
    kept = pinned = 0
    if budget is not None:
        layer_sizes, head_sizes = sizes if sizes is not None else sizes_for_paging(paging)
        res = decide(
            mode=mode,
            layers=L,
            head=head_sizes,
            layer_size=lambda i: layer_sizes[i],
            slots=slots,
            fits=lambda nbytes, k, paged_any, sp: (
                sum(paged_terms(nbytes, k, paged_any, sp)[0].values()) <= budget * FILL
            ),
            pin=pin,
            recompute=recompute,
            spill=spill and mode != "forward",
        )
        res.kept_bytes = res.kept * kept_one
        res.spill_bytes = res.spilled * (kept_one - BT * d * ci)  # what is saved; the input stays in RAM
        if spill and mode != "forward" and not res.spilled and res.kept < L:
            res.spill_room = kept_one + SPILL_STAGING
        kept, pinned = res.kept, res.pinned_bytes
        paged_any = res.paged > 0
        spilled = res.spilled > 0
    else:
        paged_any, spilled = True, False
    terms, peak = paged_terms(pinned, kept, paged_any, spilled)
    return Plan(mode, terms, budget, seq_len, batch_size, paging, slots, peak, res)


def largest_layer_matrix(store) -> int:
    """Elements of the largest matrix of a store's decoder layers (what the engine converts at once
    when the compute dtype is not the store's)."""
    return max(
        numel(s.shape)
        for i in range(store.config.num_hidden_layers)
        for s in store.shards[i].tensors.values()
        if len(s.shape) == 2
    )


def plan_for_store(
    store,
    *,
    mode: str,
    seq_len: int,
    batch_size: int = 1,
    slots: int = 2,
    compute_dtype=None,
    lora: LoraSettings | None = None,
    budget: int | None = None,
    runtime: int | None = None,
    grad_accum: int = 1,
    pin: bool = True,
    recompute: str = "auto",
    spill: bool = False,
) -> Plan:
    """A plan with the sizes read from an opened store."""
    if compute_dtype is not None and not isinstance(compute_dtype, str):  # a torch.dtype
        compute_itemsize = compute_dtype.itemsize
    else:
        compute_itemsize = compute_dtype_info(compute_dtype or "auto", store.dtype, store.config).itemsize
    gguf = hasattr(store, "workspace_bytes")  # a GGUF file (odyssey.gguf.store)
    store_itemsize = DTYPES[store.dtype].itemsize
    if gguf:
        layer_params = sum(numel(s) for s in store.config.layer_shapes(0).values())
        if store.quantized:  # no layer is converted whole: the workspace term counts what is
            store_itemsize = compute_itemsize
    else:  # converted one matrix at a time (engine: CastWeight), the vectors (norms, biases) whole
        layer_params = largest_layer_matrix(store) + sum(
            numel(s.shape) for s in store.shards[0].tensors.values() if len(s.shape) != 2
        )
    return plan(
        store.config,
        mode=mode,
        seq_len=seq_len,
        batch_size=batch_size,
        slots=slots,
        store_itemsize=store_itemsize,
        compute_itemsize=compute_itemsize,
        paging=paging_for_store(store),
        layer_params=layer_params,
        lora=lora,
        budget=budget,
        runtime=runtime,
        grad_accum=grad_accum,
        dequant_workspace=store.workspace_bytes(compute_itemsize) if gguf else None,
        pin=pin,
        recompute=recompute,
        sizes=sizes_for_store(store) if budget is not None else None,
        spill=spill,
    )


def plan_checked(
    store, *, seq_len: int, show: Callable[[Plan], None] | None = None, show_first: bool = True, **settings
) -> Plan:
    """`plan_for_store(store, seq_len=seq_len, **settings)`, checked (raises OdysseyError as `check`
    does when it does not fit its budget) and given to `show` to print its table: before the check
    (`odyssey plan` shows a plan that does not fit), or only once it fits (`show_first=False`: a
    command that then fails says so in one line that names the terms)."""

    def replan(n: int) -> Plan:
        return plan_for_store(store, seq_len=n, **settings)

    p = replan(seq_len)
    if show is not None and show_first:
        show(p)
    check(p, replan)
    if show is not None and not show_first:
        show(p)
    return p


def check(p: Plan, replan) -> None:
    """Raise OdysseyError naming the terms, the smallest budget and the longest sequence that fit.
    `replan(seq_len) -> Plan` re-plans at another sequence length (same budget)."""
    if p.fits:
        return
    terms = ", ".join(f"{k} {format_bytes(v)}" for k, v in p.terms.items())
    longest = 0
    lo, hi = 1, p.seq_len
    while lo <= hi:  # the plan grows with seq_len: binary search the longest that fits
        mid = (lo + hi) // 2
        if replan(mid).fits:
            longest, lo = mid, mid + 1
        else:
            hi = mid - 1
    seq_hint = f"or --seq-len {longest} fits this budget" if longest >= 16 else "no sequence length fits this budget"
    raise OdysseyError(
        f"--ram-budget {format_bytes(p.budget)} is too small: the plan needs {format_bytes(p.total)} "
        f"({terms}); use --ram-budget {_round_up_mib(p.total)}MiB or more, {seq_hint}"
    )


def _round_up_mib(n: int) -> int:
    return -(-n // MIB)
