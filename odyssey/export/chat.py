"""The chat template an export carries: the merged store, the safetensors checkpoint and the GGUF
keep the conversation format the model was tuned with, and its end-of-turn token.

The tokenizer files travel byte for byte (`odyssey.tokenizer.TOKENIZER_FILES`: chat_template.jinja,
tokenizer_config.json's "chat_template"). A tokenizer without a template whose vocabulary has the
default ChatML tokens (Odyssey's own BPE: `odyssey.data.templates`) is given the default template as
chat_template.jinja, so `transformers`' `apply_chat_template` and llama.cpp render what `odyssey
chat` renders. The GGUF gets `tokenizer.chat_template` and `tokenizer.ggml.eot_token_id` (the
template's end-of-turn id; EOS stays the tokenizer's).
"""

from __future__ import annotations

import os
from pathlib import Path

from odyssey.errors import OdysseyError

TEMPLATE_FILE = "chat_template.jinja"  # transformers 5's place for a tokenizer's template


def carried_template(directory: str | os.PathLike, vocab_size: int):
    """The ChatTemplate of the tokenizer in `directory` an export carries, or None: no tokenizer, a
    template that does not render, or the default one whose tokens the tokenizer lacks (adding tokens
    is prepare-data's job, not an export's)."""
    from odyssey.data.templates import load_chat_template

    if not (Path(directory) / "tokenizer.json").is_file():
        return None
    try:
        template = load_chat_template(directory, model_vocab_size=vocab_size)
    except OdysseyError:
        return None
    if template.is_none or template.added_tokens or not template.eot_ids:
        return None
    return template


def template_files(directory: str | os.PathLike, vocab_size: int) -> dict[str, bytes]:
    """{name: bytes} to write beside the copied tokenizer files: the default template as
    chat_template.jinja where the tokenizer has none of its own."""
    from odyssey.data.templates import DEFAULT_ORIGIN

    template = carried_template(directory, vocab_size)
    if template is None or template.origin != DEFAULT_ORIGIN or (Path(directory) / TEMPLATE_FILE).exists():
        return {}
    return {TEMPLATE_FILE: template.source.encode("utf-8")}


def copy_tokenizer_and_template(src: Path, dst: Path, vocab_size: int) -> list[str]:
    """`copy_tokenizer(src, dst)`, then the default template where `template_files` gives it; the
    names written."""
    from odyssey.atomic import write_bytes
    from odyssey.tokenizer import copy_tokenizer

    names = copy_tokenizer(Path(src), Path(dst))
    for name, data in template_files(src, vocab_size).items():
        write_bytes(Path(dst) / name, data)
        names.append(name)
    return names


def add_to_special_vocab(special, directory: str | os.PathLike, vocab_size: int) -> None:
    """Set the GGUF chat template (where the files gave gguf none) and end-of-turn id on `special`
    (a gguf.SpecialVocab)."""
    template = carried_template(directory, vocab_size)
    if template is None:
        return
    if special.chat_template is None:
        special.chat_template = template.source
    special.special_token_ids["eot"] = template.eot_ids[0]
