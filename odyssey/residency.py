"""Budget-aware residency and selective recompute: what the planner does with the budget a step
does not need.

The plan of a run (planner.py) first counts what a step needs with everything paged through the
pager's slots and every layer recomputed in backward. Whatever is left of the budget goes, in this
order, to:

1. Selective recompute (training, `recompute: auto`). The last layers first (their backward comes
   first and frees soonest), a layer's forward runs with grad and keeps what its backward needs:
   no recompute for that layer, about 4N instead of 6N FLOP a token (N its parameters). A kept
   layer costs what its forward saves and its input (B x T x d, compute dtype;
   `stepmemory.kept_layer_bytes`): not its weights, nor its norms' and GLU's outputs, computed again
   in backward (saved.Derived). Autograd saves the base weights it needs as handles
   (saved.SavedWeights), so the layer's slot (and its weights converted to the
   compute dtype) are released after forward as for any paged layer, and its backward pages it in
   again and rebuilds the saved views from the weights bound then. As many layers as the budget
   holds keep their activations, before anything is pinned: a kept layer saves a third of its
   FLOPs, while pinning a layer saves only its reads, which the pager's reader thread hides behind
   the computation (measured stall 0.0 s a step on the 1.2B model). With a budget that holds them,
   every layer keeps its activations (4N FLOP a token, as the in-RAM peer without checkpointing).
2. Pinned units (`pin: true`). A pinned unit is read once, into a buffer of its own, and stays
   resident across steps: never re-read, never evicted. The rest are paged through the slots as
   before. Units are pinned by bytes saved per step per byte held: a decoder layer is read twice
   a step in training (forward and backward, kept or recomputed), a head or embedding row block
   once, so decoder layers go first, from the last layer down (the paged layers stay a prefix
   0..m-1 whose first layer the slots still carry from one step's backward into the next step's
   forward), then the head pass's units in order. A unit that does not fit is skipped and smaller
   ones after it are tried. In generation every unit is read once a token. Kept and pinned are
   independent: `pin: false` pins nothing, whatever is kept.

Residency fills the plan up to `FILL` (90 %) of the budget, never past it (the guard's checkpoint
line). With a budget that holds the whole model every unit is pinned: the store is read once and the
slots are never touched (an anonymous mapping costs no RAM until it is written, and the plan drops
the buffer pool then). `read_bytes` is what the pager reads a step (a token in generation) in
steady state, from a replay of the pager's slot policy (`steady_reads`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from odyssey.config import format_bytes

FILL = 0.9
"""Residency fills the plan up to this share of the budget, not all of it: the guard asks for a
checkpoint when anonymous RAM passes 90 % of the budget (guard.soft_pct), and measured peaks run at
0.94-0.96 of the plan, so a plan at 90 % keeps a run's peak clear of that line."""


def label(unit) -> int | str:
    """A pager unit as metrics and plans name it: a layer's index, "head", "embed[3/5]"."""
    return unit if isinstance(unit, (int, str)) else str(unit)


@dataclass
class UnitSize:
    label: int | str
    nbytes: int  # bytes a read brings in
    buffer_bytes: int  # bytes of a pinned buffer for it (the page-aligned range a read covers)


