"""Generation: greedy output equals transformers' greedy generation on the same imported model."""

import json

import pytest
import torch

from odyssey.engine import Engine
from odyssey.generate import generate_ids
from odyssey.store import Store
from tests.conftest import assert_user_error, run_cli, tiny_config


def make_tokenizer(d, vocab=256):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(
        ["once upon a time there was a little cat", "옛날 옛적에 작은 고양이가 살았어요"] * 20, trainer
    )
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    return tok


@pytest.fixture
def imported(tmp_path):
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=300)
    hf = HFLlama(
        LlamaConfig(
            **{k: v for k, v in cfg.to_hf_dict("float32").items() if k not in ("architectures", "dtype", "torch_dtype")}
        )
    )
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)  # peaky logits: greedy choices are not ties
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    make_tokenizer(src)
    p = run_cli("import", src, "--out", tmp_path / "store", "--quiet")
    assert p.returncode == 0, p.stderr
    return tmp_path / "store", hf.eval()


def test_greedy_equals_transformers(imported):
    store_dir, hf = imported
    prompt = [1, 17, 42, 99, 5]
    with Engine(Store.open(store_dir), compute_dtype="fp32") as eng:
        ours = list(generate_ids(eng, prompt, 12, temperature=0.0))
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[
        0, len(prompt) :
    ].tolist()
    assert ours == ref


def test_generate_cli_streams_text(imported):
    store_dir, _ = imported
    p = run_cli(
        "generate",
        "--model",
        store_dir,
        "--prompt",
        "옛날 옛적에",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
        "--ram-budget",
        "1GiB",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("옛날 옛적에")
    assert "tokens in" in p.stderr and "memory plan" in p.stderr


def test_prompt_ids_without_tokenizer_and_clear_error(tiny_store):
    p = run_cli("generate", "--model", tiny_store, "--prompt", "hello")
    assert_user_error(p, "no tokenizer", "prepare-data")
    p = run_cli(
        "generate",
        "--model",
        tiny_store,
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--quiet",
    )
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.split()) == 4


def test_generate_refuses_a_budget_too_small(tiny_store):
    p = run_cli("generate", "--model", tiny_store, "--prompt-ids", "1,2", "--ram-budget", "10MiB")
    assert_user_error(p, "too small", "--ram-budget")


def test_sampling_stays_inside_the_tokenizer_vocabulary(tiny_store):
    """A tokenizer smaller than the model's vocabulary: only ids it can decode are generated."""
    from odyssey.engine import Engine
    from odyssey.generate import generate_ids
    from odyssey.store import Store

    with Engine(Store.open(tiny_store), compute_dtype="fp32") as eng:
        ids = list(generate_ids(eng, [1, 2, 3], 40, temperature=1.5, seed=3, vocab_limit=17))
        free = list(generate_ids(eng, [1, 2, 3], 40, temperature=1.5, seed=3))
    assert max(ids) < 17 and max(free) >= 17
