"""The bad-input battery: a table of inputs a user can get wrong, for every subcommand. Each case
must end with exit status 2, one line on stderr naming the cause (no traceback), and every file of
the inputs unchanged (sha256 before and after).

Cases run in-process through `odyssey.cli.main` (torch is imported once, so 150+ cases take
seconds); `test_battery_through_the_real_cli` runs a sample as real subprocesses. The counts are
printed at the end (`-s`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from odyssey import cli
from tests.conftest import ROOT, assert_user_error, run_cli

RESULTS: Counter = Counter()
TQDM_MARKS = ("%|", "it/s]", "B/s]", "docs/s]")


# ---------------------------------------------------------------------------------------------
# the world: good inputs and damaged copies of them


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _damaged_store(good: Path, root: Path, name: str, damage) -> Path:
    out = root / name
    shutil.copytree(good, out)
    damage(out)
    return out


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def world(train_dir, tmp_path_factory) -> Path:
    """W/store (tiny, with a tokenizer), W/tok (token data), W/adapter (2 steps of LoRA), damaged
    copies of each, corpora and YAML files good and bad. Nothing here may change during a case."""
    w = tmp_path_factory.mktemp("world")
    shutil.copytree(train_dir / "store", w / "store")
    shutil.copytree(train_dir / "tok", w / "tok")
    p = run_cli(
        "train", "--model", w / "store", "--data", w / "tok", "--out", w / "run", "--ram-budget", "1GiB",
        "--steps", "2", "seq_len=32", "eval_every=0", "--quiet", "--no-guard",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    shutil.copytree(w / "run" / "adapter", w / "adapter")
    shutil.rmtree(w / "run")
    good = w / "store"
    index = "model.safetensors.index.json"
    shard = "model-00002-of-00004.safetensors"
    bad = w / "bad"
    stores = {
        "empty-dir": lambda s: [p.unlink() for p in s.iterdir() if p.is_file()],
        "index-malformed": lambda s: _write(s / index, '{"weight_map": '),
        "index-not-object": lambda s: _write(s / index, "[1, 2, 3]"),
        "index-no-weight-map": lambda s: _write(s / index, '{"metadata": {}}'),
        "config-malformed": lambda s: _write(s / "config.json", '{"vocab_size": '),
        "config-missing": lambda s: (s / "config.json").unlink(),
        "config-not-object": lambda s: _write(s / "config.json", '"llama"'),
        "config-zero-layers": lambda s: _write(
            s / "config.json", json.dumps({**json.loads((s / "config.json").read_text()), "num_hidden_layers": 0})
        ),
        "shard-missing": lambda s: (s / shard).unlink(),
        "shard-truncated": lambda s: (s / shard).write_bytes((s / shard).read_bytes()[:4]),
        "shard-header-garbage": lambda s: (s / shard).write_bytes(b"\xff" * 64),
        "shard-empty": lambda s: (s / shard).write_bytes(b""),
    }
    for name, damage in stores.items():
        _damaged_store(good, bad, name, damage)
    (bad / "a-file").write_text("not a store\n")

    adapter_config = json.loads((w / "adapter" / "adapter_config.json").read_text())
    adapters = {
        "adapter-config-malformed": lambda a: _write(a / "adapter_config.json", '{"r": '),
        "adapter-config-missing": lambda a: (a / "adapter_config.json").unlink(),
        "adapter-r-zero": lambda a: _write(a / "adapter_config.json", json.dumps({**adapter_config, "r": 0})),
        "adapter-alpha-nan": lambda a: _write(
            a / "adapter_config.json", json.dumps({**adapter_config, "lora_alpha": float("nan")})
        ),
        "adapter-weights-missing": lambda a: (a / "adapter_model.safetensors").unlink(),
        "adapter-weights-garbage": lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x00" * 16),
        "adapter-targets-unknown": lambda a: _write(
            a / "adapter_config.json", json.dumps({**adapter_config, "target_modules": ["wq"]})
        ),
    }
    for name, damage in adapters.items():
        _damaged_store(w / "adapter", bad, name, damage)

    datas = {
        "data-no-manifest": lambda d: (d / "manifest.json").unlink(),
        "data-manifest-malformed": lambda d: _write(d / "manifest.json", "{"),
        "data-manifest-not-object": lambda d: _write(d / "manifest.json", "[]"),
        "data-train-missing": lambda d: (d / "train.bin").unlink(),
        "data-tokenizer-malformed": lambda d: _write(d / "tokenizer.json", "[1, 2"),
    }
    for name, damage in datas.items():
        _damaged_store(w / "tok", bad, name, damage)

    # corpora
    _write(w / "corpus" / "a.txt", "Once upon a time there was a cat.\n\nThe cat sat.\n" * 40)
    (w / "empty-corpus").mkdir()
    _write(w / "no-text.jsonl", '{"title": "x"}\n{"title": "y"}\n')
    _write(w / "bad.jsonl", '{"text": "fine"}\n{"text": \n')
    (w / "binary.txt").write_bytes(bytes(range(256)) * 8)
    # configs
    nano = (ROOT / "configs" / "nano.yaml").read_text()
    yamls = {
        "yaml-malformed": "hidden_size: [64\n",
        "yaml-not-mapping": "- 1\n- 2\n",
        "yaml-unknown-key": nano + "wings: 2\n",
        "yaml-wrong-type": nano.replace("hidden_size:", "hidden_size: wide\n_old_hidden_size:"),
        "yaml-head-dim-zero": nano + "head_dim: 0\n",
        "yaml-eps-nan": nano + "rms_norm_eps: .nan\n",
        "yaml-negative-layers": nano.replace("num_hidden_layers:", "num_hidden_layers: -2\n_old:"),
        "train-yaml-malformed": "lr: [\n",
        "train-yaml-unknown": "lr: 1.0e-4\nmomentum: 0.9\n",
        "train-yaml-negative-wd": "weight_decay: -1\n",
        "train-yaml-lora-r-zero": "lora:\n  r: 0\n",
        "train-yaml-nan-lr": "lr: .nan\n",
    }
    for name, text in yamls.items():
        _write(w / "yaml" / f"{name}.yaml", text)
    # an HF-like source that is not importable
    _write(w / "hf-no-config" / "model.safetensors", "x")
    _write(w / "hf-bad-arch" / "config.json", json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _write(w / "hf-bad-config" / "config.json", "{")
    _write(w / "thermal-dir" / "x", "")
    _gguf_world(w)
    return w


def _gguf_world(w: Path) -> None:
    """W/g: the store as an f32 and a Q8_0 GGUF (its tokenizer in the metadata), an adapter trained
    on the f32 one (2 steps) and copies of it targeting lm_head / embed_tokens, damaged GGUFs (header
    cut, tensor data cut, an IQ2_XXS tensor, gemma3 and falcon files, text, empty, a directory named
    x.gguf), a GGUF changed after its checksums were recorded, and a question/answer file."""
    from safetensors.torch import load_file, save_file

    from odyssey.export.gguf import write_gguf
    from odyssey.gguf.store import GGUFStore
    from odyssey.store import Store
    from tests.test_gguf_read import info_pos, patch, write_small

    g = w / "g"
    g.mkdir()
    store = Store.open(w / "store")
    write_gguf(store, g / "model.gguf", "f32", progress=False)
    write_gguf(store, g / "model-q8.gguf", "q8_0", progress=False)
    p = run_cli(
        "train", "--model", g / "model.gguf", "--data", w / "tok", "--out", w / "grun", "--ram-budget", "1GiB",
        "--steps", "2", "seq_len=32", "eval_every=0", "--quiet", "--no-guard",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    shutil.copytree(w / "grun" / "adapter", g / "adapter")
    shutil.rmtree(w / "grun")
    cfg = json.loads((g / "adapter" / "adapter_config.json").read_text())
    r, d, vocab = cfg["r"], store.config.hidden_size, store.config.vocab_size
    for name, module, a_shape, b_shape in (
        ("head-adapter", "lm_head", (r, d), (vocab, r)),
        ("embed-adapter", "embed_tokens", (r, vocab), (d, r)),
    ):
        shutil.copytree(g / "adapter", g / name)
        _write(
            g / name / "adapter_config.json", json.dumps({**cfg, "target_modules": [*cfg["target_modules"], module]})
        )
        t = load_file(str(g / name / "adapter_model.safetensors"))
        t[f"base_model.model.{module}.lora_A.weight"] = torch.randn(a_shape) if module == "lm_head" else None
        if module == "lm_head":
            t[f"base_model.model.{module}.lora_B.weight"] = torch.randn(b_shape)
        else:  # PEFT's embedding LoRA: lora_embedding_A (r, vocab), lora_embedding_B (d, r)
            del t[f"base_model.model.{module}.lora_A.weight"]
            t[f"base_model.model.{module}.lora_embedding_A"] = torch.randn(a_shape)
            t[f"base_model.model.{module}.lora_embedding_B"] = torch.randn(b_shape)
        save_file(t, str(g / name / "adapter_model.safetensors"))
    data = (g / "model-q8.gguf").read_bytes()
    (g / "cut-header.gguf").write_bytes(data[:300])  # inside the metadata
    (g / "cut-data.gguf").write_bytes(data[:-1000])
    shutil.copy(g / "model-q8.gguf", g / "iq2.gguf")
    patch(g / "iq2.gguf", info_pos(g / "iq2.gguf", "blk.0.ffn_up.weight") + 4 + 2 * 8, "<I", 16)  # IQ2_XXS
    write_small(g / "gemma3.gguf", "gemma3")
    write_small(g / "falcon.gguf", "falcon")
    _write(g / "text.gguf", "not a model, a note\n")
    (g / "empty.gguf").write_bytes(b"")
    (g / "dir.gguf").mkdir()
    _write(g / "dir.gguf" / "x", "")
    # changed after first use: verify records the checksums, then one byte of layer 1 flips
    shutil.copy(g / "model.gguf", g / "changed.gguf")
    assert cli.main(["verify", str(g / "changed.gguf"), "--quiet"]) == 0
    gs = GGUFStore.open(g / "changed.gguf")
    _flip(g / "changed.gguf", gs.gf.tensors[gs.names["model.layers.1.mlp.up_proj.weight"]].offset + 100)
    _write(
        g / "qa.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a cat"}]}) + "\n",
    )


def _checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


# ---------------------------------------------------------------------------------------------
# the table: (id, argv with W for the world and O for a fresh output directory, what the line names)

S, D, A, B = "W/store", "W/tok", "W/adapter", "W/bad"
BUDGET = ["--ram-budget", "1GiB"]
STORE_DAMAGE = [
    "empty-dir", "index-malformed", "index-not-object", "index-no-weight-map", "config-malformed",
    "config-missing", "config-not-object", "config-zero-layers", "shard-missing", "shard-truncated",
    "shard-header-garbage", "shard-empty", "a-file",
]  # fmt: skip


def _store_cases():
    """Every command that opens a store, on every kind of damaged store (and on missing ones)."""
    uses = {
        "info": lambda s: ["info", s],
        "plan": lambda s: ["plan", "--model", s, *BUDGET],
        "generate": lambda s: ["generate", "--model", s, "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--quiet"],
        "train": lambda s: ["train", "--model", s, "--data", D, "--out", "O/run", *BUDGET, "--no-guard", "--quiet"],
        "merge": lambda s: ["merge", "--model", s, "--adapter", A, "--out", "O/merged", "--quiet"],
        "export": lambda s: ["export", s, "--out", "O/exp", "--formats", "safetensors", "--quiet"],
        "prepare-data-model": lambda s: ["prepare-data", "W/corpus", "--out", "O/data", "--model", s, "--quiet"],
    }
    # prepare-data reads only the store's config.json (the tokenizer goes beside the weights)
    reads_config_only = {"prepare-data-model"}
    config_damage = ["empty-dir", "config-malformed", "config-missing", "config-not-object", "a-file"]
    for verb, argv in uses.items():
        yield f"{verb}-missing-store", argv("W/nowhere"), "nowhere"
        for damage in config_damage if verb in reads_config_only else STORE_DAMAGE:
            yield f"{verb}-{damage}", argv(f"{B}/{damage}"), None
    yield "verify-missing-store", ["verify", "W/nowhere"], "nowhere"
    yield "verify-a-file", ["verify", f"{B}/a-file"], None
    yield "verify-empty-dir", ["verify", f"{B}/empty-dir"], None
    yield "bench-missing-store", ["bench", "pagein", "--model", "W/nowhere"], "nowhere"
    yield "bench-index-malformed", ["bench", "pagein", "--model", f"{B}/index-malformed"], None


def _adapter_cases():
    names = [
        "adapter-config-malformed", "adapter-config-missing", "adapter-r-zero", "adapter-alpha-nan",
        "adapter-weights-missing", "adapter-weights-garbage", "adapter-targets-unknown",
    ]  # fmt: skip
    for name in names + ["nowhere"]:
        a = f"{B}/{name}" if name != "nowhere" else "W/nowhere"
        yield f"merge-{name}", ["merge", "--model", S, "--adapter", a, "--out", "O/m", "--quiet"], None
        yield f"generate-{name}", ["generate", "--model", S, "--adapter", a, "--prompt-ids", "1,2", "--quiet"], None
        yield f"export-{name}", ["export", S, "--adapter", a, "--out", "O/e", "--formats", "safetensors"], None
    yield "merge-adapter-is-a-store", ["merge", "--model", S, "--adapter", S, "--out", "O/m"], None


def _data_cases():
    train = ["train", "--model", S, "--out", "O/run", *BUDGET, "--no-guard", "--quiet"]
    for name in ["data-no-manifest", "data-manifest-malformed", "data-manifest-not-object", "data-train-missing"]:
        yield f"train-{name}", [*train, "--data", f"{B}/{name}"], None
    yield "train-data-missing", [*train, "--data", "W/nowhere"], "nowhere"
    yield "train-data-is-a-store", [*train, "--data", S], None
    prep = ["prepare-data", "--out", "O/d", "--quiet"]
    yield "prepare-missing-input", [*prep, "W/nowhere.txt"], "nowhere"
    yield "prepare-empty-dir", [*prep, "W/empty-corpus"], None
    yield "prepare-jsonl-without-text", [*prep, "W/no-text.jsonl"], "text"
    yield "prepare-jsonl-malformed", [*prep, "W/bad.jsonl"], "bad.jsonl"
    yield "prepare-vocab-too-small", [*prep, "W/corpus", "--vocab-size", "10"], "vocab"
    yield "prepare-vocab-over-model", [*prep, "W/corpus", "--vocab-size", "4096", "--model", S], None
    yield "prepare-tokenizer-missing", [*prep, "W/corpus", "--tokenizer", "W/nowhere"], "nowhere"
    yield "prepare-tokenizer-malformed", [*prep, "W/corpus", "--tokenizer", f"{B}/data-tokenizer-malformed"], None
    yield "prepare-val-fraction-one", [*prep, "W/corpus", "--val-fraction", "1"], "val"
    yield "prepare-out-is-a-file", ["prepare-data", "W/corpus", "--out", f"{B}/a-file", "--quiet"], None


def _config_cases():
    model_yaml = [
        "yaml-malformed", "yaml-not-mapping", "yaml-unknown-key", "yaml-wrong-type", "yaml-head-dim-zero",
        "yaml-eps-nan", "yaml-negative-layers",
    ]  # fmt: skip
    for name in model_yaml:
        yield f"init-{name}", ["init", "--config", f"W/yaml/{name}.yaml", "--out", "O/s", "--quiet"], None
    yield "init-config-missing", ["init", "--config", "W/nowhere.yaml", "--out", "O/s"], "nowhere"
    for override in ["hidden_size=0", "num_attention_heads=7", "vocab_size=-1", "rope_theta=.inf", "wings=2"]:
        yield f"init-override-{override}", ["init", "--config", "configs/nano.yaml", "--out", "O/s", override], None
    yield "init-out-is-a-file", ["init", "--config", "configs/nano.yaml", "--out", f"{B}/a-file"], None
    train = ["train", "--model", S, "--data", D, "--out", "O/run", *BUDGET, "--no-guard", "--quiet"]
    for name in ["train-yaml-malformed", "train-yaml-unknown", "train-yaml-negative-wd", "train-yaml-lora-r-zero",
                 "train-yaml-nan-lr"]:  # fmt: skip
        yield f"train-{name}", [*train, "--config", f"W/yaml/{name}.yaml"], None
    overrides = [
        "seq_len=0", "batch_size=-1", "grad_accum=0", "lr=0", "lr=.nan", "weight_decay=-1", "max_grad_norm=-1",
        "min_lr_ratio=2", "warmup_steps=-1", "eval_every=-5", "slots=0", "keep_checkpoints=0", "mode=half",
        "compute_dtype=fp8", "lora.r=0", "lora.alpha=-1", "lora.dropout=1", "lora.targets=[wq]",
        "lora.targets=[lm_head]", "guard.interval_s=0", "guard.soft_pct=99", "guard.resume_temp_c=95",
        "guard.on_guard_lost=panic", "seq_len=4096", "nonsense", "lora=3", "seq_len=[1,2]",
    ]  # fmt: skip
    for override in overrides:
        yield f"train-override-{override}", [*train, override], None
    yield "train-no-model", ["train", "--data", D, "--out", "O/run", *BUDGET, "--no-guard"], "--model"
    yield "train-no-budget", ["train", "--model", S, "--data", D, "--out", "O/run", "--no-guard"], "--ram-budget"
    yield "train-resume-nothing", [*train, "--resume"], "--resume"
    yield "train-budget-too-small", [*train[:7], "--ram-budget", "16MiB", "--no-guard"], "too small"


def _option_cases():
    g = ["generate", "--model", S]
    yield "generate-no-prompt", [*g], "--prompt"
    yield "generate-prompt-ids-junk", [*g, "--prompt-ids", "1,x"], None
    yield "generate-prompt-ids-over-vocab", [*g, "--prompt-ids", "1,99999"], None
    yield "generate-both-prompts", [*g, "--prompt", "hi", "--prompt-ids", "1"], None
    for flag, value in [("--max-new-tokens", "-1"), ("--max-new-tokens", "0"), ("--temperature", "-1"),
                        ("--temperature", "nan"), ("--top-k", "-3"), ("--slots", "0"), ("--seed", "-2"),
                        ("--ram-budget", "lots"), ("--ram-budget", "0"), ("--ram-budget", "1MiB"),
                        ("--compute-dtype", "fp8")]:  # fmt: skip
        yield f"generate-{flag}={value}", [*g, "--prompt-ids", "1,2", flag, value], flag if value != "1MiB" else None
    p = ["plan", "--model", S]
    bad_plan = [("--seq-len", "-5"), ("--seq-len", "0"), ("--batch-size", "0"), ("--lora-r", "0"), ("--slots", "0"),
                ("--grad-accum", "0"), ("--ram-budget", "-1GiB"), ("--ram-budget", "2XB"),
                ("--mode", "half")]  # fmt: skip
    for flag, value in bad_plan:
        yield f"plan-{flag}={value}", [*p, flag, value], flag
    yield "plan-too-small", [*p, "--ram-budget", "8MiB"], "too small"
    t = ["train", "--model", S, "--data", D, "--out", "O/run", *BUDGET, "--no-guard"]
    for flag, value in [("--steps", "0"), ("--steps", "-3"), ("--nproc", "0"), ("--mode", "half")]:
        yield f"train-{flag}={value}", [*t, flag, value], flag
    yield "train-unknown-option", [*t, "--learning-rate", "1"], "--learning-rate"
    e = ["export", S, "--out", "O/e"]
    yield "export-format-unknown", [*e, "--formats", "onnx"], "onnx"
    yield "export-gguf-type-unknown", [*e, "--formats", "gguf", "--gguf-type", "q3_k_xs"], "q3_k_xs"
    yield "export-no-formats", [*e, "--formats", ""], None
    yield "import-missing-src", ["import", "W/nowhere", "--out", "O/i"], "nowhere"
    yield "import-no-config", ["import", "W/hf-no-config", "--out", "O/i"], None
    yield "import-bad-arch", ["import", "W/hf-bad-arch", "--out", "O/i"], None
    yield "import-bad-config", ["import", "W/hf-bad-config", "--out", "O/i"], None
    yield "import-a-store-dtype", ["import", S, "--out", "O/i", "--dtype", "f8"], "--dtype"
    yield "merge-dtype-unknown", ["merge", "--model", S, "--adapter", A, "--out", "O/m", "--dtype", "int4"], "--dtype"
    for flag, value in [("--strategies", "teleport"), ("--slots", "a,b"), ("--repeats", "0")]:
        yield f"bench-{flag}={value}", ["bench", "pagein", "--model", S, flag, value], None
    yield "bench-unknown-kind", ["bench", "lightspeed", "--model", S], None
    yield "doctor-read-test-negative", ["doctor", "--read-test-mib", "-1"], "--read-test-mib"
    yield "doctor-models-dir-a-file", ["doctor", "--models-dir", f"{B}/a-file", "--read-test-mib", "0"], None
    gd = ["guard", "--run", "O/grun", "--ram-budget", "1GiB"]
    yield "guard-pid-gone", [*gd, "--pid", "999999999"], "999999999"
    yield "guard-pid-junk", [*gd, "--pid", "me"], "--pid"
    yield "guard-run-a-file", ["guard", "--pid", str(os.getpid()), "--run", f"{B}/a-file", *BUDGET], "a-file"
    yield "guard-budget-junk", ["guard", "--pid", str(os.getpid()), "--run", "O/g", "--ram-budget", "lots"], None
    yield "guard-soft-over-hard", [*gd, "--pid", str(os.getpid()), "--soft-pct", "95", "--hard-pct", "90"], None
    yield "guard-interval-zero", [*gd, "--pid", str(os.getpid()), "--interval", "0"], "interval"
    yield "monitor-missing-run", ["monitor", "W/nowhere"], "nowhere"
    yield "verb-unknown", ["frobnicate"], "frobnicate"


G, GQ, GA = "W/g/model.gguf", "W/g/model-q8.gguf", "W/g/adapter"
BAD_GGUF = {  # file: what the line names
    "cut-header": "truncated",
    "cut-data": "truncated",
    "iq2": "IQ2_XXS",
    "gemma3": "gemma3",
    "falcon": "falcon",
    "text": "not a GGUF file",
    "empty": "empty.gguf",
    "dir": "dir.gguf",
}


def _gguf_cases():
    """Every command that takes a model, on every kind of bad GGUF; adapters of another GGUF; head
    adapters as GGUF adapters; a GGUF changed after first use; outputs onto the GGUF itself."""
    uses = {
        "info": lambda m: ["info", m],
        "verify": lambda m: ["verify", m],
        "plan": lambda m: ["plan", "--model", m, *BUDGET],
        "train": lambda m: ["train", "--model", m, "--data", D, "--out", "O/run", *BUDGET, "--no-guard", "--quiet"],
        "generate": lambda m: ["generate", "--model", m, "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--quiet"],
        "chat": lambda m: ["chat", "--model", m, "--prompt", "hi", "--max-new-tokens", "2", "--quiet"],
        "eval": lambda m: ["eval", "--model", m, "--data", "W/g/qa.jsonl", "--max-new-tokens", "2", "--quiet"],
        "merge": lambda m: ["merge", "--model", m, "--adapter", GA, "--out", "O/m", "--quiet"],
        "export": lambda m: ["export", m, "--out", "O/e", "--formats", "safetensors", "--quiet"],
        "import": lambda m: ["import", m, "--out", "O/i", "--quiet"],
        "prepare-data": lambda m: ["prepare-data", "W/corpus", "--out", "O/d", "--model", m, "--quiet"],
    }
    for verb, argv in uses.items():
        for name, needle in BAD_GGUF.items():
            yield f"gguf-{verb}-{name}", argv(f"W/g/{name}.gguf"), needle
    # an adapter trained on model.gguf, used with model-q8.gguf: refused naming both files
    both = ("model.gguf", "model-q8.gguf")
    yield "gguf-generate-other-base", ["generate", "--model", GQ, "--adapter", GA, "--prompt-ids", "1,2"], both
    yield (
        "gguf-chat-other-base",
        ["chat", "--model", GQ, "--adapter", GA, "--prompt", "hi", "--max-new-tokens", "2"],
        both,
    )
    yield "gguf-eval-other-base", ["eval", "--model", GQ, "--adapter", GA, "--data", "W/g/qa.jsonl", "--quiet"], both
    yield "gguf-merge-other-base", ["merge", "--model", GQ, "--adapter", GA, "--out", "O/m", "--quiet"], both
    yield "gguf-export-other-base", ["export", GQ, "--adapter", GA, "--out", "O/e", "--formats", "gguf-lora"], both
    yield (
        "gguf-export-other-base-store",
        ["export", S, "--adapter", GA, "--out", "O/e", "--formats", "gguf-lora"],
        (
            "model.gguf",
            "store",
        ),
    )
    for name, module in (("head-adapter", "lm_head"), ("embed-adapter", "embed_tokens")):
        argv = ["export", G, "--adapter", f"W/g/{name}", "--out", "O/e", "--formats", "gguf-lora", "--quiet"]
        yield f"gguf-lora-{name}", argv, module
    changed = "W/g/changed.gguf"
    yield "gguf-train-changed", uses["train"](changed), ("changed.gguf", "checksum")
    yield "gguf-generate-changed", uses["generate"](changed), ("changed.gguf", "checksum")
    yield "gguf-chat-changed", uses["chat"](changed), ("changed.gguf", "checksum")
    yield "gguf-train-full-quantized", [*uses["train"](GQ), "mode=full"], "quantized GGUF"
    yield (
        "gguf-merge-out-is-the-gguf",
        ["merge", "--model", G, "--adapter", GA, "--out", G, "--quiet"],
        ("--out", "model.gguf"),
    )
    yield (
        "gguf-merge-out-is-the-gguf-force",
        ["merge", "--model", G, "--adapter", GA, "--out", G, "--force"],
        ("--out", "model.gguf"),
    )
    yield (
        "gguf-export-out-is-the-gguf",
        ["export", G, "--out", G, "--formats", "safetensors", "--quiet"],
        ("--out", "model.gguf"),
    )
    yield (
        "gguf-export-lora-out-is-the-gguf",
        ["export", G, "--adapter", GA, "--out", G, "--formats", "gguf-lora"],
        ("--out", "model.gguf"),
    )
    yield "gguf-import-out-is-the-gguf", ["import", G, "--out", G, "--quiet"], ("--out", "model.gguf")
    yield "gguf-import-out-is-the-gguf-force", ["import", G, "--out", G, "--force", "--quiet"], ("--out", "model.gguf")
    yield (
        "gguf-train-out-is-the-gguf",
        ["train", "--model", G, "--data", D, "--out", G, *BUDGET, "--no-guard"],
        ("--out", "model.gguf"),
    )


CASES = [
    *_store_cases(), *_adapter_cases(), *_data_cases(), *_config_cases(), *_option_cases(), *_gguf_cases(),
]  # fmt: skip


def _argv(argv: list[str], world: Path, out: Path) -> list[str]:
    def fill(a: str) -> str:
        if a.startswith("W/"):
            return str(world / a[2:])
        if a.startswith("O/"):
            return str(out / a[2:])
        if a.startswith("configs/"):
            return str(ROOT / a)
        return a

    return [fill(a) for a in argv]


def _error_lines(err: str) -> list[str]:
    """stderr without progress-bar redraws."""
    lines = err.replace("\r", "\n").splitlines()
    return [ln for ln in lines if ln.strip() and not any(m in ln for m in TQDM_MARKS)]


@pytest.mark.parametrize("case,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, tmp_path, capsys, monkeypatch, case, argv, needle):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    before = _checksums(world)
    args = _argv(argv, world, tmp_path)
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse
        code = e.code
    except BaseException as e:
        RESULTS["traceback"] += 1
        raise AssertionError(f"{case}: traceback ({type(e).__name__}: {e})") from e
    _, err = capsys.readouterr()
    lines = _error_lines(err)
    damaged = _checksums(world) != before
    RESULTS["cases"] += 1
    RESULTS["accepted"] += code == 0
    RESULTS["damage"] += damaged
    ok = code == 2 and len(lines) == 1 and "Traceback" not in err and not damaged
    needles = (needle,) if isinstance(needle, str) else needle or ()
    ok = ok and all(n.lower() in lines[-1].lower() for n in needles)
    RESULTS["clean"] += ok
    assert not damaged, f"{case}: an input changed"
    assert code == 2, f"{case}: exit {code}, stderr {err[-800:]!r}"
    assert len(lines) == 1, f"{case}: {len(lines)} lines on stderr: {lines}"
    for n in needles:
        assert n.lower() in lines[-1].lower(), (n, lines[-1])


SUBPROCESS_SAMPLE = ["train-index-malformed", "merge-adapter-r-zero", "init-yaml-eps-nan", "plan---seq-len=-5",
                     "guard-run-a-file", "prepare-jsonl-without-text", "generate-shard-truncated",
                     "gguf-train-cut-data", "gguf-generate-other-base", "gguf-train-changed"]  # fmt: skip


@pytest.mark.parametrize("case", SUBPROCESS_SAMPLE)
def test_battery_through_the_real_cli(world, tmp_path, case):
    """A sample of the table as real processes (allocator re-exec, imports, exit status)."""
    (argv,) = [c[1] for c in CASES if c[0] == case]
    before = _checksums(world)
    p = run_cli(*_argv(argv, world, tmp_path), env={k: v for k, v in os.environ.items() if k != "DISPLAY"})
    assert_user_error(p)
    assert len(_error_lines(p.stderr)) == 1, p.stderr
    assert _checksums(world) == before


def test_battery_counts():
    """Runs last in this file: the table's size and what it found (printed with -s)."""
    print(
        f"\nbad-input battery: {len(CASES)} cases, {RESULTS['cases']} ran to a status: {RESULTS['clean']} clean, "
        f"{RESULTS['traceback']} tracebacks, {RESULTS['accepted']} accepted, {RESULTS['damage']} damaged inputs"
    )
    assert len(CASES) >= 150
    assert len({c[0] for c in CASES}) == len(CASES)  # ids unique
