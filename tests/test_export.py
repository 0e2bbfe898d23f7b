"""export: transformers loads the safetensors directory and gives the engine's logits; torch.load
maps the .pth and gets the store's tensors; bad input is refused before anything is written, and a
failure midway leaves no file under a final name."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_cli, tiny_config
from test_merge import IDS, engine_logits, make_adapter

from odyssey.export import RECORD_NAME, export_model
from odyssey.export.pth import write_pth
from odyssey.export.safetensors import write_safetensors
from odyssey.store import Store, init_store


def hf_logits(directory: Path) -> torch.Tensor:
    from transformers import LlamaForCausalLM as HFLlama

    model = HFLlama.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def final_names(out: Path) -> list[str]:
    """What is under `out` besides the export's record (tests/test_outputs.py checks it); temporary
    files included (there should be none)."""
    return sorted(p.name for p in out.iterdir() if p.name != RECORD_NAME) if out.exists() else []


@pytest.fixture
def adapter(tmp_path, tiny_store):
    return make_adapter(tiny_store, tmp_path / "adapter")


# --------------------------------------------------------------------------------------------
# safetensors: transformers


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_safetensors_with_engine_logits(tmp_path, tied):
    base = tmp_path / "base"
    init_store(tiny_config(tie_word_embeddings=tied), base, dtype="f32", seed=1, progress=False)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    s = export_model(base, tmp_path / "out", "safetensors", progress=False)
    d = tmp_path / "out" / "safetensors"
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    torch.testing.assert_close(hf_logits(d), engine_logits(base), atol=1e-4, rtol=1e-4)
    (r,) = s["formats"]
    assert r["format"] == "safetensors" and r["bytes"] == sum(p.stat().st_size for p in d.iterdir())
    assert r["mb_s"] > 0 and r["peak_anon_bytes"] > 0


def test_sharded_safetensors_with_index(tmp_path, tiny_store):
    from safetensors import safe_open

    out = tmp_path / "st"
    write_safetensors(Store.open(tiny_store), out, max_shard_bytes=100_000, progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    want = Store.open(tiny_store).state_dict()
    got = {}
    for p in shards:
        with safe_open(p, "pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    torch.testing.assert_close(hf_logits(out), engine_logits(tiny_store), atol=1e-4, rtol=1e-4)


def test_export_with_adapter_merges_on_the_fly(tmp_path, tiny_store, adapter):
    export_model(tiny_store, tmp_path / "out", ["safetensors", "pth"], adapter=adapter, progress=False)
    expected = engine_logits(tiny_store, adapter)
    torch.testing.assert_close(hf_logits(tmp_path / "out" / "safetensors"), expected, atol=1e-4, rtol=1e-4)
    # the .pth holds the same merged weights
    pth = torch.load(tmp_path / "out" / "model.pth", mmap=True, weights_only=True)
    from safetensors.torch import load_file

    st = load_file(tmp_path / "out" / "safetensors" / "model.safetensors")
    assert pth.keys() == st.keys() and all(torch.equal(pth[k], st[k]) for k in st)
    assert not torch.equal(
        pth["model.layers.0.self_attn.q_proj.weight"],
        Store.open(tiny_store).load_tensors(0)["model.layers.0.self_attn.q_proj.weight"],
    )


# --------------------------------------------------------------------------------------------
# pth: torch.load


@pytest.mark.parametrize("dtype,tied", [("bf16", True), ("f32", False), ("f16", False)])
def test_torch_load_pth_equals_store(tmp_path, dtype, tied):
    base = tmp_path / "base"
    init_store(tiny_config(tie_word_embeddings=tied), base, dtype=dtype, seed=3, progress=False)
    export_model(base, tmp_path / "out", "pth", progress=False)
    got = torch.load(tmp_path / "out" / "model.pth", mmap=True, weights_only=True)
    want = Store.open(base).state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def test_pth_records_equal_torch_save(tmp_path, tiny_store):
    """Same records, same bytes as torch.save(state_dict) (the archive folder name and the random
    serialization id aside): the pickle is torch's own format, not an imitation that loads."""
    sd = Store.open(tiny_store).state_dict()
    torch.save(sd, tmp_path / "ref.pth")
    write_pth(Store.open(tiny_store), tmp_path / "mine.pth", progress=False)

    def records(path):
        with zipfile.ZipFile(path) as z:
            return {n.split("/", 1)[1]: z.read(n) for n in z.namelist() if not n.endswith("serialization_id")}

    ref, mine = records(tmp_path / "ref.pth"), records(tmp_path / "mine.pth")
    assert ref.keys() == mine.keys()
    assert all(ref[k] == mine[k] for k in ref), [k for k in ref if ref[k] != mine[k]]


