"""Chat templates (odyssey.data.templates): rendering and ids equal to transformers'
apply_chat_template, loss masks on the answers only, the default ChatML template, bad templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from odyssey.data.templates import DEFAULT_ORIGIN, DEFAULT_TEMPLATE, OWN_ORIGIN, load_chat_template
from odyssey.errors import OdysseyError
from odyssey.tokenizer import CHAT_TOKENS, hf_side_files, train_tokenizer

TEXTS = ["You are a helpful assistant.", "What is the cat's name?", "The cat is named Tom.", "옛날 옛적에 고양이"]
CHATML = (  # Qwen2.5's shape: a default system turn when the conversation has none
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (  # Llama 3's shape: BOS, header tokens, content stripped, <|eot_id|>
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
STYLES = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML, "<|im_end|>"),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        LLAMA3,
        "<|eot_id|>",
    ),
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the cat's name?"}, {"role": "assistant", "content": "Tom."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Who found the stones?"},
        {"role": "assistant", "content": "Lily found them."},
        {"role": "user", "content": "옛날 옛적에?"},
        {"role": "assistant", "content": "고양이가 살았어요."},
    ],
]


def _save_tokenizer(directory: Path, specials: list[str], bos: str | None, eos: str, template: str | None) -> Path:
    """A tiny byte-level BPE with `specials` after its vocabulary, saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-tokenizers")
    return {name: _save_tokenizer(root / name, *spec[:4]) for name, spec in STYLES.items()}


