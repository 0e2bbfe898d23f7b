"""Text generation under a RAM budget: the prompt in one pass, then every layer paged per token.

With a KV cache each new token costs one pass over the weights: (B, 1) through L layers, whose
keys and values are appended to the cache (L x 2 x (B, Hkv, S, hd)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
    eos_id: int | None = None,
    vocab_limit: int | None = None,
) -> Iterator[int]:
    """Yields new token ids one at a time. `vocab_limit`: only ids below it are sampled (a
    tokenizer smaller than the model's vocabulary cannot decode the rows beyond it)."""
    if not prompt_ids:
        raise OdysseyError("the prompt is empty; pass --prompt TEXT or --prompt-ids 1,2,3")
    vocab = engine.cfg.vocab_size
    bad = [i for i in prompt_ids if not 0 <= i < vocab]
    if bad:
        raise OdysseyError(f"prompt id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(engine.cfg.num_hidden_layers)
    ids = torch.tensor([prompt_ids])
    for _ in range(max_new_tokens):
        logits = engine.logits(ids, cache=cache, last_only=True)[0]  # (V,)
        if vocab_limit is not None and vocab_limit < logits.numel():
            logits = logits[:vocab_limit]
        nxt = sample_next(logits, temperature, top_k, gen)
        yield nxt
        if eos_id is not None and nxt == eos_id:
            return
        ids = torch.tensor([[nxt]])


def stream_text(tokenizer, new_ids: Iterator[int], write: Callable[[str], None]) -> list[int]:
    """Decode incrementally and write only the new text (multi-byte characters wait until whole)."""
    out: list[int] = []
    shown = ""
    for tok in new_ids:
        out.append(tok)
        if tokenizer is None:
            write(f"{tok} ")
            continue
        text = tokenizer.decode(out)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence (Hangul is 3 bytes): wait
            continue
        write(text[len(shown) :])
        shown = text
    return out