def test_pth_write_keeps_anonymous_memory_flat(tmp_path):
    """Anonymous RSS grows by about one unit while writing, not by the model (8 layers, 82 MB)."""
    from odyssey.runtime.memory import PeakSampler, process_memory

    base = tmp_path / "base"
    cfg = tiny_config(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=512,
    )
    init_store(cfg, base, dtype="f32", seed=1, progress=False)
    store = Store.open(base)
    total = store.total_bytes()
    start = process_memory().anon_bytes
    with PeakSampler(interval_s=0.002) as mem:
        write_pth(store, tmp_path / "model.pth", progress=False)
    growth = mem.peak_bytes - start
    assert growth < total / 3, (growth / 2**20, total / 2**20)
    assert (tmp_path / "model.pth").stat().st_size > total - 100_000


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing under a final name


def test_unknown_format_refused(tmp_path, tiny_store):
    out = tmp_path / "out"
    assert_user_error(
        run_cli("export", tiny_store, "--out", out, "--formats", "safetensors,onnx"),
        "unknown format 'onnx'",
        "safetensors, pth, gguf",
    )
    assert final_names(out) == []


def test_unsupported_gguf_type_refused(tmp_path, tiny_store):
    out = tmp_path / "out"
    assert_user_error(
        run_cli("export", tiny_store, "--out", out, "--formats", "safetensors,gguf", "--gguf-type", "q3_k"),
        "q3_k",
        "q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k",
    )
    assert final_names(out) == []


def test_gguf_without_tokenizer_refused_before_writing(tmp_path, tiny_store):
    out = tmp_path / "out"
    assert_user_error(
        run_cli("export", tiny_store, "--out", out, "--formats", "safetensors,pth,gguf"),
        "no tokenizer.json",
        "prepare-data",
    )
    assert final_names(out) == []


@pytest.mark.parametrize("shape", ["same", "other"])
def test_adapter_for_another_base_refused(tmp_path, tiny_store, shape):
    other = tmp_path / "other"
    cfg = tiny_config() if shape == "same" else tiny_config(hidden_size=32, intermediate_size=96)
    init_store(cfg, other, dtype="f32", seed=2, progress=False)
    adapter = make_adapter(other, tmp_path / "adapter-other")
    out = tmp_path / "out"
    assert_user_error(
        run_cli("export", tiny_store, "--out", out, "--formats", "safetensors,pth", "--adapter", adapter),
        "same shape" if shape == "same" else "another shape",
        "--model",
    )
    assert final_names(out) == []


def test_existing_output_needs_force(tmp_path, tiny_store):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pth").write_bytes(b"old")
    assert_user_error(
        run_cli("export", tiny_store, "--out", out, "--formats", "safetensors,pth"), "already exists", "--force"
    )
    assert final_names(out) == ["model.pth"] and (out / "model.pth").read_bytes() == b"old"
    p = run_cli("export", tiny_store, "--out", out, "--formats", "safetensors,pth", "--force", "--quiet")
    assert p.returncode == 0, p.stderr
    assert "MB/s" in p.stdout and "pth" in p.stdout and "safetensors" in p.stdout
    assert final_names(out) == ["model.pth", "safetensors"]
    assert (
        torch.load(out / "model.pth", mmap=True, weights_only=True).keys() == Store.open(tiny_store).state_dict().keys()
    )


