"""GGML block types as Odyssey reads them: elements and bytes per block, the bytes of a row and
of a tensor, and the refusal of a type it does not read. No torch (the reader's checks use it)."""

from __future__ import annotations

import numpy as np

from odyssey.errors import OdysseyError

# name -> (elements per block, bytes per block), as gguf.GGML_QUANT_SIZES gives them
BLOCKS = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
SUPPORTED = tuple(BLOCKS)


def type_name(qtype) -> str:
    """A GGML type (gguf.GGMLQuantizationType, its int value, or its name) -> its name."""
    if isinstance(qtype, str):
        return qtype.upper()
    import gguf

    try:
        return gguf.GGMLQuantizationType(int(qtype)).name
    except ValueError:  # a type id newer than the gguf package (or a corrupt header)
        return f"#{int(qtype)} (unknown)"


def check_type(qtype, what: str = "tensor") -> str:
    name = type_name(qtype)
    if name not in BLOCKS:
        raise OdysseyError(
            f"{what} has GGML type {name}, which Odyssey does not read; supported: {', '.join(SUPPORTED)} "
            f"(re-quantize the model to one of them with llama.cpp's llama-quantize)"
        )
    return name


def row_bytes(qtype, cols: int) -> int:
    """Bytes of one row of `cols` elements (a row is whole blocks)."""
    elems, nbytes = BLOCKS[check_type(qtype)]
    if cols % elems:
        raise OdysseyError(f"{type_name(qtype)} rows must be a multiple of {elems} elements long, got {cols}")
    return cols // elems * nbytes


def tensor_bytes(qtype, shape) -> int:
    """Bytes of a tensor of `shape` (numpy / HF order: the last dimension is the row)."""
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * row_bytes(qtype, int(shape[-1]))
