"""Text generation under a RAM budget: the prompt in one pass, then every layer paged per token
(but the units the budget lets the pager pin, residency.py: with room for the whole model, nothing
is read after the first token).

With a KV cache each new token costs one pass over the weights: (B, 1) through L layers, whose
keys and values are appended to the cache (L x 2 x (B, Hkv, S, hd)).

The prompt is tokenized as transformers tokenizes it with the model's own tokenizer (a BOS only
where that tokenizer adds one), generation stops at the ids `stop_ids` names (the tokenizer's EOS,
and those of generation_config.json), and the text is decoded as transformers decodes it: greedy
text equals `transformers` greedy `generate` on the same model and prompt.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator

import torch

from odyssey.errors import OdysseyError
from odyssey.model import KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    """logits (V,) -> token id. temperature 0 is greedy."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def generate_ids(
    engine,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    eos_ids: Iterable[int] = (),
    vocab_limit: int | None = None,
    cache: KVCache | None = None,
) -> Iterator[int]:
    """Yields new token ids one at a time; the last is one of `eos_ids` when generation stopped
    there. `vocab_limit`: only ids below it are sampled (a tokenizer smaller than the model's
    vocabulary cannot decode the rows beyond it). `cache`: a KV cache holding the keys and values of
    `prompt_ids[:cache.length()]` (a conversation's earlier turns): only the rest of the prompt is
    computed; on return it holds the prompt and every new token but the last."""
    stop = set(eos_ids)
    if not prompt_ids:
        raise OdysseyError("the prompt is empty; pass --prompt TEXT or --prompt-ids 1,2,3")
    vocab = engine.cfg.vocab_size
    bad = [i for i in prompt_ids if not 0 <= i < vocab]
    if bad:
        raise OdysseyError(f"prompt id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
    gen = torch.Generator().manual_seed(seed)
    if cache is None:
        cache = KVCache(engine.cfg.num_hidden_layers)
    past = min(cache.length(), len(prompt_ids) - 1)  # the last prompt token is always computed
    crop_cache(cache, past)
    ids = torch.tensor([prompt_ids[past:]])
    for _ in range(max_new_tokens):
        logits = engine.logits(ids, cache=cache, last_only=True)[0]  # (V,)
        if vocab_limit is not None and vocab_limit < logits.numel():
            logits = logits[:vocab_limit]
        nxt = sample_next(logits, temperature, top_k, gen)
        yield nxt
        if nxt in stop:
            return
        ids = torch.tensor([[nxt]])


def crop_cache(cache: KVCache, n: int) -> None:
    """Keep the keys and values of the first `n` positions of `cache` (n <= its length)."""
    for i, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):
        if k is not None:
            cache.k[i], cache.v[i] = (k[:, :, :n], v[:, :, :n]) if n else (None, None)


def stop_ids(store, tok, template=None) -> list[int]:
    """The ids generation stops at, as transformers' `generate` would on this store: those of its
    generation_config.json (or config.json's eos_token_id without one), with the tokenizer's EOS;
    in a conversation (`template`: a ChatTemplate) the template's end-of-turn ids first."""
    from odyssey.tokenizer import generation_eos_ids

    ids = list(template.eot_ids) if template is not None else []
    ids += [i for i in (tok.stop_ids() if tok is not None else []) if i not in ids]
    listed = generation_eos_ids(store.root)
    if listed is None:
        listed = [store.config.eos_token_id] if store.config.eos_token_id is not None else []
    return ids + [i for i in listed if i not in ids]


