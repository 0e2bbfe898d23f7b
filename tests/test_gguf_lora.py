"""`odyssey export --adapter RUN/adapter --formats gguf-lora`: a PEFT adapter as a llama.cpp LoRA
adapter GGUF, read back with gguf.GGUFReader (keys, types, names, shapes, values: lora_b of q/k
carries llama.cpp's row permutation for the llama architecture, and un-permuting it gives PEFT's
tensor exactly); refusals (one line, exit 2, nothing written). llama.cpp itself runs base + adapter
against the merged model in the slow test at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_cli, tiny_config
from helpers_lora import lora_skeleton

from odyssey.adapters import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from odyssey.errors import OdysseyError
from odyssey.export import export_model
from odyssey.export.gguf_layout import unpermute_qk
from odyssey.store import Store, init_store
from tests.test_llamacpp import llama_logits

Q = gguf.GGMLQuantizationType
PROJ = {  # HF module in model.layers.N. -> llama.cpp tensor in blk.N.
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def make_base(directory: Path, seed: int = 1, **kw) -> Path:
    init_store(tiny_config(**kw), directory, dtype="f32", seed=seed, progress=False)
    return directory


def make_adapter(store_dir: Path, out: Path) -> Path:
    """r 4, alpha 8, every B non-zero (tests/helpers_lora.py); saved as out/adapter."""
    lora_skeleton(Store.open(store_dir), out)
    return out / "adapter"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(base store, adapter) for a tiny Llama: 2 layers, hidden 64, 4 query / 2 KV heads."""
    d = tmp_path_factory.mktemp("gguf-lora")
    base = make_base(d / "store")
    return base, make_adapter(base, d)


def fields(path: Path) -> tuple[dict, dict]:
    """({key: (value, GGUFValueType)}, {tensor name: ReaderTensor}) of a GGUF file."""
    r = gguf.GGUFReader(path)
    kv = {k: (f.contents(), f.types[0]) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return kv, {t.name: t for t in r.tensors}


def export_lora(base, adapter, out, **kw) -> Path:
    s = export_model(base, out, "gguf-lora", adapter=adapter, progress=False, **kw)
    (r,) = s["formats"]
    return Path(r["path"])


def test_llama_adapter_gguf_structure_and_values(llama, tmp_path):
    base, adapter_dir = llama
    path = export_lora(base, adapter_dir, tmp_path / "out")
    assert path == tmp_path / "out" / "adapter-f32.gguf"  # f32 by default for adapters
    kv, tensors = fields(path)
    V = gguf.GGUFValueType
    assert kv["general.type"] == ("adapter", V.STRING)
    assert kv["general.architecture"] == ("llama", V.STRING)
    assert kv["adapter.type"] == ("lora", V.STRING)
    assert kv["adapter.lora.alpha"] == (8.0, V.FLOAT32)

    cfg = Store.open(base).config
    adapter = read_adapter(adapter_dir)
    L = cfg.num_hidden_layers
    want = {f"blk.{i}.{name}.weight.lora_{ab}" for i in range(L) for name in PROJ.values() for ab in "ab"}
    assert set(tensors) == want and len(tensors) == 2 * 7 * L
    permuted = 0
    for i in range(L):
        for hf, name in PROJ.items():
            A, B = adapter.pairs[f"model.layers.{i}.{hf}"]  # (r, in), (out, r) fp32
            ta, tb = tensors[f"blk.{i}.{name}.weight.lora_a"], tensors[f"blk.{i}.{name}.weight.lora_b"]
            assert ta.tensor_type == tb.tensor_type == Q.F32
            # ggml ne order: lora_a [in, r] (ne[0] = the base's in), lora_b [r, out] (ne[1] = its out)
            assert list(ta.shape) == [A.shape[1], A.shape[0]] and list(tb.shape) == [B.shape[1], B.shape[0]]
            a, b = np.asarray(ta.data), np.asarray(tb.data)
            assert a.shape == tuple(A.shape) and b.shape == tuple(B.shape)
            np.testing.assert_array_equal(a, A.numpy())
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(name)
            if heads:  # llama.cpp's row order for RoPE on adjacent pairs, as the base export's q/k
                assert not np.array_equal(b, B.numpy())
                np.testing.assert_array_equal(unpermute_qk(b, heads), B.numpy())
                permuted += 1
            else:
                np.testing.assert_array_equal(b, B.numpy())
    assert permuted == 2 * L


def test_f16_and_the_export_record(llama, tmp_path):
    base, adapter_dir = llama
    out = tmp_path / "out"
    path = export_lora(base, adapter_dir, out, gguf_type="f16")
    assert path.name == "adapter-f16.gguf"
    kv, tensors = fields(path)
    A, _ = read_adapter(adapter_dir).pairs["model.layers.1.mlp.down_proj"]
    t = tensors["blk.1.ffn_down.weight.lora_a"]
    assert t.tensor_type == Q.F16
    np.testing.assert_array_equal(np.asarray(t.data), A.numpy().astype(np.float16))
    # the same export again keeps the finished file (the export record), as for the other formats
    s = export_model(base, out, "gguf-lora", gguf_type="f16", adapter=adapter_dir, progress=False)
    assert s["formats"][0]["kept"] and s["formats"][0]["format"] == "gguf-lora f16"


def test_qwen2_pairs_go_as_they_are(tmp_path):
    """qwen2 rotates halves as HF does: no permutation, general.architecture qwen2."""
    base = make_base(tmp_path / "store", model_type="qwen2")
    adapter_dir = make_adapter(base, tmp_path)
    kv, tensors = fields(export_lora(base, adapter_dir, tmp_path / "out"))
    assert kv["general.architecture"][0] == "qwen2"
    _, B = read_adapter(adapter_dir).pairs["model.layers.0.self_attn.q_proj"]
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data), B.numpy())


