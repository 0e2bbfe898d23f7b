"""Out-of-core forward and backward over the pager (layer-major, recompute in backward).

The model is a `CausalLM` skeleton (any family of `odyssey.families`; PEFT LoRA adapters, real and
resident, optional) on the `meta` device. Each unit the pager hands over has its frozen weights
bound as `nn.Parameter(view, requires_grad=False)`, used, and unbound. A matrix in another dtype
than the compute dtype (a bf16 store in fp32: `CastWeight`) or GGUF-quantized (`QWeight`, and
llama's permuted q/k) is bound by giving its Linear a forward that converts it into one reused
workspace just before its matmul and again in backward (odyssey.gguf.qweight): one matrix at a
time, same numbers. Shapes: B batch, T tokens, d hidden, V vocabulary, L layers.

- forward: embedding rows gathered by the store (only the rows needed, their blocks checked),
  layers 0..L-1 without grad keeping only each layer's input, final norm, then the head: its
  weight (V, d) (the embedding when tied, then read once a step) paged in row blocks no larger
  than a layer, used in vocab chunks; the loss an online log-sum-exp over them (headloss.py), never
  B x T x V logits, IGNORE targets left out. Packed examples: `positions` restart the RoPE and
  `segments` make attention block-diagonal causal (model.attention_mask).
- backward: layers L-1..0, each recomputed with grad from its saved input (a leaf with
  requires_grad), `torch.autograd.backward(out, grad)`, the input's gradient passed down.
- selective recompute (`keep`, residency.py): the last `keep` layers run their forward with grad
  and keep the graph; their backward needs no recompute. Their weights are not held from forward
  to backward: autograd saves handles for them (saved.SavedWeights) and backward binds the layer
  again; nor are the norms' and the GLU's outputs (LoRA's inputs): recipes computed again once in
  backward from what the graph keeps anyway (saved.Derived, `derive_saved`), bit for bit. Spill
  (`spill`, spill.py): the `spill` layers before them keep their graphs too, what autograd saves
  written to disk in forward and read back one layer ahead of their backward. Same numbers, bit
  for bit.
- LoRA: PEFT's `lora.Linear` forward is `adapters.lora_forward` (fewer passes over the output;
  `lora_fused=False` keeps PEFT's); `compile_layers=True` runs each decoder layer through
  torch.compile (training steps only); train_step names its phases for torch.profiler.
The schedule is forward then reverse, so the last layer of forward is the first of backward; layer
0 stays resident into the next step. Pinned units (`pinned`) are read once and served from their
own buffers. Held units (`hold_pinned`, generation): a pinned unit is bound once, in the compute
dtype, and stays bound; when every tensor was converted its buffer's pages are given back (the
plan counts the converted copy).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from odyssey.dtypes import DTYPES, VOCAB_CHUNK, compute_dtype_info
from odyssey.gguf.qweight import CastWeight, QWeight, Workspace, bind_linear, row_chunk, unbind_linear
from odyssey.headloss import OnlineCrossEntropy
from odyssey.model import CausalLM, KVCache, embed_scale, rope_tables
from odyssey.pager import Pager, PassStats, Resident, ResidentPager, UnitStat
from odyssey.saved import saving
from odyssey.store import Block, Store


class Engine:
    cast_per_matrix = True  # a store's matrices in another dtype: converted at each use (CastWeight)

    def __init__(
        self,
        store: Store,
        compute_dtype: str = "auto",
        slots: int = 2,
        direct: bool = False,
        resident: bool = False,
        model: nn.Module | None = None,
        pinned=(),
        keep: int = 0,
        hold_pinned: bool = False,
        lora_fused: bool = True,
        compile_layers: bool = False,
        spill: int = 0,
        spill_dir=None,
        spill_reserve: int = 0,
        derive_saved: bool = True,
    ):
        self.store = store
        # kept and spilled layers save the norms' and the GLU's outputs as recipes (saved.Derived)
        self.derive_saved = derive_saved
        self.cfg = store.config
        self.dtype = compute_dtype_info(compute_dtype, store.dtype, store.config).torch()
        if model is None:
            with torch.device("meta"):
                model = CausalLM(self.cfg)
        self.model = model  # a meta skeleton, possibly wrapped by PEFT (see adapters.py)
        if lora_fused:  # PEFT's LoRA forward with fewer passes over the output (adapters.lora_forward)
            from odyssey.adapters import use_lora_forward

            use_lora_forward(model)
        L = store.config.num_hidden_layers
        if not 0 <= keep <= L:
            raise ValueError(f"keep must be in 0..{L}, got {keep}")
        # The last `keep` layers keep their activations in train_step (no recompute in backward);
        # their weights are paged in again for backward like any layer's (SavedWeights), so
        # keeping a layer does not pin it.
        self.keep = keep
        if not 0 <= spill <= L - keep:
            raise ValueError(f"spill must be in 0..{L - keep}, got {spill}")
        # The `spill` layers before the kept ones keep their activations on disk (spill.py).
        self.spill = spill
        self._spill = None
        if spill:
            from odyssey.spill import Spill

            self._spill = Spill(spill_dir, reserve=spill_reserve)
        self.pager = ResidentPager(store) if resident else Pager(store, slots=slots, direct=direct, pinned=pinned)
        self._bound: dict[str, tuple[nn.Module, str, nn.Parameter]] = {}
        self.hold_pinned = hold_pinned
        self._held: dict = {}  # pinned unit -> Resident bound for good (its tensors in the compute dtype)
        self._held_uses: list[UnitStat] = []  # uses of held units since the last pass_stats
        core = model.base_model.model if hasattr(model, "base_model") and hasattr(model.base_model, "model") else model
        self._core = core.model  # DecoderModel inside the (PEFT-wrapped) skeleton: layers, norm
        if compile_layers:  # torch.compile of each decoder layer, training steps only (compiling.py)
            from odyssey.compiling import compile_layers as compile_each

            compile_each(self._core.layers)
        self._modules = dict(self._find_base_modules())
        self.workspace = Workspace()  # GGUF: where each quantized matrix is dequantized before its matmul
        self.head_ws = None  # a float store's head chunks are converted there too (planner: weights)
        if hasattr(store, "workspace_numel"):  # allocated once, for the largest matrix
            self.workspace.get(store.workspace_numel(), self.dtype)
        elif self.cast_per_matrix and DTYPES[store.dtype].torch() != self.dtype:  # a bf16 store in fp32
            from odyssey.planner import largest_layer_matrix

            self.workspace.get(largest_layer_matrix(store), self.dtype)
            self.head_ws = self.workspace

    # --- weights ---
    def _find_base_modules(self):
        """HF parameter name -> (module owning the frozen base weight, attribute). PEFT wraps
        targeted Linears: their base weight lives at `<name>.base_layer.weight`."""
        core = self.model
        for name, mod in core.named_modules():
            for pname, p in list(mod.named_parameters(recurse=False)):
                if "lora_" in name or p.device.type != "meta":
                    continue
                hf = f"{name}.{pname}".replace(".base_layer", "")
                # PEFT prefixes names with base_model.model.
                hf = hf.removeprefix("base_model.model.")
                yield hf, (mod, pname)

    def bind(self, res: Resident) -> None:
        for name, t in res.tensors.items():
            if name not in self._modules:
                continue
            mod, attr = self._modules[name]
            if isinstance(t, QWeight):  # a GGUF matrix: dequantized at each use (odyssey.gguf.qweight)
                bind_linear(mod, t, self.workspace)
                self._bound[name] = (mod, None, None)
                continue
            if self.cast_per_matrix and t.dtype != self.dtype and t.dim() == 2 and isinstance(mod, nn.Linear):
                # converted at each use, one matrix at a time (CastWeight), not the layer at once
                bind_linear(mod, CastWeight(t), self.workspace)
                self._bound[name] = (mod, None, None)
                continue
            w = t if t.dtype == self.dtype else t.to(self.dtype)
            old = mod._parameters[attr]
            mod._parameters[attr] = nn.Parameter(w, requires_grad=False)
            self._bound[name] = (mod, attr, old)

    def unbind(self, res: Resident) -> None:
        for name in res.tensors:
            entry = self._bound.pop(name, None)
            if entry:
                mod, attr, old = entry
                if attr is None:
                    unbind_linear(mod)
                    continue
                mod._parameters[attr] = old  # back to the meta placeholder: no view outlives the slot

    @contextlib.contextmanager
    def resident(self, unit):
        res = self._get(unit)
        if unit in self._held:  # bound for good (hold_pinned)
            yield res
            return
        try:
            self.bind(res)
            yield res
        finally:
            self.unbind(res)
            self.pager.release(res)

    def _get(self, unit) -> Resident:
        """The unit from the pager, or a held unit's Resident without it; a pinned unit is held at
        its first use when `hold_pinned` (see the module's docstring)."""
        held = self._held.get(unit)
        if held is not None:
            self._held_uses.append(UnitStat(unit, self.store.page(unit).nbytes, 0.0, 0.0, True))
            return held
        res = self.pager.get(unit)
        if not (self.hold_pinned and getattr(self.pager, "is_pinned", lambda u: False)(unit)):
            return res
        tensors = {
            n: t if isinstance(t, QWeight) or t.dtype == self.dtype else t.to(self.dtype)
            for n, t in res.tensors.items()
        }
        held = Resident(unit, tensors, res.slot)
        self.bind(held)  # already in the compute dtype: bound as they are
        self._held[unit] = held
        self.pager.release(res)
        if all(tensors[n] is not t for n, t in res.tensors.items()):  # no view of the buffer is left
            self.pager.drop_pinned(unit)
        return held

    def _release(self, res: Resident) -> None:
        if res.unit not in self._held:
            self.pager.release(res)

    def _prefetch(self, units) -> None:
        """Schedule `units` with the pager, but the held ones (served without it)."""
        self.pager.prefetch([u for u in units if u not in self._held])

    def bound_weight(self, name: str) -> torch.Tensor:
        """The frozen base weight bound now under HF `name` (a view of the slot, or its converted
        copy); a RuntimeError when it is not bound."""
        entry = self._bound.get(name)
        if entry is None or entry[1] is None:
            raise RuntimeError(f"engine: {name} is not bound (a kept layer's backward outside its resident())")
        mod, attr, _ = entry
        return mod._parameters[attr]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, d) compute dtype; only the rows needed are read."""
        t = self.store.embedding_rows(ids.reshape(-1).numpy())  # (B*T, d), checked against the store
        scale = embed_scale(self.cfg, t.dtype)
        if scale is not None:  # Gemma: scaled in the weights' dtype, as HF does
            t = t * scale
        return t.to(self.dtype).view(*ids.shape, self.cfg.hidden_size)

    # --- layers ---
    def layer(self, i: int) -> nn.Module:
        return self._core.layers[i]

    def rope(self, start: int, T: int, positions: torch.Tensor | None = None) -> dict:
        """cos/sin per layer type for positions start..start+T-1, or for `positions` (B, T) (packed
        examples: each restarts at 0), see model.rope_tables."""
        return rope_tables(self.cfg, torch.arange(start, start + T) if positions is None else positions, self.dtype)

    def head_units(self) -> list:
        """The pager units of the head pass, in order; the first holds model.norm.weight. Untied:
        the head shard's row blocks (block 0 holds the norm), or "head" when it is one block. Tied:
        "head" (the norm alone), then the embedding's row blocks (or "embed")."""
        if self.cfg.tie_word_embeddings:
            return ["head", *self.store.blocks("embed")]
        units = self.store.blocks("head")
        if "model.norm.weight" not in self.store.page(units[0]).tensors:  # a GGUF: "head" is the norm
            units = ["head", *units]
        return units

    def layer_schedule(self, backward: bool = False) -> list:
        """The units a pass asks the pager for, in order: layers, the head's units, then in
        training every layer again, L-1..0, for its backward (recomputed, or through the graph its
        forward kept, whose saved weights are rebuilt from the layer bound again: SavedWeights)."""
        L = self.cfg.num_hidden_layers
        fwd = list(range(L)) + self.head_units()
        return fwd + list(range(L - 1, -1, -1)) if backward else fwd

    @contextlib.contextmanager
    def head(self):
        """The head pass over the pager. Yields (norm, rows): `norm` is the final RMSNorm with its
        weight bound (a copy in the compute dtype: the slot it came from is released while
        autograd may still need it); `rows()` iterates (v0, W) over the head's row blocks in
        order, W a (R, d) store-dtype view of head rows v0..v0+R-1, valid until the next item (its
        slot is then released; the pager reads the next block meanwhile). Consume `rows()` once,
        to the end: the pager serves units in schedule order."""
        units = self.head_units()
        name = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        norm = self._core.norm
        held = [self._get(units[0])]  # the unit in use (one at a time)
        old = norm._parameters["weight"]
        w = held[0].tensors["model.norm.weight"].to(self.dtype, copy=True)  # (d,)
        norm._parameters["weight"] = nn.Parameter(w, requires_grad=False)

        def rows():
            for k, unit in enumerate(units):
                if k > 0:
                    held.append(self._get(unit))
                W = held[-1].tensors.get(name)
                if W is not None:
                    yield (unit.row_start if isinstance(unit, Block) else 0), W
                self._release(held.pop())

        try:
            yield norm, rows
        finally:
            norm._parameters["weight"] = old
            while held:
                self._release(held.pop())

    def head_logits(self, h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """h (N, d) -> logits (N, R) in compute dtype for head rows W (R, d), converting W a chunk
        of rows at a time (in one matmul when W is in the compute dtype: a held block)."""
        if not isinstance(W, QWeight) and W.dtype == self.dtype:
            return F.linear(h, W)
        out = torch.empty(h.shape[0], W.shape[0], dtype=self.dtype)
        for v0 in range(0, W.shape[0], VOCAB_CHUNK):
            out[:, v0 : v0 + VOCAB_CHUNK] = F.linear(h, row_chunk(W, v0, v0 + VOCAB_CHUNK, self.dtype, self.head_ws))
        return out

    # --- forward ---
    @torch.no_grad()
    def forward_hidden(
        self,
        ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T) -> x (B, T, d) before the final norm; positions, segments (B, T) for packed
        examples (model.attention_mask). The caller has prefetched the schedule (layers, then the
        head units), so the reads run ahead of the computation."""
        past = cache.length() if cache is not None else 0
        x = self.embed(ids)
        rope = self.rope(past, ids.shape[1], positions)
        for i in range(self.cfg.num_hidden_layers):
            with self.resident(i):
                x = self.layer(i)(x, rope, cache, segments)
        return x

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V) (or (B, V) with last_only), compute dtype."""
        self._prefetch(self.layer_schedule())
        x = self.forward_hidden(ids, cache=cache)
        if last_only:
            x = x[:, -1:]
        B, T, d = x.shape
        out = torch.empty(B * T, self.cfg.vocab_size, dtype=self.dtype)
        with self.head() as (norm, rows):
            h = norm(x).reshape(B * T, d)
            for v0, W in rows():
                out[:, v0 : v0 + W.shape[0]] = self.head_logits(h, W)
        out = out.view(B, T, -1)
        return out[:, -1] if last_only else out

    # --- training: loss and backward ---
    def chunked_ce(
        self, hf: torch.Tensor, tgt: torch.Tensor, W: torch.Tensor, grad: bool
    ) -> tuple[float, torch.Tensor | None]:
        """Mean cross-entropy of hf @ W.T against tgt, and (if grad) its gradient w.r.t. hf, with
        the whole head W (V, d) in hand: `OnlineCrossEntropy` over one block."""
        ce = OnlineCrossEntropy(hf, tgt, grad, self.dtype, self.head_ws)
        ce.add(0, W)
        return ce.result()

    def loss_and_grad_x(
        self, x: torch.Tensor, targets: torch.Tensor, norm: nn.Module, rows, grad_scale: float = 1.0
    ) -> tuple[float, torch.Tensor]:
        """x (B, T, d) before the final norm -> (loss, dloss/dx (B, T, d) scaled by grad_scale),
        over the head's row blocks `rows()` (see `head`); the gradient goes back through the frozen
        final norm by autograd."""
        B, T, d = x.shape
        xl = x.detach().requires_grad_(True)
        with torch.enable_grad():
            h = norm(xl)
        ce = OnlineCrossEntropy(h.detach().reshape(B * T, d), targets.reshape(-1), True, self.dtype, self.head_ws)
        for v0, W in rows():
            ce.add(v0, W)
        loss, grad_h = ce.result()
        with torch.enable_grad():
            torch.autograd.backward(h, (grad_h * grad_scale).view(B, T, d).to(h.dtype))
        return loss, xl.grad

    def train_step(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor,
        grad_scale: float = 1.0,
        between=None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> float:
        """One forward and backward on a batch; LoRA parameters accumulate `.grad` of the mean loss
        over the trained targets (targets != IGNORE), scaled by grad_scale (the trainer passes this
        batch's share of the step's trained targets). Returns that mean loss (0 without trained
        targets). positions, segments (B, T): packed examples. `between()` is called between
        layers (control requests); it may block (pause) or raise (stop)."""
        first_kept = self.cfg.num_hidden_layers - self.keep - self.spill  # from here on: no recompute
        between = between or (lambda: None)
        self._prefetch(self.layer_schedule(backward=True))
        with record_function("odyssey.forward"):  # phases, named in torch.profiler's traces
            x, rope, saved, kept = self._forward(ids, first_kept, between, positions, segments)
        with record_function("odyssey.head_loss"), self.head() as (norm, rows):
            loss, g = self.loss_and_grad_x(x, targets, norm, rows, grad_scale)
        del x
        between()
        with record_function("odyssey.backward"):
            self._backward(kept, saved, g, rope, segments, first_kept, between)
        return loss

    def _forward(self, ids, first_kept, between, positions, segments):
        """train_step's forward: layers 0..L-1; returns (x before the final norm, rope, saved inputs
        of the layers recomputed in backward, kept (input, output) graphs of the others)."""
        dropout = self._has_dropout()
        x = self.embed(ids)
        rope = self.rope(0, ids.shape[1], positions)
        saved = []  # (layer input (B, T, d) compute dtype, RNG state when dropout draws masks)
        kept = []  # (layer input, a leaf; its output, with the graph its backward needs)
        first_ram = self.cfg.num_hidden_layers - self.keep  # layers first_kept.. first_ram - 1 spill
        if self._spill is not None:
            self._spill.begin_step(shared=[t for cs in rope.values() for t in cs])
        for i in range(self.cfg.num_hidden_layers):
            if i < first_kept:
                saved.append((x, torch.get_rng_state() if dropout else None))
                with self.resident(i), torch.no_grad():
                    x = self.layer(i)(x, rope, None, segments)
            else:  # the graph is kept, its saved weights as handles (SavedWeights), on disk when spilled
                xi = x.detach().requires_grad_(True)
                inner = self._spill.layer(i) if i < first_ram else None
                with self.resident(i) as res, torch.enable_grad(), saving(self, res, inner, self.derive_saved):
                    out = self.layer(i)(xi, rope, None, segments)
                if inner is not None:
                    self._spill.seal(i)
                kept.append((xi, out))
                x = out.detach()
            between()
        if self._spill is not None and first_kept < first_ram:
            self._spill.prefetch(first_ram - 1)  # read back during the head pass
        return x, rope, saved, kept

    def _backward(self, kept, saved, g, rope, segments, first_kept, between) -> None:
        """train_step's backward: the kept layers' graphs, then the recomputed layers."""
        first_ram = self.cfg.num_hidden_layers - self.keep
        for i in range(self.cfg.num_hidden_layers - 1, first_kept - 1, -1):  # through the kept graphs
            xi, out = kept.pop()
            spilled = i < first_ram
            if spilled:
                self._spill.fetch(i)  # its saved tensors read back
                if i - 1 >= first_kept:
                    self._spill.prefetch(i - 1)
            with self.resident(i), torch.enable_grad():  # bound again: the saved handles' weights
                torch.autograd.backward(out, g)
            if spilled:
                self._spill.release(i)
            g = xi.grad
            del out, xi
            between()
        for i in range(first_kept - 1, -1, -1):
            xi, rng = saved.pop()
            xi = xi.detach().requires_grad_(True)  # a leaf: LoRA weights inside get gradients
            with self.resident(i), torch.enable_grad():
                if rng is not None:
                    with torch.random.fork_rng():
                        torch.set_rng_state(rng)  # the same dropout masks as in forward
                        out = self.layer(i)(xi, rope, None, segments)
                else:
                    out = self.layer(i)(xi, rope, None, segments)
                torch.autograd.backward(out, g)
            g = xi.grad
            del out, xi
            between()

    @torch.no_grad()
    def eval_loss(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> float:
        """Mean cross-entropy over the trained targets without gradients (validation), through the
        chunked head; 0 when no target is trained."""
        self._prefetch(self.layer_schedule())
        x = self.forward_hidden(ids, positions=positions, segments=segments)
        with self.head() as (norm, rows):
            h = norm(x)
            ce = OnlineCrossEntropy(h.reshape(-1, h.shape[-1]), targets.reshape(-1), False, self.dtype, self.head_ws)
            for v0, W in rows():
                ce.add(v0, W)
            return ce.result()[0]

    def _has_dropout(self) -> bool:
        return any(isinstance(mod, nn.Dropout) and mod.p > 0 and mod.training for mod in self._core.modules())

    def pass_stats(self, seconds: float) -> PassStats:
        st = self.pager.take_stats() + self._held_uses
        self._held_uses = []
        spill = {"spilled_layers": self.spill, **self._spill.take_stats()} if self._spill is not None else {}
        return PassStats.of(st, seconds, self.pager, kept_layers=self.keep, **spill)

    def close(self) -> None:
        self.pager.close()
        if self._spill is not None:
            self._spill.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
