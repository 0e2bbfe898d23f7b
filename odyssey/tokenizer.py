"""The model's tokenizer: its files, its special tokens, training one, loading one.

Two kinds of tokenizer reach Odyssey, and both are used exactly as `transformers` uses them:
- a model's own (`odyssey import` copies it, `prepare-data --tokenizer DIR` reads it): any Hugging
  Face fast tokenizer (`tokenizer.json` + `tokenizer_config.json` ...), byte-level BPE as in
  Llama 3, Qwen and SmolLM2, or SentencePiece-derived as in TinyLlama, Llama 2 and Gemma, with its
  own rules: a BOS only where the tokenizer adds one, its own EOS;
- one trained here (`train_tokenizer`): a byte-level BPE (GPT-2 byte-to-unicode tokens + merges)
  with <unk> = 0, <s> = 1 (bos, added), </s> = 2 (eos), and the default chat template's
  <|im_start|> and <|im_end|> (CHAT_TOKENS) as the last two ids, written with
  `tokenizer_config.json` and `special_tokens_map.json` so that it loads the same way.

`load_model_tokenizer(DIR)` loads a tokenizer with the class `transformers.AutoTokenizer` picks for
DIR (the `tokenizer_class` of tokenizer_config.json, with AutoTokenizer's own corrections), but
without AutoTokenizer itself: that imports torch, and prepare-data runs without it. The tests
check the choice and the ids against AutoTokenizer. A model store or a prepared data directory
holds these files next to its own (TOKENIZER_FILES, carried byte for byte by import, merge and
export); generation, GGUF export and prepare-data read them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from odyssey.atomic import write_bytes
from odyssey.errors import OdysseyError

if TYPE_CHECKING:  # imported lazily: importing this module costs no `tokenizers`, no `transformers`
    from tokenizers import Tokenizer

UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # ids 0, 1, 2 in a tokenizer trained here
SPECIAL_TOKENS = [UNK, BOS, EOS]
# the default chat template's (ChatML, odyssey.data.templates): reserved as the last ids of a tokenizer trained here
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + len(CHAT_TOKENS)  # every byte is a token, plus the special tokens
# the tokenizer files a model store or data directory may hold (copied byte for byte with the weights)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "tokenizer.model",  # SentencePiece's own file (Llama 2, Gemma), beside its tokenizer.json
    "vocab.json",  # byte-level BPE's slow-tokenizer files (GPT-2, Qwen), beside their tokenizer.json
    "merges.txt",
    "generation_config.json",  # the EOS ids generation stops at (Llama 3 lists several)
)
# the ones prepare-data writes for a tokenizer it trains (tokenizer.json + `hf_side_files`)
WRITTEN_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# AutoTokenizer's own table for the model types Odyssey imports (transformers' TOKENIZER_MAPPING_NAMES,
# which sits beside torch): the class it uses when tokenizer_config.json names none
_FAMILY_TOKENIZERS = {
    "qwen2": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
    "gemma": "GemmaTokenizer",
    "gemma2": "GemmaTokenizer",
    "gemma3": "GemmaTokenizer",
    "gemma3_text": "GemmaTokenizer",
}
# ... the model types whose table entry wins over the declared class (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
_FAMILY_OVERRIDES = frozenset({"qwen2"})
# ... and those whose table entry is the plain backend (mistral-common, or tokenizer.json as is): for
# these AutoTokenizer ignores a declared class such as LlamaTokenizer
_BACKEND_MODEL_TYPES = frozenset({"mistral", "mixtral", "ministral", "ministral3", "mistral3", "pixtral"})


def train_tokenizer(
    documents: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, no normalizer).

    Ids 0, 1, 2 are <unk>, <s>, </s>; then the 256 byte tokens, then merges, then <|im_start|> and
    <|im_end|> (CHAT_TOKENS, special), `vocab_size` in all (fewer if the corpus has no more pairs to
    merge). Any text round-trips exactly, Korean included.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise OdysseyError(
            f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
            f"{len(SPECIAL_TOKENS) + len(CHAT_TOKENS)} special tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())  # byte-level: every byte has a token, so no <unk> is ever produced
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # all 256 bytes, seen or not
    tok.train_from_iterator(documents, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])  # after the merges
    # Like Llama's tokenizer, plain `encode(text)` (and HF `tokenizer(text)`) starts with <s>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def load_tokenizer(path: str | os.PathLike, fix: str | None = None) -> Tokenizer:
    """Load `path` (a tokenizer.json, or a directory holding one) as a bare `tokenizers.Tokenizer`
    (no transformers rules: for reading the file itself; tokenize with `load_model_tokenizer`).

    Without the file, raises OdysseyError "PATH has no tokenizer.json; FIX", where `fix` is the
    caller's advice (default: name a directory written by prepare-data or a store that has one).
    """
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise OdysseyError(f"{path} has no tokenizer.json; {fix or _DEFAULT_FIX}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception with serde's message
        raise OdysseyError(
            f"{file} is not a valid tokenizers file ({_first_line(e)}); copy it again from the model's "
            f"checkpoint, or write one with prepare-data"
        ) from None


_DEFAULT_FIX = "pass a directory written by `odyssey prepare-data`, a model store or a checkpoint folder that has one"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --------------------------------------------------------------------------------------------
# a model's tokenizer, as transformers loads it


class ModelTokenizer:
    """A Hugging Face fast tokenizer loaded from a directory, with its own special-token rules.

    `encode(text)` is `AutoTokenizer.from_pretrained(dir)(text)["input_ids"]`: a BOS where that
    tokenizer adds one (Llama 3, Gemma, TinyLlama), none where it does not (Qwen). `decode` skips
    special tokens, as `tokenizer.decode(ids, skip_special_tokens=True)` does."""

    def __init__(self, hf, directory: Path):
        self.hf = hf  # a transformers TokenizersBackend (PreTrainedTokenizerFast) subclass
        self.directory = Path(directory)
        specials = hf("", return_attention_mask=False)["input_ids"]
        self.added: list[int] = list(specials)  # the ids it puts around any text (BOS, EOS or none)
        self.bos_id: int | None = hf.bos_token_id
        self.eos_id: int | None = hf.eos_token_id
        self.unk_id: int | None = hf.unk_token_id
        self.pad_id: int | None = hf.pad_token_id
        self.adds_bos = bool(specials) and self.bos_id is not None and specials[0] == self.bos_id
        self.adds_eos = bool(specials) and self.eos_id is not None and specials[-1] == self.eos_id
        # ids run 0..n-1 in practice; a vocabulary with holes still needs rows up to its largest id
        self.vocab_size = max(len(hf), max(hf.get_vocab().values(), default=-1) + 1)

    @property
    def path(self) -> Path:
        return self.directory / "tokenizer.json"

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.hf.convert_ids_to_tokens(i)

    def encode(self, text: str) -> list[int]:
        return self.hf(text, return_attention_mask=False, verbose=False)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, in one call (the Rust side encodes them in parallel)."""
        return self.hf(texts, return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def document_layout(self) -> str:
        """How prepare-data stores a document: "<s> tokens </s>", "tokens <|im_end|>", ..."""
        head = f"{self.token(self.bos_id)} " if self.adds_bos else ""
        return f"{head}tokens {self.token(self.eos_id)}"

    def stop_ids(self) -> list[int]:
        """The ids generation stops at: the tokenizer's EOS and every EOS id generation_config.json
        lists beside it (Llama 3 Instruct lists <|end_of_text|>, <|eom_id|> and <|eot_id|>)."""
        ids = [self.eos_id] if self.eos_id is not None else []
        return ids + [i for i in generation_eos_ids(self.directory) or [] if i not in ids]


def generation_eos_ids(directory: str | os.PathLike) -> list[int] | None:
    """The eos_token_id(s) of DIR/generation_config.json as a list; None without the file (or the key)."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        raise OdysseyError(
            f"{path} is not a JSON object; copy it again from the model's checkpoint or delete it"
        ) from None
    if eos is None:
        return None
    eos = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise OdysseyError(f"{path}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return eos


def _read_json_object(path: Path) -> dict:
    """A JSON object from `path`, {} when the file is absent; one line naming the file otherwise."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OdysseyError(
            f"{path} cannot be read as JSON ({_first_line(e)}); copy it again from the model's checkpoint"
        ) from None
    if not isinstance(data, dict):
        raise OdysseyError(f"{path} must hold a JSON object; copy it again from the model's checkpoint")
    return data


