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
               Training: what the phase at the peak holds for a moment (stepmemory.py: `recompute_bytes`,
               `head_bytes`): one layer recomputed with grad and its backward, or the head pass
- activations  generation: none kept. Training: the saved layer inputs (B x T x d, compute dtype)
               and the gradient flowing down, as many as the phase at the peak holds
- kv cache     generation: L x 2 x B x T x kv
- adapters     LoRA weights (fp32); training adds two AdamW moments and the LoRA gradients the
               phase at the peak holds. With the moments offloaded (offload.py) the term holds
               the weights and gradients only, and the optimizer step is a phase of its own: what
               every phase holds throughout (runtime to weights), the moments and every gradient
- logits       generation: the last position's logits
- margin       what the process holds beyond the terms: allocator slack and fragmentation, 5 % of
               the rest + 16 MiB; training adds `TRAINING_SLACK` (memory outside torch's tensors)

Training peaks in one of three phases of a step, and the plan is the largest (`Plan.peak` names it):
the head pass (every saved input, no LoRA gradient yet), the backward of the last layer (every
saved input, that layer's gradients) or that of layer 0 (one saved input, every gradient). Backward
frees layer i's saved input as it makes layer i's gradients, so the two are never both whole; with
grad_accum > 1 the gradients of the earlier micro-batches are whole in every phase. With the AdamW
moments offloaded (offload.py) the optimizer step is a fourth phase: the moments read back and every
gradient, no activation.

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
from odyssey.stepmemory import kept_layer_bytes, lora_parameter_count, training_peak

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
    offload: int = 0  # bytes of AdamW moments on disk between optimizer steps (offload.py); 0: in RAM

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
        if self.offload:
            lines.append(f"optimizer: the AdamW moments ({format_bytes(self.offload)}) wait on disk between steps")
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
            "offload_bytes": self.offload,
        }


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
    offload: bool = False,
) -> Plan:
    """The plan of a run of `cfg`; `paging` from the store (`paging_for_store`), else as `odyssey
    init` would write it. `grad_accum`: micro-batches a training step sums gradients over.
    `dequant_workspace`: a GGUF file's matrices are dequantized one at a time into a workspace of
    this many bytes (GGUFStore.workspace_bytes), counted as a term. With a budget, what the step
    does not need of it is given to residency (residency.py): layers that keep their activations
    (`recompute` auto) and pinned units (`pin`); `sizes` are the pager units' sizes
    (`residency.sizes_for_store`), else estimated from `paging`. `offload`: the AdamW moments
    wait on disk between optimizer steps (offload.py; LoRA training)."""
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

    adapters = lora_parameter_count(cfg, lora) * 4 if lora is not None else 0  # fp32 weights
    offload = offload and mode != "forward" and lora is not None

    def with_margin(terms: dict[str, int]) -> dict[str, int]:
        rest = sum(terms.values())
        terms["margin"] = int(rest * 0.05) + 16 * MIB + (TRAINING_SLACK if mode != "forward" else 0)
        return terms

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
        resident = dict(terms)  # held across the whole step
        if mode == "forward":
            terms["workspace"] = BT * (3 * d + 3 * f) * ci  # no grad: the MLP's peak is live
            terms["kv cache"] = L * 2 * BT * kv * ci
            terms["logits"] = B * V * ci * 2
            if lora is not None:
                terms["adapters"] = adapters
        else:
            peak, workspace, activations, grads = training_peak(
                cfg, BT, T, ci, settings, grad_accum, kept, kept * kept_one
            )
            terms["workspace"] = workspace
            terms["activations"] = activations
            if spilled:  # one spilled layer's tensors in flight (written, or read ahead) and the staging buffer
                terms["spill in flight"] = kept_one + SPILL_STAGING
            if offload:  # the moments wait on disk (offload.py): the weights and the gradients at the peak
                terms["adapters"] = adapters + grads
            elif lora is not None:  # weights and two AdamW moments, fp32, and the gradients at the peak
                terms["adapters + AdamW"] = adapters * 3 + grads
        terms = with_margin(terms)
        if offload:  # the optimizer step: the moments read back, every gradient, no activation
            step = with_margin(dict(resident, **{"adapters + AdamW": adapters * 4}))
            if sum(step.values()) > sum(terms.values()):
                return step, "the optimizer step, the AdamW moments read back"
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
    return Plan(mode, terms, budget, seq_len, batch_size, paging, slots, peak, res, 2 * adapters if offload else 0)


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
    offload: bool = False,
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
        offload=offload,
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
