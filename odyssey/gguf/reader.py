"""A llama.cpp GGUF file's header: metadata (architecture, hyperparameters, tokenizer arrays, chat
template) and, for each tensor, its name, GGML type, shape (HF order) and absolute byte range, all
checked before a tensor byte is read. No torch.

The file (little-endian, versions 2 and 3):
```
"GGUF"  u32 version  u64 n_tensors  u64 n_kv
n_kv x      key (u64 length + UTF-8)  u32 value type  value      (arrays: u32 item type, u64 count, items)
n_tensors x name (u64 length + UTF-8)  u32 n_dims  u64 ne[n_dims]  u32 GGML type  u64 offset
padding to `general.alignment` (default 32)
tensor data: each tensor at data_start + offset, offset a multiple of the alignment
```
`ne` lists dimensions fastest first (ne[0] is the row length): the HF / numpy shape is `ne`
reversed. A tensor's bytes are whole blocks of its type (`odyssey.gguf.blocks`).

Why not `gguf.GGUFReader`: it keeps one numpy array per array item (two per string: about 800k
small arrays for a 128k-token vocabulary with its merges) and maps the whole file; a truncated or
corrupt file fails inside numpy. This parser reads the header with plain reads, keeps strings as
str and numeric arrays as lists, and turns every structural fault into one OdysseyError naming the
file and the fix; tests/test_gguf_read.py checks it against GGUFReader field by field.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from odyssey.errors import OdysseyError
from odyssey.gguf.blocks import BLOCKS, check_type, tensor_bytes, type_name

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ARCHITECTURES = ("llama", "qwen2", "qwen3")  # general.architecture values Odyssey reads (mistral is llama)
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF value types: id -> (struct format, numpy dtype) for scalars; 8 string, 9 array
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9
_FLOAT32 = 6

_REDO = "download or convert the model again (llama.cpp's convert_hf_to_gguf.py, or `odyssey export --formats gguf`)"


def _float32(v: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06): the number the writer was given."""
    return float(str(np.float32(v)))


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's bytes lie in the file."""

    name: str  # llama.cpp name, e.g. blk.0.attn_q.weight
    qtype: str  # GGML type name: F32, Q8_0, Q4_K, ...
    shape: tuple[int, ...]  # numpy / HF order: (rows, row length); GGUF's ne reversed
    offset: int  # bytes, absolute in the file, a multiple of the alignment
    nbytes: int  # bytes of data (whole blocks)

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


