"""Merge, adapters and every export, for every model family (tiny random models written by each
family's own transformers class, as in tests/test_families.py):
- `merge` gives a store transformers loads with the family's class, whose logits equal transformers
  + peft `merge_and_unload()`; biases and norms are copied untouched; config.json is the base's;
- the safetensors export (transformers, the family's class) and the `.pth` export (torch.load into
  that class) reload with those logits;
- the adapter `odyssey train` writes loads with `PeftModel.from_pretrained`, every LoRA weight in
  place, and `AutoPeftModelForCausalLM` finds the base from adapter_config.json;
- the GGUF uses llama.cpp's architecture and tensor layout for the family (read back with
  gguf.GGUFReader: names as gguf-py's own map gives them, shapes, values after the Q/K permutation
  or Gemma's 1 + w, the keys of sliding windows and RoPE); what llama.cpp cannot compute is
  refused with one line and nothing written. llama.cpp itself runs them in tests/test_llamacpp.py."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_cli
from test_families import CASES, hf_model, ids_for
from test_merge import make_adapter

from odyssey.adapters import adapter_skeleton, read_adapter
from odyssey.engine import Engine
from odyssey.errors import OdysseyError
from odyssey.export import export_model
from odyssey.export.gguf import gguf_bytes, write_gguf
from odyssey.export.gguf_layout import ROPE_FREQS, gguf_name, unpermute_qk
from odyssey.merge import MergedSource, merge
from odyssey.store import Store
from odyssey.store.importer import import_hf
from odyssey.tokenizer import copy_tokenizer

FAMILIES = ["llama3", "mistral", "qwen2", "qwen3", "gemma3"]
VOCAB = 512  # train_dir's tokenizer has 512 tokens (GGUF export needs one, `train` its data)
# llama.cpp scales Gemma 3 queries by head_dim ** -0.5 (tests/test_families.py's gemma3 uses 24)
GGUF_SAFE = {"gemma3": dict(query_pre_attn_scalar=32)}
ARCH = {"llama3": "llama", "llama-linear": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ARCH["gemma3"] = "gemma3"
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def stores(tmp_path_factory, train_dir):
    """case -> (the transformers model, its imported store holding train_dir's tokenizer)."""
    made = {}

    def get(case: str, **over):
        key = (case, repr(sorted(over.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(case)
            model = hf_model(case, vocab_size=VOCAB, **{**GGUF_SAFE.get(case, {}), **over})
            model.save_pretrained(d / "src")
            import_hf(d / "src", d / "store", progress=False)
            copy_tokenizer(train_dir / "tok", d / "store")
            made[key] = (model, d / "store")
        return made[key]

    return get


def hf_class(case: str) -> str:
    return CASES[case][0]


def hf_logits(directory, ids, adapter=None, merge_lora=False) -> torch.Tensor:
    """Logits of the family's transformers class loaded from `directory` (+ a PEFT adapter)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merge_lora:
            model = model.merge_and_unload()
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def store_tensors(source) -> dict[str, torch.Tensor]:
    sd = {}
    for unit in source.units:
        sd.update(source.load_tensors(unit))
    return sd


# --------------------------------------------------------------------------------------------
# merge


@pytest.mark.parametrize("case", FAMILIES)
def test_merge_equals_peft_merge_and_unload(stores, case, tmp_path):
    import transformers

    _, store_dir = stores(case)
    adapter = make_adapter(store_dir, tmp_path / "adapter")
    merge(store_dir, adapter, tmp_path / "merged", progress=False)
    ids = ids_for(VOCAB)
    want = hf_logits(store_dir, ids, adapter, merge_lora=True)
    assert (want - hf_logits(store_dir, ids)).abs().max() > 1e-2  # the adapter changes the output

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(back).__name__ == hf_class(case)
    with torch.no_grad():
        got = back(input_ids=ids).logits
    err = float((got - want).abs().max())
    print(f"\n{case}: merged store vs peft merge_and_unload, max abs logit diff {err:.2e}")
    assert err < 1e-4
    with Engine(Store.open(tmp_path / "merged"), compute_dtype="fp32") as eng:
        torch.testing.assert_close(eng.logits(ids), want, atol=1e-4, rtol=1e-4)

    # config.json: the base's, the family's keys and the source's; only LoRA targets changed
    assert json.loads((tmp_path / "merged" / "config.json").read_text()) == json.loads(
        (store_dir / "config.json").read_text()
    )
    base, merged = store_tensors(Store.open(store_dir)), store_tensors(Store.open(tmp_path / "merged"))
    targets = {f"{m}.weight" for m in read_adapter(adapter).pairs}
    assert base.keys() == merged.keys() and targets < base.keys()
    for k in base:
        assert torch.equal(base[k], merged[k]) != (k in targets), k
    kept = {k.split(".", 3)[3] for k in base.keys() - targets if k.startswith("model.layers.")}
    family_extras = {
        "llama3": {"self_attn.q_proj.bias", "self_attn.o_proj.bias", "mlp.down_proj.bias"},
        "mistral": set(),
        "qwen2": {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"},
        "qwen3": {"self_attn.q_norm.weight", "self_attn.k_norm.weight"},
        "gemma3": {"self_attn.q_norm.weight", "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"},
    }[case]
    assert family_extras <= kept


# --------------------------------------------------------------------------------------------
# safetensors, pth (and gguf) with an adapter merged on the fly


@pytest.mark.parametrize("case", FAMILIES)
def test_every_export_reloads_with_merged_logits(stores, case, tmp_path):
    """One `export` per family, adapter merged on the fly: safetensors through the family's
    transformers class and the .pth loaded into that class give peft's merged logits; the GGUF
    holds the merged tensors in llama.cpp's layout."""
    import transformers

    _, store_dir = stores(case)
    adapter = make_adapter(store_dir, tmp_path / "adapter")
    out = tmp_path / "out"
    export_model(store_dir, out, "safetensors,pth,gguf", gguf_type="f32", adapter=adapter, progress=False)
    ids = ids_for(VOCAB)
    want = hf_logits(store_dir, ids, adapter, merge_lora=True)

    st = out / "safetensors"
    assert json.loads((st / "config.json").read_text()) == json.loads((store_dir / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(st, dtype=torch.float32).eval()
    assert type(model).__name__ == hf_class(case)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)

    sd = torch.load(out / "model.pth", mmap=True, weights_only=True)
    source = MergedSource(Store.open(store_dir), read_adapter(adapter))
    merged = store_tensors(source)
    assert list(sd) == list(Store.open(store_dir).config.all_shapes())
    assert all(torch.equal(sd[k], merged[k]) for k in merged)
    config = transformers.AutoConfig.from_pretrained(store_dir)
    fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or config.tie_word_embeddings)
    fresh.tie_weights()
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    err = float((got - want).abs().max())
    print(f"\n{case}: .pth in {type(fresh).__name__} vs peft merge_and_unload, max abs logit diff {err:.2e}")
    assert err < 1e-4

    check_gguf_tensors(out / "model-f32.gguf", source, case)


# --------------------------------------------------------------------------------------------
# GGUF: llama.cpp's architecture and tensor layout per family


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def check_gguf_tensors(path, source, case) -> None:
    """Every tensor of `source` under llama.cpp's name for the family (gguf-py's own map), with
    its shape, f32, and its values as llama.cpp's architecture wants them."""
    cfg = source.config
    arch = ARCH[case]
    r = gguf.GGUFReader(path)
    assert fields(r)["general.architecture"] == arch
    tensors = {t.name: t for t in r.tensors}
    want = store_tensors(source)
    extra = [ROPE_FREQS] if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "llama3" else []
    assert list(tensors) == extra + [gguf_name(n, cfg.family) for n in want]
    name_map = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for hf_name, w in want.items():
        name = gguf_name(hf_name, cfg.family)
        base, _, suffix = hf_name.rpartition(".")
        assert name_map.get_name(base) + "." + suffix == name, (hf_name, name)
        t = tensors[name]
        assert t.tensor_type == Q.F32 and tuple(int(s) for s in t.shape) == tuple(reversed(w.shape)), name
        got = np.asarray(t.data, dtype=np.float32).reshape(w.shape)
        w = w.float().numpy()
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            assert not np.array_equal(got, w), f"{name} was not permuted"
            got = unpermute_qk(got, heads)
        if case == "gemma3" and name.endswith("norm.weight"):
            w = w + np.float32(1.0)  # Gemma's (1 + w) as llama.cpp's plain scale
        np.testing.assert_array_equal(got, w, err_msg=name)


@pytest.mark.parametrize("case", [*FAMILIES, "llama-linear"])
def test_gguf_architecture_layout_and_keys(stores, case, tmp_path, capsys):
    model, store_dir = stores(case)
    store = Store.open(store_dir)
    cfg = store.config
    path = tmp_path / "m.gguf"
    write_gguf(store, path, "f32", progress=False)
    printed = capsys.readouterr().out
    check_gguf_tensors(path, store, case)
    f = fields(gguf.GGUFReader(path))
    arch = ARCH[case]
    keys = {k.removeprefix(arch + "."): v for k, v in f.items() if k.startswith(arch + ".")}
    assert keys["block_count"] == cfg.num_hidden_layers and keys["embedding_length"] == cfg.hidden_size
    assert keys["attention.key_length"] == keys["attention.value_length"] == cfg.head_dim
    assert keys["attention.head_count_kv"] == cfg.num_key_value_heads
    assert keys["rope.freq_base"] == pytest.approx(cfg.rope_theta)
    swa = {k: v for k, v in keys.items() if "sliding" in k or "swa" in k}
    if case == "gemma3":  # llama.cpp's iSWA: window, local base, the pattern (not its default 5:1)
        assert swa == {
            "attention.sliding_window": 6,
            "rope.freq_base_swa": pytest.approx(100.0),
            "attention.sliding_window_pattern": [True, False, True],
        }
        assert keys["context_length"] == cfg.max_position_embeddings
    else:
        assert swa == {}
    if case in ("mistral", "qwen2"):  # sliding layers where llama.cpp has none: exact within the window
        assert keys["context_length"] == cfg.sliding_window < cfg.max_position_embeddings
        assert f"has no sliding window: the GGUF's context length is the window, {cfg.sliding_window} tokens" in printed
    elif case != "gemma3":
        assert keys["context_length"] == cfg.max_position_embeddings and "note" not in printed
    if case == "llama-linear":
        assert (keys["rope.scaling.type"], keys["rope.scaling.factor"]) == ("linear", 4.0)
    else:
        assert "rope.scaling.type" not in keys
    if case == "llama3":  # rope_freqs: convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, by hand
        rope = cfg.rope_scaling
        old, lo, hi, factor = (rope[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                 "high_freq_factor", "factor"))  # fmt: skip
        want = []
        for i in range(0, cfg.head_dim, 2):
            wavelen = 2 * math.pi * cfg.rope_theta ** (i / cfg.head_dim)
            smooth = (old / wavelen - lo) / (hi - lo)
            want.append(
                1 if wavelen < old / hi else factor if wavelen > old / lo else 1 / ((1 - smooth) / factor + smooth)
            )
        assert {1, factor} < set(want)  # all three bands present
        t = next(t for t in gguf.GGUFReader(path).tensors if t.name == ROPE_FREQS)
        np.testing.assert_allclose(np.asarray(t.data), want, rtol=1e-6)
        # and transformers' Llama 3 frequencies are the default ones over those divisors
        rotary = model.model.rotary_emb
        plain = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim)
        torch.testing.assert_close(rotary.inv_freq.double(), plain / torch.tensor(want), rtol=1e-6, atol=0)


def test_gguf_of_a_bf16_gemma_stores_one_plus_w_in_f32(stores, tmp_path):
    """1 + w is formed in f32 from the bf16 weight (not rounded to bf16 first)."""
    _, store_dir = stores("gemma3")
    merge_dir = tmp_path / "bf16"
    adapter = make_adapter(store_dir, tmp_path / "adapter")
    merge(store_dir, adapter, merge_dir, dtype="bf16", progress=False)
    store = Store.open(merge_dir)
    write_gguf(store, tmp_path / "m.gguf", "bf16", progress=False)
    t = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.0.attn_q_norm.weight")
    w = store.load_tensors(0)["model.layers.0.self_attn.q_norm.weight"]
    assert w.dtype == torch.bfloat16 and t.tensor_type == Q.F32
    np.testing.assert_array_equal(np.asarray(t.data), w.float().numpy() + np.float32(1.0))
    assert not np.array_equal(np.asarray(t.data), (w + 1).float().numpy())  # bf16 rounding would show


# --- refusals: one line naming what llama.cpp cannot compute; nothing written ------------------


LLAMA3_ROPE = dict(rope_parameters=dict(CASES["llama3"][2]["rope_parameters"]))


@pytest.mark.parametrize(
    "case,over,match",
    [
        ("llama-dynamic", {}, r"llama.cpp's llama architecture has no dynamic RoPE"),
        ("qwen2", LLAMA3_ROPE, r"qwen2 architecture has no llama3 RoPE"),
        ("qwen3", dict(attention_bias=True), r"qwen3 architecture has no attn_output.bias \(qwen3 self_attn.o_proj"),
        ("gemma3", dict(query_pre_attn_scalar=24), r"gemma3 .*scales queries by head_dim = 32 \*\* -0.5.*= 24"),
        ("qwen2", dict(head_dim=32), r"qwen2 architecture needs heads x head_dim = hidden_size.*4 x 32 != 64"),
    ],
)
def test_what_llama_cpp_cannot_compute_is_refused(stores, case, over, match, tmp_path):
    _, store_dir = stores(case, **over)
    store = Store.open(store_dir)
    with pytest.raises(OdysseyError, match=match) as e:
        gguf_bytes(store, "f16")  # the export driver's check, before any format is written
    assert "\n" not in str(e.value) and "export --formats safetensors,pth instead" in str(e.value)
    with pytest.raises(OdysseyError, match=match):
        write_gguf(store, tmp_path / "m.gguf", progress=False)
    assert not list(tmp_path.iterdir())


def test_export_cli_refuses_before_writing_any_format(stores, tmp_path):
    _, store_dir = stores("llama-dynamic")
    p = run_cli("export", store_dir, "--out", tmp_path / "out", "--formats", "safetensors,gguf", "--quiet")
    assert_user_error(p, "cannot export GGUF", "no dynamic RoPE")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# the adapter `odyssey train` writes, in PEFT


@pytest.mark.parametrize("case", FAMILIES)
def test_trained_adapter_loads_in_peft(stores, case, tmp_path, train_dir):
    """`odyssey train` (2 steps, a large lr so the adapter matters) writes an adapter that
    PeftModel.from_pretrained loads onto the family's class with every LoRA weight in place and
    the engine's logits; adapter_config.json names the base so AutoPeftModelForCausalLM finds it."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    from odyssey.train import train

    _, store_dir = stores(case)
    run = tmp_path / "run"
    overrides = [
        "steps=2", "seq_len=16", "lr=0.05", "warmup_steps=0", "eval_every=0", "compute_dtype=fp32",
        "lora.r=4", "lora.alpha=8",
    ]  # fmt: skip
    assert train(str(run), model=str(store_dir), data=str(train_dir / "tok"), budget="1GiB",
                 overrides=overrides, guard=False, progress=False) == 0  # fmt: skip
    adapter_dir = run / "adapter"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(CASES_TARGETS)
    assert cfg["base_model_name_or_path"] == str(store_dir.resolve())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)

    import transformers

    ids = ids_for(VOCAB)
    hf = transformers.AutoModelForCausalLM.from_pretrained(store_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    adapter = read_adapter(adapter_dir)
    loaded = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(loaded) == 2 * len(adapter.pairs) == 2 * 7 * Store.open(store_dir).config.num_hidden_layers
    for module, (A, B) in adapter.pairs.items():
        assert torch.equal(loaded[f"base_model.model.{module}.lora_A.weight"], A)
        assert torch.equal(loaded[f"base_model.model.{module}.lora_B.weight"], B)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        plain = hf_logits(store_dir, ids)
    assert (theirs - plain).abs().max() > 1e-2  # training moved the adapter away from zero
    store = Store.open(store_dir)
    with Engine(store, compute_dtype="fp32", model=adapter_skeleton(store, adapter)) as eng:
        torch.testing.assert_close(eng.logits(ids), theirs, atol=1e-4, rtol=1e-4)
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32).eval()
    assert type(auto.get_base_model()).__name__ == hf_class(case)
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=ids).logits, theirs, atol=1e-5, rtol=1e-5)


CASES_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
