"""Chat templates: a conversation -> the text and token ids the model sees, and its loss mask.

Rendering is `transformers`' own: `tokenizer.apply_chat_template` (Jinja) on the model's tokenizer
as `odyssey.tokenizer.load_model_tokenizer` loads it (no torch), so what Odyssey trains on is what
`transformers` produces for that tokenizer. The template is, in order of precedence:
- `--chat-template FILE`: a Jinja text file (`override`), as Hugging Face's chat_template.jinja;
- the tokenizer's own (chat_template.jinja, or "chat_template" in tokenizer_config.json);
- for a tokenizer without one (Odyssey's `init` + a BPE trained by prepare-data), DEFAULT_TEMPLATE,
  ChatML:

      <|im_start|>system\\n{system}<|im_end|>\\n          (only where the conversation has one)
      <|im_start|>user\\n{question}<|im_end|>\\n
      <|im_start|>assistant\\n{answer}<|im_end|>\\n      ... turns repeat
      <|im_start|>assistant\\n                           (the generation prompt)

  with end-of-turn token <|im_end|>. Odyssey's trained BPE reserves <|im_start|> and <|im_end|>
  (special tokens after the vocabulary); an older tokenizer without them gets them appended, every
  old id kept, when the model's vocabulary has room (`model_vocab_size`), else a one-line refusal
  naming --chat-template FILE;
- `none` (`override="none"`): no template; a prompt/completion pair is stored as the prompt's ids
  (`tokenizer(prompt)`, a BOS where the tokenizer adds one), the completion's, then EOS.

Ids are the rendered text tokenized with add_special_tokens=False, which is what
`apply_chat_template(tokenize=True)` returns. The end-of-turn ids (`eot_ids`: generation stops
there) are found by rendering a probe conversation: the first special (added) token the template
emits after an assistant's content (ChatML <|im_end|>, Llama 3 <|eot_id|>, Gemma <end_of_turn>),
then the tokenizer's EOS.

Loss mask (`encode_example`): 1 on a token whose prediction is trained. An assistant turn k trains
the tokens from the end of the rendered prompt `render(messages[:k], add_generation_prompt=True)`
(which must be a prefix of the whole conversation's text, else the template is refused) through
the turn's end-of-turn token inclusive; every other token is 0. `train_on="last"` trains the last
assistant turn only; `mask_prompt=False` trains every token but the first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from odyssey.errors import OdysseyError
from odyssey.tokenizer import CHAT_TOKENS, ModelTokenizer, load_model_tokenizer

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_ORIGIN = "default ChatML"
OWN_ORIGIN = "the store's own (tokenizer_config.json)"
NONE = "none"
TRAIN_ON = ("all", "last")
# a conversation rendered to find the end-of-turn token: the answer is followed by it
_PROBE_ANSWER = "Zq probe answer 7"
_PROBE = [{"role": "user", "content": "Zq probe question"}, {"role": "assistant", "content": _PROBE_ANSWER}]


@dataclass
class ChatTemplate:
    """A chat template bound to its tokenizer. `origin` says where it came from (OWN_ORIGIN,
    DEFAULT_ORIGIN, "FILE path", NONE); `source` is its Jinja text (None for NONE); `eot_ids` the
    ids generation stops at (end of turn first, then EOS); `added_tokens` the ChatML tokens this
    load appended to an older tokenizer (then `tok` is the extended tokenizer and `tokenizer_files`
    its files, to write where the tokenizer is kept)."""

    tok: ModelTokenizer
    origin: str
    source: str | None
    eot_ids: list[int] = field(default_factory=list)
    added_tokens: list[str] = field(default_factory=list)
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)

    @property
    def is_none(self) -> bool:
        return self.source is None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text: `tokenizer.apply_chat_template(messages, tokenize=False, ...)`."""
        if self.source is None:
            raise OdysseyError(
                "--chat-template none has no way to render a conversation; drop --chat-template none "
                "(the model's template or the default ChatML is used) or give --chat-template FILE"
            )
        try:
            text = self.tok.hf.apply_chat_template(
                messages, chat_template=self.source, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja2's TemplateError, raise_exception(...) in the template, type errors
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise OdysseyError(
                f"the chat template ({self.origin}) fails to render a conversation ({type(e).__name__}: {msg}); "
                f"fix the template or give another with --chat-template FILE"
            ) from None
        if not isinstance(text, str):
            raise OdysseyError(f"the chat template ({self.origin}) rendered {type(text).__name__}, not text")
        return text

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """The ids of `render(...)`: `apply_chat_template(..., tokenize=True)`'s input_ids."""
        return self._ids(self.render(messages, add_generation_prompt))[0]

    def _ids(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok.hf(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def encode_example(
        self, messages: list[dict], train_on: str = "all", mask_prompt: bool = True
    ) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation ending with an assistant turn; mask[i] = 1 where token i is
        a trained target (see the module docstring). With NONE, `messages` is one user turn (the
        prompt) and one assistant turn (the completion)."""
        if train_on not in TRAIN_ON:
            raise OdysseyError(f"--train-on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        if self.source is None:
            ids, mask = self._encode_raw(messages)
        else:
            ids, mask = self._encode_chat(messages, train_on)
        if not mask_prompt:
            mask = [0] + [1] * (len(ids) - 1)
        if mask:
            mask[0] = 0  # the first token is predicted from nothing
        return ids, mask

    def _encode_raw(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        roles = [m.get("role") for m in messages]
        if roles != ["user", "assistant"]:
            raise OdysseyError(
                "--chat-template none takes prompt/completion pairs only (one user turn, one assistant "
                "turn); give conversations a chat template (drop --chat-template none)"
            )
        eos = self.tok.eos_id
        if eos is None:
            raise OdysseyError(
                f"the tokenizer in {self.tok.directory} has no EOS token to end a completion with "
                f"(--chat-template none); set eos_token in its tokenizer_config.json"
            )
        prompt = self.tok.encode(messages[0]["content"])  # a BOS where the tokenizer adds one
        answer = self.tok.hf(messages[1]["content"], add_special_tokens=False, verbose=False)["input_ids"]
        return prompt + answer + [eos], [0] * len(prompt) + [1] * (len(answer) + 1)

    def _encode_chat(self, messages: list[dict], train_on: str) -> tuple[list[int], list[int]]:
        full = self.render(messages)
        ids, offsets = self._ids(full)
        mask = [0] * len(ids)
        turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
        if train_on == "last":
            turns = turns[-1:]
        stops = set(self.eot_ids)
        for k in turns:
            start = len(self._prefix(messages[:k], True, full))
            end = len(self._prefix(messages[: k + 1], False, full))
            for i, (a, _) in enumerate(offsets):  # character offsets of each token in `full`
                if a < start:
                    continue
                if a >= end:
                    break
                mask[i] = 1
                if ids[i] in stops:
                    break  # the end-of-turn token closes the answer; what follows it is template
        return ids, mask

    def _prefix(self, messages: list[dict], add_generation_prompt: bool, full: str) -> str:
        text = self.render(messages, add_generation_prompt)
        if not full.startswith(text):
            cut = "prompt" if add_generation_prompt else "conversation"
            raise OdysseyError(
                f"the chat template ({self.origin}) is not prefix-stable: the {cut} up to turn {len(messages)} "
                f"does not render as the start of the whole conversation, so the answer tokens cannot be "
                f"found; give a template that renders earlier turns the same (--chat-template FILE)"
            )
        return text


def load_chat_template(
    tokenizer_dir: str | os.PathLike,
    override: str | os.PathLike | None = None,
    model_vocab_size: int | None = None,
    tok: ModelTokenizer | None = None,
) -> ChatTemplate:
    """The chat template for the tokenizer in `tokenizer_dir` (see the module docstring).

    `override`: a .jinja file, or "none". `model_vocab_size`: the embedding rows of the model the
    data is for; the default template's tokens are appended to a tokenizer lacking them only within
    it (None: no limit). `tok`: the tokenizer already loaded from `tokenizer_dir`.
    """
    tok = tok or load_model_tokenizer(tokenizer_dir)
    if override is not None and str(override) == NONE:
        eos = [tok.eos_id] if tok.eos_id is not None else []
        return ChatTemplate(tok, NONE, None, eos)
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise OdysseyError(f"--chat-template {path} is not a file; give a Jinja template file or `none`")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise OdysseyError(
                f"--chat-template {path} cannot be read as UTF-8 text ({e}); give a Jinja file"
            ) from None
        if not source.strip():
            raise OdysseyError(f"--chat-template {path} is empty; give a Jinja template file")
        template = ChatTemplate(tok, f"FILE {path}", source)
    elif isinstance(tok.chat_template, str) and tok.chat_template.strip():
        template = ChatTemplate(tok, OWN_ORIGIN, tok.chat_template)
    elif isinstance(tok.chat_template, dict) and isinstance(tok.chat_template.get("default"), str):
        template = ChatTemplate(tok, OWN_ORIGIN, tok.chat_template["default"])  # named templates: the default
    else:
        template = _default_template(tok, model_vocab_size)
    template.eot_ids = _eot_ids(template)
    return template


def _default_template(tok: ModelTokenizer, model_vocab_size: int | None) -> ChatTemplate:
    """DEFAULT_TEMPLATE on `tok`, its ChatML tokens appended to the tokenizer where it lacks them."""
    vocab = tok.hf.get_vocab()
    missing = [t for t in CHAT_TOKENS if t not in vocab]
    if not missing:
        return ChatTemplate(tok, DEFAULT_ORIGIN, DEFAULT_TEMPLATE)
    room = None if model_vocab_size is None else model_vocab_size - tok.vocab_size
    if room is not None and room < len(missing):
        raise OdysseyError(
            f"the tokenizer in {tok.directory} has no chat template and lacks the default template's tokens "
            f"{', '.join(missing)}, and the model's vocabulary ({model_vocab_size}) has no room for them; "
            f"give a template written with the tokens it has (--chat-template FILE)"
        )
    return _extended(tok, missing)


def _extended(tok: ModelTokenizer, missing: list[str]) -> ChatTemplate:
    """`tok` with `missing` appended as special tokens (every old id kept), loaded back from its
    files as every later reader loads it."""
    import tempfile

    from tokenizers import AddedToken

    from odyssey.tokenizer import load_tokenizer, read_tokenizer_files

    raw = load_tokenizer(tok.directory)
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    files = read_tokenizer_files(tok.directory)
    files["tokenizer.json"] = (raw.to_str(pretty=True) + "\n").encode()
    files["chat_template.jinja"] = DEFAULT_TEMPLATE.encode()
    with tempfile.TemporaryDirectory(prefix="odyssey-tokenizer-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        loaded = load_model_tokenizer(tmp)
    loaded.directory = tok.directory  # named by where it came from; its files travel in tokenizer_files
    return ChatTemplate(loaded, DEFAULT_ORIGIN, DEFAULT_TEMPLATE, added_tokens=missing, tokenizer_files=files)


def _eot_ids(template: ChatTemplate) -> list[int]:
    """The first special token rendered after the probe answer, then EOS (see the module docstring)."""
    tok = template.tok
    eos = [tok.eos_id] if tok.eos_id is not None else []
    text = template.render(_PROBE)
    at = text.rfind(_PROBE_ANSWER)
    if at < 0:
        raise OdysseyError(
            f"the chat template ({template.origin}) does not render an assistant's content as given; "
            f"give a template that does (--chat-template FILE)"
        )
    ids, offsets = template._ids(text)
    special = set(tok.hf.all_special_ids) | {
        i for i, t in tok.hf.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    after = at + len(_PROBE_ANSWER)
    for i, (a, _) in zip(ids, offsets, strict=True):
        if a >= after and i in special:
            return [i] + [e for e in eos if e != i]
    return eos
