"""Every model family against its own transformers class: a tiny random model written by
transformers, imported with `odyssey import`, gives the same logits out of core (fp32), the same
LoRA gradients as transformers + peft in RAM, an adapter PEFT loads, and the store loads back in
transformers with the family's class. Refusals: a relabelled checkpoint, a config value that changes
the math and is not implemented, an unknown family, a missing shard."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from odyssey.adapters import adapter_skeleton, lora_parameters, read_adapter
from odyssey.engine import Engine
from odyssey.errors import OdysseyError
from odyssey.model import CausalLM, KVCache, rope_inv_freq
from odyssey.modelconfig import ModelConfig
from odyssey.store import Store
from odyssey.store.importer import import_hf
from tests.helpers_lora import lora_skeleton, poison_released_slots

BASE = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# family case -> (transformers class, config class, config keys); each exercises what differs
CASES = {
    # Llama 3 RoPE, projection biases, head_dim other than hidden / heads, tied (Llama 3.2)
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(
        head_dim=32, attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3, tie_word_embeddings=True)),
    "llama-linear": ("LlamaForCausalLM", "LlamaConfig", dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    # dynamic NTK rescales beyond max_position_embeddings: the test sequence goes past it
    "llama-dynamic": ("LlamaForCausalLM", "LlamaConfig", dict(
        max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=7)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=32, attention_bias=False)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=6, rope_theta=1e6, rope_local_base_freq=100.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], tie_word_embeddings=True)),
}  # fmt: skip
SEQ = 24  # longer than every sliding window and the dynamic RoPE's max_position_embeddings


def hf_model(case: str, **over):
    """A random model of the case's family, written by transformers' own class, fp32, with every
    norm and bias randomised (a zero bias or unit norm would hide a missing one)."""
    import transformers

    cls_name, cfg_name, keys = CASES[case]
    cfg = getattr(transformers, cfg_name)(**{**BASE, **keys, **over})
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("norm.weight"):
                p.normal_(0.0 if "gemma" in case else 1.0, 0.2)
            else:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """case -> (the transformers model, the store's path), made on first use."""
    made = {}

    def get(case: str):
        if case not in made:
            d = tmp_path_factory.mktemp(case)
            model = hf_model(case)
            model.save_pretrained(d / "src")
            import_hf(d / "src", d / "store", progress=False)
            made[case] = (model, d / "store")
        return made[case]

    return get


def ids_for(vocab: int, n: int = SEQ, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", ["llama3", "qwen2", "qwen3", "gemma3"])
def test_kept_layers_need_no_pin_in_every_family(imported, case, monkeypatch, tmp_path):
    """Every layer keeps its graph from forward to backward without being pinned, while the pager
    scribbles NaNs over each slot it releases: what autograd saves for the family's ops (biases
    on every projection, sliding windows, q/k norms, Gemma's (1 + w) and sandwich norms) holds no
    view of a slot, and the loss and LoRA gradients equal the full recompute's bit for bit (fp32),
    with odyssey's LoRA forward and with PEFT's own; likewise with every layer's saved tensors
    spilled to disk and read back for backward (spill.py)."""
    _, path = imported(case)
    store = Store.open(path)
    ids = ids_for(store.config.vocab_size, batch=1)
    L = store.config.num_hidden_layers

    def run(keep, fused, spill=0):
        skel = lora_skeleton(store, None, std=0.02)
        with Engine(
            store, compute_dtype="fp32", model=skel, keep=keep, lora_fused=fused, spill=spill, spill_dir=tmp_path
        ) as eng:
            if spill:
                eng._spill.min_bytes = 0  # tiny tensors: spill them all
            loss = eng.train_step(ids, ids)
            assert spill == 0 or eng.pass_stats(1.0).spill_bytes > 0
        return loss, {k: p.grad for k, p in lora_parameters(skel).items()}

    refs = {fused: run(0, fused) for fused in (True, False)}
    poisoned = poison_released_slots(monkeypatch)
    for fused, keep, spill in [(True, L, 0), (False, L, 0), (True, 0, L), (False, 1, L - 1)]:
        poisoned.clear()
        loss, grads = run(keep, fused, spill)
        assert loss == refs[fused][0], (fused, keep, spill)
        assert all(torch.equal(grads[k], refs[fused][1][k]) for k in grads) and len(grads) == 2 * 7 * 3
        assert 0 in poisoned


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(imported, case):
    """Out of core (paged, fp32) and in RAM, logits equal the family's transformers class; the
    store's config.json names the family, so transformers loads the store with that class."""
    import transformers

    model, store_dir = imported(case)
    ids = ids_for(BASE["vocab_size"])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    store = Store.open(store_dir)
    assert store.config.family.architecture == CASES[case][0]
    with Engine(store, compute_dtype="fp32") as eng:
        ours = eng.logits(ids)
    err = float((ours - ref).abs().max())
    print(f"\n{case}: out-of-core logits max abs diff {err:.2e}")
    assert err < 1e-4, err
    in_ram = CausalLM(store.config)
    in_ram.load_state_dict(store_state_dict(store), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(in_ram.eval()(ids), ref, atol=1e-4, rtol=1e-4)
    back = transformers.AutoModelForCausalLM.from_pretrained(store_dir, dtype=torch.float32).eval()
    assert type(back).__name__ == CASES[case][0]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


def store_state_dict(store: Store) -> dict:
    sd = {}
    for unit in store.units:
        sd.update(store.load_tensors(unit))
    return sd


@pytest.mark.parametrize("case", ["mistral", "qwen2", "gemma3"])
def test_cached_generation_equals_full_forward(imported, case):
    """With a KV cache (prompt, then one token at a time) the sliding-window mask gives the logits
    of a full forward at every position, past the window."""
    model, store_dir = imported(case)
    ids = ids_for(BASE["vocab_size"], batch=1)
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    with Engine(Store.open(store_dir), compute_dtype="fp32") as eng:
        cache = KVCache(eng.cfg.num_hidden_layers)
        got = [eng.logits(ids[:, :5], cache=cache)[0]]
        for t in range(5, SEQ):
            got.append(eng.logits(ids[:, t : t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama3", "mistral", "qwen2", "qwen3", "gemma3"])
def test_lora_gradients_equal_peft_and_adapter_loads(imported, case, tmp_path):
    """LoRA gradients out of core equal transformers + peft with the model in RAM (max relative
    error 1e-4); the saved adapter loads with PeftModel.from_pretrained on the family's class and
    gives the engine's logits."""
    import peft
    import transformers

    _, store_dir = imported(case)
    store = Store.open(store_dir)
    skel = lora_skeleton(store, tmp_path)
    ids, tgt = ids_for(BASE["vocab_size"]), ids_for(BASE["vocab_size"], seed=2)
    with Engine(store, compute_dtype="fp32", model=skel) as eng:
        loss = eng.train_step(ids, tgt)
    ours = {k: p.grad for k, p in lora_parameters(skel).items()}

    hf = transformers.AutoModelForCausalLM.from_pretrained(store_dir, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    logits = ref(input_ids=ids).logits
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    ref_loss.backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if "lora_" in n}
    assert set(theirs) == set(ours) and len(ours) == 2 * 7 * store.config.num_hidden_layers
    worst = max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()) for k in ours)
    print(f"\n{case}: loss {loss:.6f} vs peft {float(ref_loss.detach()):.6f}, max relative gradient error {worst:.2e}")
    assert abs(loss - float(ref_loss)) < 1e-5
    assert worst < 1e-4, worst

    adapter = read_adapter(tmp_path / "adapter")
    with Engine(store, compute_dtype="fp32", model=adapter_skeleton(store, adapter)) as eng:
        mine = eng.logits(ids)
    with torch.no_grad():
        torch.testing.assert_close(mine, ref.eval()(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        dict(LLAMA3, original_max_position_embeddings=8192),
    ],
)
@pytest.mark.parametrize("seq_len", [16, 200])
def test_rope_frequencies_equal_transformers(rope, seq_len):
    """Odyssey's RoPE frequencies are transformers' (`modeling_rope_utils`), for each type, within
    and beyond max_position_embeddings (64)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": 500000.0, **rope}
    cfg = transformers.LlamaConfig(**{**BASE, "rope_parameters": params})
    ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu", seq_len=seq_len)
    if rope["rope_type"] == "dynamic" and seq_len <= BASE["max_position_embeddings"]:
        ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu")  # HF keeps the original within the range
    ours = rope_inv_freq(16, 500000.0, rope, seq_len, BASE["max_position_embeddings"])
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# refusals: one line, nothing written


def _write(model, d):
    model.save_pretrained(d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _refused(src, out, match):
    with pytest.raises(OdysseyError, match=match) as e:
        import_hf(src, out, progress=False)
    assert "\n" not in str(e.value)
    assert not out.exists(), "a refused import wrote something"


@pytest.mark.parametrize("case,tensor", [("qwen2", r"[qkv]_proj\.bias"), ("qwen3", r"[qk]_norm\.weight")])
def test_relabelled_checkpoint_refused(tmp_path, case, tensor):
    """A Qwen2/Qwen3 checkpoint whose config says Llama would lose its biases / q-k norms: refused,
    naming the tensor."""
    src = _write(hf_model(case), tmp_path / "src")
    _edit_config(src, model_type="llama", architectures=["LlamaForCausalLM"])
    _refused(src, tmp_path / "out", rf"tensor model\.layers\.0\.self_attn\.{tensor}.* is not part of a llama")


@pytest.mark.parametrize(
    "case,change,match",
    [
        ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
        ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
        ("llama3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE type 'yarn'"),
        ("llama3", {"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
        ("llama3", {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}, "model_type 'phi3' .*not supported"),
        ("llama3", {"architectures": ["Qwen2ForCausalLM"]}, "does not match model_type 'llama'"),
        ("qwen2", {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "Gemma 2"),
    ],
)
def test_unsupported_config_refused(tmp_path, case, change, match):
    src = _write(hf_model(case), tmp_path / "src")
    _edit_config(src, **change)
    _refused(src, tmp_path / "out", match)


def test_missing_shard_refused(tmp_path):
    """A sharded source with a shard gone: one line naming it."""
    src = tmp_path / "src"
    hf_model("qwen3").save_pretrained(src, max_shard_size="100KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    _refused(src, tmp_path / "out", rf"shard {shards[1].name} listed in model.safetensors.index.json is missing")


def test_config_keys_kept(imported, tmp_path):
    """The store's config.json keeps the source's own keys, and `odyssey init` makes a family's
    model from an Odyssey YAML-style config."""
    _, store_dir = imported("gemma3")
    src = json.loads((store_dir / "config.json").read_text())
    assert src["architectures"] == ["Gemma3ForCausalLM"] and src["model_type"] == "gemma3_text"
    assert src["query_pre_attn_scalar"] == 24 and src["sliding_window"] == 6
    assert src["rope_parameters"]["sliding_attention"]["rope_theta"] == 100.0
    assert src["hidden_activation"] == "gelu_pytorch_tanh"
    cfg = ModelConfig.from_hf_dict(src)
    assert cfg.layer_types == CASES["gemma3"][2]["layer_types"] and cfg.rope_local_base_freq == 100.0
    shutil.rmtree(tmp_path, ignore_errors=True)


# the shapes of real checkpoints under configs/ (random init), with the real models' parameter counts
REAL_SHAPES = {
    "llama-3.2-1b": 1_235_814_400,
    "tinyllama-1.1b": 1_100_048_384,
    "smollm2-1.7b": 1_711_376_384,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen3-1.7b": 1_720_574_976,
    "gemma-3-1b": 999_885_952,
}


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_real_shapes_count_like_transformers(name):
    """configs/NAME.yaml has the real model's parameter count, and the family's transformers class
    built from the config Odyssey writes (on the meta device) has the same parameters, by name."""
    import transformers

    from odyssey.config import load_model_config
    from tests.conftest import ROOT

    cfg = load_model_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.num_parameters() == REAL_SHAPES[name]
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict("bfloat16"))
    with torch.device("meta"):
        model = getattr(transformers, cfg.family.architecture)(hf_cfg)
    theirs = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert theirs == cfg.all_shapes()


@pytest.mark.parametrize("case", ["llama3", "qwen2", "qwen3", "gemma3"])
def test_init_makes_every_family(tmp_path, case):
    """`odyssey init` of a family's config writes a store transformers loads with the family's class
    (norms the identity: one, or zero for Gemma's 1 + w), and the engine agrees with it."""
    import transformers

    from odyssey.store import init_store

    _, cfg_name, keys = CASES[case]
    cfg = ModelConfig.from_hf_dict(getattr(transformers, cfg_name)(**{**BASE, **keys}).to_dict())
    init_store(cfg, tmp_path / "s", dtype="f32", seed=2, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    assert type(hf).__name__ == CASES[case][0]
    ids = ids_for(BASE["vocab_size"])
    with torch.no_grad(), Engine(Store.open(tmp_path / "s"), compute_dtype="fp32") as eng:
        torch.testing.assert_close(eng.logits(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_import_cli_refusal_is_one_line(tmp_path):
    """As a user sees it: `odyssey import` of a relabelled Qwen2 checkpoint exits 2 with one line
    naming a tensor it would drop; the source is untouched and nothing is written."""
    from tests.conftest import assert_user_error, run_cli

    src = _write(hf_model("qwen2"), tmp_path / "src")
    _edit_config(src, model_type="llama", architectures=["LlamaForCausalLM"])
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    proc = run_cli("import", src, "--out", tmp_path / "out")
    assert_user_error(proc, "proj.bias", "is not part of a llama")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before
