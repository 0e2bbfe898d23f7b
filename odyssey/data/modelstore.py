"""The model store prepare-data prepares data for (`--model STORE`): its vocabulary, and its tokenizer.

A store that has a tokenizer is never given another one silently: a different tokenizer goes into
it only when asked to replace it, and only when its vocabulary fits the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from odyssey import atomic
from odyssey.errors import OdysseyError
from odyssey.tokenizer import TOKENIZER_FILES, ModelTokenizer, write_tokenizer_files

if TYPE_CHECKING:
    from odyssey.data.prepare import _ChosenTokenizer


def too_big(tok_vocab: int, model_vocab: int, trained: bool) -> OdysseyError:
    fix = (
        f"use --vocab-size <= {model_vocab}"
        if trained
        else "use the tokenizer the model was made for (e.g. --tokenizer of the checkpoint it came from)"
    )
    return OdysseyError(f"tokenizer vocabulary {tok_vocab} is larger than the model's {model_vocab}; {fix}")


@dataclass
class ModelStore:
    """The model store the data is prepared for (`--model`): its config.json, and its tokenizer
    (tokenizer.json and the side files) if it has one already."""

    root: Path
    config: dict
    has_tokenizer: bool
    gguf: Path | None = None  # a GGUF file: its tokenizer (from the metadata, cached in `root`) is fixed

    @classmethod
    def open(cls, root: Path, vocab_size: int | None) -> ModelStore:
        """Read `root`'s config.json; refuse an asked `vocab_size` larger than the model's. A GGUF
        file: its tokenizer, read from the metadata (odyssey.gguf.store), which the data must use."""
        from odyssey.gguf.store import names_gguf

        if names_gguf(root):
            return cls._open_gguf(root, vocab_size)
        config = read_model_config(root)
        if vocab_size is not None and vocab_size > config["vocab_size"]:
            raise too_big(vocab_size, config["vocab_size"], trained=True)
        return cls(root, config, (root / "tokenizer.json").is_file())

    @classmethod
    def _open_gguf(cls, path: Path, vocab_size: int | None) -> ModelStore:
        from odyssey.gguf.store import GGUFStore

        store = GGUFStore.open(path)
        if vocab_size is not None:
            raise OdysseyError(
                f"{path} is a GGUF file, whose tokenizer is in its metadata and its data must use it: drop --vocab-size"
            )
        tok = store.tokenizer_path()
        if tok is None:
            raise OdysseyError(
                f"Odyssey cannot read the tokenizer of {path} from its metadata; convert the model with "
                f"`odyssey import {path} --out DIR` and pass --model DIR"
            )
        cfg = store.config
        config = {"vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        return cls(tok.parent, config, True, gguf=Path(path))

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    def check_request(self, vocab_size: int | None, replace: bool) -> None:
        """Before any work: training a new tokenizer (`vocab_size`) for a store that has one is
        refused unless `replace`."""
        if self.gguf is not None and replace:
            raise OdysseyError(
                f"{self.gguf} is a GGUF file, whose tokenizer is in its metadata: drop --replace-tokenizer"
            )
        if self.has_tokenizer and vocab_size is not None and not replace:
            raise OdysseyError(
                f"model store {self.root} already has a tokenizer, and its data must use it: drop "
                f"--vocab-size to tokenize with it, or pass --replace-tokenizer to train a new one "
                f"in its place (the model then has to learn the new tokens)"
            )

    def check_tokenizer(self, vocab: int, chosen: _ChosenTokenizer, replace: bool) -> None:
        """Refuse a tokenizer larger than the model's vocabulary, or one that differs from the
        store's own unless asked to `replace` it."""
        if vocab > self.vocab_size:
            raise too_big(vocab, self.vocab_size, trained=chosen.trained)
        if self.gguf is not None and not self.holds(chosen):
            raise OdysseyError(
                f"{self.gguf} is a GGUF file, whose tokenizer (in its metadata) the data must use: drop --tokenizer"
            )
        if self.has_tokenizer and not replace and not self.holds(chosen):
            raise OdysseyError(
                f"model store {self.root} already has a different tokenizer, and its data must use it: "
                f"drop --tokenizer to tokenize with the store's, or pass --replace-tokenizer to put "
                f"{chosen.origin} in its place"
            )

    def holds(self, chosen: _ChosenTokenizer) -> bool:
        """The store's tokenizer.json is the chosen one (same JSON)."""
        try:
            mine = json.loads((self.root / "tokenizer.json").read_bytes())
        except (OSError, ValueError):
            return False
        return mine == json.loads(chosen.files["tokenizer.json"])

    def add_tokenizer(self, chosen: _ChosenTokenizer, tok: ModelTokenizer) -> None:
        """Give the store the chosen tokenizer's files (when it has none, or replaces its own), so it
        tokenizes (generate, export to GGUF) exactly as the data; warn where config.json's bos/eos
        ids differ from the tokenizer's."""
        if self.has_tokenizer and self.holds(chosen):
            return  # the store's own: left as it is
        atomic.remove_stale_temps(self.root, TOKENIZER_FILES)  # left by a killed prepare-data
        gone = [n for n in TOKENIZER_FILES if n not in chosen.files and (self.root / n).is_file()]
        for name in gone:  # a replaced tokenizer's files that the new one lacks (its chat template...)
            (self.root / name).unlink()
        write_tokenizer_files(chosen.files, self.root, [])
        if self.has_tokenizer:
            print(f"replaced the tokenizer of {self.root} with {chosen.origin}")
        for key, value in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)):
            if self.config.get(key) is not None and value is not None and self.config[key] != value:
                print(f"warning: {self.root}/config.json has {key}={self.config[key]}, the tokenizer has {value}")


def read_model_config(store: Path) -> dict:
    cfg = store / "config.json"
    if not cfg.is_file():
        raise OdysseyError(
            f"model store {store} has no config.json; create it with `odyssey init` or pass the right --model"
        )
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OdysseyError(f"{cfg} is not valid JSON ({e}); recreate the store with `odyssey init`") from None
    if not isinstance(config, dict) or not isinstance(config.get("vocab_size"), int):
        raise OdysseyError(f"{cfg} has no integer vocab_size; recreate the store with `odyssey init`")
    return config
