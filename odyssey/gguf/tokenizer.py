"""A GGUF's tokenizer as Hugging Face tokenizer files: `write_tokenizer(model.gguf, DIR)` writes
tokenizer.json, tokenizer_config.json (special tokens, add_bos/add_eos), chat_template.jinja (from
`tokenizer.chat_template`) and, where the file names an end-of-turn token apart from its EOS,
generation_config.json (the ids generation stops at, `odyssey.tokenizer.ModelTokenizer.stop_ids`).

The conversion is transformers' own (`transformers.integrations.gguf`: what
`AutoTokenizer.from_pretrained(dir, gguf_file=name)` builds), not a second one written here: its
metadata reader maps the file and walks the header only (no tensor byte is read), and the vocabulary
becomes the class transformers uses for it (GPT-2's byte-level BPE for "gpt2": Llama 3, Qwen,
SmolLM2; LlamaTokenizer's SentencePiece-style BPE for "llama": TinyLlama, Llama 2). The class is
called directly rather than through AutoTokenizer, which first builds the model's config with
`gguf.GGUFReader` (4-5 s for SmolLM2's 49k-token vocabulary: one numpy array per string); the tests
check the ids and the chat rendering against AutoTokenizer's. Measured on a busy 2-core VM (imports
done): SmolLM2's 49,152 tokens and 48,900 merges in 1.2-1.5 s, a 128,256-token vocabulary with as
many merges in 2.6-4.5 s (header parse, conversion, files written), the process peaking at about
490 MB with torch and transformers imported. transformers reads the file through a link in an
empty directory: tokenizer files lying beside the GGUF (another model's) play no part.
transformers' GPT-2 class adds its "<|endoftext|>" to a vocabulary that lacks one (Llama 3's); that
token, which the file does not have, is left out.

A GGUF store converts its tokenizer once, into `tokenizer_cache_dir(model.gguf)` (under the cache
directory of `odyssey.probe`, keyed by the file's real path, size and a digest of its header), and
reuses it: `cached_tokenizer(model.gguf)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from odyssey import atomic
from odyssey.errors import OdysseyError
from odyssey.gguf.reader import GGUFFile

MODELS = ("gpt2", "llama")  # tokenizer.ggml.model values converted (byte-level BPE; SentencePiece-style)
CACHE_SUBDIR = "gguf-tokenizers"
HEADER_DIGEST_BYTES = 16 << 20  # the header is hashed in reads of this size (a 256k vocabulary's header: ~10 MB)
# keys transformers' save_pretrained writes that say how this process loaded it, not what the tokenizer is
_LOAD_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")


def has_tokenizer(gf: GGUFFile) -> bool:
    """Whether the GGUF's metadata holds a tokenizer (a tokenizer model and its tokens)."""
    return gf.metadata.get("tokenizer.ggml.model") is not None and bool(gf.metadata.get("tokenizer.ggml.tokens"))


def _refuse_without_tokenizer(gf: GGUFFile) -> None:
    meta = gf.metadata
    model = meta.get("tokenizer.ggml.model")
    if not has_tokenizer(gf):
        raise OdysseyError(
            f"{gf.path} has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens in its metadata); "
            f"convert the model again with llama.cpp's convert_hf_to_gguf.py, which writes it"
        )
    if model not in MODELS:
        raise OdysseyError(
            f"{gf.path} has a {model!r} tokenizer (tokenizer.ggml.model); Odyssey converts "
            f"{' and '.join(repr(m) for m in MODELS)} (byte-level BPE, SentencePiece-style): use a model "
            f"with one of those"
        )
    n = len(meta["tokenizer.ggml.tokens"])
    for key in ("bos", "eos", "unknown", "padding", "eot"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and not (isinstance(i, int) and 0 <= i < n):
            raise OdysseyError(
                f"{gf.path}: tokenizer.ggml.{key}_token_id is {i!r}, outside its {n}-token vocabulary; "
                f"convert the model again"
            )


def load_hf_tokenizer(gguf_path: str | os.PathLike, gf: GGUFFile | None = None):
    """The transformers tokenizer of a GGUF's metadata, built as `AutoTokenizer.from_pretrained(dir,
    gguf_file=name)` builds it (a TokenizersBackend over transformers' GGUF conversion). One line
    naming the file when it has no tokenizer or one transformers cannot convert. `gf`: the file's
    header, when the caller has it open already."""
    path = Path(gguf_path)
    # the structure checked; the architecture is the model's concern, not the tokenizer's
    gf = gf or GGUFFile.open(path, architectures=None)
    _refuse_without_tokenizer(gf)
    from transformers import TokenizersBackend

    from odyssey.tokenizer import _quiet_transformers

    try:
        # From a directory holding only a link to the file: from_pretrained would take a
        # tokenizer.json or tokenizer_config.json lying beside the GGUF over its metadata.
        with _quiet_transformers(), tempfile.TemporaryDirectory(prefix=".odyssey-gguf-") as alone:
            os.symlink(os.path.realpath(path), os.path.join(alone, "model.gguf"))
            return TokenizersBackend.from_pretrained(alone, gguf_file="model.gguf", local_files_only=True)
    except Exception as e:  # transformers raises many kinds; the message is the point
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OdysseyError(
            f"transformers cannot build the tokenizer of {path} from its metadata ({type(e).__name__}: {first}); "
            f"convert the model again with a current llama.cpp"
        ) from None


def tokenizer_files_of(gguf_path: str | os.PathLike, gf: GGUFFile | None = None) -> dict[str, bytes]:
    """{file name: bytes} of the HF tokenizer files a GGUF's metadata describes (see the module);
    `gf`: the file's header, when the caller has it open already."""
    path = Path(gguf_path)
    gf = gf or GGUFFile.open(path, architectures=None)
    hf = load_hf_tokenizer(path, gf)
    with tempfile.TemporaryDirectory(prefix=".odyssey-gguf-tokenizer-") as tmp:
        hf.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    config = json.loads(files["tokenizer_config.json"])
    for k in _LOAD_KEYS:
        config.pop(k, None)
    _drop_tokens_beyond(files, config, len(gf.metadata["tokenizer.ggml.tokens"]))
    config["clean_up_tokenization_spaces"] = False  # decode(encode(s)) == s, as llama.cpp detokenizes
    files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    meta = gf.metadata
    eos, eot = meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")
    stops = [i for i in (eos, eot, meta.get("tokenizer.ggml.eom_token_id")) if isinstance(i, int)]
    stops = list(dict.fromkeys(stops))
    if len(stops) > 1:  # an end of turn apart from the EOS (Llama 3 Instruct's <|eot_id|>): generation stops at both
        gen = {"eos_token_id": stops}
        if isinstance(meta.get("tokenizer.ggml.bos_token_id"), int):
            gen = {"bos_token_id": meta["tokenizer.ggml.bos_token_id"], **gen}
        files["generation_config.json"] = (json.dumps(gen, indent=2) + "\n").encode()
    return files


def _drop_tokens_beyond(files: dict[str, bytes], config: dict, n: int) -> None:
    """Remove the tokens transformers added past the GGUF's `n` (GPT-2's class adds its default
    "<|endoftext|>" to a vocabulary without one, as Llama 3's): an id the model has no row for would
    make the tokenizer larger than the model (prepare-data refuses that) and is no token of the file."""
    tok = json.loads(files["tokenizer.json"])
    extra = {t["content"] for t in tok.get("added_tokens", []) if t["id"] >= n}
    if not extra:
        return
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < n]
    files["tokenizer.json"] = json.dumps(tok, indent=2, ensure_ascii=False).encode()
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < n}
    for key, value in list(config.items()):
        if isinstance(value, str) and value in extra:
            config[key] = None  # e.g. unk_token "<|endoftext|>": the file names no such token
        elif isinstance(value, list) and any(v in extra for v in value if isinstance(v, str)):
            config[key] = [v for v in value if v not in extra]