@contextlib.contextmanager
def open_engine(
    store,
    *,
    adapter: str | None,
    seq_len: int,
    budget: int | None,
    compute_dtype: str = "auto",
    slots: int = 2,
    pin: bool = True,
    show: bool = True,
    hold: bool = True,
) -> Iterator:
    """The engine `generate`, `chat` and `eval` run: `store` paged from disk, the LoRA adapter in
    `adapter` (a directory, e.g. RUN/adapter) resident and applied on the fly (refused when made for
    another base), after the memory plan of a forward over `seq_len` tokens was checked against
    `budget` (one line naming its terms when it does not fit; its table on stderr with `show`).
    The units the plan pins are held: bound once, in the compute dtype (engine.Engine, `hold_pinned`),
    so a token computes with them at in-RAM speed (`hold=False`: bound and unbound per use).
    `compute_dtype` auto picks the dtype that multiplies one token faster (odyssey.probe, DECODE_TOKENS)."""
    from odyssey.dtypes import compute_dtype_line, compute_dtype_name
    from odyssey.engine import Engine
    from odyssey.planner import plan_checked
    from odyssey.probe import DECODE_TOKENS

    # `auto` decides for one token a pass (odyssey.probe): the weights' bytes, not the arithmetic
    line = compute_dtype_line(compute_dtype, store.dtype, store.config, DECODE_TOKENS)
    compute_dtype = compute_dtype_name(compute_dtype, store.dtype, store.config, DECODE_TOKENS)
    found = None
    if adapter:  # read and checked against the base before anything heavy
        from odyssey.adapters import read_adapter

        found = read_adapter(adapter)
        found.check_base(store)
    p = plan_checked(
        store,
        mode="forward",
        pin=pin,
        seq_len=seq_len,
        slots=slots,
        budget=budget,
        compute_dtype=compute_dtype,
        show=(lambda p: print(f"{p.table()}\n{line}", file=sys.stderr)) if show else None,
        show_first=False,
    )
    model = None
    if found is not None:
        from odyssey.adapters import adapter_skeleton

        model = adapter_skeleton(store, found)
    from odyssey.residency import units_from_labels

    pinned = units_from_labels(store, p.residency.pinned) if p.residency is not None else []
    with Engine(store, compute_dtype=compute_dtype, slots=slots, model=model, pinned=pinned, hold_pinned=hold) as eng:
        yield eng


def stream_text(
    tokenizer, new_ids: Iterator[int], write: Callable[[str], None], prompt_ids: list[int] = ()
) -> list[int]:
    """Write the text of `new_ids` as they come; return them. The text is what the tokenizer
    decodes for prompt + new ids beyond what it decodes for the prompt alone (so a SentencePiece
    tokenizer keeps the space before the first new word), written only once whole: an incomplete
    UTF-8 sequence at the end (Hangul is 3 bytes) waits for its next token, and so does a run of
    byte-fallback tokens (`<0xNN>`, SentencePiece-style), which decodes as a whole: bytes that are
    valid alone may turn into replacement characters once the run goes on. Without a tokenizer the
    ids themselves are written."""
    prompt_ids = list(prompt_ids)
    byte_ids = _byte_token_ids(tokenizer)
    prefix = tokenizer.decode(prompt_ids) if tokenizer is not None else ""
    out: list[int] = []
    shown = ""

    def text_so_far() -> str:
        full = tokenizer.decode(prompt_ids + out)
        return full[len(prefix) :] if full.startswith(prefix) else tokenizer.decode(out)

    for tok in new_ids:
        out.append(tok)
        if tokenizer is None:
            write(f"{tok} ")
            continue
        if tok in byte_ids:  # the run of byte tokens may continue: its text is not final yet
            continue
        text = text_so_far()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            continue
        write(text[len(shown) :])
        shown = text
    if tokenizer is not None and out:
        text = text_so_far()  # what is left, incomplete sequence included (as decode would show it)
        if len(text) > len(shown):
            write(text[len(shown) :])
    return out


def _byte_token_ids(tokenizer) -> set[int]:
    """Ids of the byte-fallback tokens (`<0x00>`..`<0xFF>`) of a SentencePiece-style tokenizer."""
    hf = getattr(tokenizer, "hf", tokenizer)  # a ModelTokenizer wraps transformers' tokenizer
    if hf is None or not hasattr(hf, "get_vocab"):
        return set()
    return {i for t, i in hf.get_vocab().items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
