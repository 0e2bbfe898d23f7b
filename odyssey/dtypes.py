"""Dtypes and the constants every layer shares, in one torch-free place.

The storage dtypes: one row per dtype a tensor can be stored in (`DTYPES` by Odyssey's short name,
`ST_CODES` by safetensors header code, `GGUF_CODES` by GGML type name), with every name the formats
give it: the safetensors code, the bytes per element, Hugging Face's `torch_dtype` name in
config.json, the numpy dtype of the raw elements (bf16 as uint16: numpy has no bfloat16), the torch
dtype (resolved by `DtypeInfo.torch()`, which imports torch only when called), the typed storage
class torch.save's pickle names, and the GGML type where GGUF has one. A store holds one of
`STORE_DTYPES`; the safetensors header codec accepts every row.

Shared constants: `PAGE_SIZE` (the alignment of store data and pager buffers), `VOCAB_CHUNK` (head
rows per chunk in the engine and the planner), `MIB`, `IGNORE` (the target id that carries no loss);
and `numel(shape)`.

The compute dtype: `--compute-dtype auto` (the default) never computes below the store's precision:
an f32 (or f16) store computes in fp32; a bf16 store computes in whichever of bf16 and fp32 the
compute probe measured faster on this machine at the model's own shapes (odyssey.probe: once per
machine, cached; fp16 is never picked, see there). The environment variable `ODYSSEY_COMPUTE_DTYPE` (bf16 or fp32)
overrides what `auto` picks, on every command and in every test: the suite can be run both ways on
one machine. An explicit `--compute-dtype bf16|fp32` always wins. `compute_dtype_source` names the
rule that decided, `compute_dtype_line` says it in words for doctor, plan, generate and train.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

from odyssey.errors import OdysseyError

PAGE_SIZE = 4096  # bytes: store data and pager buffers are aligned to it (O_DIRECT, zero-copy views)
VOCAB_CHUNK = 8192  # head rows per chunk: (B*T, 8192) fp32 logits = 16 MiB at B*T = 512
MIB = 1 << 20
IGNORE = -100  # a target that is not trained: no loss, no gradient (torch cross_entropy's ignore_index)


def numel(shape: Iterable[int]) -> int:
    """Elements of a tensor of `shape` (1 for a scalar's empty shape)."""
    return math.prod(shape)


@dataclass(frozen=True)
class DtypeInfo:
    """One storage dtype under every name the formats Odyssey reads and writes give it."""

    short: str  # Odyssey's name: the store index's "dtype", `--dtype`
    st: str  # safetensors header code: "BF16", "F32", ...
    itemsize: int  # bytes per element
    hf_name: str  # config.json `torch_dtype` (also the torch attribute): "bfloat16", ...
    numpy: str  # numpy dtype of the raw elements: bf16 is read as "uint16" (numpy has no bfloat16)
    torch_storage: str  # the legacy typed storage class torch.save's pickle names: "BFloat16Storage"
    gguf: str | None  # gguf.GGMLQuantizationType name, None where GGUF has no such type

    def torch(self):
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.hf_name)


DTYPES: dict[str, DtypeInfo] = {
    d.short: d
    for d in (
        DtypeInfo("bf16", "BF16", 2, "bfloat16", "uint16", "BFloat16Storage", "BF16"),
        DtypeInfo("f16", "F16", 2, "float16", "float16", "HalfStorage", "F16"),
        DtypeInfo("f32", "F32", 4, "float32", "float32", "FloatStorage", "F32"),
        DtypeInfo("f64", "F64", 8, "float64", "float64", "DoubleStorage", "F64"),
        DtypeInfo("i64", "I64", 8, "int64", "int64", "LongStorage", "I64"),
        DtypeInfo("i32", "I32", 4, "int32", "int32", "IntStorage", "I32"),
        DtypeInfo("u8", "U8", 1, "uint8", "uint8", "ByteStorage", None),
    )
}
ST_CODES: dict[str, DtypeInfo] = {d.st: d for d in DTYPES.values()}  # by safetensors header code
GGUF_CODES: dict[str, DtypeInfo] = {d.gguf: d for d in DTYPES.values() if d.gguf}  # by GGML type name
STORE_DTYPES = ("bf16", "f16", "f32")  # what a store holds (`--dtype` of init, import, merge)

COMPUTE_DTYPES = ("auto", "bf16", "fp32")
COMPUTE_ENV = "ODYSSEY_COMPUTE_DTYPE"


