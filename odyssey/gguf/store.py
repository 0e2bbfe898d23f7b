"""A llama.cpp GGUF file as a store: `GGUFStore` has the reading API the pager, engine, planner,
learners, merge and exporters use from `odyssey.store.Store`, over the file as it is (never
written to).

Units as in a store: "embed", each layer index, "head". The pager reads:
- layer i: one byte range, from its first tensor to the end of its last. llama.cpp's
  convert_hf_to_gguf.py writes tensors in the checkpoint's order (per layer, whatever the layer
  order), llama-quantize keeps the order, and Odyssey's own export writes unit by unit, so a
  layer's tensors are adjacent (only alignment padding between them) and the span is the layer. A
  file whose layer is scattered (the span more than twice the layer's own bytes plus a page) is
  refused by name with the fix (`odyssey import`), rather than paged as a huge span.
- the embedding (`token_embd.weight`) and an untied head (`output.weight`) in row blocks
  (`Block`s, also when one block holds them all): a quantized row is whole blocks of its type, so
  rows r0..r1 are one byte range; a block is no larger than the largest layer's span.
- "head": the final norm alone (`output_norm.weight`): the engine's head pass reads it first (tied:
  then the embedding's blocks; untied: then the head's blocks, `Engine.head_units`).

`page(unit).tensors[hf_name] = (offset in the page, GGML type name, HF shape)`; F32/F16/BF16 mean
what the safetensors codes mean. `tensor_view` turns a slot's bytes into what the engine binds: a
plain view for F32/F16/BF16 tensors, a `QWeight` (odyssey.gguf.qweight: dequantized per matrix at
use) for quantized matrices and for llama's permuted q/k of any type; q/k biases are copied
unpermuted (a vector). `load_tensors` gives HF names and layout, dequantized (f32 unless a dtype is
asked: the values are exact in f32).

`dtype`: "f32" or "f16" when the matrices are that type (compute in fp32, as such stores), else
"bf16" (BF16 and quantized files: `auto` picks by measurement, odyssey.dtypes). `quantized`: any
matrix in a GGML block type; such a file trains LoRA only (`odyssey import model.gguf --out DIR`
gives a store for the rest).

Checksums (odyssey.gguf.records, the `ChecksumRecords` mixin): the file carries none and is never
written to; each pager unit's digest is recorded in the cache directory at first use and checked
on every later read. `verify` checks the structure (done by `open`), every tensor's size and range,
and every unit against the record, recording missing ones.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from odyssey.errors import OdysseyError
from odyssey.export.gguf_layout import ARCHS, ROPE_FREQS, gguf_name
from odyssey.gguf.blocks import BLOCKS, row_bytes
from odyssey.gguf.model import model_config
from odyssey.gguf.reader import MAGIC, GGUFFile
from odyssey.gguf.records import ChecksumRecords
from odyssey.modelconfig import ModelConfig
from odyssey.store.format import Block, Page, PageUnit, StoreError, Unit, units_of

FLOATS = ("F32", "F16", "BF16")  # GGML types that are plain arrays (the safetensors codes' meaning)
BLOCKED = {"embed": "model.embed_tokens.weight", "head": "lm_head.weight"}
IMPORT_HINT = "`odyssey import {path} --out DIR` converts it to a store"


def is_gguf(path) -> bool:
    """A regular file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def names_gguf(path) -> bool:
    """What `--model PATH` takes as a GGUF: a file with the GGUF magic, or any path named .gguf but a
    store directory (a text, an empty or a missing x.gguf, a directory named so, is then refused by
    the reader, naming what is wrong, rather than as a store without config.json)."""
    if is_gguf(path):
        return True
    return str(path).lower().endswith(".gguf") and not os.path.isfile(os.path.join(path, "config.json"))


