"""The on-disk store: init, verify, import, HF compatibility, crash-resume and bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from odyssey.errors import OdysseyError
from odyssey.model import LlamaForCausalLM
from odyssey.store import FORMAT_VERSION, INDEX_NAME, JOURNAL_NAME, Store, StoreError, init_store, shard_name
from tests.conftest import ROOT, assert_user_error, run_cli, tiny_config


def model_from_store(store_dir) -> LlamaForCausalLM:
    store = Store.open(store_dir)
    m = LlamaForCausalLM(store.config)
    sd = store.state_dict(dtype=torch.float32)
    if store.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    m.load_state_dict(sd)
    return m.eval()


def snapshot(d: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.iterdir()) if p.is_file()}


def test_init_layout_and_verify(tiny_store, tiny_cfg):
    store = Store.open(tiny_store)
    n = tiny_cfg.num_hidden_layers + 2
    assert sorted(p.name for p in tiny_store.glob("*.safetensors")) == [shard_name(k, n) for k in range(n)]
    index = json.loads((tiny_store / INDEX_NAME).read_text())
    assert index["metadata"]["odyssey"]["format_version"] == FORMAT_VERSION
    assert set(index["weight_map"]) == set(tiny_cfg.all_shapes())
    assert store.verify(progress=False) == []
    # data is page-aligned and one contiguous range per shard
    for info in store.shards.values():
        assert info.data_offset % 4096 == 0
        spans = list(info.tensors.values())
        assert [s.start for s in spans] == [0] + [sum(x.nbytes for x in spans[:i]) for i in range(1, len(spans))]
    assert not (tiny_store / JOURNAL_NAME).exists()


def test_init_is_deterministic_per_tensor(tmp_path, tiny_cfg):
    a, b = tmp_path / "a", tmp_path / "b"
    init_store(tiny_cfg, a, dtype="bf16", seed=7, progress=False)
    init_store(tiny_config(num_hidden_layers=3), b, dtype="bf16", seed=7, progress=False)
    ta, tb = Store.open(a).load_tensors(1), Store.open(b).load_tensors(1)
    for name in ta:  # layer 1 is the same whatever the depth... except the depth-scaled o/down
        if "o_proj" in name or "down_proj" in name:
            continue
        assert torch.equal(ta[name], tb[name]), name
    c = tmp_path / "c"
    init_store(tiny_cfg, c, dtype="bf16", seed=8, progress=False)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(Store.open(c).load_tensors(0)[name], Store.open(a).load_tensors(0)[name])
    w = Store.open(a).load_tensors(0)["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.003 and abs(w.mean().item()) < 0.003


def test_transformers_loads_store_with_same_logits(tiny_store):
    from transformers import LlamaForCausalLM as HFLlama

    ours = model_from_store(tiny_store)
    hf = HFLlama.from_pretrained(tiny_store, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_flipped_byte_is_reported_naming_the_shard(tiny_store):
    victim = tiny_store / shard_name(2, 4)  # layer 1
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01
    victim.write_bytes(bytes(data))
    p = run_cli("verify", tiny_store, "--quiet")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    bad = [line for line in p.stderr.splitlines() if line.startswith("FAIL")]
    assert len(bad) == 1 and victim.name in bad[0] and "checksum" in bad[0]


def test_truncated_shard_refused_on_load_and_verify(tiny_store):
    victim = tiny_store / shard_name(1, 4)
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(StoreError, match=f"{victim.name}.*truncated"):
        Store.open(tiny_store)
    p = run_cli("verify", tiny_store, "--quiet")
    assert_user_error(p, victim.name, "truncated")
    p = run_cli("info", tiny_store)
    assert_user_error(p, victim.name)


def test_corrupt_header_and_unknown_format_version(tiny_store):
    index = json.loads((tiny_store / INDEX_NAME).read_text())
    index["metadata"]["odyssey"]["format_version"] = 99
    (tiny_store / INDEX_NAME).write_text(json.dumps(index))
    assert_user_error(run_cli("info", tiny_store), "format version 99")
    index["metadata"]["odyssey"]["format_version"] = FORMAT_VERSION
    (tiny_store / INDEX_NAME).write_text(json.dumps(index))
    victim = tiny_store / shard_name(0, 4)
    data = bytearray(victim.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    victim.write_bytes(bytes(data))
    assert_user_error(run_cli("info", tiny_store), victim.name, "header")


def test_resume_after_crash_keeps_complete_shards(tmp_path, tiny_cfg):
    out = tmp_path / "s"
    init_store(tiny_cfg, out, dtype="bf16", seed=3, progress=False)
    reference = snapshot(out)
    # Simulate a crash after two shards: index not yet written, journal present, later shards
    # missing or a temp file left over.
    index = json.loads((out / INDEX_NAME).read_text())
    journal = {"key": None, "done": {}}
    (out / INDEX_NAME).unlink()
    for k in (2, 3):
        (out / shard_name(k, 4)).unlink()
    (out / ".model-00003-of-00004.safetensors.abc.tmp").write_bytes(b"partial")
    # rebuild the journal as init would have left it
    from odyssey.dtypes import DTYPES

    journal["key"] = {"config": tiny_cfg.to_hf_dict(DTYPES["bf16"].hf_name), "dtype": "bf16", "seed": 3, "kind": "init"}
    for k in (0, 1):
        f = shard_name(k, 4)
        journal["done"][f] = {
            "unit": index["metadata"]["odyssey"]["shards"][f]["unit"],
            "bytes": index["metadata"]["odyssey"]["shards"][f]["bytes"],
            "sha256": index["metadata"]["odyssey"]["shards"][f]["sha256"],
        }
    (out / JOURNAL_NAME).write_text(json.dumps(journal))
    with pytest.raises(StoreError, match="interrupted"):
        Store.open(out)
    s = init_store(tiny_cfg, out, dtype="bf16", seed=3, progress=False)  # no --force needed
    assert s["kept_shards"] == 2
    after = snapshot(out)
    for k in (0, 1):  # kept as they were, not rewritten
        assert after[shard_name(k, 4)][0] == reference[shard_name(k, 4)][0]
    for k in range(4):
        assert after[shard_name(k, 4)][1] == reference[shard_name(k, 4)][1]
    assert Store.open(out).verify(progress=False) == []


def test_a_store_in_row_blocks_stays_a_plain_hf_checkpoint(tmp_path):
    """Row blocks are byte ranges of the HF tensors: one model.embed_tokens.weight and one
    lm_head.weight, under their names; transformers loads the store as it is."""
    from transformers import LlamaForCausalLM as HFLlama

    cfg = tiny_config(vocab_size=250)
    init_store(cfg, tmp_path / "s", dtype="f32", seed=2, progress=False, block_rows=7)
    store = Store.open(tmp_path / "s")
    assert len(store.blocks("embed")) == len(store.blocks("head")) == 36
    index = json.loads((tmp_path / "s" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(cfg.all_shapes())
    assert store.shards["head"].tensors["lm_head.weight"].shape == (250, 64)
    hf = HFLlama.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    ids = torch.randint(0, 250, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(model_from_store(tmp_path / "s")(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_resume_from_a_journal_written_before_row_blocks_records_them(tmp_path):
    """A journal whose finished shards carry no block digests (an init killed before row blocks
    existed): the resumed init hashes the blocks from the kept shard, as a fresh init does."""
    from odyssey.dtypes import DTYPES
    from odyssey.store.checksum import BLOCKS

    cfg = tiny_config(vocab_size=250)
    out = tmp_path / "s"
    init_store(cfg, out, dtype="f32", seed=3, progress=False, block_rows=7)
    reference = json.loads((out / INDEX_NAME).read_text())["metadata"]["odyssey"]["shards"]
    (out / INDEX_NAME).unlink()
    for k in (2, 3):
        (out / shard_name(k, 4)).unlink()
    key = {"config": cfg.to_hf_dict(DTYPES["f32"].hf_name), "dtype": "f32", "seed": 3, "kind": "init"}
    key["block_rows"] = 7
    done = {shard_name(k, 4): {x: reference[shard_name(k, 4)][x] for x in ("unit", "bytes", "sha256")} for k in (0, 1)}
    (out / JOURNAL_NAME).write_text(json.dumps({"key": key, "done": done}))
    s = init_store(cfg, out, dtype="f32", seed=3, progress=False, block_rows=7)
    assert s["kept_shards"] == 2
    shards = json.loads((out / INDEX_NAME).read_text())["metadata"]["odyssey"]["shards"]
    assert shards == reference and len(shards[shard_name(0, 4)][BLOCKS]["xxh3_128"]) == 36
    assert Store.open(out).verify(progress=False) == []


def test_non_empty_out_needs_force_and_nothing_is_damaged(tmp_path, tiny_store):
    before = snapshot(tiny_store)
    p = run_cli("init", "--config", ROOT / "configs/nano.yaml", "--out", tiny_store, "--quiet")
    assert_user_error(p, "not empty", "--force")
    assert snapshot(tiny_store) == before
    keep = tiny_store / "notes.txt"
    keep.write_text("mine")
    p = run_cli("init", "--config", ROOT / "configs/nano.yaml", "--out", tiny_store, "--quiet", "--force")
    assert p.returncode == 0, p.stderr
    assert keep.read_text() == "mine"
    assert Store.open(tiny_store).config.hidden_size == 128


def test_not_enough_disk_checked_before_writing(tmp_path, monkeypatch, tiny_cfg):
    import odyssey.store.writer as st

    monkeypatch.setattr(st.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 1000))
    with pytest.raises(OdysseyError, match="not enough free disk"):
        init_store(tiny_cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "yaml_text,needle",
    [
        (
            "vocab_size: 10\nhidden_size: 64\nintermediate_size: 8\nnum_hidden_layers: 1\nnum_attention_heads: 4\n"
            "width: 3\n",
            "unknown config key width",
        ),
        (
            "vocab_size: ten\nhidden_size: 64\nintermediate_size: 8\nnum_hidden_layers: 1\nnum_attention_heads: 4\n",
            "vocab_size must be of type int",
        ),
        (
            "vocab_size: 10\nhidden_size: 100\nintermediate_size: 8\nnum_hidden_layers: 1\nnum_attention_heads: 3\n",
            "must divide hidden_size",
        ),
        ("vocab_size: [1\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, yaml_text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    p = run_cli("init", "--config", cfg, "--out", tmp_path / "out", "--quiet")
    assert_user_error(p, needle)
    assert not (tmp_path / "out").exists()


def save_hf(tmp_path, tied=False, shard=False, v5=True):
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    cfg = tiny_config(tie_word_embeddings=tied)
    hf = HFLlama(
        LlamaConfig(
            **{k: v for k, v in cfg.to_hf_dict("float32").items() if k not in ("architectures", "dtype", "torch_dtype")}
        )
    )
    d = tmp_path / "hf"
    hf.save_pretrained(d, max_shard_size="100KB" if shard else "5GB")
    if not v5:  # rewrite the config as transformers v4 did
        c = json.loads((d / "config.json").read_text())
        theta = (c.pop("rope_parameters", None) or {}).get("rope_theta", 10000.0)
        c["rope_theta"] = theta
        (d / "config.json").write_text(json.dumps(c))
    (d / "tokenizer.json").write_text("{}")
    return d, hf.eval()


@pytest.mark.parametrize("tied,shard,v5", [(False, False, True), (True, True, True), (False, True, False)])
def test_import_hf_checkpoint(tmp_path, tied, shard, v5):
    src, hf = save_hf(tmp_path, tied, shard, v5)
    if shard:
        assert (src / INDEX_NAME).exists()
    p = run_cli("import", src, "--out", tmp_path / "store", "--quiet")
    assert p.returncode == 0, p.stderr
    store = Store.open(tmp_path / "store")
    assert store.verify(progress=False) == []
    assert (tmp_path / "store" / "tokenizer.json").exists()
    assert store.config.tie_word_embeddings == tied
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model_from_store(tmp_path / "store")(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_import_refuses_other_architectures(tmp_path):
    src = tmp_path / "gpt"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    p = run_cli("import", src, "--out", tmp_path / "out")
    assert_user_error(p, "GPT2LMHeadModel", "not supported")
    assert not (tmp_path / "out").exists()


def test_opening_a_plain_hf_checkpoint_points_to_import(tmp_path):
    src, _ = save_hf(tmp_path, shard=True)
    assert_user_error(run_cli("info", src), "odyssey import")