def check_store_dtype(name: str) -> None:
    """Refuse a `--dtype` a store cannot hold."""
    if name not in STORE_DTYPES:
        raise OdysseyError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, got {name!r}")


def _forced() -> str | None:
    forced = os.environ.get(COMPUTE_ENV, "").strip().lower()
    if forced and forced not in ("bf16", "fp32"):
        raise OdysseyError(f"{COMPUTE_ENV} must be bf16 or fp32, got {forced!r}; unset it to let `auto` decide")
    return forced or None


def probe_for(config, tokens: int | None = None, remeasure: bool = False):
    """The compute probe's figures at the shape of `config`'s largest projection (the 1.2B's when
    None) with `tokens` rows (None: a training step's, odyssey.probe.PROBE_TOKENS; 1 for generating,
    DECODE_TOKENS: over copies of W that reach the model's fp32 weights or 64 MiB, whichever is less),
    measured once per machine and cached (odyssey.probe)."""
    from odyssey.probe import DEFAULT_SHAPE, PROBE_TOKENS, decode_copies, probe, shape_of

    if config is None:
        shape = DEFAULT_SHAPE if tokens is None else (tokens, *DEFAULT_SHAPE[1:])
    else:
        shape = shape_of(config, PROBE_TOKENS if tokens is None else tokens)
    copies = decode_copies(shape, None if config is None else 4 * config.num_parameters())
    return probe(shape, remeasure=remeasure, copies=copies)


def compute_dtype_name(
    name: str = "auto", store_dtype: str | None = None, config=None, tokens: int | None = None
) -> str:
    """ "bf16" or "fp32": what `--compute-dtype NAME` computes a store of `store_dtype` ("bf16",
    "f16", "f32"; None: not known, as for `odyssey doctor`) with the model `config` (a ModelConfig,
    whose largest projection the probe measures; None: the 1.2B's) in on this machine, for passes
    of `tokens` rows (None: training's; 1: generating, where the weights' bytes decide)."""
    if name in ("fp32", "f32"):
        return "fp32"
    if name == "bf16":
        return "bf16"
    if name != "auto":
        raise OdysseyError(f"--compute-dtype must be auto, bf16 or fp32, got {name!r}")
    forced = _forced()
    if forced:
        return forced
    if store_dtype in ("f32", "f16"):  # bf16 holds fewer bits than either: never below the store
        return "fp32"
    return probe_for(config, tokens).fastest


def compute_dtype_info(name: str = "auto", store_dtype: str | None = None, config=None) -> DtypeInfo:
    """The table row of what `--compute-dtype NAME` computes a `store_dtype` store in (its itemsize,
    its torch dtype)."""
    return DTYPES["bf16" if compute_dtype_name(name, store_dtype, config) == "bf16" else "f32"]


def compute_dtype_source(name: str = "auto", store_dtype: str | None = None) -> str:
    """Why `compute_dtype_name(name, store_dtype)` answers what it does: "option" (--compute-dtype
    or the config's compute_dtype), "environment" (ODYSSEY_COMPUTE_DTYPE), "store" (an f32 or f16
    store computes in fp32) or "probe" (a bf16 store, or none known: the faster dtype measured)."""
    if name != "auto":
        return "option"
    if _forced():
        return "environment"
    return "store" if store_dtype in ("f32", "f16") else "probe"


def compute_dtype_line(
    name: str = "auto", store_dtype: str | None = None, config=None, tokens: int | None = None
) -> str:
    """One line naming the compute dtype and the rule that picked it, e.g.
    "compute dtype: fp32 (auto: the store is f32, never computed below its precision)" or
    "compute dtype: bf16 (auto: measured bf16 399 GFLOP/s vs fp32 173 at 512x2048x5632, cached 2026-11-30)"."""
    picked = compute_dtype_name(name, store_dtype, config, tokens)
    source = compute_dtype_source(name, store_dtype)
    if source == "option":
        why = f"--compute-dtype {name}"
    elif source == "environment":
        why = f"{COMPUTE_ENV}={picked} overrides auto"
    elif source == "store":
        why = f"auto: the store is {store_dtype}, never computed below its precision"
    else:
        measured = probe_for(config, tokens).summary()
        why = f"auto: {measured}" if store_dtype else f"auto for bf16 stores (f32 and f16: fp32): {measured}"
    return f"compute dtype: {picked} ({why})"
