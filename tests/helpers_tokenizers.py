"""Tiny tokenizers in the styles of real checkpoints, built locally with `tokenizers` (no download)
and saved as transformers saves them, so tests can check Odyssey against `AutoTokenizer`.

    llama3         byte-level BPE (Llama 3's split regex), adds <|begin_of_text|>, EOS <|eot_id|>,
                   chat_template.jinja, generation_config.json listing two EOS ids
    qwen           byte-level BPE (Qwen2's regex, NFC), class Qwen2Tokenizer, no BOS at all, EOS
                   <|im_end|>, the chat template inside tokenizer_config.json
    sentencepiece  SentencePiece-derived BPE as in TinyLlama / Llama 2: <unk> <s> </s>, 256 byte
                   tokens <0x00>..<0xFF> (byte_fallback), Metaspace "▁", class LlamaTokenizer,
                   adds <s>

`make_tokenizer(directory, style)` writes the files and returns the vocabulary size (len of the
transformers tokenizer). A new style is one entry in STYLES.
"""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "once upon a time there was a little cat named Tom.",
    "The cat sat on the mat and looked at the moon.",
    "It's 2024; they'll say 'hi' to 3 friends!",
    "옛날 옛적에 작은 고양이가 살았어요.",
    "Lily found 17 shiny stones by the river, and she ran home.",
    "hello world\n\nThe end.",
]
TEXTS = [  # what the equality checks tokenize: spaces, digits, newlines, Korean, a leading space
    "Once upon a time, a little girl named Lily found 3 shiny stones.",
    " leading space and  two  spaces",
    "It's 2024; they'll say 'hi'!\n\nNew paragraph.",
    "옛날 옛적에 작은 고양이가 살았어요.",
    "unseen: zebra ΩΣ 🙂",
]
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _byte_level(directory: Path, regex: str, specials: list[str], vocab: int, normalizer=None, template=None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=regex == LLAMA3_REGEX))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(SENTENCES * 10, trainer)
    tok.add_special_tokens(specials)  # ids after the BPE vocabulary, as in Llama 3 and Qwen
    post = [processors.ByteLevel(trim_offsets=False)]
    if template is not None:
        post.append(template(tok))
    tok.post_processor = processors.Sequence(post) if len(post) > 1 else post[0]
    tok.save(str(directory / "tokenizer.json"))
    return tok


def llama3(directory: Path) -> None:
    from tokenizers import processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

    def bos_first(tok):
        bos = "<|begin_of_text|>"
        return processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )

    tok = _byte_level(directory, LLAMA3_REGEX, specials, 400, template=bos_first)
    _dump(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "clean_up_tokenization_spaces": True,
            "model_max_length": 131072,
        },
    )
    (directory / "chat_template.jinja").write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    _dump(
        directory / "generation_config.json",
        {"bos_token_id": tok.token_to_id("<|begin_of_text|>"), "eos_token_id": ids, "do_sample": True},
    )


def qwen(directory: Path) -> None:
    from tokenizers import normalizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _byte_level(directory, QWEN_REGEX, specials, 380, normalizer=normalizers.NFC())
    _dump(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "add_prefix_space": False,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 32768,
            "chat_template": QWEN_TEMPLATE,
        },
    )
    ids = [tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    _dump(directory / "generation_config.json", {"bos_token_id": ids[1], "eos_token_id": ids, "pad_token_id": ids[1]})


def sentencepiece(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator(SENTENCES * 10, trainer)
    model = json.loads(trained.to_str())["model"]
    # SentencePiece's layout: <unk> <s> </s>, the 256 byte tokens, then the pieces in trained order
    pieces = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in ("<unk>", "<s>", "</s>")]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])  # already in the vocabulary: ids 0, 1, 2
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.save(str(directory / "tokenizer.json"))
    _dump(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": None,
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 2048,
        },
    )


STYLES = {"llama3": llama3, "qwen": qwen, "sentencepiece": sentencepiece}


def make_tokenizer(directory: Path, style: str) -> int:
    """Write a tokenizer of `style` into `directory` (created if needed); return its vocabulary size
    as transformers counts it (base vocabulary + added tokens)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    STYLES[style](directory)
    return len(AutoTokenizer.from_pretrained(directory))


# --------------------------------------------------------------------------------------------
# a tiny checkpoint as downloaded: a random model of a family, saved by transformers, with a tokenizer


def _family(config_name: str, model_name: str, **keys):
    def classes():
        import transformers

        return getattr(transformers, config_name), getattr(transformers, model_name), keys

    return classes


# family -> (config class, model class, config keys) of transformers; a new family is one entry.
# Windows of 4 tokens: generation runs past them.
FAMILIES = {
    "llama": _family("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _family("MistralConfig", "MistralForCausalLM", sliding_window=4),
    "qwen2": _family("Qwen2Config", "Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": _family("Qwen3Config", "Qwen3ForCausalLM", head_dim=16),
    "gemma3": _family("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, sliding_window=4, query_pre_attn_scalar=16),
}


def make_checkpoint(directory: Path, style: str, family: str = "llama", seed: int = 0, std: float = 0.3):
    """A tiny random `family` model (2 layers, width 64, GQA 4/2) saved with save_pretrained (f32
    safetensors) in `directory`, with a tokenizer of `style` whose vocabulary is the model's and whose
    special ids are in its config. Weights N(0, std): peaky logits, so greedy choices are no ties.
    Returns the model (eval mode)."""
    import torch

    directory = Path(directory)
    tok_dir = directory.parent / f".{directory.name}-tokenizer"
    vocab = make_tokenizer(tok_dir, style)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    config_cls, model_cls, keys = FAMILIES[family]()
    cfg = config_cls(
        **keys,
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=std)
    model.save_pretrained(directory)
    for f in tok_dir.iterdir():  # the tokenizer's own files win (generation_config.json included)
        (directory / f.name).write_bytes(f.read_bytes())
    return model.eval()
