"""The model's tokenizer: its files, its special tokens, training one, loading one.

Odyssey tokenizes with HF `tokenizers` (a `tokenizer.json`). A tokenizer trained here is a
byte-level BPE (GPT-2 byte-to-unicode tokens + merges) with <unk> = 0, <s> = 1 (bos), </s> = 2
(eos), and comes with `tokenizer_config.json` and `special_tokens_map.json` so that
`transformers.AutoTokenizer.from_pretrained(DIR)` loads it too. A model store or a prepared data
directory holds these files next to its own; generation, GGUF export and prepare-data read them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from odyssey.atomic import write_bytes
from odyssey.errors import OdysseyError

if TYPE_CHECKING:  # imported lazily: importing this module costs no `tokenizers`
    from tokenizers import Tokenizer

UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # ids 0, 1, 2 in a tokenizer trained here
SPECIAL_TOKENS = [UNK, BOS, EOS]
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte is a token, plus the special tokens
# the tokenizer files a model store or data directory may hold (copied along with the weights)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)
# the ones prepare-data writes (tokenizer.json + the side files of `hf_side_files`)
WRITTEN_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_tokenizer(
    documents: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, no normalizer).

    Ids 0, 1, 2 are <unk>, <s>, </s>; then the 256 byte tokens, then merges, up to `vocab_size`
    (fewer if the corpus has no more pairs to merge). Any text round-trips exactly, Korean included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise OdysseyError(
            f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())  # byte-level: every byte has a token, so no <unk> is ever produced
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # all 256 bytes, seen or not
    tok.train_from_iterator(documents, trainer)
    # Like Llama's tokenizer, plain `encode(text)` (and HF `tokenizer(text)`) starts with <s>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def special_ids(tok: Tokenizer, source: str) -> dict:
    """{"bos_id", "eos_id", "unk_id"} of `tok` (unk may be None); `source` names it in the error
    raised when <s> or </s> is missing."""
    ids = {"bos_id": tok.token_to_id(BOS), "eos_id": tok.token_to_id(EOS), "unk_id": tok.token_to_id(UNK)}
    for key, name in (("bos_id", BOS), ("eos_id", EOS)):
        if ids[key] is None:
            raise OdysseyError(
                f"tokenizer {source} has no {name} token; Odyssey needs {BOS} and {EOS}: "
                f"let prepare-data train one (drop --tokenizer)"
            )
    return ids


def load_tokenizer(path: str | os.PathLike, fix: str | None = None) -> Tokenizer:
    """Load `path` (a tokenizer.json, or a directory holding one: a data directory or a model store)
    as a `tokenizers.Tokenizer`.

    Without the file, raises OdysseyError "PATH has no tokenizer.json; FIX", where `fix` is the
    caller's advice (default: name a directory written by prepare-data or a store that has one).
    """
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        if fix is None:
            fix = "pass a directory written by `odyssey prepare-data` or a model store that has one"
        raise OdysseyError(f"{path} has no tokenizer.json; {fix}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception with serde's message
        raise OdysseyError(
            f"{file} is not a valid tokenizers file ({str(e).splitlines()[0]}); write it again with prepare-data"
        ) from None


def hf_side_files() -> dict[str, bytes]:
    """tokenizer_config.json and special_tokens_map.json for `AutoTokenizer.from_pretrained`."""
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        # HF's cleanup turns "a , b" into "a, b": off, so decode(encode(s)) == s
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,  # no limit from the tokenizer; the model config has one
    }

    def dump(obj) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()

    return {"tokenizer_config.json": dump(config), "special_tokens_map.json": dump(specials)}


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files (TOKENIZER_FILES) present in `directory`."""
    return [Path(directory) / n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()]


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the tokenizer files of `src_dir` into `dst_dir` (each atomically); returns their names."""
    copied = []
    for path in tokenizer_files(src_dir):
        write_bytes(Path(dst_dir) / path.name, path.read_bytes())
        copied.append(path.name)
    return copied


def write_tokenizer_files(files: dict[str, bytes], directory: Path, written: list[Path]) -> None:
    """Write `files` (name -> bytes, one per WRITTEN_FILES name) into `directory`, each atomically;
    append each path to `written` as soon as it exists (for the caller's cleanup if a later step fails)."""
    for name in WRITTEN_FILES:
        write_bytes(directory / name, files[name])
        written.append(directory / name)  # for the cleanup if a later step fails