@dataclass
class Residency:
    """What the budget left over buys: pinned units and layers that keep their activations."""

    mode: str  # "lora" | "forward"
    layers: int
    pinned: list = field(default_factory=list)  # labels of the pinned units, in pin order
    pinned_bytes: int = 0  # their buffers
    kept: int = 0  # last layers whose forward keeps activations (no recompute)
    kept_bytes: int = 0  # what they hold at once (activations and inputs; no weights)
    spilled: int = 0  # layers before the kept ones whose activations go to disk (spill.py), not recomputed
    spill_bytes: int = 0  # bytes they write to (and read back from) the spill file a step
    spill_dir: str = ""  # where (set by train when it spills)
    direct: bool = False  # the pager reads O_DIRECT (set by train: readmode.choose)
    spill_room: int = 0  # spill asked, none possible: the bytes one layer in flight needs (planner)
    units: int = 0  # units a step (a token) uses
    unit_bytes: int = 0  # bytes a step (a token) asks the pager for (a layer twice in training)
    read_bytes: int = 0  # bytes the pager reads a step (a token) in steady state
    pin: bool = True  # pin units with what is left (False: nothing is pinned)
    recompute: str = "auto"

    @property
    def paged(self) -> int:
        return self.units - len(self.pinned)

    def engine_kwargs(self, store) -> dict:
        """The training Engine's arguments that carry this plan: the pinned units, the layers that
        keep or spill their activations, where they spill and how the pager reads."""
        return dict(
            pinned=units_from_labels(store, self.pinned),
            keep=self.kept,
            spill=self.spilled,
            spill_dir=self.spill_dir,
            spill_reserve=self.spill_bytes,
            direct=self.direct,
        )

    @property
    def kept_paged(self) -> int:
        """Layers that keep activations but are not pinned: read in forward and again in backward."""
        pinned = set(self.pinned)
        return sum(1 for i in range(self.layers - self.kept, self.layers) if i not in pinned)

    def summary(self) -> str:
        """One line: what is pinned, what keeps activations, what a step reads."""
        what = "a token" if self.mode == "forward" else "a step"
        text = f"residency: {len(self.pinned)} of {self.units} units pinned ({format_bytes(self.pinned_bytes)})"
        if self.mode != "forward":
            text += f", {self.kept} of {self.layers} layers keep activations"
            if self.spilled:
                text += f", {self.spilled} spill them to disk ({format_bytes(self.spill_bytes)} a step)"
        return text + f"; reads {format_bytes(self.read_bytes)} {what}"

    def lines(self) -> list[str]:
        what = "a token" if self.mode == "forward" else "a step"
        pinned = f"{len(self.pinned)} of {self.units} units pinned ({format_bytes(self.pinned_bytes)})"
        if not self.pin:
            pinned += " (--no-pin)"
        out = [
            f"residency: {pinned}, {self.paged} paged",
            f"  reads   {format_bytes(self.read_bytes)} {what} of the {format_bytes(self.unit_bytes)} it uses "
            f"({_pct(self.read_bytes, self.unit_bytes)}; the rest is in RAM)",
        ]
        if self.mode != "forward":
            how = "--recompute all" if self.recompute == "all" else f"{format_bytes(self.kept_bytes)}"
            out.append(
                f"  recompute: {self.kept} of {self.layers} layers keep activations ({how}), "
                f"{self.layers - self.kept - self.spilled} recomputed in backward"
            )
            if self.spilled:
                out.append(
                    f"  spill:     {self.spilled} layer(s) keep theirs on disk: {format_bytes(self.spill_bytes)} "
                    "written and read back a step"
                )
            elif self.spill_room:
                out.append(
                    f"  spill:     none: one layer's activations in flight need {format_bytes(self.spill_room)} "
                    "the budget does not have"
                )
            again = self.kept_paged
            if again:  # their weights are not held from forward to backward (saved.SavedWeights)
                out.append(f"             {again} kept layer(s) not pinned: paged in again for backward")
        return out

    def to_json(self) -> dict:
        return dict(self.__dict__, kept_paged=self.kept_paged)


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.0f} %" if b else "0 %"


def pin_order(layers: int, head: list[UnitSize], layer_size: Callable[[int], UnitSize]) -> list[UnitSize]:
    """Units in the order they are pinned: layers L-1..0, then the head pass's units."""
    return [layer_size(i) for i in range(layers - 1, -1, -1)] + list(head)


def schedule(mode: str, layers: int, head: list) -> list:
    """The labels a step (a token) asks the pager for, in order (engine.layer_schedule): in
    training every layer comes again for its backward, kept or recomputed."""
    fwd = list(range(layers)) + list(head)
    if mode == "forward":
        return fwd
    return fwd + list(range(layers - 1, -1, -1))


def steady_reads(sched: list, pinned: set, slots: int, rounds: int = 3) -> list:
    """The units of `sched` the pager reads from disk in the last of `rounds` repetitions: a replay
    of its slot policy (pager.Pager._reader) with the reader one unit ahead of the consumer (which
    holds the previous paged unit's slot). Pinned units never touch a slot. A unit still in a slot
    is not read again; a read takes the free slot released longest ago, sparing slots that hold a
    unit wanted among the next `slots` units of the step's schedule."""
    held: list = [None] * slots  # the unit in each slot
    released = [0.0] * slots
    clock, prev = 0.0, None
    reads: list = []
    for _ in range(rounds):
        reads = []
        for j, u in enumerate(sched):
            if u in pinned:
                continue
            if u in held:
                s = held.index(u)
            else:
                soon = set(sched[j + 1 : j + 1 + slots])
                free = [k for k in range(slots) if slots == 1 or held[k] is None or held[k] != prev]
                free.sort(key=lambda k: (held[k] in soon, released[k]))
                s = free[0]
                held[s] = u
                reads.append(u)
            clock += 1.0
            released[s] = clock
            prev = u
    return reads


