"""Talking to the model: `odyssey chat` (and `generate --chat`) answers as transformers' greedy
`generate` does on the rendered conversation and stops at the template's end-of-turn token; the
terminal loop keeps the history (within --max-context); `odyssey eval` gives the loss on answers
and the exact matches a computation by hand gives; exports carry the chat template and its
end-of-turn id (safetensors: `AutoTokenizer.apply_chat_template`, GGUF: `GGUFReader`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import gguf
import pytest
import torch

from tests.conftest import ROOT, assert_user_error, cli_in_process, run_cli, tiny_config
from tests.helpers_tokenizers import make_tokenizer

QUESTION = "Who sat on the mat?"
MAX_NEW = 24


def chat_ids(tok, messages, add_generation_prompt=False) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def hf_greedy(hf, tok, messages, n=MAX_NEW) -> tuple[list[int], str]:
    """transformers' greedy answer to `messages` (generation prompt added), stopping at the EOS ids of
    generation_config.json (<|im_end|>, the end of turn, and <|endoftext|>)."""
    ids = torch.tensor([chat_ids(tok, messages, True)])
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))[0]
    new = out[ids.shape[1] :].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """(store dir, the transformers model, its tokenizer, end-of-turn id): a tiny Llama with a
    Qwen-style ChatML tokenizer (template in tokenizer_config.json), its head row for <|im_end|>
    planted so that the greedy answer to QUESTION ends with it after a few tokens."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("chatml")
    n = make_tokenizer(d / "tok", "qwen")
    tok = AutoTokenizer.from_pretrained(d / "tok")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=n, max_position_embeddings=512)
    hf_cfg = {k: v for k, v in cfg.to_hf_dict("float32").items() if k not in ("architectures", "dtype", "torch_dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)  # peaky logits: greedy choices are not ties
    # plant: <|im_end|> scores below every token where the first 3 answer tokens are predicted, above
    # every token where the 4th is (its head row solves those 4 equations exactly; d = 64 > 4)
    prompt = chat_ids(tok, [{"role": "user", "content": QUESTION}], True)
    with torch.no_grad():
        new = hf.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, eos_token_id=None)[0].tolist()
        h = hf.model(torch.tensor([new])).last_hidden_state[0, len(prompt) - 1 : len(new) - 1]  # (4, d) normed
        logits = hf.lm_head(h)  # (4, V)
        want = torch.cat([logits[:3].min(dim=1).values - 1, logits[3:].max(dim=1).values + 1])
        hf.lm_head.weight[eot] = torch.linalg.pinv(h) @ want
    hf.save_pretrained(d / "hf")
    for f in (d / "tok").iterdir():  # the tokenizer's generation_config.json wins: <|im_end|>, <|endoftext|>
        shutil.copy(f, d / "hf" / f.name)
    hf.generation_config.eos_token_id = json.loads((d / "tok" / "generation_config.json").read_text())["eos_token_id"]
    p = cli_in_process("import", d / "hf", "--out", d / "store", "--quiet")
    assert p.returncode == 0, p.stderr
    return d / "store", hf, tok, eot


def chat_cli(store, *args, input=None, verb=("chat",), in_process=False):
    """A real `odyssey chat` process (stdin: `input`), or, for a one-shot --prompt, the command
    through `odyssey.cli.main` in this process."""
    if in_process:
        assert input is None
        return cli_in_process(*verb, "--model", store, "--temperature", "0", "--compute-dtype", "fp32", *args)
    cmd = [sys.executable, "-m", "odyssey", *verb, "--model", str(store), "--temperature", "0"]
    cmd += ["--compute-dtype", "fp32", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, input=input, timeout=300)


def test_chat_prompt_is_greedy_transformers_and_stops_at_end_of_turn(chatml):
    store, hf, tok, eot = chatml
    new, text = hf_greedy(hf, tok, [{"role": "user", "content": QUESTION}])
    assert new[-1] == eot and 1 < len(new) < MAX_NEW  # transformers stopped at the end of turn
    p = chat_cli(store, "--prompt", QUESTION, "--max-new-tokens", MAX_NEW, in_process=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout == text + "\n"  # the answer alone on stdout
    assert f"{len(new)} tokens" in p.stderr and "stopped at end of turn" in p.stderr
    alias = chat_cli(
        store,
        "--chat",
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        MAX_NEW,
        "--quiet",
        verb=("generate",),
        in_process=True,
    )
    assert alias.returncode == 0, alias.stderr
    assert alias.stdout == p.stdout and alias.stderr == ""


def test_interactive_loop_keeps_the_history(chatml):
    store, hf, tok, _ = chatml
    system = {"role": "system", "content": "Answer briefly."}
    q1, q2 = QUESTION, "And then what happened to the cat?"
    p = chat_cli(
        store, "--system", system["content"], "--max-new-tokens", 12, input=f"{q1}\n\n{q2}\n/exit\nnot asked\n"
    )
    assert p.returncode == 0, p.stderr
    _, a1 = hf_greedy(hf, tok, [system, {"role": "user", "content": q1}], 12)
    turns = [system, {"role": "user", "content": q1}, {"role": "assistant", "content": a1}]
    _, a2 = hf_greedy(hf, tok, [*turns, {"role": "user", "content": q2}], 12)
    assert p.stdout == f"> {a1}\n> > {a2}\n> ", p.stdout  # an empty line asks nothing; /exit ends
    assert "/reset" in p.stderr
    # /reset forgets: the second question then gets the answer it gets alone
    p = chat_cli(store, "--max-new-tokens", 12, input=f"{q1}\n/reset\n{q2}\n")  # Ctrl-D (end of input) ends
    _, alone = hf_greedy(hf, tok, [{"role": "user", "content": q2}], 12)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("> ")[-2].rstrip("\n") == alone and "history cleared" in p.stderr


def test_history_is_trimmed_to_max_context_and_the_cache_reused(chatml):
    """Oldest user/assistant pairs go first, the system message stays, the answer is the one to the
    trimmed history; a turn that follows the last one reuses its keys and values."""
    from odyssey.chat import ChatSession
    from odyssey.data.templates import load_chat_template
    from odyssey.engine import Engine
    from odyssey.generate import stop_ids
    from odyssey.store import Store

    store_dir, hf, tok, _ = chatml
    store = Store.open(store_dir)
    template = load_chat_template(store_dir)
    questions = [QUESTION, "Where was the moon?", "Who found the stones?", "Say hello."]
    with Engine(store, compute_dtype="fp32") as eng:
        s = ChatSession(
            eng,
            template.tok,
            template,
            stop_ids(store, template.tok, template),
            system="Be kind.",
            max_context=90,
            max_new_tokens=8,
        )
        replies = []
        for q in questions:
            parts: list[str] = []
            replies.append(s.ask(q, parts.append))
            assert "".join(parts) == replies[-1].text
            kept = s.conv.messages[:-1]  # what the answer was generated from
            assert replies[-1].text == hf_greedy(hf, tok, kept, 8)[1]
            assert len(chat_ids(tok, kept, True)) + 8 <= 90
    assert s.conv.dropped >= 1 and s.conv.messages[0] == {"role": "system", "content": "Be kind."}
    assert [m["role"] for m in s.conv.messages[1:]] == ["user", "assistant"] * (len(s.conv.messages) // 2)
    assert replies[1].reused_tokens > replies[0].prompt_tokens // 2  # the first turn was not computed again
    # the terminal says once that turns are dropped
    p = chat_cli(store_dir, "--max-context", 90, "--max-new-tokens", 8, input="\n".join(questions) + "\n")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("oldest turns are dropped") == 1 and p.stdout.count("> ") == len(questions) + 1


def test_ctrl_c_stops_an_answer_and_the_conversation_goes_on(chatml):
    """SIGINT during an answer stops it after the token in progress; the partial answer stays in the
    history and the next question is answered from it."""
    import os
    import signal

    from odyssey.chat import ChatSession
    from odyssey.data.templates import load_chat_template
    from odyssey.engine import Engine
    from odyssey.generate import stop_ids
    from odyssey.store import Store

    store_dir, hf, tok, _ = chatml
    store = Store.open(store_dir)
    template = load_chat_template(store_dir)
    with Engine(store, compute_dtype="fp32") as eng:
        s = ChatSession(eng, template.tok, template, stop_ids(store, template.tok, template), max_context=256,
                        max_new_tokens=20)  # fmt: skip
        parts: list[str] = []
        before = signal.getsignal(signal.SIGINT)

        def write(text: str) -> None:
            parts.append(text)
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in the terminal

        first = s.ask("Where was the moon?", write)
        assert first.interrupted and not first.stopped and len(first.ids) <= 3 and first.text == "".join(parts)
        assert signal.getsignal(signal.SIGINT) is before  # given back
        second = s.ask(QUESTION, lambda _: None)
    assert not second.interrupted
    history = [{"role": "user", "content": "Where was the moon?"}, {"role": "assistant", "content": first.text}]
    assert second.text == hf_greedy(hf, tok, [*history, {"role": "user", "content": QUESTION}], 20)[1]


def test_chat_template_none_answers_a_plain_prompt(chatml, capsys):
    store = chatml[0]
    args = (
        "--prompt",
        "once upon a time",
        "--max-new-tokens",
        10,
        "--temperature",
        0,
        "--compute-dtype",
        "fp32",
        "--quiet",
    )
    plain = odyssey(capsys, "generate", "--model", store, *args)
    chat = odyssey(capsys, "chat", "--model", store, "--chat-template", "none", *args)
    assert plain.returncode == chat.returncode == 0, chat.stderr
    assert chat.stdout == plain.stdout and len(chat.stdout) > 1


def answer_labels(tok, messages) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (1, n) and labels with -100 everywhere but the last answer and its <|im_end|>."""
    full = chat_ids(tok, messages)
    start = len(chat_ids(tok, messages[:-1], True))
    end = full.index(tok.convert_tokens_to_ids("<|im_end|>"), start) + 1
    labels = [-100] * len(full)
    labels[start:end] = full[start:end]
    return torch.tensor([full]), torch.tensor([labels])


def odyssey(capsys, *args) -> subprocess.CompletedProcess:
    """`odyssey ARGS` in this process (a refusal needs no fresh interpreter): exit status, stderr."""
    from odyssey.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def hand_loss(hf, tok, conversations) -> tuple[float, int]:
    """transformers' mean loss over the last answers' tokens (labels -100 elsewhere), token-weighted."""
    nll = count = 0.0
    with torch.no_grad():
        for conv in conversations:
            ids, labels = answer_labels(tok, conv)
            n = int((labels[0, 1:] != -100).sum())
            nll += float(hf(ids, labels=labels).loss) * n
            count += n
    return nll / count, int(count)


EVAL_LINE = r"eval: (\d+) examples, loss on answers ([\d.]+) over (\d+) tokens .* exact match (\d+)/(\d+)"


def test_eval_matches_a_computation_by_hand(chatml, tmp_path, capsys):
    store, hf, tok, _ = chatml
    _, right = hf_greedy(hf, tok, [{"role": "user", "content": QUESTION}])
    pairs = [(QUESTION, right), ("Hi?", "Hello there."), ("Name a color.", "blue")]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in pairs))
    out = tmp_path / "answers.jsonl"
    p = cli_in_process(
        "eval", "--model", store, "--data", data, "--compute-dtype", "fp32", "--max-new-tokens", MAX_NEW,
        "--out", out, "--quiet",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]
    loss, count = hand_loss(hf, tok, conversations)
    m = re.search(EVAL_LINE, p.stdout)
    assert m, p.stdout
    assert int(m[1]) == 3 and abs(float(m[2]) - loss) < 2e-4 and int(m[3]) == count
    exact = [hf_greedy(hf, tok, c[:-1])[1].strip() == c[-1]["content"] for c in conversations]
    assert exact[0] and (int(m[4]), int(m[5])) == (sum(exact), 3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = [(q, a, e) for (q, a), e in zip(pairs, exact, strict=True)]
    assert [(r["question"], r["reference"], r["exact"]) for r in rows] == want
    assert rows[0]["answer"] == right
    # chat records (a system turn, two exchanges: the last answer is scored) and alpaca, with --limit
    chat = [{"role": "system", "content": "Be kind."}, *conversations[1], *conversations[0]]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": chat}) + "\n")
    p = odyssey(capsys, "eval", "--model", store, "--data", tmp_path / "chat.jsonl", "--limit", 1, "--quiet",
                "--compute-dtype", "fp32", "--max-new-tokens", MAX_NEW)  # fmt: skip
    m = re.search(EVAL_LINE, p.stdout)
    assert p.returncode == 0 and m, p.stderr
    loss, count = hand_loss(hf, tok, [chat])
    assert int(m[1]) == 1 and abs(float(m[2]) - loss) < 2e-4 and int(m[3]) == count
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Name a", "input": "color.", "output": "blue"}) + "\n")
    p = odyssey(capsys, "eval", "--model", store, "--data", alpaca, "--quiet", "--compute-dtype", "fp32")
    m = re.search(EVAL_LINE, p.stdout)
    loss, _ = hand_loss(hf, tok, [[{"role": "user", "content": "Name a\n\ncolor."}, conversations[2][1]]])
    assert p.returncode == 0 and m and abs(float(m[2]) - loss) < 2e-4, p.stdout


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2


def test_bad_input_is_one_line(chatml, tmp_path, model_tokenizers, capsys):
    from transformers import AutoTokenizer

    from odyssey.store import Store, init_store
    from odyssey.tokenizer import copy_tokenizer
    from tests.test_merge import make_adapter

    store = chatml[0]
    chat = ("chat", "--model", store, "--compute-dtype", "fp32")
    assert_user_error(odyssey(capsys, *chat, "--prompt", "  "), "--prompt is empty")
    other = tmp_path / "other"
    cfg = Store.open(store).config
    init_store(tiny_config(vocab_size=cfg.vocab_size, max_position_embeddings=512), other, dtype="f32", seed=7)
    adapter = make_adapter(other, tmp_path / "adapter")
    assert_user_error(odyssey(capsys, *chat, "--adapter", adapter, "--prompt", "hi"), "--model")
    assert_user_error(odyssey(capsys, *chat, "--max-context", 4096, "--prompt", "hi"), "max_position_embeddings")
    assert_user_error(odyssey(capsys, *chat, "--max-new-tokens", 64, "--max-context", 64), "--max-new-tokens")
    # a tokenizer with no template and no ChatML tokens, in a model with no room for them
    plain = model_tokenizers["sentencepiece"]
    bare = tmp_path / "bare"
    init_store(tiny_config(vocab_size=len(AutoTokenizer.from_pretrained(plain))), bare, dtype="f32", seed=1)
    copy_tokenizer(plain, bare)
    assert_user_error(odyssey(capsys, "chat", "--model", bare, "--prompt", "hi"), "no room", "--chat-template FILE")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    assert_user_error(odyssey(capsys, "eval", "--model", store, "--data", bad), "bad.jsonl:1", "assistant")
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert_user_error(odyssey(capsys, "eval", "--model", store, "--data", bad), "bad.jsonl:1", "'question'")
    p = odyssey(capsys, "eval", "--model", store, "--data", bad, "--out", store / "x.jsonl")
    assert_user_error(p, "apart")
    assert not (store / "x.jsonl").exists()
    # as a user meets it: no traceback from a fresh process either
    assert_user_error(run_cli("generate", "--chat", "--model", store, "--prompt", ""), "--prompt is empty")


# --------------------------------------------------------------------------------------------
# exports carry the template and the end-of-turn token


def gguf_fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def test_merged_and_exported_carry_the_template(chatml, tmp_path, capsys):
    from transformers import AutoTokenizer

    from tests.test_merge import make_adapter

    store, _, tok, eot = chatml
    adapter = make_adapter(store, tmp_path / "adapter")
    p = cli_in_process("merge", "--model", store, "--adapter", adapter, "--out", tmp_path / "merged", "--quiet")
    assert p.returncode == 0, p.stderr
    args = ("--prompt", QUESTION, "--temperature", 0, "--compute-dtype", "fp32", "--quiet")
    merged = odyssey(capsys, "chat", "--model", tmp_path / "merged", *args)
    on_the_fly = odyssey(capsys, "chat", "--model", store, "--adapter", adapter, *args)
    plain = odyssey(capsys, "chat", "--model", store, *args)
    assert merged.returncode == on_the_fly.returncode == 0, on_the_fly.stderr
    assert merged.stdout == on_the_fly.stdout != plain.stdout
    p = cli_in_process(
        "export", tmp_path / "merged", "--out", tmp_path / "exp", "--formats", "safetensors,gguf", "--quiet"
    )
    assert p.returncode == 0, p.stderr
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "옛날 옛적에?"}]
    want = chat_ids(tok, conv, True)
    for d in (tmp_path / "merged", tmp_path / "exp" / "safetensors"):
        assert chat_ids(AutoTokenizer.from_pretrained(d), conv, True) == want
    f = gguf_fields(next((tmp_path / "exp").glob("*.gguf")))
    assert f["tokenizer.chat_template"] == tok.chat_template
    assert f["tokenizer.ggml.eot_token_id"] == eot and f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id


def test_default_chatml_goes_into_the_exports(tmp_path):
    """A tokenizer without a template but with the ChatML tokens (Odyssey's own BPE): the exports
    get the default template as chat_template.jinja / tokenizer.chat_template, EOT <|im_end|>."""
    from transformers import AutoTokenizer

    from odyssey.data.templates import DEFAULT_TEMPLATE, load_chat_template
    from odyssey.store import init_store
    from odyssey.tokenizer import CHAT_TOKENS, hf_side_files, train_tokenizer

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    raw = train_tokenizer(["once upon a time there was a cat", "옛날 옛적에"] * 20, vocab_size=300)
    raw.save(str(tok_dir / "tokenizer.json"))
    for name, data in hf_side_files().items():
        (tok_dir / name).write_bytes(data)
    assert all(raw.token_to_id(t) is not None for t in CHAT_TOKENS)
    store = tmp_path / "store"
    init_store(tiny_config(vocab_size=raw.get_vocab_size()), store, dtype="f32", seed=1, progress=False)
    for f in tok_dir.iterdir():
        shutil.copy(f, store / f.name)
    ours = load_chat_template(store)
    assert ours.origin == "default ChatML" and not ours.added_tokens
    p = cli_in_process("export", store, "--out", tmp_path / "exp", "--formats", "safetensors,gguf", "--quiet")
    assert p.returncode == 0, p.stderr
    exported = tmp_path / "exp" / "safetensors"
    assert (exported / "chat_template.jinja").read_text() == DEFAULT_TEMPLATE
    conv = [{"role": "user", "content": "옛날 옛적에?"}, {"role": "assistant", "content": "a cat"}]
    assert chat_ids(AutoTokenizer.from_pretrained(exported), conv) == ours.encode(conv)
    f = gguf_fields(next((tmp_path / "exp").glob("*.gguf")))
    assert f["tokenizer.chat_template"] == DEFAULT_TEMPLATE
    assert f["tokenizer.ggml.eot_token_id"] == raw.token_to_id("<|im_end|>")
    assert f["tokenizer.ggml.eos_token_id"] == raw.token_to_id("</s>")


def test_chat_on_a_gguf_uses_its_own_template(chatml, tmp_path):
    """`odyssey chat --model x.gguf --prompt ... --temperature 0`: an f32 GGUF exported by odyssey
    (ChatML template and <|im_end|> in its metadata), alone in its directory, answers as transformers'
    greedy `generate` on the template's rendering and stops at the end of turn: the tokenizer and
    the template come from the GGUF's metadata."""
    store, hf, tok, eot = chatml
    p = cli_in_process("export", store, "--out", tmp_path / "exp", "--formats", "gguf", "--gguf-type", "f32", "--quiet")
    assert p.returncode == 0, p.stderr
    (tmp_path / "alone").mkdir()
    model = shutil.move(next((tmp_path / "exp").glob("*.gguf")), tmp_path / "alone" / "model.gguf")
    assert gguf_fields(model)["tokenizer.chat_template"] == tok.chat_template
    new, text = hf_greedy(hf, tok, [{"role": "user", "content": QUESTION}])
    assert new[-1] == eot and 1 < len(new) < MAX_NEW
    p = chat_cli(model, "--prompt", QUESTION, "--max-new-tokens", MAX_NEW, in_process=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout == text + "\n"
    assert f"{len(new)} tokens" in p.stderr and "stopped at end of turn" in p.stderr
    assert sorted(x.name for x in (tmp_path / "alone").iterdir()) == ["model.gguf"]  # nothing written beside it


@pytest.mark.slow
def test_llama_cpp_sees_the_template(chatml, tmp_path):
    import llama_cpp  # make test-slow installs it

    store, _, tok, eot = chatml
    p = run_cli("export", store, "--out", tmp_path / "exp", "--formats", "gguf", "--gguf-type", "f32", "--quiet")
    assert p.returncode == 0, p.stderr
    llm = llama_cpp.Llama(str(next((tmp_path / "exp").glob("*.gguf"))), verbose=False, n_ctx=256)
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == eot
    # llama.cpp's chat mode renders with that template and stops at its end of turn: its greedy
    # answer is transformers' (the fixture's answer ends with <|im_end|> at the 4th token)
    hf = chatml[1]
    want_ids, want = hf_greedy(hf, tok, [{"role": "user", "content": QUESTION}])
    assert want_ids[-1] == eot
    messages = [{"role": "user", "content": QUESTION}]
    got = llm.create_chat_completion(messages, max_tokens=MAX_NEW, temperature=0.0)
    assert got["usage"]["prompt_tokens"] == len(chat_ids(tok, messages, True))  # the same rendering
    assert got["choices"][0]["finish_reason"] == "stop"  # at the end of turn ...
    assert got["usage"]["completion_tokens"] == len(want_ids) - 1  # ... after the same tokens
    # the same text, but for the random model's invalid UTF-8 bytes (llama.cpp drops them)
    assert got["choices"][0]["message"]["content"] == want.replace("\ufffd", "")
