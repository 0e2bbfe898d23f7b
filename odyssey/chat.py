"""A conversation with the model through its chat template (`odyssey chat`, `generate --chat`).

Every turn renders the whole history with the template (`ChatTemplate.encode(messages,
add_generation_prompt=True)`, transformers' `apply_chat_template`), generates until one of the
template's end-of-turn ids or an EOS, and keeps the answer (its text, as the tokenizer decodes it,
end-of-turn token left out) as the assistant's turn. The history stays within `max_context` tokens,
the answer's `max_new_tokens` included: the oldest user/assistant pairs go first, the system message
stays. With `--chat-template none` each message is a plain prompt (tokenized as `generate` does) and
answered alone, up to EOS. The KV cache is kept across turns: the ids computed so far that begin the next prompt
(usually the whole earlier conversation) are not computed again.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from odyssey.errors import OdysseyError

DEFAULT_MAX_CONTEXT = 2048  # tokens of history + answer when the model allows more


def default_max_context(cfg) -> int:
    return min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)


def check_context(cfg, max_context: int, max_new_tokens: int) -> None:
    """One line for a --max-context the model cannot take or that leaves no room for a question."""
    if max_context > cfg.max_position_embeddings:
        raise OdysseyError(
            f"--max-context {max_context} is beyond the model's max_position_embeddings "
            f"({cfg.max_position_embeddings}); pass --max-context {cfg.max_position_embeddings} or less"
        )
    if max_new_tokens >= max_context:
        raise OdysseyError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the conversation in --max-context "
            f"{max_context}; lower --max-new-tokens or raise --max-context"
        )


class Conversation:
    """The messages of a conversation ({"role", "content"}), an optional system message first."""

    def __init__(self, template, system: str | None, max_context: int, max_new_tokens: int):
        self.template = template
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []
        self.max_context, self.max_new_tokens = max_context, max_new_tokens
        self.dropped = 0  # user/assistant pairs dropped to stay within max_context

    @property
    def messages(self) -> list[dict]:
        return self.system + self.turns

    def reset(self) -> None:
        self.turns.clear()

    def prompt_ids(self) -> list[int]:
        """The ids of the history with the generation prompt, once the oldest pairs that do not fit
        are dropped. Raises OdysseyError when the last message alone (with the system message and
        the answer's room) does not fit."""
        room = self.max_context - self.max_new_tokens
        while True:
            if self.template.is_none:  # --chat-template none: the message alone, as a plain prompt
                del self.turns[:-1]
                ids = self.template.tok.encode(self.turns[-1]["content"])
            else:
                ids = self.template.encode(self.messages, add_generation_prompt=True)
            if len(ids) <= room:
                return ids
            if len(self.turns) < 3:  # the last user message alone is too long
                raise OdysseyError(
                    f"the message takes {len(ids)} tokens with the history kept, more than the "
                    f"{room} that --max-context {self.max_context} leaves beside --max-new-tokens "
                    f"{self.max_new_tokens}; write a shorter message or raise --max-context"
                )
            del self.turns[:2]
            self.dropped += 1


@dataclass
class Reply:
    text: str  # as streamed (end-of-turn token left out)
    ids: list[int]  # the new ids, the stop id included when generation stopped at one
    stopped: bool  # at an end-of-turn id or EOS (False: --max-new-tokens or interrupted)
    interrupted: bool
    prompt_tokens: int
    reused_tokens: int  # prompt ids whose keys and values came from the cache


class ChatSession:
    """A conversation on an open engine: `ask(text, write)` streams the answer through `write`."""

    def __init__(
        self,
        engine,
        tokenizer,
        template,
        stop: list[int],
        *,
        system: str | None = None,
        max_context: int,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
    ):
        self.engine, self.tok, self.template, self.stop = engine, tokenizer, template, list(stop)
        self.conv = Conversation(template, system, max_context, max_new_tokens)
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.cache = None
        self.cached: list[int] = []  # the ids whose keys and values the cache holds
        self.asked = 0
        self._interrupt = threading.Event()

    def reset(self) -> None:
        self.conv.reset()

    def ask(self, text: str, write: Callable[[str], None]) -> Reply:
        """Add the user's `text`, stream the answer through `write`, keep it in the history.
        Ctrl-C (SIGINT) during the answer stops it after the token in progress."""
        from odyssey.generate import crop_cache, generate_ids, stream_text
        from odyssey.model import KVCache

        if not text.strip():
            raise OdysseyError("the message is empty; type a question (or pass --prompt TEXT)")
        self.conv.turns.append({"role": "user", "content": text})
        try:
            prompt = self.conv.prompt_ids()
        except OdysseyError:
            self.conv.turns.pop()
            raise
        if self.cache is None:
            self.cache, self.cached = KVCache(self.engine.cfg.num_hidden_layers), []
        same = _common_prefix(self.cached, prompt)
        crop_cache(self.cache, same)
        reused = min(same, len(prompt) - 1)
        self._interrupt.clear()
        ids = generate_ids(
            self.engine,
            prompt,
            self.max_new_tokens,
            self.temperature,
            self.top_k,
            self.seed + self.asked,
            eos_ids=self.stop,
            vocab_limit=self.tok.vocab_size,
            cache=self.cache,
        )
        parts: list[str] = []

        def out(s: str) -> None:
            parts.append(s)
            write(s)

        self.asked += 1
        try:
            with self._sigint_stops():
                new = stream_text(self.tok, self._until_interrupted(ids), out, prompt_ids=prompt)
        except BaseException:  # stopped inside a forward: the cache may be half updated
            self.cache, self.cached = None, []
            self.conv.turns.pop()
            raise
        self.cached = prompt + new[:-1]  # generate_ids computes every new token but the last
        stopped = bool(new) and new[-1] in self.stop
        answer = "".join(parts)
        self.conv.turns.append({"role": "assistant", "content": answer})
        return Reply(answer, new, stopped, self._interrupt.is_set(), len(prompt), reused)

    def _until_interrupted(self, ids: Iterator[int]) -> Iterator[int]:
        for i in ids:
            yield i
            if self._interrupt.is_set():
                ids.close()
                return

    def _sigint_stops(self):
        """Within: SIGINT sets the interrupt flag instead of raising (main thread only)."""
        import contextlib

        if threading.current_thread() is not threading.main_thread():
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def handler():
            old = signal.signal(signal.SIGINT, lambda *_: self._interrupt.set())
            try:
                yield
            finally:
                signal.signal(signal.SIGINT, old)

        return handler()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def interactive(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None], note) -> int:
    """The terminal loop: a line is a user message; /reset clears the history; /exit, Ctrl-D (or
    Ctrl-C while typing) end. `note(text)` says things beside the conversation (stderr)."""
    note("type a message; /reset clears the history, /exit or Ctrl-D ends, Ctrl-C stops an answer")
    told_trim = False
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            session.reset()
            note("(history cleared)")
            continue
        if not cmd:
            continue
        try:
            reply = session.ask(line, write)
        except OdysseyError as e:
            note(f"odyssey: {e}")
            continue
        write("\n")
        if reply.interrupted:
            note("(answer stopped)")
        elif not reply.stopped:
            note(f"(answer cut at --max-new-tokens {session.max_new_tokens})")
        if session.conv.dropped and not told_trim:
            note(
                f"(the oldest turns are dropped to keep the conversation within --max-context "
                f"{session.conv.max_context} tokens)"
            )
            told_trim = True
