"""A tokenizer as GGUF carries it: `gpt2` (byte-level BPE: tokens in byte-to-unicode form, merges,
the pre-tokenizer's llama.cpp name) or `llama` (SentencePiece-style: scores in merge order, byte
tokens, the space prefix); special ids, add_bos/add_eos and the chat template through
`gguf.SpecialVocab`, as llama.cpp's convert_hf_to_gguf.py writes them, with the end-of-turn id of
the chat template (`odyssey.export.chat`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from odyssey.errors import OdysseyError
from odyssey.modelconfig import ModelConfig
from odyssey.tokenizer import MIN_VOCAB_SIZE

# Pre-tokenizer regexes (as HF tokenizer.json writes them) whose llama.cpp name we know.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2/2.5/3: one digit at a time


# --------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class GGUFVocab:
    """The tokenizer as GGUF stores it: one entry per model vocabulary row, and the settings
    llama.cpp tokenizes with. `model` is llama.cpp's tokenizer model: "gpt2" (byte-level BPE: Llama
    3, Qwen, SmolLM2, Odyssey's own; tokens in GPT-2 byte-to-unicode form, merges) or "llama"
    (SentencePiece-style BPE or Unigram: TinyLlama, Llama 2, Gemma; "▁" for a space, <0xXX> byte
    tokens, a score per token that orders the merges)."""

    model: str  # "gpt2" | "llama"
    tokens: list[str]  # "[PAD<i>]" for rows the tokenizer lacks
    types: list[int]  # gguf.TokenType: NORMAL, CONTROL (special), USER_DEFINED, BYTE, UNKNOWN, UNUSED (padding)
    scores: list[float] | None  # "llama" only: higher merges first (-rank of the merge making the token)
    pre: str  # llama.cpp pre-tokenizer name ("default" for "llama")
    special: object  # gguf.SpecialVocab: merges, special ids, add_bos/add_eos, chat template
    add_space_prefix: bool | None  # "llama" only: a "▁" before the text (Metaspace / Prepend)

    @property
    def merges(self) -> list[str]:
        return self.special.merges

    @property
    def bos_id(self) -> int | None:
        return self.special.special_token_ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self.special.special_token_ids.get("eos")


_REDO = "use the tokenizer the model was made for (`odyssey import` copies a checkpoint's)"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OdysseyError(f"{path} cannot be read as JSON ({e}); {_REDO}") from None
    if not isinstance(data, dict):
        raise OdysseyError(f"{path} is not a tokenizer.json object; {_REDO}")
    return data


def _parts(component: dict | None, key: str) -> list[dict]:
    """A tokenizer.json component (pre_tokenizer, normalizer, decoder) as its list of parts."""
    if not isinstance(component, dict):
        return []
    if component.get("type") == "Sequence":
        return [p for p in component.get(key) or [] if isinstance(p, dict)]
    return [component]


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer: "gpt-2" for a plain ByteLevel with its
    regex (what Odyssey trains), "llama-bpe" for Llama 3's split, "qwen2" for Qwen's, "smollm" for
    single digits then GPT-2's regex (SmolLM2); "default" for another byte-level split; None when
    the tokenizer is not byte-level."""
    parts = _parts(pre, "pretokenizers")
    kinds = [p.get("type") for p in parts]
    if "ByteLevel" not in kinds:
        return None
    gpt2_regex = parts[kinds.index("ByteLevel")].get("use_regex", True)
    if kinds == ["ByteLevel"] and gpt2_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and gpt2_regex and parts[0].get("individual_digits"):
        return "smollm"
    regexes = [(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if regexes == [LLAMA3_REGEX]:
        return "llama-bpe"
    if regexes == [QWEN2_REGEX]:
        return "qwen2"
    return "default"


def _space_prefix(tok: dict) -> bool | None:
    """For a SentencePiece-style tokenizer: does it put "▁" before the text (Metaspace with
    prepend_scheme always/first, or a Prepend("▁") normalizer as in Llama 2), or not (Gemma:
    spaces replaced, nothing prepended)? None: not SentencePiece-style."""
    for p in _parts(tok.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace":
            if "prepend_scheme" in p:
                return p["prepend_scheme"] in ("always", "first")
            return bool(p.get("add_prefix_space", True))
    norms = _parts(tok.get("normalizer"), "normalizers")
    if any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in norms):
        return True
    if any(n.get("type") == "Replace" and (n.get("content") == "▁") for n in norms):
        return False
    return None


def tokenizer_model(tok: dict) -> str | None:
    """llama.cpp's tokenizer model for a tokenizer.json: "gpt2" for byte-level BPE, "llama" for
    SentencePiece-style BPE (byte fallback or "▁" spaces) and Unigram; None for anything else
    (WordPiece, a BPE with neither)."""
    model = tok.get("model") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and pre_tokenizer_name(tok.get("pre_tokenizer")):
        return "gpt2"
    if model.get("type") in ("BPE", "Unigram") and (model.get("byte_fallback") or _space_prefix(tok) is not None):
        return "llama"
    return None


def _merge_scores(model: dict, by_id: dict[int, str]) -> list[float]:
    """A SentencePiece-style score per id: the BPE merge that makes a token first ranks it (score
    -rank: llama.cpp's "llama" tokenizer merges the highest-scoring pair first, as the BPE applies
    its merges in rank order), the Unigram model's own log-probability; 0 for tokens no merge makes
    (characters, bytes, specials)."""
    ids = {t: i for i, t in by_id.items()}
    scores = [0.0] * (max(by_id, default=-1) + 1)
    if model.get("type") == "Unigram":
        for i, (_, score) in enumerate(model.get("vocab") or []):
            scores[i] = float(score)
        return scores
    for rank, m in reversed(list(enumerate(model.get("merges") or []))):  # the lowest rank wins
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = ids.get(a + b)
        if i is not None:
            scores[i] = -float(rank)
    return scores


def _special_vocab(directory: Path, merges: bool, n_vocab: int):
    """gguf's `SpecialVocab` of `directory`, without its log lines: it guesses add_bos/add_eos from
    the post-processor's template and warns where that guess is unsure (Llama 2's pair template),
    and read_vocab replaces that guess with what transformers does."""
    import logging

    import gguf

    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(directory, load_merges=merges, n_vocab=n_vocab)
    finally:
        log.setLevel(level)


def read_vocab(tokenizer_path: Path, cfg: ModelConfig) -> GGUFVocab:
    """The tokenizer in `tokenizer_path`'s directory -> the GGUF vocabulary for a model with
    `cfg.vocab_size` rows. Tokens, types and scores come from tokenizer.json; special ids and
    whether a BOS/EOS is added from the tokenizer as transformers loads it; merges and the chat
    template through gguf's own `SpecialVocab` (as llama.cpp's converter). Raises OdysseyError
    naming the fix for what llama.cpp cannot load."""
    import gguf

    from odyssey.export.chat import add_to_special_vocab
    from odyssey.tokenizer import load_model_tokenizer

    tok = _read_json(tokenizer_path)
    model = tok.get("model") or {}
    kind = tokenizer_model(tok)
    if kind is None:
        raise OdysseyError(
            f"{tokenizer_path} is neither a byte-level BPE (GPT-2, Llama 3, Qwen) nor a SentencePiece-style "
            f"tokenizer (model {model.get('type')!r}); llama.cpp has no tokenizer model for it: {_REDO}"
        )
    if model.get("type") == "Unigram":
        by_id = {i: piece for i, (piece, _) in enumerate(model.get("vocab") or [])}
    else:
        by_id = {int(i): t for t, i in (model.get("vocab") or {}).items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    n_tok = max(by_id, default=-1) + 1
    if n_tok > cfg.vocab_size:
        raise OdysseyError(
            f"{tokenizer_path} has {n_tok} tokens, the model only {cfg.vocab_size} embedding rows; {_REDO}"
        )
    if kind == "gpt2" and not model.get("merges"):
        raise OdysseyError(
            f"{tokenizer_path} has no BPE merges (llama.cpp refuses a byte-level vocabulary without "
            f"them); train one with a --vocab-size above {MIN_VOCAB_SIZE} (`odyssey prepare-data --vocab-size`)"
        )
    hf = load_model_tokenizer(tokenizer_path.parent)
    unk = hf.unk_id if kind == "llama" else None
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # the model has rows the tokenizer never produces
            types.append(T.UNUSED)
            continue
        t, a = by_id[i], added.get(i)
        tokens.append(t)
        if a is not None and i != unk:
            types.append(T.CONTROL if a.get("special") else T.USER_DEFINED)
        elif i == unk:
            types.append(T.UNKNOWN)
        elif kind == "llama" and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    scores = None
    if kind == "llama":
        scores = _merge_scores(model, by_id)
        scores += [-1000.0] * (cfg.vocab_size - len(scores))  # padding rows, as llama.cpp's converter
    special = _special_vocab(tokenizer_path.parent, kind == "gpt2", cfg.vocab_size)
    add_to_special_vocab(special, tokenizer_path.parent, cfg.vocab_size)  # chat template, end-of-turn id
    # the ids and the BOS/EOS rules transformers uses win over SpecialVocab's reading of the files
    for typ, i in (("bos", hf.bos_id), ("eos", hf.eos_id), ("unk", hf.unk_id), ("pad", hf.pad_id)):
        if i is not None and i < cfg.vocab_size:
            special.special_token_ids[typ] = i
    around = hf.added  # the ids the tokenizer puts around any text
    bos, eos = special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    special.add_special_token = {
        "bos": bool(around) and around[0] == bos,
        "eos": bool(around) and around[-1] == eos and (len(around) > 1 or around[0] != bos),
    }
    return GGUFVocab(
        model=kind,
        tokens=tokens,
        types=[int(t) for t in types],
        scores=scores,
        pre=pre_tokenizer_name(tok.get("pre_tokenizer")) if kind == "gpt2" else "default",
        special=special,
        add_space_prefix=_space_prefix(tok) if kind == "llama" else None,
    )


def add_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    vocab.special.add_to_gguf(writer, quiet=True)  # merges, special ids, add_bos/add_eos, chat template


def vocab_bytes(vocab: GGUFVocab) -> int:
    """Bytes the token, merge and score arrays and the chat template take in the file (8-byte
    length + UTF-8 per string, 4 bytes per type and score)."""
    strings = sum(len(s.encode("utf-8")) + 8 for s in vocab.tokens + vocab.merges)
    template = vocab.special.chat_template
    template = json.dumps(template) if isinstance(template, list) else template or ""
    arrays = 4 * len(vocab.types) * (2 if vocab.scores is not None else 1)
    return strings + arrays + 8 + len(template.encode("utf-8"))
