"""`odyssey export`: one store (optionally with an adapter merged on the fly) to the formats other
tools load, each streamed one unit at a time by its own writer.

```
OUT/safetensors/       HF checkpoint directory (safetensors.py)  -> transformers.from_pretrained
OUT/model.pth          torch.save'd state dict, HF names (pth.py) -> torch.load(mmap=True)
OUT/model-<type>.gguf  llama.cpp file (gguf.py)                   -> llama.cpp, llama-cpp-python
OUT/adapter-<type>.gguf  the --adapter alone, as a llama.cpp LoRA adapter (gguf_lora.py)
                       -> `llama-cli -m base.gguf --lora OUT/adapter-f32.gguf`
```
`gguf-lora` is exported alone (it is the adapter, not merged weights), f32 (default) or f16.
Everything the user can get wrong is checked before the first byte is written: format names, the
GGUF type, the adapter's base, an --out apart from the inputs, outputs that exist already (unless
--force), and free disk for all requested outputs together. Every output goes to a temporary name
and is renamed when complete; each shard of the store is checked against its checksum as it is
read (a damaged shard stops the export before its output is renamed into place).

`OUT/.odyssey-export.json` (RECORD_NAME) records, per output, the key of what it is made from
(weights, adapter, tokenizer, format) and whether it is being written or done. Re-running the same
export after a kill keeps the outputs it finished, rewrites the one it was writing and removes the
temporary files of the killed process, without --force; --force is needed only to replace an
output that this export did not make, and replaces only the requested outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from odyssey import atomic
from odyssey.atomic import existing_parent
from odyssey.config import format_bytes
from odyssey.errors import OdysseyError
from odyssey.outputs import check_apart
from odyssey.store import tokenizer_dir, unit_shapes

FORMATS = ("safetensors", "pth", "gguf", "gguf-lora")  # also the order they are written in
DISK_MARGIN = 64 << 20  # bytes kept free beyond the estimate (metadata, filesystem slack)
RECORD_NAME = ".odyssey-export.json"
_OUTPUT_RE = re.compile(r"^(safetensors|model\.pth|(model|adapter)-[a-z0-9_]+\.gguf)$")


def is_output_name(name: str) -> bool:
    """A name an export writes in OUT (the outputs and the record): temporary files of a killed
    export for these are its own, and removed by the next one."""
    return name == RECORD_NAME or _OUTPUT_RE.match(name) is not None


def parse_formats(spec: str | Iterable[str]) -> list[str]:
    """ "safetensors,pth" or a list -> the known names, deduplicated, in FORMATS order."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    bad = [n for n in names if n not in FORMATS]
    if bad:
        raise OdysseyError(f"--formats: unknown format {bad[0]!r}; choose from {', '.join(FORMATS)} (comma-separated)")
    if not names:
        raise OdysseyError(f"--formats is empty; choose one or more of {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in names]


def output_path(out: Path, fmt: str, gguf_type: str) -> Path:
    if fmt == "gguf-lora":
        return out / f"adapter-{gguf_type}.gguf"
    return {"safetensors": out / "safetensors", "pth": out / "model.pth", "gguf": out / f"model-{gguf_type}.gguf"}[fmt]


def estimate_bytes(source, fmt: str, gguf_type: str) -> int:
    """Bytes one output will take on disk (an upper estimate; headers and metadata included)."""
    from odyssey.export import pth, safetensors

    if fmt == "safetensors":
        return safetensors.estimate_bytes(source)
    if fmt == "pth":
        return pth.estimate_bytes(source)
    if fmt == "gguf-lora":
        from odyssey.export.gguf_lora import adapter_bytes

        return adapter_bytes(source, gguf_type)  # also refuses what write_gguf_lora would
    from odyssey.export.gguf import gguf_bytes

    return gguf_bytes(source, gguf_type)  # also refuses what write_gguf would (type, tokenizer)


def check_lora_request(fmts: list[str], adapter) -> None:
    """gguf-lora writes the adapter itself: it needs --adapter, and goes alone (with --adapter the
    other formats would be merged weights, and base + adapter on top of merged weights applies
    the adapter twice)."""
    if adapter is None:
        raise OdysseyError("--formats gguf-lora exports an adapter: pass --adapter RUN/adapter (and its base as STORE)")
    if len(fmts) > 1:
        others = ",".join(f for f in fmts if f != "gguf-lora")
        raise OdysseyError(
            f"--formats gguf-lora goes alone (with --adapter, {others} would hold merged weights); "
            f"export the adapter and the base (without --adapter) in two commands"
        )


def _read_record(out: Path) -> dict:
    try:
        rec = json.loads((out / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    outputs = rec.get("outputs") if isinstance(rec, dict) else None
    return {k: v for k, v in outputs.items() if isinstance(v, dict)} if isinstance(outputs, dict) else {}


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def source_key(source) -> dict:
    """What an export's outputs are made from: the weights, the adapter, the tokenizer files."""
    from odyssey.store import file_sha256
    from odyssey.tokenizer import tokenizer_files

    store = getattr(source, "store", source)
    adapter = getattr(source, "adapter", None)
    key = {"weights": store.fingerprint(), "dtype": source.dtype}
    if adapter is not None:
        from odyssey.adapters import WEIGHTS_NAME

        key["adapter"] = file_sha256(adapter.path / WEIGHTS_NAME)
        key["scale"] = adapter.scale
    key["tokenizer"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tokenizer_files(tokenizer_dir(store))
    }
    return key


def output_key(src_key: dict, fmt: str, gguf_type: str) -> str:
    """sha256 naming one output: its source (`source_key`), format and GGUF type."""
    typed = fmt in ("gguf", "gguf-lora")
    key = {"kind": "export", "format": fmt, "gguf_type": gguf_type if typed else None, "source": src_key}
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def plan_outputs(out: Path, paths: dict[str, Path], keys: dict[str, str], force: bool) -> tuple[list[str], list[str]]:
    """(formats to write, formats kept: finished earlier by this same export). An output that
    exists and is not this export's own (finished, or being written when it was killed) is
    refused unless `force`."""
    if out.exists() and not out.is_dir():
        raise OdysseyError(f"--out {out} is a file; choose a directory path")
    record = _read_record(out) if out.is_dir() else {}
    todo, kept, there = [], [], []
    for fmt, path in paths.items():
        rec = record.get(path.name, {})
        own = rec.get("key") == keys[fmt]
        if not (path.exists() or path.is_symlink()):
            todo.append(fmt)
        elif own and not force and rec.get("state") == "done" and rec.get("bytes") == _size_on_disk(path):
            kept.append(fmt)
        elif (own and rec.get("state") == "writing") or force:
            todo.append(fmt)  # this export's own unfinished output (or --force): written again
        else:
            there.append(path)
    if there:
        more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
        raise OdysseyError(f"{there[0]} already exists{more}; pass --force to overwrite or choose another --out")
    return todo, kept


def _set_record(out: Path, name: str, entry: dict | None) -> None:
    """Set (or with None, drop) the record of output `name`; no record file is left without entries."""
    record = _read_record(out)
    if entry is None:
        record.pop(name, None)
    else:
        record[name] = entry
    if record:
        atomic.write_json(out / RECORD_NAME, {"outputs": record})
    else:
        (out / RECORD_NAME).unlink(missing_ok=True)


def check_free_disk(out: Path, needs: dict[str, int]) -> None:
    """All requested outputs must fit, checked before any is written."""
    probe = existing_parent(out)
    free = shutil.disk_usage(probe).free
    need = sum(needs.values())
    if free < need + DISK_MARGIN:
        parts = ", ".join(f"{fmt} {format_bytes(b)}" for fmt, b in needs.items())
        raise OdysseyError(
            f"not enough free disk at {probe}: the export needs {format_bytes(need)} ({parts}), "
            f"{format_bytes(free)} is free; free some space or choose another --out"
        )


def open_source(model_dir: str | os.PathLike, adapter: str | os.PathLike | None):
    """The store, or the store with the adapter merged on the fly (refused if made for another base)."""
    from odyssey.store import open_model

    store = open_model(model_dir)
    if adapter is None:
        return store
    from odyssey.adapters import read_adapter
    from odyssey.merge import MergedSource

    return MergedSource(store, read_adapter(adapter))


def stream_tensors(source, units, dtype):
    """Every tensor of `units` in config order (the order the writers declare), cast to `dtype`
    and contiguous. One unit is loaded at a time and each tensor leaves the unit's dict as it is
    handed out, so a caller that drops it after writing holds one unit plus one tensor."""
    for unit in units:
        tensors = source.load_tensors(unit)  # one unit resident
        for name, shape in unit_shapes(source.config, unit).items():
            t = tensors.pop(name).to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: source gave shape {list(t.shape)}, config implies {list(shape)}")
            yield t
            del t


def _write_one(source, fmt: str, path: Path, gguf_type: str, progress: bool) -> dict:
    """The writer's summary; its "bytes" is the size on disk of the finished output."""
    if fmt == "safetensors":
        from odyssey.export.safetensors import write_safetensors

        return write_safetensors(source, path, progress=progress)
    if fmt == "pth":
        from odyssey.export.pth import write_pth

        return write_pth(source, path, progress=progress)
    if fmt == "gguf-lora":
        from odyssey.export.gguf_lora import write_gguf_lora

        return write_gguf_lora(source, path, gguf_type, progress=progress)
    from odyssey.export.gguf import write_gguf

    return write_gguf(source, path, gguf_type, progress=progress)  # to a temporary name, then renamed


def export_model(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    formats: str | Iterable[str],
    gguf_type: str | None = None,
    adapter: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Writes the requested formats of the store at `model_dir` (merged with `adapter` if given;
    for "gguf-lora", the adapter alone, checked against its base) under `out`. `gguf_type`: the
    GGUF tensor type, default f16 (gguf) or f32 (gguf-lora). Returns {"out", "adapter", "seconds",
    "formats": [{"format", "path", "bytes", "seconds", "mb_s", "peak_anon_bytes", "kept", "types"}]}
    (types: a GGUF's {GGML type: {"tensors", "bytes"}} as written, else None);
    peak_anon_bytes is this process's RssAnon peak while that output was written (every 20 ms)."""
    from odyssey.runtime.memory import PeakSampler

    atomic.set_command("export")
    out = Path(out)
    fmts = parse_formats(formats)
    if "gguf-lora" in fmts:
        from odyssey.export.gguf_lora import DEFAULT_TYPE, check_adapter_file, check_adapter_type

        check_lora_request(fmts, adapter)
        gguf_type = gguf_type or DEFAULT_TYPE
        check_adapter_type(gguf_type)
        check_adapter_file(adapter)  # before the weights are read: head/embed targets, r/alpha stated
    else:
        gguf_type = gguf_type or "f16"
        if "gguf" in fmts or gguf_type != "f16":
            from odyssey.export.gguf_layout import check_gguf_type

            check_gguf_type(gguf_type)
    source = open_source(model_dir, adapter)  # an adapter for another base is refused here
    check_apart(out, [("model", None, model_dir), ("adapter", "--adapter", adapter)])
    paths = {f: output_path(out, f, gguf_type) for f in fmts}
    src_key = source_key(source)
    keys = {f: output_key(src_key, f, gguf_type) for f in fmts}
    todo, kept = plan_outputs(out, paths, keys, force)
    check_free_disk(out, {f: estimate_bytes(source, f, gguf_type) for f in todo})

    import torch  # noqa: F401  (seconds of import, not of writing, so the MB/s figures are fair)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out, is_output_name)  # left by a killed export
    results, t_all = [], time.perf_counter()
    for fmt in fmts:
        name = paths[fmt].name
        t0 = time.perf_counter()
        try:  # every shard read is checked against the store's checksums before the output is renamed
            with PeakSampler(interval_s=0.02) as mem:
                types = None  # GGUF: the type mix written (a kept output's is not re-read)
                if fmt in kept:
                    size = _size_on_disk(paths[fmt])
                else:
                    # Recorded before the output is touched: after a kill, the same export rewrites it.
                    before = _read_record(out).get(name)
                    _set_record(out, name, {"key": keys[fmt], "state": "writing"})
                    try:
                        written = _write_one(source, fmt, paths[fmt], gguf_type, progress)
                        size, types = written["bytes"], written.get("types")
                    except BaseException:
                        _set_record(out, name, before)  # a clean failure leaves the output as it was
                        raise
                    _set_record(out, name, {"key": keys[fmt], "state": "done", "bytes": _size_on_disk(paths[fmt])})
        except BaseException:
            if created and not results:  # leave no empty --out behind
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
        seconds = time.perf_counter() - t0
        results.append(
            {
                "format": f"{fmt} {gguf_type}" if fmt in ("gguf", "gguf-lora") else fmt,
                "path": str(paths[fmt]),
                "bytes": size,
                "seconds": seconds,
                "mb_s": size / 1e6 / max(seconds, 1e-9),
                "peak_anon_bytes": mem.peak_bytes,
                "kept": fmt in kept,  # finished by an earlier run of this same export
                "types": types,
            }
        )
    return {
        "out": str(out),
        "adapter": str(adapter) if adapter else None,
        "formats": results,
        "seconds": time.perf_counter() - t_all,
    }
