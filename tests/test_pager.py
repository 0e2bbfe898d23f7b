"""The pager and the out-of-core forward."""

import pytest
import torch

from odyssey.engine import Engine
from odyssey.pager import Pager
from odyssey.runtime.memory import process_memory
from odyssey.store import Store, init_store
from tests.conftest import tiny_config
from tests.test_store import model_from_store


def test_views_equal_store_tensors(tiny_store):
    store = Store.open(tiny_store)
    with Pager(store, slots=2) as pager:
        pager.prefetch(store.units)
        for u in store.units:
            res = pager.get(u)
            ref = store.load_tensors(u)
            for name, t in res.tensors.items():
                assert torch.equal(t, ref[name]), name
            pager.release(res)
        stats = pager.take_stats()
    assert [s.unit for s in stats] == store.units
    assert all(s.bytes > 0 and not s.reused for s in stats)


def test_resident_units_are_not_read_again(tiny_store):
    store = Store.open(tiny_store)
    sched = [0, 1, "head", 1, 0, 0, 1]
    with Pager(store, slots=2) as pager:
        pager.prefetch(sched)
        for u in sched:
            pager.release(pager.get(u))
        stats = pager.take_stats()
    assert [s.reused for s in stats] == [False, False, False, True, False, True, True]


def test_out_of_schedule_order_is_an_error(tiny_store):
    store = Store.open(tiny_store)
    with Pager(store, slots=2) as pager:
        pager.prefetch([0, 1])
        with pytest.raises(RuntimeError, match="out of schedule order"):
            pager.get(1)


def test_direct_io_reads_the_same_bytes_or_falls_back(tiny_store):
    store = Store.open(tiny_store)
    with Pager(store, slots=1, direct=True) as pager:
        res = pager.get(0)
        ref = store.load_tensors(0)
        assert all(torch.equal(t, ref[n]) for n, t in res.tensors.items())
        pager.release(res)
        # either O_DIRECT worked or the reason it did not is recorded
        assert pager.direct_fallback is None or "O_DIRECT" in pager.direct_fallback


def test_pool_never_grows(tmp_path):
    cfg = tiny_config(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)
    init_store(cfg, tmp_path / "s", dtype="f32", progress=False)
    store = Store.open(tmp_path / "s")
    with Pager(store, slots=2) as pager:

        def one_pass():
            pager.prefetch(store.units)
            for u in store.units:
                pager.release(pager.get(u))

        one_pass()
        after_one = process_memory().anon_bytes
        for _ in range(99):
            one_pass()
        after_100 = process_memory().anon_bytes
    assert after_100 <= after_one * 1.05, (after_one, after_100)