def decide(
    *,
    mode: str,
    layers: int,
    head: list[UnitSize],
    layer_size: Callable[[int], UnitSize],
    slots: int,
    fits: Callable[[int, int, bool, bool], bool],
    pin: bool = True,
    recompute: str = "auto",
    spill: bool = False,
) -> Residency:
    """The residency for a budget. `fits(pinned_bytes, kept, paged_any, spilled)` says whether the
    plan with that many pinned bytes, kept layers, (paged_any) some unit still paged and (spilled)
    the other layers spilling their activations to disk fits the budget. Layers keep activations
    first (the last ones first, as many as fit with nothing pinned); with `spill`, the layers left
    spill theirs (one layer's worth in flight: a kept layer fewer when that does not fit); then
    units are pinned with what is left."""
    order = pin_order(layers, head, layer_size)
    total_units = len(order)
    chosen: dict = {}
    pbytes = 0
    kept = 0
    spilling = False
    if mode != "forward" and recompute == "auto":
        while kept < layers and fits(0, kept + 1, True, False):
            kept += 1
        if spill and kept < layers:
            k = kept
            while k > 0 and not fits(0, k, True, True):
                k -= 1
            if fits(0, k, True, True):
                kept, spilling = k, True
    if pin:
        for u in order:
            if fits(pbytes + u.buffer_bytes, kept, len(chosen) + 1 < total_units, spilling):
                chosen[u.label] = u
                pbytes += u.buffer_bytes
    heads = [u.label for u in head]
    sched = schedule(mode, layers, heads)
    sizes = {u.label: u.nbytes for u in order}
    reads = steady_reads(sched, set(chosen), slots)
    return Residency(
        mode=mode,
        layers=layers,
        pinned=[u.label for u in order if u.label in chosen],
        pinned_bytes=pbytes,
        kept=kept,
        spilled=layers - kept if spilling else 0,
        units=total_units,
        unit_bytes=sum(sizes[u] for u in sched),
        read_bytes=sum(sizes[u] for u in reads),
        pin=pin,
        recompute=recompute,
    )


UnitSizes = tuple[list[UnitSize], list[UnitSize]]
"""(the decoder layers' sizes by index, the head pass's units' sizes in order)."""


def head_units(store) -> list:
    """The pager units of the head pass, in order (engine.Engine.head_units)."""
    if store.config.tie_word_embeddings:
        return ["head", *store.blocks("embed")]
    return store.blocks("head")


def sizes_for_store(store) -> UnitSizes:
    """The sizes of a store's pager units, as the pager reads and pins them."""
    from odyssey.pager import unit_buffer_bytes

    def size(u) -> UnitSize:
        return UnitSize(label(u), store.page(u).nbytes, unit_buffer_bytes(store, u))

    return [size(i) for i in range(store.config.num_hidden_layers)], [size(u) for u in head_units(store)]


def sizes_for_paging(paging) -> UnitSizes:
    """Sizes estimated from a `planner.Paging` (a store as `odyssey init` would write it)."""
    from odyssey.dtypes import PAGE_SIZE

    def size(name, nbytes: int) -> UnitSize:
        return UnitSize(name, nbytes, -(-nbytes // PAGE_SIZE) * PAGE_SIZE + PAGE_SIZE)

    layer = paging.layer_total_bytes // max(1, paging.layers)
    layers = [size(i, layer) for i in range(paging.layers)]
    if paging.tied:
        n = paging.embed_blocks
        blocks = ["embed"] if n <= 1 else [f"embed[{k}/{n}]" for k in range(1, n + 1)]
        head = [size("head", paging.head_bytes)] + [size(b, paging.embed_bytes // n) for b in blocks]
    else:
        n = paging.head_blocks
        blocks = ["head"] if n <= 1 else [f"head[{k}/{n}]" for k in range(1, n + 1)]
        head = [size(b, paging.head_bytes // n) for b in blocks]
    return layers, head


def units_from_labels(store, labels) -> list:
    """The store's pager units named by `labels` (Residency.pinned)."""
    want = set(labels)
    return [u for u in store.page_units() if label(u) in want]