class _Cursor:
    """Sequential reads of the header; any read past the end of the file is a truncation."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size, self.pos = f, path, size, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise OdysseyError(
                f"{self.path} is truncated or corrupt: its header needs bytes up to {self.pos + n}, "
                f"the file has {self.size}; {_REDO}"
            )
        b = self.f.read(n)
        self.pos += n
        return b

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise OdysseyError(f"{self.path}: a string at byte {self.pos - len(raw)} is not UTF-8; {_REDO}") from None

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype][0])
            return _float32(v) if vtype == _FLOAT32 else v
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _SCALARS:  # one read for the whole array
                dt = np.dtype(_SCALARS[itype][1]).newbyteorder("<")
                arr = np.frombuffer(self.take(count * dt.itemsize), dtype=dt)
                return [_float32(x) for x in arr.tolist()] if itype == _FLOAT32 else arr.tolist()
            if count > self.size - self.pos:  # each item takes at least a byte
                self.take(count)  # raises: truncated
            return [self.value(itype, key) for _ in range(count)]
        raise OdysseyError(f"{self.path}: metadata key {key!r} has unknown value type {vtype}; {_REDO}")


@dataclass
class GGUFFile:
    """A GGUF file's header, checked: `GGUFFile.open(path)`."""

    path: Path
    size: int  # bytes
    version: int
    alignment: int
    data_offset: int  # bytes: where tensor data starts
    metadata: dict  # key -> value (str, int, float, bool, or a list of them)
    tensors: dict  # name -> GGUFTensor, in file order

    @classmethod
    def open(cls, path, architectures: tuple[str, ...] | None = ARCHITECTURES) -> GGUFFile:
        """Parse and check the header (magic, version, truncation, every tensor's type, range and
        alignment, no overlaps); with `architectures`, refuse a file whose
        `general.architecture` is not one of them (None: any)."""
        path = Path(path)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise OdysseyError(f"cannot open GGUF file {path}: {e.strerror}; check the path") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            gf = cls._parse(_Cursor(f, path, size), path, size)
        gf._check_tensors()
        if architectures is not None:
            gf._check_architecture(architectures)
        return gf

    @classmethod
    def _parse(cls, c: _Cursor, path: Path, size: int) -> GGUFFile:
        magic = c.f.read(4)
        c.pos = len(magic)
        if not magic:
            raise OdysseyError(f"{path} is empty (0 bytes), not a GGUF model; download or convert the model again")
        if magic != MAGIC:
            raise OdysseyError(
                f"{path} is not a GGUF file (it starts with {magic!r}, a GGUF file with {MAGIC!r}); "
                f"pass a llama.cpp .gguf model"
            )
        version = c.scalar("<I")
        if version not in VERSIONS:
            hint = " (a big-endian file: convert it on a little-endian machine)" if version & 0xFFFF == 0 else ""
            raise OdysseyError(
                f"{path} is GGUF version {version}{hint}; Odyssey reads versions {' and '.join(map(str, VERSIONS))}: "
                f"convert the model again with a current llama.cpp"
            )
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        if n_tensors > size or n_kv > size:
            c.take(max(n_tensors, n_kv))  # raises: truncated or corrupt
        metadata = {}
        for _ in range(n_kv):
            key = c.string()
            if key in metadata:
                raise OdysseyError(f"{path}: metadata key {key!r} appears twice; {_REDO}")
            metadata[key] = c.value(c.scalar("<I"), key)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise OdysseyError(f"{path}: general.alignment must be a power of two, got {alignment!r}; {_REDO}")
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.scalar("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise OdysseyError(f"{path}: tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS}); {_REDO}")
            ne = [c.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(ne)), c.scalar("<I"), c.scalar("<Q")))
        data_offset = -(-c.pos // alignment) * alignment
        tensors = {}
        for name, shape, qtype, offset in infos:
            if name in tensors:
                raise OdysseyError(f"{path}: tensor {name} appears twice; {_REDO}")
            if any(s <= 0 for s in shape):
                raise OdysseyError(f"{path}: tensor {name} has shape {list(shape)}; {_REDO}")
            qname = check_type(qtype, f"{path}: tensor {name}")
            elems = BLOCKS[qname][0]
            if shape[-1] % elems:
                raise OdysseyError(
                    f"{path}: tensor {name} ({qname}) has rows of {shape[-1]} elements, not whole "
                    f"{elems}-element blocks; {_REDO}"
                )
            tensors[name] = GGUFTensor(name, qname, shape, data_offset + offset, tensor_bytes(qname, shape))
        return cls(path, size, version, alignment, data_offset, metadata, tensors)

    def _check_tensors(self) -> None:
        """Every tensor aligned, inside the file, and apart from the others."""
        prev = None
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            if (t.offset - self.data_offset) % self.alignment:
                raise OdysseyError(
                    f"{self.path}: tensor {t.name} starts at byte {t.offset}, not on the file's "
                    f"{self.alignment}-byte alignment; {_REDO}"
                )
            if t.end > self.size:
                raise OdysseyError(
                    f"{self.path} is truncated: tensor {t.name} needs bytes {t.offset}..{t.end}, the file "
                    f"has {self.size}; {_REDO}"
                )
            if prev is not None and t.offset < prev.end:
                raise OdysseyError(
                    f"{self.path}: tensors {prev.name} and {t.name} overlap (bytes {t.offset}..{prev.end}); {_REDO}"
                )
            prev = t

    def _check_architecture(self, allowed: tuple[str, ...]) -> None:
        from odyssey.export.gguf_layout import ARCHS
        from odyssey.families import FAMILIES

        if self.metadata.get("general.type") == "adapter":
            raise OdysseyError(
                f"{self.path} is a LoRA adapter GGUF, not a model; pass the base model's .gguf as --model"
            )
        arch = self.metadata.get("general.architecture")
        if arch in allowed:
            return
        if arch in ARCHS:
            fams = ", ".join(f.name for f in FAMILIES.values() if f.gguf_arch == arch)
            what = f"llama.cpp's {arch} architecture (Odyssey's {fams} family)"
            fix = "import the Hugging Face checkpoint with `odyssey import` instead"
        else:
            what = f"architecture {arch!r}" if arch else "no general.architecture"
            fix = "Odyssey has no family for it: use a model of the llama architecture"
        raise OdysseyError(
            f"{self.path} has {what}, which Odyssey does not read from GGUF yet (it reads {', '.join(allowed)}); {fix}"
        )

    # --- metadata ---
    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def arch_key(self, key: str, default=None):
        """`{architecture}.{key}` (e.g. `llama.embedding_length`)."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def tokenizer_metadata(self) -> dict:
        """The `tokenizer.*` keys: ggml.model, ggml.pre, ggml.tokens, ggml.token_type, ggml.scores,
        ggml.merges, special ids, add_bos/add_eos, chat_template."""
        return {k: v for k, v in self.metadata.items() if k.startswith("tokenizer.")}

    # --- data ---
    def tensor(self, name: str) -> GGUFTensor:
        if name not in self.tensors:
            raise OdysseyError(f"{self.path} has no tensor {name}; {_REDO}")
        return self.tensors[name]

    def read_raw(self, name: str, row_start: int = 0, row_end: int | None = None) -> np.ndarray:
        """The bytes of tensor `name` (rows [row_start, row_end) of a 2-D tensor), one pread,
        as a flat uint8 array."""
        t = self.tensor(name)
        rows = t.shape[0] if len(t.shape) > 1 else 1
        row_end = rows if row_end is None else row_end
        per_row = t.nbytes // rows
        start, n = t.offset + row_start * per_row, (row_end - row_start) * per_row
        buf = np.empty(n, dtype=np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [memoryview(buf)], start)
        finally:
            os.close(fd)
        if got != n:
            raise OdysseyError(f"{self.path} shrank while reading tensor {name} (got {got} of {n} bytes); {_REDO}")
        return buf

    def ranges(self, names) -> list[tuple[int, int]]:
        """The byte ranges [start, end) that hold tensors `names`, merged where only alignment
        padding lies between two of them: a layer's tensors written in order are one range, read
        with one pread."""
        out: list[list[int]] = []
        for t in sorted((self.tensor(n) for n in names), key=lambda t: t.offset):
            if out and t.offset - out[-1][1] < self.alignment:
                out[-1][1] = max(out[-1][1], t.end)
            else:
                out.append([t.offset, t.end])
        return [(a, b) for a, b in out]

    def summary(self) -> dict[str, int]:
        """{GGML type name: tensors of that type}."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.qtype] = counts.get(t.qtype, 0) + 1
        return counts


__all__ = ["GGUFFile", "GGUFTensor", "type_name"]