@pytest.fixture(scope="module")
def odyssey_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer as prepare-data trains one (no chat template of its own)."""
    d = tmp_path_factory.mktemp("odyssey-tok")
    train_tokenizer(TEXTS * 5, vocab_size=300).save(str(d / "tokenizer.json"))
    for name, data in hf_side_files().items():
        (d / name).write_bytes(data)
    return d


def _masked_runs(hf, ids: list[int], mask: list[int]) -> list[str]:
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [hf.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("style", list(STYLES))
def test_rendering_and_ids_equal_transformers(tokenizers, style):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tokenizers[style])
    t = load_chat_template(tokenizers[style])
    assert t.origin == OWN_ORIGIN and t.source == ref.chat_template
    assert t.eot_ids[0] == ref.convert_tokens_to_ids(STYLES[style][4])
    for conv in CONVERSATIONS:
        for k in range(1, len(conv) + 1):
            for gen in (False, True):
                msgs = conv[:k]
                want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                assert t.render(msgs, add_generation_prompt=gen) == want
                ids = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
                assert t.encode(msgs, add_generation_prompt=gen) == list(ids)


@pytest.mark.parametrize("style", list(STYLES))
def test_masks_train_exactly_the_answers_and_their_end_of_turn(tokenizers, style):
    t = load_chat_template(tokenizers[style])
    eot = STYLES[style][4]
    conv = CONVERSATIONS[1]
    ids, mask = t.encode_example(conv)
    assert ids == t.encode(conv) and len(mask) == len(ids) and mask[0] == 0
    assert _masked_runs(t.tok.hf, ids, mask) == ["Lily found them." + eot, "고양이가 살았어요." + eot]
    ids, last = t.encode_example(conv, train_on="last")
    assert _masked_runs(t.tok.hf, ids, last) == ["고양이가 살았어요." + eot]
    _, everything = t.encode_example(conv, mask_prompt=False)
    assert everything == [0] + [1] * (len(ids) - 1)


def test_default_template_on_a_trained_odyssey_tokenizer(odyssey_tokenizer):
    from transformers import AutoTokenizer

    t = load_chat_template(odyssey_tokenizer)
    ref = AutoTokenizer.from_pretrained(odyssey_tokenizer)
    start, end = (ref.convert_tokens_to_ids(x) for x in CHAT_TOKENS)
    assert (start, end) == (len(ref) - 2, len(ref) - 1)  # reserved as the last two ids
    assert t.origin == DEFAULT_ORIGIN and t.source == DEFAULT_TEMPLATE and not t.added_tokens
    assert t.eot_ids == [end, ref.eos_token_id]
    conv = CONVERSATIONS[1]
    want = ref.apply_chat_template(conv, chat_template=DEFAULT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert t.render(conv, add_generation_prompt=True) == want
    assert want.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    assert want.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = ref.apply_chat_template(conv, chat_template=DEFAULT_TEMPLATE, tokenize=True, return_dict=False)
    assert t.encode(conv) == list(ids) and ids.count(start) == 5
    ids, mask = t.encode_example(conv)
    assert _masked_runs(ref, ids, mask) == ["Lily found them.<|im_end|>", "고양이가 살았어요.<|im_end|>"]
    assert ref.decode(ids, skip_special_tokens=True).startswith("system\nAnswer briefly.\nuser\n")


def test_an_older_tokenizer_gets_the_chatml_tokens_appended_or_is_refused(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    old = tmp_path / "old"
    old.mkdir()
    tok = Tokenizer(models.BPE())  # as prepare-data trained one before CHAT_TOKENS: <unk> <s> </s> only
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    tok.save(str(old / "tokenizer.json"))
    for name, data in hf_side_files().items():
        (old / name).write_bytes(data)
    before = (old / "tokenizer.json").read_bytes()
    n = tok.get_vocab_size()
    t = load_chat_template(old, model_vocab_size=n + 2)
    assert t.added_tokens == CHAT_TOKENS and t.tok.vocab_size == n + 2
    assert [t.tok.hf.convert_tokens_to_ids(x) for x in CHAT_TOKENS] == [n, n + 1]
    assert t.eot_ids[0] == n + 1
    for text in TEXTS:  # every old id kept
        assert t.tok.hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False).ids
    assert set(t.tokenizer_files) >= {"tokenizer.json", "chat_template.jinja"}
    assert (old / "tokenizer.json").read_bytes() == before  # nothing written by loading
    with pytest.raises(OdysseyError, match="no room.*--chat-template FILE") as e:
        load_chat_template(old, model_vocab_size=n + 1)
    assert "\n" not in str(e.value)


def test_override_file_and_none(tokenizers, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(LLAMA3.replace("bos_token", "''"), encoding="utf-8")
    t = load_chat_template(tokenizers["chatml"], override=f)
    assert t.origin == f"FILE {f}" and not t.render(CONVERSATIONS[0]).startswith("<|im_start|>")
    none = load_chat_template(tokenizers["llama3"], override="none")
    hf = none.tok.hf
    ids, mask = none.encode_example(CONVERSATIONS[0])
    prompt = hf("What is the cat's name?")["input_ids"]
    answer = hf("Tom.", add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer + [hf.eos_token_id]  # the prompt as tokenizer(prompt) gives it
    assert mask == [0] * len(prompt) + [1] * (len(answer) + 1)
    with pytest.raises(OdysseyError, match="none"):
        none.render(CONVERSATIONS[0])
    with pytest.raises(OdysseyError, match="prompt/completion pairs only"):
        none.encode_example(CONVERSATIONS[1])


@pytest.mark.parametrize(
    "source, needle",
    [
        ("{% for m in messages %}{{ m['role'] }{% endfor %}", "fails to render"),  # Jinja syntax
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        (
            "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
            "prefix",
        ),
        ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}", "assistant"),
    ],
)
def test_a_bad_template_is_one_line(tokenizers, tmp_path, source, needle):
    f = tmp_path / "bad.jinja"
    f.write_text(source, encoding="utf-8")
    with pytest.raises(OdysseyError) as e:
        t = load_chat_template(tokenizers["chatml"], override=f)
        t.encode_example(CONVERSATIONS[1])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and ("bad.jinja" in msg or needle == "prefix"), msg