def test_not_enough_disk_refused_first(tmp_path, tiny_store, monkeypatch, capsys):
    """Free disk (all outputs together) is checked before anything is written."""
    from odyssey import cli
    from odyssey import export as ex

    need = sum(ex.estimate_bytes(Store.open(tiny_store), f, "f16") for f in ("safetensors", "pth"))
    free = need  # enough for the tensors, not for the safety margin
    monkeypatch.setattr(ex.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, free))
    out = tmp_path / "out"
    rc = cli.main(["export", str(tiny_store), "--out", str(out), "--formats", "safetensors,pth", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not enough free disk" in err[0] and "pth" in err[0], err
    assert final_names(out) == []


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_failure_midway_leaves_no_final_file(tmp_path, tiny_store, fmt, monkeypatch):
    """A writer that dies after some bytes leaves neither a file under the final name nor a temp."""
    real = Store.load_tensors

    def failing(self, unit, dtype=None):
        if unit == 1:
            raise OSError("disk on fire")
        return real(self, unit, dtype)

    monkeypatch.setattr(Store, "load_tensors", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk on fire"):
        export_model(tiny_store, out, fmt, progress=False)
    assert final_names(out) == []


def test_failed_force_keeps_old_safetensors(tmp_path, tiny_store, monkeypatch):
    out = tmp_path / "out"
    export_model(tiny_store, out, "safetensors", progress=False)
    before = {p.name: p.read_bytes() for p in (out / "safetensors").iterdir()}
    monkeypatch.setattr(Store, "load_tensors", lambda self, unit, dtype=None: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        export_model(tiny_store, out, "safetensors", force=True, progress=False)
    assert final_names(out) == ["safetensors"]
    assert {p.name: p.read_bytes() for p in (out / "safetensors").iterdir()} == before


@pytest.mark.parametrize("style", ["llama3", "qwen", "sentencepiece"])
def test_tokenizer_files_travel_byte_for_byte(tmp_path, style):
    """import, merge and the safetensors export carry every tokenizer file of the source as it is:
    the chat template (chat_template.jinja for Llama 3, inside tokenizer_config.json for Qwen)
    reaches the export, where AutoTokenizer finds the source's."""
    from transformers import AutoTokenizer

    from odyssey.merge import merge
    from odyssey.store import import_hf
    from odyssey.tokenizer import TOKENIZER_FILES
    from tests.helpers_tokenizers import make_checkpoint

    src = tmp_path / "hf"
    make_checkpoint(src, style)
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.name in TOKENIZER_FILES}
    assert "tokenizer_config.json" in files and ("chat_template.jinja" in files) == (style == "llama3")
    import_hf(src, tmp_path / "store", progress=False)
    adapter = make_adapter(tmp_path / "store", tmp_path / "adapter")
    merge(tmp_path / "store", adapter, tmp_path / "merged", progress=False)
    export_model(tmp_path / "merged", tmp_path / "out", "safetensors", progress=False)
    export_model(tmp_path / "store", tmp_path / "out2", "safetensors", adapter=adapter, progress=False)
    copies = [
        tmp_path / "store",
        tmp_path / "merged",
        tmp_path / "out" / "safetensors",
        tmp_path / "out2" / "safetensors",
    ]
    for d in copies:
        assert {n: (d / n).read_bytes() for n in files} == files, d
        assert not [n for n in TOKENIZER_FILES if n not in files and (d / n).exists()], d
    want = AutoTokenizer.from_pretrained(src).chat_template
    assert (want is not None) == (style != "sentencepiece")
    for d in copies[2:]:
        assert AutoTokenizer.from_pretrained(d).chat_template == want


# --------------------------------------------------------------------------------------------
# all three formats through the driver (the GGUF writer itself is tested in test_gguf.py)


def test_all_formats_with_adapter(tmp_path):
    """One call writes the three outputs; the GGUF holds the merged weights too."""
    from gguf import GGUFReader

    from odyssey.adapters import read_adapter
    from odyssey.merge import MergedSource
    from odyssey.tokenizer import train_tokenizer

    base = tmp_path / "base"
    init_store(tiny_config(vocab_size=320), base, dtype="f32", seed=1, progress=False)
    docs = ["the quick brown fox jumps over the lazy dog", "a merged model in three formats"] * 20
    train_tokenizer(docs, vocab_size=300).save(str(base / "tokenizer.json"))
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out"
    s = export_model(base, out, "gguf,pth,safetensors", gguf_type="f32", adapter=adapter, progress=False)
    assert [r["format"] for r in s["formats"]] == ["safetensors", "pth", "gguf f32"]
    assert final_names(out) == ["model-f32.gguf", "model.pth", "safetensors"]
    assert all(r["bytes"] > 0 and r["mb_s"] > 0 for r in s["formats"])

    merged = MergedSource(Store.open(base), read_adapter(adapter)).load_tensors(1)
    v = {t.name: t for t in GGUFReader(out / "model-f32.gguf").tensors}["blk.1.attn_v.weight"]
    want = merged["model.layers.1.self_attn.v_proj.weight"]  # V rows are not permuted for llama.cpp
    torch.testing.assert_close(torch.from_numpy(v.data.copy()).reshape(want.shape), want, atol=0, rtol=0)


def test_safetensors_directory_has_the_usual_mode(tmp_path, tiny_store):
    import os

    mask = os.umask(0)
    os.umask(mask)
    export_model(tiny_store, tmp_path / "out", "safetensors", progress=False)
    assert (tmp_path / "out" / "safetensors").stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