def write_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the HF tokenizer files of a GGUF's metadata into `out_dir` and return it. Into an
    existing directory (a store being imported) each file is written atomically, tokenizer.json
    last (the file that says a directory has a tokenizer); a directory that does not exist yet is
    made whole beside its final name and renamed into place (`atomic.atomic_dir`)."""
    from odyssey.tokenizer import write_tokenizer_files

    files = tokenizer_files_of(gguf_path)
    out = Path(out_dir)
    if out.is_dir():
        write_tokenizer_files(files, out, [])
    else:
        with atomic.atomic_dir(out) as tmp:
            write_tokenizer_files(files, tmp, [])
    return out


def header_digest(gguf_path: str | os.PathLike) -> str:
    """sha256 (hex) of a GGUF's header: its metadata and tensor table, up to where tensor data starts."""
    gf = GGUFFile.open(gguf_path, architectures=None)
    h = hashlib.sha256()
    with open(gf.path, "rb") as f:
        left = gf.data_offset
        while left > 0:
            chunk = f.read(min(left, HEADER_DIGEST_BYTES))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def tokenizer_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Where the converted tokenizer of a GGUF store lives: CACHE/gguf-tokenizers/NAME-DIGEST, CACHE
    as `odyssey.probe.cache_dir` (ODYSSEY_CACHE_DIR, else $XDG_CACHE_HOME/odyssey, else
    ~/.cache/odyssey), DIGEST over the file's real path, its size and its header's sha256: another
    file, a changed vocabulary or a replaced file gets another directory."""
    from odyssey.probe import cache_dir

    real = Path(os.path.realpath(gguf_path))
    try:
        size = real.stat().st_size
    except OSError as e:
        raise OdysseyError(f"cannot open GGUF file {gguf_path}: {e.strerror}; check the path") from None
    key = json.dumps({"path": str(real), "size": size, "header": header_digest(real)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / CACHE_SUBDIR / f"{real.stem}-{digest}"


def cached_tokenizer(gguf_path: str | os.PathLike) -> Path:
    """The directory of a GGUF's converted tokenizer, converted on first use (atomically, under an
    exclusive lock so that concurrent processes convert once) and reused after."""
    final = tokenizer_cache_dir(gguf_path)
    if (final / "tokenizer.json").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OdysseyError(
            f"cannot create the tokenizer cache {final.parent} ({e.strerror}); set ODYSSEY_CACHE_DIR to a "
            f"writable directory"
        ) from None
    from odyssey.tokenizer import write_tokenizer_files

    with atomic.flocked(final.parent):
        if not (final / "tokenizer.json").is_file():  # another process may have written it meanwhile
            atomic.remove_stale_temps(final.parent)
            files = tokenizer_files_of(gguf_path)
            try:  # whole or not at all; a leftover without tokenizer.json is replaced
                with atomic.atomic_dir(final) as tmp:
                    write_tokenizer_files(files, tmp, [])
            except OSError as e:
                raise OdysseyError(
                    f"cannot write the tokenizer cache {final} ({e.strerror or e}); set ODYSSEY_CACHE_DIR to a "
                    f"writable directory with free space"
                ) from None
    return final


__all__ = [
    "cached_tokenizer",
    "has_tokenizer",
    "load_hf_tokenizer",
    "tokenizer_cache_dir",
    "tokenizer_files_of",
    "write_tokenizer",
]