def edit_config(adapter_dir: Path, dst: Path, **changes) -> Path:
    """A copy of the adapter with adapter_config.json changed (a value None: the key removed)."""
    shutil.copytree(adapter_dir, dst)
    cfg = json.loads((dst / CONFIG_NAME).read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / CONFIG_NAME).write_text(json.dumps(cfg))
    return dst


def test_rslora_scale_is_kept(llama, tmp_path):
    base, adapter_dir = llama
    rs = edit_config(adapter_dir, tmp_path / "rs", use_rslora=True)
    kv, _ = fields(export_lora(base, rs, tmp_path / "out"))
    # llama.cpp scales by alpha / r: alpha = (8 / sqrt(4)) * 4 keeps rsLoRA's 8 / sqrt(4)
    assert kv["adapter.lora.alpha"][0] == pytest.approx(16.0)


def head_adapter(adapter_dir: Path, dst: Path) -> Path:
    """The adapter with LoRA on lm_head too (hidden 64 -> vocab 256)."""
    from safetensors.torch import load_file, save_file

    dst = edit_config(adapter_dir, dst, target_modules=[*read_adapter(adapter_dir).targets, "lm_head"])
    t = load_file(str(dst / WEIGHTS_NAME))
    t["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, 64)
    t["base_model.model.lm_head.lora_B.weight"] = torch.randn(256, 4)
    save_file(t, str(dst / WEIGHTS_NAME))
    return dst


@pytest.mark.parametrize(
    "case,match",
    [
        ("no-alpha", r"has no lora_alpha: a GGUF adapter states its scale"),
        ("no-r", r"has no r: a GGUF adapter states its scale"),
        ("head", r"targets lm_head; a GGUF LoRA adapter here carries the decoder projections"),
        ("embed", r"targets embed_tokens"),
        ("dora", r"DoRA adapter, which llama.cpp cannot apply"),
        ("q8_0", r"--gguf-type for --formats gguf-lora must be f32 or f16"),
        ("mixed", r"--formats gguf-lora goes alone"),
        ("no-adapter", r"--formats gguf-lora exports an adapter: pass --adapter"),
        ("other-base", r"was trained on .* not on .*; use it with its own base"),
        ("dynamic-rope", r"cannot export GGUF: llama.cpp's llama architecture has no dynamic RoPE"),
    ],
)
def test_refusals_write_nothing(llama, tmp_path, case, match):
    base, adapter_dir = llama
    kw = {"formats": "gguf-lora", "adapter": adapter_dir}
    if case == "no-alpha":
        kw["adapter"] = edit_config(adapter_dir, tmp_path / "a", lora_alpha=None)
    elif case == "no-r":
        kw["adapter"] = edit_config(adapter_dir, tmp_path / "a", r=None)
    elif case == "head":
        kw["adapter"] = head_adapter(adapter_dir, tmp_path / "a")
    elif case == "embed":
        kw["adapter"] = edit_config(adapter_dir, tmp_path / "a", target_modules=["q_proj", "embed_tokens"])
    elif case == "dora":
        kw["adapter"] = edit_config(adapter_dir, tmp_path / "a", use_dora=True)
    elif case == "q8_0":
        kw["gguf_type"] = "q8_0"
    elif case == "mixed":
        kw["formats"] = "gguf,gguf-lora"
    elif case == "no-adapter":
        kw["adapter"] = None
    elif case == "other-base":
        base = make_base(tmp_path / "other", seed=2)  # the same shapes, other weights
    elif case == "dynamic-rope":
        base = make_base(tmp_path / "dyn", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
        kw["adapter"] = make_adapter(base, tmp_path)
    before = sorted(p.name for p in Path(kw["adapter"] or adapter_dir).iterdir())
    with pytest.raises(OdysseyError, match=match) as e:
        export_model(base, tmp_path / "out", progress=False, **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in Path(kw["adapter"] or adapter_dir).iterdir()) == before


def test_cli_exports_and_refuses_in_one_line(llama, tmp_path):
    base, adapter_dir = llama
    p = run_cli("export", "--model", base, "--adapter", adapter_dir, "--formats", "gguf-lora", "--out", tmp_path / "o")
    assert p.returncode == 0, p.stderr
    assert "gguf-lora f32" in p.stdout and (tmp_path / "o" / "adapter-f32.gguf").is_file()
    bad = edit_config(adapter_dir, tmp_path / "bad", lora_alpha=None)
    p = run_cli("export", base, "--adapter", bad, "--formats", "gguf-lora", "--out", tmp_path / "o2", "--quiet")
    assert_user_error(p, "has no lora_alpha")
    assert not (tmp_path / "o2").exists()


# --------------------------------------------------------------------------------------------
# llama.cpp: base GGUF + adapter GGUF == merged GGUF (slow: llama-cpp-python, `make test-slow`)

LLAMA_CPP_POSITIONS = 80


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 480-token byte-level BPE tokenizer (the GGUF export needs one; the prompt is token ids)."""
    from conftest import ROOT

    from odyssey.data import prepare_data

    out = tmp_path_factory.mktemp("gguf-lora-data") / "data"
    prepare_data([ROOT / "data" / "sample" / "stories_en.txt"], out, vocab_size=480, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_cpp_base_plus_adapter_equals_the_merged_model(tmp_path, tokenizer_dir, family, monkeypatch):
    """A small base (2 layers, hidden 256, head_dim 64, GQA 4/2, vocab 512) exported to an f32
    GGUF, plus this adapter (r 4, alpha 8, B ~ N(0, 0.3) so that it moves the logits), loaded in
    llama.cpp, gives the logits of `odyssey merge` exported to an f32 GGUF, at 80 positions: max
    abs diff <= 1e-3, argmax 100%; and the engine's logits of base + adapter. For llama, the same
    adapter written without the Q/K permutation on lora_b is far off (the control: position 0
    agrees, later ones drift)."""
    from odyssey.adapters import adapter_skeleton
    from odyssey.engine import Engine
    from odyssey.export.gguf import write_gguf
    from odyssey.merge import merge
    from odyssey.tokenizer import copy_tokenizer

    cfg = tiny_config(
        model_type=family,
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.08,
    )
    init_store(cfg, tmp_path / "base", dtype="f32", seed=3, progress=False)
    copy_tokenizer(tokenizer_dir, tmp_path / "base")
    store = Store.open(tmp_path / "base")
    lora_skeleton(store, tmp_path, std=0.3)
    adapter_dir = tmp_path / "adapter"
    write_gguf(store, tmp_path / "base.gguf", "f32", progress=False)
    lora = export_lora(tmp_path / "base", adapter_dir, tmp_path / "lora")
    merge(tmp_path / "base", adapter_dir, tmp_path / "merged", progress=False)
    write_gguf(Store.open(tmp_path / "merged"), tmp_path / "merged.gguf", "f32", progress=False)

    ids = torch.randint(3, 480, (LLAMA_CPP_POSITIONS,), generator=torch.Generator().manual_seed(7)).tolist()
    merged = llama_logits(tmp_path / "merged.gguf", ids)
    got = llama_logits(tmp_path / "base.gguf", ids, lora=lora)
    plain = llama_logits(tmp_path / "base.gguf", ids)
    with Engine(store, compute_dtype="fp32", model=adapter_skeleton(store, read_adapter(adapter_dir))) as eng:
        engine = eng.logits(torch.tensor([ids])).numpy()[0]
    assert got.shape == merged.shape == (LLAMA_CPP_POSITIONS, cfg.vocab_size)
    diff = float(np.abs(got - merged).max())
    agree = float((got.argmax(axis=1) == merged.argmax(axis=1)).mean())
    moved = float(np.abs(plain - merged).max())  # what the adapter changes: the check must see it
    moved_argmax = float((plain.argmax(axis=1) != merged.argmax(axis=1)).mean())
    vs_engine = float(np.abs(got - engine).max())
    print(
        f"\n{family}: base + adapter vs merged, f32 GGUFs, {LLAMA_CPP_POSITIONS} positions: max abs diff "
        f"{diff:.2e}, argmax agrees at {agree:.0%}; vs the engine (base + adapter) {vs_engine:.2e}; the adapter "
        f"moves the logits by up to {moved:.2f} and the argmax at {moved_argmax:.0%} of positions "
        f"(logit std {merged.std():.2f})"
    )
    assert moved > 0.5 and moved_argmax > 0.1
    assert diff <= 1e-3
    assert agree == 1.0
    assert vs_engine <= 1e-3
    if family == "llama":  # the control: lora_b of q/k in HF's row order
        import odyssey.export.gguf_layout as layout

        monkeypatch.setattr(layout, "permute_qk", lambda w, n_head: w)
        unpermuted = export_lora(tmp_path / "base", adapter_dir, tmp_path / "lora-unpermuted")
        off = np.abs(llama_logits(tmp_path / "base.gguf", ids, lora=unpermuted) - merged).max(axis=1)
        print(f"llama without the permutation on lora_b: position 0 {off[0]:.2e}, max {off.max():.2f}")
        assert off[0] <= 1e-3 and off.max() > 0.1


@pytest.mark.slow
def test_llama_cpp_runs_the_adapter_on_the_q8_0_gguf_it_was_trained_on(tmp_path, tokenizer_dir):
    """The whole user path on the very file: a small llama store (2 layers, hidden 256, GQA 4/2,
    vocab 512; tests/test_llamacpp.py's "peaked" model, whose positions have clear winners) exported
    to a Q8_0 GGUF; `odyssey prepare-data --model THAT.gguf` and `odyssey train` (LoRA, 8 steps at lr
    2e-2) on that GGUF; `odyssey export --model THAT.gguf --adapter ... --formats gguf-lora`.
    llama.cpp with the Q8_0 file + the adapter gives the argmax of the merged model (`odyssey merge`
    of the GGUF + adapter, exported to an f32 GGUF) at >= 98% of 192 positions; the Q8_0 file
    without the adapter agrees far less (the adapter matters).
    Measured: 100% (max abs diff 0.23, logit std 1.0); without the adapter 4% (max abs diff 13.8).
    The difference left is llama.cpp's Q8_0 matmul, which quantizes the activations to 8 bits too
    (the same size without any adapter: Q8_0 file vs its dequantized f32 export, max 0.11-0.13). On a
    random-init base (no clear winners) the argmax agreed at 96.9%: the 6 flips had top-2 gaps under
    0.034, ties within that noise, so the base here is the peaked one."""
    from conftest import ROOT

    from odyssey.export.gguf import write_gguf
    from odyssey.tokenizer import copy_tokenizer
    from tests.test_llamacpp import write_peaked

    write_peaked(tmp_path / "base", seed=5)
    copy_tokenizer(tokenizer_dir, tmp_path / "base")
    q8 = tmp_path / "model-q8_0.gguf"
    write_gguf(Store.open(tmp_path / "base"), q8, "q8_0", progress=False)
    q8_bytes = q8.read_bytes()

    def odyssey(*args):
        p = run_cli(*args)
        assert p.returncode == 0, p.stderr
        return p

    corpus = ROOT / "data" / "sample" / "stories_en.txt"
    odyssey("prepare-data", corpus, "--out", tmp_path / "data", "--model", q8, "--quiet")
    run = tmp_path / "run"
    odyssey(
        "train", "--model", q8, "--data", tmp_path / "data", "--out", run, "--ram-budget", "1GiB", "--steps", "8",
        "seq_len=64", "lr=2e-2", "warmup_steps=0", "eval_every=0", "compute_dtype=fp32", "--quiet", "--no-guard",
    )  # fmt: skip
    odyssey("export", "--model", q8, "--adapter", run / "adapter", "--formats", "gguf-lora", "--out", tmp_path / "lora")
    (lora,) = (tmp_path / "lora").glob("*.gguf")
    odyssey("merge", "--model", q8, "--adapter", run / "adapter", "--out", tmp_path / "merged", "--dtype", "f32")
    write_gguf(Store.open(tmp_path / "merged"), tmp_path / "merged.gguf", "f32", progress=False)
    assert q8.read_bytes() == q8_bytes  # the file trained on is left as it was

    g = torch.Generator().manual_seed(11)
    got, merged, plain = [], [], []
    for _ in range(3):  # 3 prompts of 64 tokens: 192 positions
        ids = torch.randint(3, 480, (64,), generator=g).tolist()
        got.append(llama_logits(q8, ids, lora=lora))
        merged.append(llama_logits(tmp_path / "merged.gguf", ids))
        plain.append(llama_logits(q8, ids))
    got, merged, plain = np.concatenate(got), np.concatenate(merged), np.concatenate(plain)
    agree = float((got.argmax(axis=1) == merged.argmax(axis=1)).mean())
    plain_agree = float((plain.argmax(axis=1) == merged.argmax(axis=1)).mean())
    diff = float(np.abs(got - merged).max())
    moved = float(np.abs(plain - merged).max())
    print(
        f"\nQ8_0 GGUF trained on ({len(got)} positions): llama.cpp Q8_0 + adapter vs the merged f32 GGUF: argmax "
        f"agrees at {agree:.1%}, max abs diff {diff:.3f} (logit std {merged.std():.2f}); Q8_0 without the adapter: "
        f"argmax agrees at {plain_agree:.1%}, max abs diff {moved:.2f}"
    )
    assert agree >= 0.98
    assert plain_agree < agree - 0.1 and moved > 5 * diff
