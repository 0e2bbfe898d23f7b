"""How the pager reads a model, for the memory plan: the slot size, the decoder layers' bytes and
the row blocks of the embedding and head (`Paging`), from a config as `odyssey init` would write
it (`paging_for_config`) or from an opened store or GGUF file (`paging_for_store`). The planner
(planner.py) prices the buffer pool and the reads of a step from it."""

from __future__ import annotations

from dataclasses import dataclass

from odyssey.config import format_bytes
from odyssey.dtypes import PAGE_SIZE, numel
from odyssey.modelconfig import ModelConfig


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
    gguf: str = ""  # a GGUF file: its types and what a layer holds quantized ("" for a store)
    head_norm_unit: bool = False  # untied GGUF: the final norm is a unit of its own, read before the head

    @property
    def head_units(self) -> int:
        """Units a head pass reads: the untied head's blocks, or the tied head's norm shard and
        the embedding's blocks (the tied embedding is read once a step, for the head)."""
        return 1 + self.embed_blocks if self.tied else self.head_blocks + self.head_norm_unit

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

    def lines(self, mode: str, slots: int, reads: bool = True) -> list[str]:
        largest = "the largest decoder layer" if self.slot_bytes <= _page_up(self.layer_bytes) else "a row block"
        out = [f"paging: {slots} slot(s) of {format_bytes(self.slot_bytes)} ({largest})"]
        out.append(f"  embed   {self._blocks_text(self.embed_rows, self.embed_blocks, self.embed_bytes)}")
        if self.tied:
            out.append(f"  head    tied: the final norm, then the embedding's {self._count(self.embed_blocks)}")
        else:
            norm = ", after the final norm (a unit of its own)" if self.head_norm_unit else ""
            out.append(f"  head    {self._blocks_text(self.head_rows, self.head_blocks, self.head_bytes)}{norm}")
        if self.gguf:
            out.append(f"  gguf    {self.gguf}")
        if not reads:  # the residency's lines say what is read
            return out
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
    # a GGUF keeps the final norm apart from an untied head: one unit more (Engine.head_units)
    norm_apart = not cfg.tie_word_embeddings and "model.norm.weight" not in store.page(store.blocks("head")[0]).tensors
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
        gguf=store.paging_note() if hasattr(store, "paging_note") else "",
        head_norm_unit=norm_apart,
    )
