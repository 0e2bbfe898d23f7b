"""merge: adapters folded into the base equal base + adapter through the engine and through PEFT;
an adapter for another base, a full --out, too little disk are refused before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, cli_in_process, run_cli, tiny_config

from odyssey.adapters import adapter_skeleton, inject, read_adapter, save_adapter
from odyssey.config import LoraSettings
from odyssey.engine import Engine
from odyssey.merge import MergedSource, merge, merge_weight
from odyssey.model import LlamaForCausalLM
from odyssey.store import Store, init_store

IDS = torch.tensor([[3, 17, 250, 9, 42, 0, 128, 77, 5, 64, 31, 200]])  # (1, 12) token ids < vocab 256


def make_adapter(store_dir: Path, out: Path, seed: int = 0, r: int = 4, alpha: float = 8.0) -> Path:
    """A PEFT adapter for the store at `store_dir` with random, non-zero B (B is zero at init, which
    would make every merge test pass trivially)."""
    store = Store.open(store_dir)
    settings = LoraSettings(r=r, alpha=alpha)
    model = LlamaForCausalLM(store.config)
    inject(model, settings, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return save_adapter(model, settings, out, store)


def engine_logits(store_dir: Path, adapter_dir: Path | None = None) -> torch.Tensor:
    store = Store.open(store_dir)
    model = adapter_skeleton(store, read_adapter(adapter_dir)) if adapter_dir else None
    with Engine(store, compute_dtype="fp32", model=model) as eng:
        return eng.logits(IDS)


@pytest.fixture
def adapter(tmp_path, tiny_store):
    return make_adapter(tiny_store, tmp_path / "adapter")


def nothing_under(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


# --------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("tied", [False, True])
def test_merged_logits_equal_base_plus_adapter(tmp_path, tied):
    base = tmp_path / "base"
    init_store(tiny_config(tie_word_embeddings=tied), base, dtype="f32", seed=1, progress=False)
    (base / "tokenizer.json").write_text("{}")  # copied as is
    adapter = make_adapter(base, tmp_path / "adapter")
    s = merge(base, adapter, tmp_path / "merged", progress=False)

    merged = engine_logits(tmp_path / "merged")
    expected = engine_logits(base, adapter)
    plain = engine_logits(base)
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    assert Store.open(tmp_path / "merged").verify(progress=False) == []
    assert (tmp_path / "merged" / "tokenizer.json").read_text() == "{}"
    assert s["modules"] == 2 * 7 and s["bytes"] == Store.open(tmp_path / "merged").total_bytes()
    assert s["mb_s"] > 0 and s["peak_anon_bytes"] > 0


def test_merge_is_fp32_sum_cast_once(tmp_path):
    """bf16 store: W' = bf16(fp32(W) + scale * B @ A), one rounding; untargeted tensors unchanged."""
    base = tmp_path / "base"
    init_store(tiny_config(), base, dtype="bf16", seed=1, progress=False)
    adapter = read_adapter(make_adapter(base, tmp_path / "adapter"))
    store = Store.open(base)
    src = MergedSource(store, adapter)
    got, orig = src.load_tensors(1), store.load_tensors(1)
    A, B = adapter.pairs["model.layers.1.mlp.down_proj"]
    want = (orig["model.layers.1.mlp.down_proj.weight"].float() + adapter.scale * (B @ A)).bfloat16()
    assert got["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(got["model.layers.1.mlp.down_proj.weight"].float(), want.float(), atol=0, rtol=0)
    assert torch.equal(got["model.layers.1.input_layernorm.weight"], orig["model.layers.1.input_layernorm.weight"])
    assert not torch.equal(
        got["model.layers.1.self_attn.q_proj.weight"], orig["model.layers.1.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        src.load_tensors("embed")["model.embed_tokens.weight"], store.load_tensors("embed")["model.embed_tokens.weight"]
    )


def test_merge_to_f32_rounds_once(tmp_path):
    """`merge --dtype f32` of a bf16 base stores the fp32 sum, not a bf16-rounded one upcast."""
    base = tmp_path / "base"
    init_store(tiny_config(), base, dtype="bf16", seed=1, progress=False)
    adapter_dir = make_adapter(base, tmp_path / "adapter")
    merge(base, adapter_dir, tmp_path / "m32", dtype="f32", progress=False)
    adapter = read_adapter(adapter_dir)
    A, B = adapter.pairs["model.layers.0.self_attn.k_proj"]
    W = Store.open(base).load_tensors(0)["model.layers.0.self_attn.k_proj.weight"]
    got = Store.open(tmp_path / "m32").load_tensors(0)["model.layers.0.self_attn.k_proj.weight"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, W.float().addmm(B, A, alpha=adapter.scale), atol=0, rtol=0)


def test_merge_weight_formula():
    W = torch.randn(6, 5)
    A, B = torch.randn(2, 5), torch.randn(6, 2)
    torch.testing.assert_close(merge_weight(W, A, B, 0.5), W + 0.5 * B @ A)
    assert merge_weight(W.half(), A, B, 0.5).dtype == torch.float16


def test_peft_on_transformers_equals_merged(tmp_path, tiny_store, adapter):
    """The adapter loaded by PEFT on transformers' model of the base store gives the merged store's
    logits (the store is an HF checkpoint directory, the adapter a PEFT one)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM as HFLlama

    merge(tiny_store, adapter, tmp_path / "merged", progress=False)
    hf = HFLlama.from_pretrained(str(tiny_store), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(adapter)).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=IDS).logits
        plain = HFLlama.from_pretrained(str(tiny_store), dtype=torch.float32).eval()(input_ids=IDS).logits
    assert (peft_logits - plain).abs().max() > 1e-2  # PEFT really applied the adapter
    torch.testing.assert_close(engine_logits(tmp_path / "merged"), peft_logits, atol=1e-4, rtol=1e-4)


def test_merge_cli_prints_figures(tmp_path, tiny_store, adapter):
    p = run_cli(
        "merge", "--model", tiny_store, "--adapter", adapter, "--out", tmp_path / "m", "--dtype", "bf16", "--quiet"
    )
    assert p.returncode == 0, p.stderr
    assert "MB/s" in p.stdout and "14 modules in 2 layers" in p.stdout and "bf16" in p.stdout
    assert Store.open(tmp_path / "m").dtype == "bf16"


# --------------------------------------------------------------------------------------------
# refusals: one line, exit 2, nothing written


def test_adapter_from_same_shape_other_weights_refused(tmp_path, tiny_store, tiny_cfg):
    other = tmp_path / "other"
    init_store(tiny_cfg, other, dtype="f32", seed=2, progress=False)
    adapter = make_adapter(other, tmp_path / "adapter-other")
    out = tmp_path / "merged"
    assert_user_error(
        cli_in_process("merge", "--model", tiny_store, "--adapter", adapter, "--out", out),
        "same shape",
        str(other),
        "--model",
    )
    assert not out.exists()


def test_adapter_from_other_shape_refused(tmp_path, tiny_store):
    other = tmp_path / "other"
    init_store(tiny_config(hidden_size=32, intermediate_size=96), other, dtype="f32", seed=1, progress=False)
    adapter = make_adapter(other, tmp_path / "adapter-other")
    out = tmp_path / "merged"
    assert_user_error(
        cli_in_process("merge", "--model", tiny_store, "--adapter", adapter, "--out", out), "another shape", "--model"
    )
    assert not out.exists()


def test_foreign_adapter_without_record_checked_by_shape(tmp_path, tiny_store):
    """An adapter made by another tool has no odyssey_adapter.json: its shapes are still checked."""
    other = tmp_path / "other"
    init_store(tiny_config(hidden_size=32, intermediate_size=96), other, dtype="f32", seed=1, progress=False)
    adapter = make_adapter(other, tmp_path / "adapter-other")
    (adapter / "odyssey_adapter.json").unlink()
    out = tmp_path / "merged"
    assert_user_error(
        cli_in_process("merge", "--model", tiny_store, "--adapter", adapter, "--out", out), "does not fit"
    )
    assert not out.exists()


def test_non_empty_out_and_in_place_refused(tmp_path, tiny_store, adapter):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_user_error(
        cli_in_process("merge", "--model", tiny_store, "--adapter", adapter, "--out", out), "not empty", "--force"
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    before = {p.name: p.stat().st_mtime_ns for p in tiny_store.iterdir()}
    assert_user_error(
        cli_in_process("merge", "--model", tiny_store, "--adapter", adapter, "--out", tiny_store, "--force"),
        "is the input base model",
    )
    assert {p.name: p.stat().st_mtime_ns for p in tiny_store.iterdir()} == before


def test_not_enough_disk_refused(tmp_path, tiny_store, adapter, monkeypatch, capsys):
    from odyssey import cli
    from odyssey.store import writer

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    out = tmp_path / "merged"
    rc = cli.main(["merge", "--model", str(tiny_store), "--adapter", str(adapter), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not enough free disk" in err[0], err
    assert not out.exists()


def test_not_an_adapter_refused(tmp_path, tiny_store):
    out = tmp_path / "merged"
    assert_user_error(
        cli_in_process("merge", "--model", tiny_store, "--adapter", tmp_path, "--out", out), "not an adapter directory"
    )
    assert nothing_under(out)