@pytest.mark.parametrize("tied", [False, True])
def test_out_of_core_logits_equal_in_ram(tmp_path, tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    init_store(cfg, tmp_path / "s", dtype="f32", seed=5, progress=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        ref = model_from_store(tmp_path / "s")(ids)
    with Engine(Store.open(tmp_path / "s"), compute_dtype="fp32") as eng:
        out = eng.logits(ids)
        again = eng.logits(ids)  # second pass: layer 0 reused, no drift
    assert torch.equal(out, ref)
    assert torch.equal(again, ref)


def test_bf16_store_fp32_compute_matches_in_ram(tmp_path, tiny_cfg):
    init_store(tiny_cfg, tmp_path / "s", dtype="bf16", seed=5, progress=False)
    ids = torch.randint(0, tiny_cfg.vocab_size, (1, 11))
    with torch.no_grad():
        ref = model_from_store(tmp_path / "s")(ids)  # bf16 weights read as fp32
    with Engine(Store.open(tmp_path / "s"), compute_dtype="fp32") as eng:
        torch.testing.assert_close(eng.logits(ids), ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# row blocks: the embedding and head paged in blocks of rows (store.Block)


def blocked_store(tmp_path, tied: bool, rows: int = 7, vocab: int = 250, dtype: str = "f32") -> Store:
    """A tiny store whose embedding (and untied head) is written in blocks of `rows` rows: vocab
    250 in blocks of 7 is 36 blocks, the last of 5 rows."""
    cfg = tiny_config(vocab_size=vocab, tie_word_embeddings=tied)
    out = tmp_path / f"blocked-{int(tied)}"
    init_store(cfg, out, dtype=dtype, seed=5, progress=False, block_rows=rows)
    return Store.open(out)


@pytest.mark.parametrize("tied", [False, True])
def test_row_blocks_partition_the_shard_and_their_views_are_its_rows(tmp_path, tied):
    from odyssey.store import Block

    store = blocked_store(tmp_path, tied)
    blocked = ["embed"] if tied else ["embed", "head"]
    assert store.blocks("head") == ["head"] if tied else len(store.blocks("head")) == 36
    units = store.page_units()
    assert units[36 : 36 + 2] == [0, 1] and len(units) == 36 + 2 + (1 if tied else 36)
    with Pager(store, slots=2) as pager:
        pager.prefetch(units)
        for unit in store.units:
            whole = store.load_tensors(unit)
            if unit not in blocked:
                res = pager.get(unit)
                assert all(torch.equal(t, whole[n]) for n, t in res.tensors.items())
                pager.release(res)
                continue
            pages = [store.page(b) for b in store.blocks(unit)]
            # the blocks' byte ranges partition the file, in order
            assert pages[0].start == 0 and pages[-1].end == store.shards[unit].file_bytes
            assert all(a.end == b.start for a, b in zip(pages, pages[1:], strict=False))
            name = "model.embed_tokens.weight" if unit == "embed" else "lm_head.weight"
            rows = []
            for b in store.blocks(unit):
                assert isinstance(b, Block) and b.count == 36 and b.row_end - b.row_start == (5 if b.index == 35 else 7)
                res = pager.get(b)
                rows.append(res.tensors[name].clone())
                if unit == "head" and b.index == 0:  # the final norm lies in block 0
                    assert torch.equal(res.tensors["model.norm.weight"], whole["model.norm.weight"])
                else:
                    assert set(res.tensors) == {name}
                pager.release(res)
            assert torch.equal(torch.cat(rows), whole[name])
        stats = pager.take_stats()
    labels = [s.to_json()["layer"] for s in stats]
    assert labels[:2] == ["embed[1/36]", "embed[2/36]"] and labels[36:38] == [0, 1]
    assert labels[-1] == ("head" if tied else "head[36/36]")
    assert store.max_page_bytes() == max(store.unit_bytes(i) for i in range(2))  # a layer here


def test_large_vocabulary_pool_is_sized_by_layers(tmp_path):
    """Default blocks (no forced size): as many rows as fit in the largest layer's shard; the
    pager's slots hold a layer, not the embedding (here 7 x a layer)."""
    cfg = tiny_config(vocab_size=5000)
    init_store(cfg, tmp_path / "s", dtype="f32", progress=False)
    store = Store.open(tmp_path / "s")
    layer = store.unit_bytes(0)
    assert store.unit_bytes("embed") > 7 * layer
    embed = store.blocks("embed")
    assert len(embed) == -(-5000 // store.block_rows["embed"]) >= 7
    assert max(store.block_bytes("embed")) == layer  # block 0: header + as many rows as a layer holds
    assert max(store.block_bytes("head")) <= layer
    with Pager(store, slots=2) as pager:
        assert pager.slot_bytes == -(-layer // 4096) * 4096
    ids = torch.randint(0, 5000, (1, 9))
    with torch.no_grad():
        ref = model_from_store(tmp_path / "s")(ids)
    with Engine(store, compute_dtype="fp32") as eng:
        torch.testing.assert_close(eng.logits(ids), ref, atol=1e-6, rtol=0)
        assert max(s.bytes for s in eng.pager.take_stats()) <= layer


def test_resident_pager_serves_the_same_row_blocks(tmp_path):
    from odyssey.pager import ResidentPager

    store = blocked_store(tmp_path, tied=False)
    with ResidentPager(store) as rp, Pager(store) as pager:
        for b in store.blocks("head")[:3]:
            a, p = rp.get(b), pager.get(b)
            assert set(a.tensors) == set(p.tensors)
            assert all(torch.equal(a.tensors[n], p.tensors[n]) for n in a.tensors)
            pager.release(p)


def test_embedding_lookup_checks_only_the_blocks_it_gathers_from(tmp_path):
    """A prompt of a few tokens checks the row blocks holding them, not the whole embedding."""
    store = blocked_store(tmp_path, tied=False)
    with Engine(store, compute_dtype="fp32") as eng:
        x = eng.embed(torch.tensor([[0, 3, 15]]))  # rows in blocks 0 and 2
    checked = [b.index for b in store.blocks("embed") if store.is_verified(b)]
    assert checked == [0, 2] and not store.is_verified("embed")
    ref = store.load_tensors("embed")["model.embed_tokens.weight"]
    assert torch.equal(x[0], ref[[0, 3, 15]])
