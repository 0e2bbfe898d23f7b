"""Memory plan for a RAM budget: the resident memory of a run, term by term, and the verdict.

Every command that takes `--ram-budget` plans first and refuses early, listing the terms, the
smallest budget that fits and the longest sequence that fits in the given budget.

Terms (bytes of anonymous memory, which is what a budget must bound):
- runtime      the interpreter with torch (and peft when training) imported and torch's meta-device
               kernels loaded (the skeleton needs them), measured in-process
- buffer pool  `slots` page-aligned buffers of the largest pager unit (pager.py): the largest
               decoder layer, since the embedding and head are read in row blocks no larger
               (`Paging`; a 128k vocabulary no longer sizes the pool)
- weights      one unit's base weights converted to the compute dtype (when it differs from the
               store dtype), bound for the layer being computed
- workspace    one layer's activations: about 3d + 3f values a token without grad (the MLP's peak);
               training recomputes with grad and keeps about three times (6d + 2kv + 4f), plus the
               gradient flowing down
- activations  training: every layer's saved input, L x B x T x d in the compute dtype
- kv cache     generation: L x 2 x B x T x kv
- adapters     LoRA weights (fp32); training adds their gradient and two AdamW moments
- logits       one vocabulary chunk of logits (and its softmax and gradient when training), and
               the head pass's (B*T, d) fp32 accumulators (target rows; the gradient)
- margin       allocator slack and fragmentation: 5 % of the rest + 16 MiB

Below the terms, `Paging` says how the pager reads the model: slot size, the row blocks of the
embedding and head, and the reads of one step (each head block counted; a head of more units than
the slots spare evicts the last layer, which backward then reads again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from odyssey.config import LoraSettings, format_bytes
from odyssey.dtypes import DTYPES, MIB, PAGE_SIZE, VOCAB_CHUNK, compute_dtype_info, numel
from odyssey.errors import OdysseyError
from odyssey.modelconfig import ModelConfig

RUNTIME_FALLBACK = {"forward": 230 * MIB, "lora": 350 * MIB, "full": 350 * MIB}


@dataclass
class Paging:
    """How the pager reads a model: slot size and the row blocks of the embedding and head."""

    slot_bytes: int  # one slot of the buffer pool: the largest unit, page-aligned
    layer_bytes: int  # the largest decoder layer's shard
    layers: int  # decoder layers L
    layer_total_bytes: int  # all decoder layers' shards
    vocab: int  # rows of the embedding (and head)
    embed_rows: int  # rows a block of the embedding
    embed_blocks: int  # 1: read whole
    embed_bytes: int  # the embedding's shard
    head_rows: int  # rows a block of an untied head (0 when tied)
    head_blocks: int  # 1: read whole; tied: the head shard (the final norm alone)
    head_bytes: int  # the head shard
    tied: bool

    @property
    def head_units(self) -> int:
        """Units a head pass reads: the untied head's blocks, or the tied head's norm shard and
        the embedding's blocks (the tied embedding is read once a step, for the head)."""
        return 1 + self.embed_blocks if self.tied else self.head_blocks

    @property
    def head_pass_bytes(self) -> int:
        return self.head_bytes + (self.embed_bytes if self.tied else 0)

    def step_reads(self, mode: str, slots: int) -> tuple[int, int, int]:
        """(layer reads, head units, bytes) a pass reads from disk in steady state. Training
        (forward, head, backward): layer 0 stays in a slot from the previous step's backward, and
        the last layer stays into backward when the head pass leaves it a slot (head units <
        slots). Generation: one forward pass per token."""
        L = self.layers
        if mode == "forward":
            layer_reads = L
        else:
            layer_reads = (L - 1) + (L - 1 if self.head_units < slots else L)
        nbytes = layer_reads * self.layer_total_bytes // max(1, L) + self.head_pass_bytes
        return layer_reads, self.head_units, nbytes

    def lines(self, mode: str, slots: int) -> list[str]:
        largest = "the largest decoder layer" if self.slot_bytes <= _page_up(self.layer_bytes) else "a row block"
        out = [f"paging: {slots} slot(s) of {format_bytes(self.slot_bytes)} ({largest})"]
        out.append(f"  embed   {self._blocks_text(self.embed_rows, self.embed_blocks, self.embed_bytes)}")
        if self.tied:
            out.append(f"  head    tied: the final norm, then the embedding's {self._count(self.embed_blocks)}")
        else:
            out.append(f"  head    {self._blocks_text(self.head_rows, self.head_blocks, self.head_bytes)}")
        layer_reads, head_units, nbytes = self.step_reads(mode, slots)
        what = "a step" if mode != "forward" else "a token"
        out.append(f"  reads   {format_bytes(nbytes)} {what}: {layer_reads} layer reads + {head_units} head unit(s)")
        return out

    def _blocks_text(self, rows: int, blocks: int, nbytes: int) -> str:
        if blocks <= 1:
            return f"{self.vocab:,} rows, read whole ({format_bytes(nbytes)})"
        return f"{self.vocab:,} rows in {blocks} blocks of {rows:,} rows ({format_bytes(nbytes)} in all)"

    @staticmethod
    def _count(blocks: int) -> str:
        return "whole shard" if blocks <= 1 else f"{blocks} blocks"

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _page_up(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE


def paging_for_config(cfg: ModelConfig, store_itemsize: int = 2) -> Paging:
    """Paging of a store of `cfg` as `odyssey init` would write it (headers taken as one page)."""
    from odyssey.store.format import block_rows_rule

    d, V = cfg.hidden_size, cfg.vocab_size
    layer = PAGE_SIZE + sum(numel(s) for s in cfg.layer_shapes(0).values()) * store_itemsize
    row = d * store_itemsize
    embed_rows = block_rows_rule(layer, PAGE_SIZE, row)
    embed_blocks = -(-V // embed_rows)
    embed_bytes = PAGE_SIZE + V * row
    if cfg.tie_word_embeddings:
        head_rows, head_blocks, head_bytes = 0, 1, PAGE_SIZE + row
    else:
        head_rows = block_rows_rule(layer, PAGE_SIZE + row, row)
        head_blocks = -(-V // head_rows)
        head_bytes = PAGE_SIZE + row + V * row
    biggest = [layer]
    biggest.append(embed_bytes if embed_blocks == 1 else PAGE_SIZE + embed_rows * row)
    biggest.append(head_bytes if head_blocks == 1 else PAGE_SIZE + row + head_rows * row)
    return Paging(
        slot_bytes=_page_up(max(biggest)),
        layer_bytes=layer,
        layers=cfg.num_hidden_layers,
        layer_total_bytes=layer * cfg.num_hidden_layers,
        vocab=V,
        embed_rows=embed_rows,
        embed_blocks=embed_blocks,
        embed_bytes=embed_bytes,
        head_rows=head_rows,
        head_blocks=head_blocks,
        head_bytes=head_bytes,
        tied=cfg.tie_word_embeddings,
    )


def paging_for_store(store) -> Paging:
    """Paging of an opened store: its shards and row blocks as the pager will read them."""
    from odyssey.pager import slot_bytes

    cfg = store.config
    layers = [store.unit_bytes(i) for i in range(cfg.num_hidden_layers)]
    embed_blocks = len(store.blocks("embed"))
    head_blocks = len(store.blocks("head"))
    return Paging(
        slot_bytes=slot_bytes(store),
        layer_bytes=max(layers),
        layers=cfg.num_hidden_layers,
        layer_total_bytes=sum(layers),
        vocab=cfg.vocab_size,
        embed_rows=store.block_rows.get("embed", cfg.vocab_size),
        embed_blocks=embed_blocks,
        embed_bytes=store.unit_bytes("embed"),
        head_rows=0 if cfg.tie_word_embeddings else store.block_rows.get("head", cfg.vocab_size),
        head_blocks=head_blocks,
        head_bytes=store.unit_bytes("head"),
        tied=cfg.tie_word_embeddings,
    )


@dataclass
class Plan:
    mode: str  # "forward" (generate) | "lora" (train with adapters) | "full" (train everything)
    terms: dict[str, int] = field(default_factory=dict)
    budget: int | None = None
    seq_len: int = 0
    batch_size: int = 1
    paging: Paging | None = None  # None in full mode (no pager)
    slots: int = 2

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
        if self.budget is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(
                f"  {'budget':<{width}}  {format_bytes(self.budget):>12}   -> {verdict} "
                f"(headroom {format_bytes(self.budget - self.total)})"
            )
        if self.paging is not None:
            lines += self.paging.lines(self.mode, self.slots)
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
            "paging": self.paging.to_json() if self.paging is not None else None,
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
) -> Plan:
    """The plan of a run of `cfg`; `paging` from the store (`paging_for_store`), else as `odyssey
    init` would write it."""
    d, f, kv, L, V = (cfg.hidden_size, cfg.intermediate_size, cfg.kv_size, cfg.num_hidden_layers, cfg.vocab_size)
    B, T = batch_size, seq_len
    BT = B * T
    ci = compute_itemsize
    if layer_params is None:
        layer_params = sum(numel(s) for s in cfg.layer_shapes(0).values())
    if paging is None:
        paging = paging_for_config(cfg, store_itemsize)
    terms: dict[str, int] = {}
    terms["runtime"] = runtime if runtime is not None else measured_runtime(mode)
    per_token = 6 * d + 2 * kv + 4 * f  # values live in one layer's forward
    if mode == "full":
        params = cfg.num_parameters()
        terms["parameters"] = params * 4
        terms["gradients + AdamW"] = params * 4 * 3
        terms["activations"] = L * BT * per_token * 4 * 2
        terms["logits"] = BT * V * 4 * 3
    else:
        terms["buffer pool"] = slots * paging.slot_bytes
        if ci != store_itemsize:  # a layer's converted weights, or one head chunk: never both
            terms["weights"] = max(layer_params, VOCAB_CHUNK * d) * ci
        if mode == "forward":
            terms["workspace"] = BT * (3 * d + 3 * f) * ci  # no grad: the MLP's peak is live
            terms["kv cache"] = L * 2 * BT * kv * ci
            terms["logits"] = B * V * ci * 2
        else:
            terms["workspace"] = BT * per_token * ci * 3 + BT * d * ci * 2
            terms["activations"] = L * BT * d * ci
            terms["logits"] = BT * VOCAB_CHUNK * 4 * 3 + BT * d * 4 * 2  # + target rows and gradient (N, d)
        if lora is not None:
            n = lora_parameter_count(cfg, lora)
            terms["adapters + AdamW" if mode == "lora" else "adapters"] = n * 4 * (4 if mode == "lora" else 1)
    rest = sum(terms.values())
    terms["margin"] = int(rest * 0.05) + 16 * MIB
    return Plan(mode, terms, budget, seq_len, batch_size, None if mode == "full" else paging, slots)


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
) -> Plan:
    """A plan with the sizes read from an opened store."""
    if compute_dtype is not None and not isinstance(compute_dtype, str):  # a torch.dtype
        compute_itemsize = compute_dtype.itemsize
    else:
        compute_itemsize = compute_dtype_info(compute_dtype or "auto", store.dtype).itemsize
    store_itemsize = DTYPES[store.dtype].itemsize
    layer_params = sum(numel(s.shape) for s in store.shards[0].tensors.values())
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