class GGUFStore(ChecksumRecords):
    """An opened GGUF model file: `GGUFStore.open(path)`."""

    def __init__(self, gf: GGUFFile, config: ModelConfig):
        self.gf = gf
        self.path = gf.path
        self.root = gf.path  # messages and adapters name the file
        self.config = config
        self.arch = gf.architecture
        self.names = {n: gguf_name(n, config.family) for n in config.all_shapes()}  # HF -> GGUF
        mats = [gf.tensors[g] for n, g in self.names.items() if len(gf.tensors[g].shape) == 2]
        by_type: dict[str, int] = {}
        for t in mats:
            by_type[t.qtype] = by_type.get(t.qtype, 0) + t.nbytes
        main = max(by_type, key=by_type.get)
        self.quantized = any(q not in FLOATS for q in by_type)
        self.dtype: str = {"F32": "f32", "F16": "f16"}.get(main, "bf16") if not self.quantized else "bf16"
        self._permute = ARCHS[self.arch].permute_qk
        self._verified: set = set()
        self._record: dict | None = None  # unit key -> digest, loaded lazily
        self._record_file: Path | None = None
        self._tokenizer: Path | bool | None = None  # tokenizer.json in the cache, False: none
        self._embed_map = None
        self._init_pages()

    @classmethod
    def open(cls, path) -> GGUFStore:
        gf = GGUFFile.open(path)
        return cls(gf, model_config(gf))

    def __repr__(self) -> str:
        return f"GGUFStore({self.path})"

    # --- units and pages ---
    @property
    def units(self) -> list[Unit]:
        return units_of(self.config)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def unit_names(self, unit: Unit) -> list[str]:
        """HF names of a unit's tensors, in config order."""
        from odyssey.store.format import unit_shapes

        return list(unit_shapes(self.config, unit))

    def _span(self, names) -> tuple[int, int]:
        ts = [self.gf.tensors[self.names[n]] for n in names]
        return min(t.offset for t in ts), max(t.end for t in ts)

    def _init_pages(self) -> None:
        cfg = self.config
        self._pages: dict[Unit, Page] = {}
        for i in range(cfg.num_hidden_layers):
            names = self.unit_names(i)
            start, end = self._span(names)
            own = sum(self.gf.tensors[self.names[n]].nbytes for n in names)
            if end - start > 2 * own + 4096:
                raise OdysseyError(
                    f"{self.path}: layer {i}'s tensors are scattered through the file ({end - start} bytes apart "
                    f"for {own} bytes of weights), so Odyssey cannot page it a layer at a time; "
                    + IMPORT_HINT.format(path=self.path)
                )
            self._pages[i] = self._page(i, names, start, end)
        start, end = self._span(["model.norm.weight"])
        self._pages["head"] = self._page("head", ["model.norm.weight"], start, end)
        largest = max(p.nbytes for p in self._pages.values())
        self.block_rows: dict[Unit, int] = {}
        self._blocks: dict[Unit, list[Block]] = {}
        for unit, name in BLOCKED.items():
            if name not in self.names:  # tied: no lm_head
                continue
            t = self.gf.tensors[self.names[name]]
            V, rb = t.shape[0], row_bytes(t.qtype, t.shape[1])
            rows = max(1, min(V, largest // rb))
            self.block_rows[unit] = rows
            n = -(-V // rows)
            self._blocks[unit] = [Block(unit, k, n, r0, min(V, r0 + rows)) for k, r0 in enumerate(range(0, V, rows))]
            if unit == "embed":  # the whole matrix (the "head" page is the final norm)
                self._pages[unit] = self._page(unit, [name], t.offset, t.end)

    def _page(self, unit, names, start: int, end: int) -> Page:
        tensors = {}
        for n in names:
            t = self.gf.tensors[self.names[n]]
            tensors[n] = (t.offset - start, t.qtype, t.shape)
        return Page(unit, self.path, start, end, tensors)

    def blocks(self, unit: Unit) -> list[PageUnit]:
        """The pager units covering `unit`: the row blocks of the embedding or an untied head, else
        [unit] ("head" of a tied model: the final norm)."""
        return list(self._blocks.get(unit, [unit]))

    def page_units(self) -> list[PageUnit]:
        """Every pager unit: the embedding's blocks, the layers, "head" (the norm), the head's blocks."""
        out: list[PageUnit] = [*self._blocks["embed"], *range(self.num_layers), "head"]
        return out + list(self._blocks.get("head", []))

    def page(self, unit: PageUnit) -> Page:
        if not isinstance(unit, Block):
            return self._pages[unit]
        name = BLOCKED[unit.unit]
        t = self.gf.tensors[self.names[name]]
        rb = row_bytes(t.qtype, t.shape[1])
        start = t.offset + unit.row_start * rb
        end = t.offset + unit.row_end * rb
        return Page(unit, self.path, start, end, {name: (0, t.qtype, (unit.row_end - unit.row_start, t.shape[1]))})

    def max_page_bytes(self) -> int:
        return max(self.page(u).nbytes for u in self.page_units())

    def unit_bytes(self, unit: Unit) -> int:
        """Bytes the pager reads for `unit` (all its blocks; "head": the norm and an untied head)."""
        units = self.blocks(unit) + (["head"] if unit == "head" and "head" in self._blocks else [])
        return sum(self.page(u).nbytes for u in units)

    def max_unit_bytes(self) -> int:
        return max(self.unit_bytes(u) for u in self.units)

    def block_bytes(self, unit: Unit) -> list[int]:
        return [self.page(b).nbytes for b in self.blocks(unit)]

    def total_bytes(self) -> int:
        return self.gf.size

    def types(self) -> dict[str, tuple[int, int]]:
        """{GGML type: (tensors, bytes)} of the model's tensors."""
        out: dict[str, list[int]] = {}
        for t in self.gf.tensors.values():
            c = out.setdefault(t.qtype, [0, 0])
            c[0] += 1
            c[1] += t.nbytes
        return {k: (v[0], v[1]) for k, v in sorted(out.items(), key=lambda kv: -kv[1][1])}

    def fingerprint(self) -> str:
        """Identity of the weights: sha256 over the header bytes and the first and last 4 KiB of
        every tensor (different weights differ there; reading the whole file would take seconds per
        GB), 16 hex digits."""
        h = hashlib.sha256()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            h.update(os.pread(fd, self.gf.data_offset, 0))
            for t in sorted(self.gf.tensors.values(), key=lambda t: t.offset):
                n = min(4096, t.nbytes)
                h.update(os.pread(fd, n, t.offset))
                h.update(os.pread(fd, n, t.end - n))
        finally:
            os.close(fd)
        return h.hexdigest()[:16]

    def tokenizer_path(self) -> Path | None:
        """tokenizer.json converted from the file's metadata (odyssey.gguf.tokenizer: once per file,
        cached under the cache directory), None when the metadata holds no tokenizer. A tokenizer
        Odyssey cannot convert is refused in one line."""
        if self._tokenizer is None:
            from odyssey.gguf.tokenizer import cached_tokenizer, has_tokenizer

            self._tokenizer = cached_tokenizer(self.path) / "tokenizer.json" if has_tokenizer(self.gf) else False
        return self._tokenizer or None

    # --- tensors ---
    def _heads(self, name: str) -> int | None:
        if not self._permute:
            return None
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return self.config.num_attention_heads
        if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return self.config.num_key_value_heads
        return None

    def tensor_view(self, name: str, buf, offset: int, qtype: str, shape):
        """What the engine binds for tensor `name` whose bytes start at `offset` of `buf` (a pager
        slot): a zero-copy tensor view (F32/F16/BF16), a QWeight (quantized matrix; q/k of a
        permuting architecture), or an unpermuted copy (a q/k bias)."""
        import math

        import torch

        from odyssey.dtypes import GGUF_CODES
        from odyssey.gguf.blocks import tensor_bytes
        from odyssey.gguf.qweight import QWeight

        heads = self._heads(name)
        if qtype in FLOATS and (heads is None or len(shape) == 1):
            t = torch.frombuffer(buf, dtype=GGUF_CODES[qtype].torch(), count=math.prod(shape), offset=offset)
            t = t.view(tuple(shape))
            if heads is not None:  # a permuted bias: a vector, copied in HF order
                from odyssey.export.gguf_layout import unpermute_qk

                t = unpermute_qk(t, heads).contiguous()
            return t
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=tensor_bytes(qtype, shape), offset=offset)
        return QWeight(raw, qtype, tuple(shape), heads)

    def load_tensors(self, unit: Unit, dtype=None) -> dict:
        """A unit's tensors, HF names and layout, dequantized (bit-exact f32; `dtype` if given),
        after checking the unit's bytes on disk against the record (the first time)."""
        import torch

        from odyssey.gguf.model import load_tensor

        self.check_unit(unit)
        out = {}
        for name in self.unit_names(unit):
            try:
                out[name] = load_tensor(self.gf, name, self.config, dtype or torch.float32)
            except OSError as e:
                raise StoreError(
                    f"{self.path}: cannot read ({e.strerror or e}); run `odyssey verify {self.path}`"
                ) from None
        return out

    def state_dict(self, dtype=None) -> dict:
        sd = {}
        for unit in self.units:
            sd.update(self.load_tensors(unit, dtype))
        return sd

    def embedding_rows(self, ids):
        """Rows `ids` (int array) of the embedding, dequantized to f32 (a float file's rows in its
        own dtype), after checking the row blocks that hold them."""
        import torch

        from odyssey.dtypes import GGUF_CODES
        from odyssey.gguf.dequant import dequantize

        ids = np.asarray(ids).reshape(-1)
        self.check_rows("embed", np.unique(ids))
        t = self.gf.tensors[self.names["model.embed_tokens.weight"]]
        V, d = t.shape
        rb = row_bytes(t.qtype, d)
        if self._embed_map is None:
            self._embed_map = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(V, rb))
        raw = np.ascontiguousarray(self._embed_map[ids])
        if t.qtype in FLOATS:
            return torch.from_numpy(raw).view(GGUF_CODES[t.qtype].torch()).view(len(ids), d)
        return dequantize(raw, t.qtype, (len(ids), d))

    # --- the planner ---
    def workspace_bytes(self, compute_itemsize: int) -> int:
        """Bytes the engine allocates to dequantize: the workspace (the largest matrix that goes
        through it, in the compute dtype; backward dequantizes into it again), the f32 scratch of
        one dequantization chunk when the compute dtype is not f32, and one head chunk (VOCAB_CHUNK
        rows, converted or dequantized)."""
        from odyssey.dtypes import VOCAB_CHUNK
        from odyssey.gguf.dequant import CHUNK_ELEMENTS

        n = self.workspace_numel()
        scratch = CHUNK_ELEMENTS * 4 if compute_itemsize != 4 and n else 0
        return n * compute_itemsize + scratch + VOCAB_CHUNK * self.config.hidden_size * compute_itemsize

    def workspace_numel(self) -> int:
        """Elements of the largest layer matrix the engine dequantizes (a QWeight: quantized, or a
        permuted q/k), 0 when none is."""
        mats = [
            shape[0] * shape[1]
            for i in range(self.num_layers)
            for n, (_, q, shape) in self.page(i).tensors.items()
            if len(shape) == 2 and (q not in FLOATS or self._heads(n) is not None)
        ]
        return max(mats, default=0)

    def paging_note(self) -> str:
        """What `odyssey plan` says of the file: types, and a layer's bytes as stored."""
        from odyssey.planner import format_bytes

        layer = max(self.unit_bytes(i) for i in range(self.num_layers))
        params = sum(int(np.prod(s)) for s in self.config.layer_shapes(0).values())
        types = ", ".join(f"{q} {n}" for q, (n, _) in self.types().items())
        return (
            f"{types} tensors; a layer is {format_bytes(layer)} on disk (bf16: {format_bytes(params * 2)}), "
            f"each matrix dequantized just before its matmul"
        )

    # --- description ---
    def describe(self) -> str:
        """`odyssey info` for a GGUF file."""
        from odyssey.planner import format_bytes

        cfg = self.config
        lines = [
            f"GGUF {self.path} (version {self.gf.version}, {format_bytes(self.gf.size)})",
            f"architecture: {self.arch} (Odyssey family {cfg.family.name}), {cfg.num_parameters():,} parameters",
            f"layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, heads "
            f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}, head dim {cfg.head_dim}, "
            f"vocabulary {cfg.vocab_size}, "
            f"context {cfg.max_position_embeddings}, RoPE base {cfg.rope_theta:g}"
            + (f" ({cfg.rope_scaling['rope_type']})" if cfg.rope_scaling else "")
            + (", tied embeddings" if cfg.tie_word_embeddings else ""),
            "types: " + ", ".join(f"{q} {n} tensors {format_bytes(b)}" for q, (n, b) in self.types().items()),
            f"computes as a {self.dtype} store"
            + (" (quantized: LoRA training, generation, merge and export)" if self.quantized else ""),
            f"pager: layer {format_bytes(max(self.unit_bytes(i) for i in range(self.num_layers)))} "
            f"(largest), embedding {len(self._blocks['embed'])} block(s) of {self.block_rows['embed']} rows"
            + (
                f", head {len(self._blocks['head'])} block(s) of {self.block_rows['head']} rows"
                if "head" in self._blocks
                else ""
            ),
        ]
        if ROPE_FREQS in self.gf.tensors:
            lines.append(f"{ROPE_FREQS}: Llama 3 RoPE divisors")
        if self.gf.chat_template:
            lines.append("chat template: in the metadata")
        return "\n".join(lines)


def refuse_quantized(store, what: str) -> None:
    """One line refusing `what` (e.g. "full fine-tuning") on a quantized GGUF."""
    if getattr(store, "quantized", False):
        raise OdysseyError(
            f"{store.path} is a quantized GGUF: Odyssey trains LoRA adapters on it, not {what}; "
            + IMPORT_HINT.format(path=store.path)
        )


__all__ = ["BLOCKS", "GGUFStore", "is_gguf", "names_gguf", "refuse_quantized"]