def _is_byte_level(tok_json: Path) -> bool:
    """tokenizer.json pre-tokenizes or decodes at the byte level (GPT-2's byte-to-unicode)."""
    try:
        tok = json.loads(tok_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False

    def kinds(part) -> list:
        if not isinstance(part, dict):
            return []
        inner = part.get("pretokenizers") or part.get("decoders") or []
        return [part.get("type")] + [k for p in inner for k in kinds(p)]

    return "ByteLevel" in kinds(tok.get("pre_tokenizer")) + kinds(tok.get("decoder"))


def hf_tokenizer_class(directory: str | os.PathLike):
    """The transformers tokenizer class `AutoTokenizer.from_pretrained(directory)` instantiates, found
    without importing AutoTokenizer (which imports torch): tokenizer_config.json's `tokenizer_class`
    ("Fast" or not), except where AutoTokenizer decides otherwise: the model type's own class
    (config.json's model_type) when none is declared or for Qwen2; PreTrainedTokenizerFast
    (tokenizer.json as is) for a class transformers lacks or that is not a fast tokenizer, a
    LlamaTokenizer over a byte-level tokenizer.json, a model type whose tokenizer is the backend."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    name = _read_json_object(directory / "tokenizer_config.json").get("tokenizer_class")
    model_type = _read_json_object(directory / "config.json").get("model_type")
    if model_type in _BACKEND_MODEL_TYPES:
        return PreTrainedTokenizerFast
    if model_type in _FAMILY_TOKENIZERS and (not isinstance(name, str) or model_type in _FAMILY_OVERRIDES):
        name = _FAMILY_TOKENIZERS[model_type]
    if not isinstance(name, str) or not name.removesuffix("Fast").endswith("Tokenizer"):
        return PreTrainedTokenizerFast  # also keeps getattr below from importing a model class
    base = name.removesuffix("Fast")
    if base == "LlamaTokenizer" and _is_byte_level(directory / "tokenizer.json"):
        return PreTrainedTokenizerFast
    cls = getattr(transformers, base, None) or getattr(transformers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, PreTrainedTokenizerFast):
        return PreTrainedTokenizerFast
    return cls


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' advice printed while loading (e.g. on clean_up_tokenization_spaces) is not the
    user's concern here: errors only, then the level as it was."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def tokenizer_dir(path: str | os.PathLike) -> Path:
    """The directory a tokenizer argument names: `path` itself, or the folder of a tokenizer.json."""
    path = Path(path)
    return path.parent if path.name == "tokenizer.json" and path.is_file() else path


def load_model_tokenizer(path: str | os.PathLike, fix: str | None = None) -> ModelTokenizer:
    """Load the tokenizer in `path` (a directory holding tokenizer.json and its side files: a model
    store, a checkpoint folder, a data directory; or that tokenizer.json) as transformers does.

    Raises OdysseyError, one line: "PATH has no tokenizer.json; FIX" (`fix`: the caller's advice),
    a file that cannot be parsed, or one that transformers refuses."""
    from transformers import PreTrainedTokenizerFast

    given = Path(path)
    directory = tokenizer_dir(given)
    if given.is_file() and given.name != "tokenizer.json":
        raise OdysseyError(f"{given} is not a tokenizer.json; name the directory that holds the tokenizer files")
    load_tokenizer(directory, fix)  # the file exists and parses, else one line saying which
    cls = hf_tokenizer_class(directory)
    try:
        with _quiet_transformers():
            hf = cls.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers and tokenizers raise many kinds; the message is the point
        raise OdysseyError(
            f"transformers cannot load the tokenizer in {directory} ({type(e).__name__}: {_first_line(e)}); "
            f"copy its files again from the model's checkpoint"
        ) from None
    if not isinstance(hf, PreTrainedTokenizerFast):
        raise OdysseyError(f"the tokenizer in {directory} is not a fast tokenizer (tokenizer.json); Odyssey needs one")
    return ModelTokenizer(hf, directory)


# --------------------------------------------------------------------------------------------
# files


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


def read_tokenizer_files(directory: Path) -> dict[str, bytes]:
    """{name: bytes} of the tokenizer files in `directory`, as they are on disk."""
    return {p.name: p.read_bytes() for p in tokenizer_files(directory)}


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the tokenizer files of `src_dir` into `dst_dir` (each atomically); returns their names."""
    copied = []
    for path in tokenizer_files(src_dir):
        write_bytes(Path(dst_dir) / path.name, path.read_bytes())
        copied.append(path.name)
    return copied


def write_tokenizer_files(files: dict[str, bytes], directory: Path, written: list[Path]) -> None:
    """Write `files` (name -> bytes, names from TOKENIZER_FILES) into `directory`, each atomically,
    tokenizer.json last (the file that says a directory has a tokenizer); append each path to
    `written` as soon as it exists (for the caller's cleanup if a later step fails)."""
    for name in sorted(files, key=lambda n: n == "tokenizer.json"):
        write_bytes(directory / name, files[name])
        written.append(directory / name)
