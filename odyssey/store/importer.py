"""Import: an existing Hugging Face checkpoint of a supported family (`odyssey.families`; single or
sharded safetensors) into a store, one layer at a time through memory maps, never the whole model in
RAM; the tokenizer files come along.

Nothing is imported silently wrong: the config is read by the family's rules (a value that changes
the math and is not implemented is refused, naming the key), and every tensor of the source must be
one the family's model consumes (a Qwen checkpoint relabelled as Llama is refused, naming a bias it
would drop), before anything is written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from odyssey import atomic
from odyssey.dtypes import DTYPES, ST_CODES, STORE_DTYPES, check_store_dtype
from odyssey.errors import OdysseyError
from odyssey.modelconfig import ModelConfig
from odyssey.outputs import check_apart
from odyssey.store.format import INDEX_NAME, read_header
from odyssey.store.writer import StoreWriter
from odyssey.tokenizer import TOKENIZER_FILES, copy_tokenizer, tokenizer_files

# tensors transformers itself skips when loading (buffers some older checkpoints saved)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def import_hf(
    src: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None, force: bool = False, progress: bool = True
) -> dict:
    """Convert an HF checkpoint of a supported family (single or sharded safetensors) into a store, one
    layer at a time through memory maps (never the whole model in RAM)."""
    from safetensors import safe_open

    atomic.set_command("import")
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise OdysseyError(f"{src} has no config.json; point `odyssey import` at a Hugging Face model directory")
    hf = _read_json(cfg_path)
    cfg = ModelConfig.from_hf_dict(hf, source=str(cfg_path))

    # Where each tensor lives in the source.
    index_path = src / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise OdysseyError(f"{index_path} has no weight_map; save the model again with save_pretrained")
        files = {name: src / str(f) for name, f in weight_map.items()}
        gone = sorted({p.name for p in files.values() if not p.is_file()})
        if gone:
            raise OdysseyError(
                f"{src}: shard {gone[0]} listed in {INDEX_NAME} is missing"
                f"{f' (and {len(gone) - 1} more)' if len(gone) > 1 else ''}; download the complete checkpoint"
            )
    elif (src / "model.safetensors").is_file():
        with safe_open(src / "model.safetensors", "pt") as f:
            files = {name: src / "model.safetensors" for name in f.keys()}
    else:
        raise OdysseyError(
            f"{src} has no model.safetensors or {INDEX_NAME}; save the model with "
            f"safe_serialization (safetensors) first"
        )
    if cfg.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # a tied head saved anyway: transformers ignores it too
    expected = cfg.all_shapes()
    _check_tensors(src, cfg, set(files), expected)
    # Keep the source dtype unless asked otherwise (f64 sources become f32).
    if not dtype:
        src_dtype = ST_CODES.get(_slice_dtype(files["model.embed_tokens.weight"], "model.embed_tokens.weight"))
        dtype = src_dtype.short if src_dtype is not None and src_dtype.short in STORE_DTYPES else "f32"
    check_store_dtype(dtype)

    # Before the writer touches --out: --force on the source would delete the shards being read.
    check_apart(out, [("source model", None, src)])
    tok_files = tokenizer_files(src)
    read = sorted({cfg_path, *([index_path] if index_path.is_file() else []), *files.values(), *tok_files})
    key = {
        "config": cfg.to_hf_dict(DTYPES[dtype].hf_name),
        "dtype": dtype,
        "kind": "import",
        "source": str(src.absolute()),
        # the source as it is now: a re-run resumes (or finds complete) only an import of the same files
        "source_files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in read],
    }
    w = StoreWriter(
        Path(out),
        cfg,
        dtype,
        key,
        force,
        extra_bytes=sum(p.stat().st_size for p in tok_files),
        extra_names=TOKENIZER_FILES,
    )
    handles: dict[Path, object] = {}

    def producer(name, shape):
        path = files[name]
        if path not in handles:
            handles[path] = safe_open(path, "pt")
        t = handles[path].get_tensor(name)  # zero-copy view of a private mmap
        if tuple(t.shape) != tuple(shape):
            raise OdysseyError(f"{src}: {name} has shape {list(t.shape)}, its config.json implies {list(shape)}")
        return t

    t0 = time.perf_counter()
    # unmap the source files after each unit: one unit's source pages at a time
    written, kept = w.write_all(producer, "import", progress, after_unit=handles.clear)
    copied = copy_tokenizer(src, Path(out))  # before the index: a directory with an index is complete
    w.finish()
    return w.summary(time.perf_counter() - t0, written, kept, tokenizer_files=copied)


def _check_tensors(src: Path, cfg: ModelConfig, present: set[str], expected: dict) -> None:
    """Every tensor the model needs is in the source, and every source tensor is one the model
    consumes; else one line naming the first tensor that is not."""
    fam = cfg.family
    what = f"{fam.name} ({fam.architecture}{', attention_bias=true' if cfg.attention_bias else ''})"
    unused = sorted(n for n in present - set(expected) if not n.endswith(IGNORED_SUFFIXES))
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise OdysseyError(
            f"{src}: tensor {unused[0]}{more} is not part of a {what} model; the checkpoint is another "
            f"family or its config.json is wrong (importing it would drop the tensor), so nothing was imported"
        )
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise OdysseyError(f"{src}: checkpoint lacks {missing[0]}{more}; is it a complete {what} model?")


def _read_json(path: Path) -> dict:
    """A JSON object from a source checkpoint's file, or one line saying what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OdysseyError(f"{path} is not valid JSON ({e}); repair or re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise OdysseyError(f"{path} must hold a JSON object; repair or re-download the checkpoint")
    return data


def _slice_dtype(path: Path, name: str) -> str:
    _, header, _ = read_header(path)
    return header[name]["dtype"]
