"""`odyssey eval`: how well the model answers a question/answer set.

Each record is a conversation whose last turn is the reference answer (chat records as they are;
completions and alpaca records as one user turn and one assistant turn). Two figures:
- loss on answers: the mean cross-entropy over the tokens of the last answer (its end-of-turn token
  included; the mask `ChatTemplate.encode_example(..., train_on="last")` gives, which training uses),
  token-weighted across records: sum of -log p(answer token | everything before) / answer tokens;
- exact match: the greedy answer to the conversation up to the last turn (its generation prompt
  added), generated until an end-of-turn id or EOS, decoded, stripped, equal to the reference
  stripped.
The loss pass leaves the conversation's keys and values in the KV cache; the greedy answer starts
from the prompt's part of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from odyssey.errors import OdysseyError


@dataclass
class Example:
    messages: list[dict]
    ids: list[int]  # the whole conversation, the reference answer included
    mask: list[int]  # 1 on the reference answer's tokens (its end-of-turn token included)
    prompt: list[int]  # the conversation up to the answer, with the generation prompt
    reference: str


@dataclass
class EvalResult:
    examples: int = 0
    answer_tokens: int = 0
    nll_sum: float = 0.0  # nats, summed over answer tokens
    exact: int = 0
    rows: list[dict] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.answer_tokens, 1)

    def summary(self) -> str:
        pct = 100.0 * self.exact / max(self.examples, 1)
        ppl = math.exp(min(self.loss, 50.0))
        return (
            f"eval: {self.examples} examples, loss on answers {self.loss:.4f} over {self.answer_tokens} tokens "
            f"(perplexity {ppl:.2f}), exact match {self.exact}/{self.examples} ({pct:.1f}%)"
        )


def read_conversations(path: Path, fmt: str = "auto", limit: int | None = None, keys=None) -> list:
    """The records of `path` (chat, completions or alpaca: `odyssey.data.formats`, as prepare-data
    reads them) as `formats.Example`s (messages, where), the first `limit` only."""
    from odyssey.data.formats import Keys, file_format, iter_examples

    keys = keys or Keys()
    if not path.is_file():
        raise OdysseyError(f"--data {path} is not a file; give a .jsonl, .json, .parquet or .csv file of records")
    found = file_format(path, fmt, keys)
    if found == "text":
        raise OdysseyError(
            f"{path} holds text, which has no answers to score; give chat, completions or alpaca records"
        )
    out = []
    for example in iter_examples(path, found, keys):
        out.append(example)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise OdysseyError(f"{path} holds no records; give a file of chat, completions or alpaca records")
    return out


def encode_examples(template, records: list) -> list[Example]:
    """Each record's ids, answer mask and prompt; one line naming a record that cannot be scored."""
    examples = []
    for rec in records:
        msgs = rec.messages
        if not msgs or msgs[-1].get("role") != "assistant":
            raise OdysseyError(
                f"{rec.where} does not end with an assistant turn, so it has no reference answer; "
                f"end every record with the answer to score"
            )
        ids, mask = template.encode_example(msgs, train_on="last", mask_prompt=True)
        if template.is_none:
            prompt = template.tok.encode(msgs[0]["content"])
        else:
            prompt = template.encode(msgs[:-1], add_generation_prompt=True)
        if not any(mask):
            raise OdysseyError(f"{rec.where} has no answer token to score; give it a non-empty answer")
        examples.append(Example(msgs, ids, mask, prompt, str(msgs[-1].get("content", ""))))
    return examples


def evaluate(engine, tok, examples: list[Example], stop: list[int], max_new_tokens: int, progress: bool = True):
    """Loss on answers and exact match of greedy answers (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from odyssey.generate import generate_ids
    from odyssey.model import KVCache

    result = EvalResult()
    bar = tqdm(examples, desc="eval", unit="ex", disable=not progress, file=None)
    for ex in bar:
        cache = KVCache(engine.cfg.num_hidden_layers)
        logits = engine.logits(torch.tensor([ex.ids[:-1]]), cache=cache)[0].float()  # (n-1, V)
        targets = torch.tensor(ex.ids[1:])
        trained = torch.tensor(ex.mask[1:], dtype=torch.bool)
        nll = float(F.cross_entropy(logits[trained], targets[trained], reduction="sum"))
        if ex.ids[: len(ex.prompt)] != ex.prompt:  # the cache holds another text: start again
            cache = None
        new = list(
            generate_ids(engine, ex.prompt, max_new_tokens, 0.0, eos_ids=stop, vocab_limit=tok.vocab_size, cache=cache)
        )
        answer = tok.decode(new[:-1] if new and new[-1] in stop else new)
        exact = answer.strip() == ex.reference.strip()
        n = int(trained.sum())
        result.examples += 1
        result.answer_tokens += n
        result.nll_sum += nll
        result.exact += exact
        question = next((m.get("content") for m in reversed(ex.messages[:-1]) if m.get("role") == "user"), "")
        result.rows.append(
            {
                "question": question,
                "reference": ex.reference,
                "answer": answer,
                "exact": exact,
                "loss": nll / max(n, 1),
                "answer_tokens": n,
            }
        )
        bar.set_postfix(loss=f"{result.loss:.3f}", exact=f"{result.exact}/{result.examples}")
    bar.close()
    return result


def write_rows(path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically."""
    from odyssey.atomic import write_text

    write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
