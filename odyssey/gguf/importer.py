"""`odyssey import model.gguf --out DIR`: a llama.cpp GGUF file into an ordinary store, one tensor at
a time, never the whole model in RAM.

What goes where:
- the model config from the GGUF's metadata (`odyssey.gguf.model.model_config`, which checks every
  tensor against it before anything is written);
- each tensor dequantized bit-exactly (`odyssey.gguf.dequant`), straight from a read-only map of its
  byte range, into the store dtype in chunks (the workspace is one tensor in the store dtype, not
  one in f32), q/k rows back in HF order (llama.cpp's RoPE permutation undone);
- the tokenizer and chat template from the metadata (`odyssey.gguf.tokenizer`), converted before
  any shard is written (after --out is checked), so a file whose vocabulary transformers cannot
  build leaves nothing behind.
  A GGUF without tokenizer metadata imports as a store without tokenizer files, said in the summary
  (`prepare-data` and `chat` then ask for one).

The store dtype: bf16 by default, as `odyssey init` writes; a GGUF whose tensors are all F32 (an f32
export) imports as f32, so that its values come back exactly. `--dtype` chooses either way; f32
keeps every dequantized value exact (a quantized value, scale x integer, has up to 19 significant
bits: bf16 rounds it).

The source is protected as `odyssey import` of a Hugging Face checkpoint protects it: an `--out` that
is the file, lies inside it or contains it (the GGUF's own directory) is refused before anything is
written (`--force` does not change this), the GGUF is only read, and the store is written by
`StoreWriter` (atomic shards and journal, a re-run resumes, the index last).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from odyssey import atomic
from odyssey.dtypes import DTYPES, check_store_dtype
from odyssey.errors import OdysseyError
from odyssey.outputs import check_apart
from odyssey.tokenizer import TOKENIZER_FILES

DEFAULT_DTYPE = "bf16"


def default_dtype(gf) -> str:
    """bf16, or f32 for a GGUF whose tensors are all F32 (imported exactly)."""
    return "f32" if set(gf.summary()) == {"F32"} else DEFAULT_DTYPE


def import_gguf(
    src: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None, force: bool = False, progress: bool = True
) -> dict:
    """Convert the llama-architecture GGUF `src` into a store at `out` (see the module); returns the
    writer's summary with `tokenizer_files` (names written) and `source_types` ({GGML type: tensors})."""
    from odyssey.gguf.model import hf_names, model_config
    from odyssey.gguf.reader import GGUFFile

    atomic.set_command("import")
    src = Path(src)
    gf = GGUFFile.open(src)  # structure, types, architecture: one line and nothing written on a fault
    cfg = model_config(gf)  # every tensor accounted for
    dtype = dtype or default_dtype(gf)
    check_store_dtype(dtype)
    # Before the writer touches --out: --force on the GGUF's own directory would put the store beside it.
    check_apart(out, [("GGUF file", None, src)])
    from odyssey.store.writer import StoreWriter

    stat = src.stat()
    key = {
        "config": cfg.to_hf_dict(DTYPES[dtype].hf_name),
        "dtype": dtype,
        "kind": "import-gguf",
        "source": str(src.absolute()),
        # the file as it is now: a re-run resumes (or finds complete) only an import of the same bytes
        "source_files": [[src.name, stat.st_size, stat.st_mtime_ns]],
    }
    # --out checked (and prepared) before the tokenizer is converted: every refusal so far costs no
    # torch. The tokenizer files take about twice the header's bytes (its tokens and merges, as JSON).
    w = StoreWriter(Path(out), cfg, dtype, key, force, extra_bytes=2 * gf.data_offset, extra_names=TOKENIZER_FILES)
    import numpy as np
    import torch

    from odyssey.export.gguf_layout import unpermute_qk
    from odyssey.gguf.dequant import dequantize
    from odyssey.gguf.tokenizer import has_tokenizer, tokenizer_files_of

    try:  # before any shard: a vocabulary transformers cannot build leaves nothing behind
        tok_files = tokenizer_files_of(src, gf) if has_tokenizer(gf) and not w.complete else {}
    except BaseException:
        if not w.complete:
            w.abandon()
        raise
    names = hf_names(gf, cfg)  # HF name -> GGUF name
    target = DTYPES[dtype].torch()
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}

    def producer(name, shape):
        t = gf.tensor(names[name])
        if t.shape != tuple(shape):  # model_config checked this; a guard against a changed file
            raise OdysseyError(f"{src}: {t.name} has shape {list(t.shape)}, the store expects {list(shape)}")
        # a read-only map of the tensor's bytes: its pages are the page cache's, gone with the map
        raw = np.memmap(src, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))
        try:
            w_ = dequantize(raw, t.qtype, t.shape, dtype=target)  # bit-exact f32 values, cast chunk by chunk
        finally:
            del raw
        n_head = heads.get(name.split(".")[-2]) if ".self_attn." in name else None
        if n_head is not None:  # llama.cpp's interleaved RoPE rows back to HF's halves
            w_ = unpermute_qk(w_, n_head).contiguous()
        return w_

    t0 = time.perf_counter()
    with torch.no_grad():
        written, kept = w.write_all(producer, "import", progress)
    if (src.stat().st_size, src.stat().st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
        w.abandon()
        raise OdysseyError(f"{src} changed while it was being imported; run the import again")
    from odyssey.tokenizer import write_tokenizer_files

    if w.complete:  # the same import finished before: its tokenizer files are there
        tok_files = {n: b"" for n in TOKENIZER_FILES if (Path(out) / n).is_file()}
    else:
        write_tokenizer_files(tok_files, Path(out), [])  # before the index: a directory with an index is complete
    w.finish()
    return w.summary(
        time.perf_counter() - t0, written, kept, tokenizer_files=sorted(tok_files), source_types=gf.summary()
    )


__all__ = ["default_dtype", "import_gguf"]
