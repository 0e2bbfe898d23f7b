"""Generation: greedy output equals transformers' greedy generation on the same imported model, as
text through `odyssey generate` for each tokenizer style (the prompt tokenized as transformers does,
a BOS only where the tokenizer adds one, stopping at the EOS ids generation_config.json lists)."""

import json
import shutil

import pytest
import torch

from odyssey.engine import Engine
from odyssey.generate import generate_ids, stream_text
from odyssey.store import Store
from tests.conftest import assert_user_error, cli_in_process, run_cli, tiny_config
from tests.helpers_tokenizers import make_checkpoint


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
    p = cli_in_process("import", src, "--out", tmp_path / "store", "--quiet")
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
    assert "compute dtype: " in p.stderr


def test_prompt_ids_without_tokenizer_and_clear_error(tiny_store):
    p = cli_in_process("generate", "--model", tiny_store, "--prompt", "hello")
    assert_user_error(p, "no tokenizer", "prepare-data")
    p = cli_in_process(
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
    p = cli_in_process("generate", "--model", tiny_store, "--prompt-ids", "1,2", "--ram-budget", "10MiB")
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


# --------------------------------------------------------------------------------------------
# the model's own tokenizer: text equals transformers' greedy text

PROMPT = "once upon a time"
# (family, tokenizer style): a family added in odyssey/families is one more entry here
CASES = [
    ("llama", "llama3"),
    ("llama", "qwen"),
    ("llama", "sentencepiece"),
    ("mistral", "sentencepiece"),
    ("qwen2", "qwen"),
    ("qwen3", "qwen"),
    ("gemma3", "sentencepiece"),
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{s}" for f, s in CASES])
def checkpoint(request, tmp_path_factory):
    """(source checkpoint dir, store dir, the transformers model loaded from the source, its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, style = request.param
    d = tmp_path_factory.mktemp(f"{family}-{style}")
    make_checkpoint(d / "hf", style, family=family)
    p = cli_in_process("import", d / "hf", "--out", d / "store", "--quiet")
    assert p.returncode == 0, p.stderr
    hf = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval()
    return d / "hf", d / "store", hf, AutoTokenizer.from_pretrained(d / "hf")


def hf_greedy(hf, tok, prompt: str, n: int, **kw) -> tuple[list[int], str]:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, **kw)[0]
    return out[ids.shape[1] :].tolist(), tok.decode(out, skip_special_tokens=True)


def odyssey_generate(store, prompt: str, n: int, *extra) -> str:
    p = cli_in_process(
        "generate", "--model", store, "--prompt", prompt, "--max-new-tokens", n, "--temperature", "0",
        "--compute-dtype", "fp32", "--quiet", *extra,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith("\n")
    return p.stdout[:-1]


def test_generate_text_equals_transformers(checkpoint):
    """`odyssey generate --temperature 0` prints the text transformers' greedy generate decodes."""
    src, store, hf, tok = checkpoint
    new, text = hf_greedy(hf, tok, PROMPT, 12)
    assert len(new) == 12  # no EOS came early: twelve tokens compared
    ours = odyssey_generate(store, PROMPT, 12)
    assert PROMPT + ours == text, (PROMPT + ours, text)
    # the prompt ids themselves: what AutoTokenizer gives (BOS only where the tokenizer adds one)
    from odyssey.tokenizer import load_model_tokenizer

    assert load_model_tokenizer(store).encode(PROMPT) == tok(PROMPT)["input_ids"]


def test_generate_stops_at_every_eos_of_generation_config(checkpoint, tmp_path):
    """generation_config.json may list several EOS ids (Llama 3 lists three): generation stops at
    the first of any, as transformers' does. Here a token greedy decoding reaches at step k is made
    an extra EOS."""
    src, store, hf, tok = checkpoint
    new, _ = hf_greedy(hf, tok, PROMPT, 12)
    k = next((i for i in range(1, 12) if new[i] not in new[:i]), 0)  # its first occurrence
    store_copy = shutil.copytree(store, tmp_path / "store")
    gen_path = store_copy / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    listed = gen.get("eos_token_id", tok.eos_token_id)
    eos = (listed if isinstance(listed, list) else [listed]) + [new[k]]
    gen_path.write_text(json.dumps({**gen, "eos_token_id": eos}))
    stopped, text = hf_greedy(hf, tok, PROMPT, 12, eos_token_id=eos)
    assert stopped == new[: k + 1]
    # what `odyssey generate` runs (tests/test_generate_text_equals_transformers runs the command)
    from odyssey.generate import stop_ids
    from odyssey.tokenizer import load_model_tokenizer

    ours = load_model_tokenizer(store_copy)
    opened = Store.open(store_copy)
    assert set(stop_ids(opened, ours)) == set(eos)
    parts: list[str] = []
    prompt = ours.encode(PROMPT)
    with Engine(opened, compute_dtype="fp32") as eng:
        ids = stream_text(ours, generate_ids(eng, prompt, 12, eos_ids=stop_ids(opened, ours)), parts.append, prompt)
    assert ids == stopped and PROMPT + "".join(parts) == text


def test_stream_text_waits_for_whole_characters_and_keeps_spaces(model_tokenizers):
    from odyssey.tokenizer import load_model_tokenizer

    tok = load_model_tokenizer(model_tokenizers["sentencepiece"])
    prompt = tok.encode("once upon")
    new = tok.encode(
        " a time 옛날",
    )[1:]  # no BOS: the continuation, "▁a" first
    parts: list[str] = []
    assert stream_text(tok, iter(new), parts.append, prompt_ids=prompt) == new
    assert "".join(parts) == " a time 옛날" and all("\ufffd" not in p for p in parts)
    # byte-fallback tokens of one Hangul syllable arrive one by one: nothing is written until whole
    hangul = tok.hf.convert_tokens_to_ids([f"<0x{b:02X}>" for b in "똠".encode()])
    parts = []
    stream_text(tok, iter(hangul), parts.append, prompt_ids=prompt)
    assert parts == [" 똠"] or "".join(parts) == "똠"


# ---------------------------------------------------------------------------------------------
# held units: pinned units bound once, in the compute dtype (engine.Engine hold_pinned)


def _store(tmp_path, dtype: str, tied: bool) -> Store:
    from odyssey.store import init_store

    out = tmp_path / f"held-{dtype}-{int(tied)}"
    init_store(tiny_config(num_hidden_layers=3, tie_word_embeddings=tied), out, dtype=dtype, seed=3, progress=False)
    return Store.open(out)


def _every_unit(store) -> list:
    from odyssey.planner import plan_for_store
    from odyssey.residency import units_from_labels

    p = plan_for_store(store, mode="forward", seq_len=32, budget=1 << 40, runtime=0, compute_dtype="fp32")
    return units_from_labels(store, p.residency.pinned)


@pytest.mark.parametrize("dtype,tied", [("bf16", True), ("bf16", False), ("f32", True)])
def test_held_units_give_the_same_logits_and_leave_the_pager_alone(tmp_path, dtype, tied):
    """Every unit pinned and held (fp32 compute; a bf16 store's weights converted once): the logits
    of the prompt and of every new token equal those of the engine that binds, converts and unbinds
    per use, bit for bit; after the first token the pager is not asked for anything, the pass's
    figures count every unit as resident (0 bytes read), and a converted unit's pinned buffer is
    given back (a same-dtype unit is bound as a view of it, which stays)."""
    from odyssey.model import KVCache

    store = _store(tmp_path, dtype, tied)
    pinned = _every_unit(store)
    ids = [[1, 7, 42, 9], [3], [250], [17]]
    with (
        Engine(store, compute_dtype="fp32", pinned=pinned) as plain,
        Engine(store, compute_dtype="fp32", pinned=pinned, hold_pinned=True) as held,
    ):
        c1, c2 = KVCache(3), KVCache(3)
        for k, step in enumerate(ids):
            want = plain.logits(torch.tensor([step]), cache=c1, last_only=True)
            got = held.logits(torch.tensor([step]), cache=c2, last_only=True)
            assert torch.equal(got, want)
            st = held.pass_stats(0.0)
            assert st.units == len(pinned)
            if k == 0:
                assert st.pagein_bytes == sum(store.page(u).nbytes for u in pinned)
            else:
                assert st.pagein_bytes == 0
                assert held.pager.take_stats() == []
        # converted units gave their buffer back (a later get would read them again); views keep theirs
        assert all(held.pager._pinned[u].ready == (dtype == "f32") for u in pinned)


def test_held_and_paged_units_mix_in_schedule_order(tmp_path):
    """Half the units pinned and held, the rest paged through one slot: greedy tokens equal the
    plain engine's over several tokens (the pager is given only the paged units, in order), and the
    paged units are read for every token."""
    store = _store(tmp_path, "bf16", tied=True)
    units = store.page_units()
    pinned = [u for u in units if u in (1, 2, "head")]
    prompt = [5, 6, 7, 8]
    with Engine(store, compute_dtype="fp32") as plain:
        want = list(generate_ids(plain, prompt, 6))
    with Engine(store, compute_dtype="fp32", slots=1, pinned=pinned, hold_pinned=True) as eng:
        it = generate_ids(eng, prompt, 6)
        got = [next(it)]
        eng.pass_stats(0.0)
        for tok in it:
            got.append(tok)
            st = eng.pass_stats(0.0)
            paged = [u for u in units if u not in pinned]
            assert len(paged) == 2 and st.units == len(units)
            assert st.pagein_bytes == sum(store.page(u).nbytes for u in paged)
    assert got == want


def test_generation_plan_counts_held_units_in_the_compute_dtype(tmp_path):
    """A bf16 store generating in fp32 holds its pinned units converted: the plan's pinned term is
    twice their buffers (in bf16 compute, the buffers themselves)."""
    from odyssey.planner import plan_for_store

    store = _store(tmp_path, "bf16", tied=False)
    kw = dict(mode="forward", seq_len=32, budget=1 << 40, runtime=0)
    p32 = plan_for_store(store, compute_dtype="fp32", **kw)
    p16 = plan_for_store(store, compute_dtype="bf16", **kw)
    assert p32.residency.pinned_bytes == p16.residency.pinned_bytes > 0
    assert p32.terms["pinned units"] == 2 * p32.residency.pinned_bytes
    assert p16.terms["pinned units"] == p16.residency.pinned_bytes
