"""Examples data: masked loss and packing without cross-talk.

The examples layout read back (TokenData: mask, offsets, checks on damaged files), the sampler
(whole examples packed into windows, positions restarting, segments, truncate/drop, padding,
shuffling, shards, resume), the masked loss (a masked target changes nothing), packed equals one
by one (per-example losses and LoRA gradients, out of core and in RAM, Llama, Mistral's sliding
window, Qwen2), and the packed, masked LoRA gradients against transformers + peft run one example at
a time with labels -100. Every comparison computes in fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from odyssey.adapters import lora_parameters
from odyssey.config import LoraSettings, TrainConfig
from odyssey.data import IGNORE, Batch, BatchSampler, TokenData, eval_batches
from odyssey.data.sampler import ExampleSet
from odyssey.engine import Engine
from odyssey.errors import OdysseyError
from odyssey.headloss import OnlineCrossEntropy
from odyssey.learners import FullLearner
from odyssey.model import CausalLM, causal_lm_loss
from odyssey.runtime.runlog import RunDir
from odyssey.store import Store
from odyssey.store.importer import import_hf
from tests.conftest import run_cli
from tests.helpers_lora import lora_skeleton
from tests.test_families import BASE, hf_model

# --------------------------------------------------------------------------------------------
# helpers: an examples-layout directory written as the shared design states its bytes


def write_examples(d: Path, splits: dict, vocab: int, eos: int = 2) -> Path:
    """splits: {"train": [(ids, mask), ...], "val": [...]} -> DIR with S.bin (uint16), S.mask
    (uint8), S.idx (int64 offsets) and a version 3 manifest of layout "examples"."""
    d.mkdir(parents=True, exist_ok=True)
    m = {
        "format": "odyssey-tokens",
        "format_version": 3,
        "layout": "examples",
        "dtype": "uint16",
        "vocab_size": vocab,
        "bos_id": 1,
        "eos_id": eos,
        "unk_id": 0,
        "data_format": "chat",
        "mask_prompt": True,
        "train_on": "all",
        "chat_template": "none",
        "chat_template_sha256": None,
        "eot_ids": [eos],
        "prepared_seq_len": 64,
        "too_long": "truncate",
        "truncated": 0,
        "dropped": 0,
        "splits": {},
    }
    for split, exs in splits.items():
        ids = np.concatenate([np.asarray(e[0]) for e in exs]).astype(np.uint16)
        mask = np.concatenate([np.asarray(e[1]) for e in exs]).astype(np.uint8)
        idx = np.concatenate([[0], np.cumsum([len(e[0]) for e in exs])]).astype("<i8")
        ids.tofile(d / f"{split}.bin")
        mask.tofile(d / f"{split}.mask")
        idx.tofile(d / f"{split}.idx")
        m["splits"][split] = {
            "file": f"{split}.bin",
            "mask_file": f"{split}.mask",
            "index_file": f"{split}.idx",
            "tokens": len(ids),
            "documents": len(exs),
            "trained_tokens": int(mask.sum()),
        }
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def make_examples(n: int, vocab: int, lo: int, hi: int, seed: int = 0, tag: bool = False) -> list:
    """n examples of lo..hi tokens: a prompt (mask 0), an answer (mask 1), sometimes a second
    prompt and answer (multi-turn), sometimes a masked last token. With `tag` the first token of
    example k is 3 + k (so a window's rows say which example they hold)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        length = int(rng.integers(lo, hi + 1))
        ids = rng.integers(3, vocab, length)
        if tag:
            ids[0] = 3 + k
        mask = np.zeros(length, dtype=np.uint8)
        p = int(rng.integers(1, max(2, length - 1)))
        mask[p:] = 1
        if length - 2 > p and rng.random() < 0.4:  # a second turn: a masked prompt inside the answer
            q = int(rng.integers(p, length - 2))
            mask[q : q + 2] = 0
        if rng.random() < 0.3:
            mask[-1] = 0
        out.append((ids.tolist(), mask.tolist()))
    return out


def alone(ids, mask) -> Batch:
    """One example as the engine sees it alone: x = ex[:-1], y = ex[1:] with IGNORE where masked."""
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    y = torch.where(mask[1:] != 0, ids[1:], torch.tensor(IGNORE))
    return Batch(ids[None, :-1], y[None])


def segment_rows(b: Batch, row: int) -> dict[int, tuple]:
    """segment id -> (x, y, positions) of that segment in `row` (0 = padding left out)."""
    seg = b.segments[row]
    return {
        int(s): (b.x[row][seg == s], b.y[row][seg == s], b.positions[row][seg == s])
        for s in seg.unique().tolist()
        if s != 0
    }


# --------------------------------------------------------------------------------------------
# TokenData: the examples layout and its checks


def test_token_data_reads_examples_and_stream_v2(tmp_path, train_dir):
    exs = make_examples(5, 100, 4, 9, seed=1)
    d = write_examples(tmp_path / "ex", {"train": exs, "val": exs[:2]}, vocab=100)
    data = TokenData(d)
    assert data.layout == "examples" and data.num_examples("train") == 5
    off = data.offsets("train")
    assert off.dtype == np.int64 and off[0] == 0 and off[-1] == data.num_tokens("train")
    assert np.array_equal(np.asarray(data.mask("train")), np.concatenate([e[1] for e in exs]))
    assert not data.mask("train").flags.writeable and not off.flags.writeable
    stream = TokenData(train_dir / "tok")  # written by today's prepare-data
    assert stream.layout == "stream" and stream.mask("train") is None and stream.offsets("val") is None
    v2 = tmp_path / "v2"
    shutil.copytree(train_dir / "tok", v2)
    m = json.loads((v2 / "manifest.json").read_text())
    m.pop("layout", None)
    m["format_version"] = 2
    (v2 / "manifest.json").write_text(json.dumps(m))
    assert TokenData(v2).layout == "stream"


@pytest.mark.parametrize(
    "damage, message",
    [
        ("mask_short", r"train\.mask holds \d+ bytes but manifest\.json says \d+ tokens \(one mask byte each\)"),
        ("idx_short", r"train\.idx holds 40 bytes but manifest\.json says 6 examples \(7 int64 offsets\)"),
        ("idx_falls", r"train\.idx does not hold rising offsets from 0 to \d+"),
        ("idx_end", r"train\.idx does not hold rising offsets from 0 to \d+"),
        ("mask_missing", r"train\.mask is missing"),
        ("no_index_key", r"manifest\.json is damaged \(bad or missing 'index_file'\)"),
    ],
)
def test_token_data_refuses_damaged_examples(tmp_path, damage, message):
    d = write_examples(tmp_path / "ex", {"train": make_examples(6, 100, 4, 9), "val": make_examples(2, 100, 4, 9)}, 100)
    idx = np.fromfile(d / "train.idx", dtype="<i8")
    if damage == "mask_short":
        (d / "train.mask").write_bytes((d / "train.mask").read_bytes()[:-1])
    elif damage == "idx_short":
        idx[:-2].tofile(d / "train.idx")
    elif damage == "idx_falls":
        idx[2], idx[3] = idx[3], idx[2]
        idx.tofile(d / "train.idx")
    elif damage == "idx_end":
        idx[-1] -= 1
        idx.tofile(d / "train.idx")
    elif damage == "mask_missing":
        (d / "train.mask").unlink()
    else:
        m = json.loads((d / "manifest.json").read_text())
        del m["splits"]["train"]["index_file"]
        (d / "manifest.json").write_text(json.dumps(m))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(OdysseyError, match=message) as e:
        TokenData(d)
    assert "\n" not in str(e.value) and "prepare-data" in str(e.value)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing touched


# --------------------------------------------------------------------------------------------
# the sampler


@pytest.fixture(scope="module")
def ex_data(tmp_path_factory):
    """300 tagged train examples of 3..40 tokens (some longer than a window of 32), 20 val."""
    exs = make_examples(300, 400, 3, 40, seed=7, tag=True)
    d = write_examples(tmp_path_factory.mktemp("ex") / "d", {"train": exs, "val": exs[:20]}, vocab=400)
    return TokenData(d), exs


def check_rows(b: Batch, exs: list, T: int) -> list[int]:
    """Every segment of every row is a whole example (truncated to T + 1 tokens at most) with
    positions 0..n-2 and its mask as IGNORE; padding is segment 0 with y IGNORE. Returns the
    examples seen, by tag."""
    seen = []
    assert b.x.shape == b.y.shape == b.positions.shape == b.segments.shape and b.x.dtype == torch.int64
    for row in range(b.x.shape[0]):
        seg = b.segments[row]
        assert bool((b.y[row][seg == 0] == IGNORE).all())
        nonzero = seg[seg != 0]
        assert bool((nonzero[1:] >= nonzero[:-1]).all())  # segments are contiguous runs 1, 2, ...
        for x, y, pos in segment_rows(b, row).values():
            k = int(x[0]) - 3
            ids, mask = exs[k]
            n = min(len(ids), T + 1)
            assert torch.equal(x, torch.tensor(ids[: n - 1]))
            assert torch.equal(pos, torch.arange(n - 1))
            want = torch.where(torch.tensor(mask[1:n]) != 0, torch.tensor(ids[1:n]), torch.tensor(IGNORE))
            assert torch.equal(y, want)
            seen.append(k)
    return seen


def test_sampler_packs_whole_examples_once_an_epoch(ex_data):
    data, exs = ex_data
    T = 32
    s = BatchSampler(data, "train", T, 1, seed=1)  # batches of one window: none spans two epochs
    kept = ExampleSet(data, "train", T)
    assert len(kept) == s.num_windows <= 300
    seen, rows = [], 0
    while s.epoch == 0:
        seen += check_rows(s.next_batch(), exs, T)
        rows += 1
    assert len(seen) == len(set(seen)) == len(kept)  # every kept example, once in an epoch
    assert rows == s.windows_per_epoch < len(kept)  # packed: several examples in some windows
    fill = sum(kept.slots) / (rows * T)
    assert fill > 0.85 and "packed" in s.summary and f"{fill:.0%} full" in s.summary
    print(f"\n{len(kept)} examples of 3..33 tokens in {rows} windows of {T}: {fill:.1%} full")
    second = [int(s.next_batch().x[0, 0]) for _ in range(3)]
    again = BatchSampler(data, "train", T, 1, seed=1)
    assert [int(again.next_batch().x[0, 0]) for _ in range(3)] != second  # another order each epoch


def test_sampler_truncates_or_drops_long_examples(ex_data):
    data, exs = ex_data
    T = 32
    lengths = np.array([len(e[0]) for e in exs])
    untrained_short = sum(1 for ids, m in exs if sum(m[1 : T + 1]) == 0)
    trunc = ExampleSet(data, "train", T, "truncate")
    assert trunc.truncated == int((lengths > T + 1).sum()) > 0 and trunc.dropped_long == 0
    assert trunc.untrained == untrained_short and len(trunc) == 300 - untrained_short
    assert int(trunc.lengths.max()) == T + 1
    drop = ExampleSet(data, "train", T, "drop")
    assert drop.dropped_long == trunc.truncated and drop.truncated == 0
    assert int(drop.lengths.max()) <= T + 1 and len(drop) < len(trunc)
    line = BatchSampler(data, "train", T, 2, too_long="drop").summary
    assert f"{drop.dropped_long} dropped as too long" in line and "of 300 examples" in line
    seen = []
    s = BatchSampler(data, "train", T, 8, too_long="drop")
    while s.epoch == 0:
        seen += check_rows(s.next_batch(), exs, T)
    assert all(len(exs[k][0]) <= T + 1 for k in seen)
    with pytest.raises(OdysseyError, match="too_long must be truncate or drop"):
        ExampleSet(data, "train", T, "cut")


def test_sampler_without_packing_pads_one_example_per_row(ex_data):
    data, exs = ex_data
    T = 32
    s = BatchSampler(data, "train", T, 6, seed=2, packing=False)
    b = s.next_batch()
    check_rows(b, exs, T)
    for row in range(6):
        segs = set(b.segments[row].tolist())
        assert segs - {0} == {1}
        n = int((b.segments[row] == 1).sum())
        assert bool((b.segments[row][n:] == 0).all()) and bool((b.y[row][n:] == IGNORE).all())
        assert bool((b.x[row][n:] == data.eos_id).all())
    assert "one per window" in s.summary


def test_sampler_shards_are_disjoint_and_resume_exactly(ex_data):
    data, exs = ex_data
    T = 32
    shards = []
    for rank in range(2):
        s = BatchSampler(data, "train", T, 1, seed=3, rank=rank, world_size=2)
        seen = []
        while s.epoch == 0:
            seen += check_rows(s.next_batch(), exs, T)
        shards.append(set(seen))
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    a = BatchSampler(data, "train", T, 3, seed=4, rank=1, world_size=2)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = BatchSampler(data, "train", T, 3, seed=4, rank=1, world_size=2)
    b.load_state_dict(state)
    for _ in range(2 * int(np.ceil(a.batches_per_epoch))):  # across epoch boundaries
        p, q = a.next_batch(), b.next_batch()
        assert all(torch.equal(getattr(p, f), getattr(q, f)) for f in ("x", "y", "positions", "segments"))
    other = BatchSampler(data, "train", T, 3, seed=4, rank=1, world_size=2, packing=False)
    with pytest.raises(OdysseyError, match="saved data position has packing=True but this run has False"):
        other.load_state_dict(state)
    with pytest.raises(TypeError, match="does not unpack"):
        x, y = a.next_batch()


def test_sampler_position_carries_over_to_another_number_of_ranks(ex_data, train_dir):
    data, _ = ex_data
    two = BatchSampler(data, "train", 32, 2, seed=5, rank=0, world_size=2)
    for _ in range(10):
        two.next_batch()
    one = BatchSampler(data, "train", 32, 2, seed=5)
    state = one.rebase(json.loads(json.dumps(two.state_dict())))
    one.load_state_dict(state)
    assert one.epoch == two.epoch == 0 and one.cursor == 2 * two.cursor == 40  # the same share of the epoch
    stream = BatchSampler(TokenData(train_dir / "tok"), "train", 32, 2)
    with pytest.raises(OdysseyError, match="saved data position has layout='stream' but this run has 'examples'"):
        BatchSampler(data, "train", 32, 2).load_state_dict(stream.state_dict())


def test_eval_batches_of_examples_are_fixed_and_in_order(ex_data):
    data, exs = ex_data
    ev = eval_batches(data, 32, 2, 3)
    again = eval_batches(data, 32, 2, 3)
    assert len(ev) == 3 and ev.summary.startswith("val: ")
    assert all(torch.equal(p.x, q.x) and torch.equal(p.segments, q.segments) for p, q in zip(ev, again, strict=True))
    seen = [k for b in ev for k in check_rows(b, exs, 32)]
    first = next(k for k, (_, m) in enumerate(exs[:20]) if sum(m[1:33]))  # the first with a trained target
    assert seen[:3] == sorted(seen[:3]) and seen[0] == first  # the examples in their order


# --------------------------------------------------------------------------------------------
# the masked loss


def test_online_cross_entropy_leaves_masked_rows_out_exactly():
    torch.manual_seed(0)
    hf, W = torch.randn(10, 8), torch.randn(30, 8)
    tgt = torch.randint(0, 30, (10,))
    tgt[[0, 3, 4, 9]] = IGNORE
    ce = OnlineCrossEntropy(hf, tgt, True, torch.float32)
    ce.add(0, W[:17])
    ce.add(17, W[17:])
    loss, g = ce.result()
    keep = tgt != IGNORE
    h = hf.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h @ W.T, tgt)  # ignore_index = -100
    ref.backward()
    assert abs(loss - float(ref.detach())) < 1e-6 and ce.trained == 6
    torch.testing.assert_close(g, h.grad, atol=1e-6, rtol=1e-5)
    assert bool((g[~keep] == 0).all())
    none = OnlineCrossEntropy(hf, torch.full((10,), IGNORE), True, torch.float32)
    none.add(0, W)
    loss0, g0 = none.result()
    assert loss0 == 0.0 and bool((g0 == 0).all())
    logits = (hf @ W.T).requires_grad_(True)
    l0 = causal_lm_loss(logits[None], torch.full((1, 10), IGNORE))
    l0.backward()
    assert float(l0) == 0.0 and bool((logits.grad == 0).all())


def _grads(params: dict) -> dict:
    out = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    return out


def test_masked_targets_change_neither_loss_nor_gradients(tmp_path, train_dir):
    """Two data directories that differ only in tokens whose target is masked (the last token of
    examples ending in a masked token): the same loss and the same gradients, bit for bit, out of
    core (LoRA) and in RAM (full training). Changing a trained target does change the loss."""
    exs = make_examples(6, 500, 8, 14, seed=3)
    for _, mask in exs:
        mask[-1] = 0
    other = [(ids[:-1] + [(ids[-1] + 7) % 500 or 3], mask) for ids, mask in exs]
    trained = [(ids[:-1] + [(ids[-1] + 7) % 500 or 3], mask[:-1] + [1]) for ids, mask in exs]
    trained_ref = [(ids, mask[:-1] + [1]) for ids, mask in exs]
    dirs = {
        name: TokenData(write_examples(tmp_path / name, {"train": e, "val": e}, vocab=500))
        for name, e in (("a", exs), ("b", other), ("c", trained_ref), ("d", trained))
    }
    batches = {k: eval_batches(d, 64, 2, 1, split="train")[0] for k, d in dirs.items()}
    assert torch.equal(batches["a"].y, batches["b"].y) and torch.equal(batches["a"].x, batches["b"].x)
    store = Store.open(train_dir / "store")
    skel = lora_skeleton(store)
    params = lora_parameters(skel)
    results = {}
    full = FullLearner(store, TrainConfig(mode="full", compute_dtype="fp32"))
    with Engine(store, compute_dtype="fp32", model=skel) as eng:
        for k, b in batches.items():
            loss = eng.train_step(b.x, b.y, 1.0, None, b.positions, b.segments)
            full_loss = full.step(b, 1.0, None)
            full_grads = {n: p.grad.clone() for n, p in full.model.named_parameters()}
            full.model.zero_grad(set_to_none=True)
            results[k] = (loss, _grads(params), full_loss, full_grads)
    (la, ga, fa, fga), (lb, gb, fb, fgb) = results["a"], results["b"]
    assert la == lb and fa == fb
    assert all(torch.equal(ga[n], gb[n]) for n in ga) and all(torch.equal(fga[n], fgb[n]) for n in fga)
    assert any(float(g.abs().max()) > 0 for g in ga.values())
    assert results["c"][0] != results["d"][0] and results["c"][2] != results["d"][2]  # a trained target counts


# --------------------------------------------------------------------------------------------
# packed equals one by one, and equals transformers + peft


@pytest.fixture(scope="module")
def family_store(tmp_path_factory):
    """case -> (the store's path) of a tiny random model written by transformers' own class."""
    made = {}

    def get(case: str) -> Path:
        if case not in made:
            d = tmp_path_factory.mktemp(case)
            hf_model(case).save_pretrained(d / "src")
            import_hf(d / "src", d / "store", progress=False)
            made[case] = d / "store"
        return made[case]

    return get


@pytest.mark.parametrize("case", ["llama3", "mistral", "qwen2"])
def test_packed_equals_one_by_one_and_peft(tmp_path, family_store, case):
    """Four examples (7..16 tokens; Mistral's window is 7, Qwen2's 6) packed into one window of 48
    with padding: per-example losses and LoRA gradients (the sum over examples, each weighted by
    its share of the trained targets) equal each example run alone, out of core and in RAM (full
    gradients), atol 1e-5; and the LoRA gradients equal transformers + peft run one example at a
    time with labels -100 (max relative error 1e-4)."""
    import peft
    import transformers

    store_dir = family_store(case)
    store = Store.open(store_dir)
    exs = make_examples(4, BASE["vocab_size"], 7, 16, seed=11)
    data = TokenData(write_examples(tmp_path / "d", {"train": exs, "val": exs}, vocab=BASE["vocab_size"]))
    packed = eval_batches(data, 48, 1, 1, split="train")[0]
    assert int(packed.segments.max()) == 4 and bool(packed.segments[0, -1] == 0)  # all four, then padding
    singles = [alone(ids, mask) for ids, mask in exs]
    counts = [b.trained for b in singles]
    N = sum(counts)
    assert packed.trained == N

    skel = lora_skeleton(store, tmp_path)
    params = lora_parameters(skel)
    with Engine(store, compute_dtype="fp32", model=skel) as eng:
        seg = packed.segments
        for s, single in enumerate(singles, start=1):  # per-example loss inside the pack
            y = torch.where(seg == s, packed.y, torch.tensor(IGNORE))
            inside = eng.eval_loss(packed.x, y, packed.positions, packed.segments)
            assert abs(inside - eng.eval_loss(single.x, single.y)) < 1e-5, (case, s)
        loss = eng.train_step(packed.x, packed.y, 1.0, None, packed.positions, packed.segments)
        ours = _grads(params)
        ref_loss = 0.0
        for single, n in zip(singles, counts, strict=True):
            ref_loss += eng.train_step(single.x, single.y, n / N) * n / N
        one_by_one = _grads(params)
    assert abs(loss - ref_loss) < 1e-5
    for k in ours:
        torch.testing.assert_close(ours[k], one_by_one[k], atol=1e-5, rtol=0)

    in_ram = CausalLM(store.config)
    sd = {}
    for unit in store.units:
        sd.update(store.load_tensors(unit))
    in_ram.load_state_dict(sd, strict=False)
    causal_lm_loss(in_ram(packed.x, positions=packed.positions, segments=packed.segments), packed.y).backward()
    full_packed = {n: p.grad.clone() for n, p in in_ram.named_parameters()}
    in_ram.zero_grad(set_to_none=True)
    for single, n in zip(singles, counts, strict=True):
        (causal_lm_loss(in_ram(single.x), single.y) * (n / N)).backward()
    for name, p in in_ram.named_parameters():
        torch.testing.assert_close(full_packed[name], p.grad, atol=1e-5, rtol=0)

    hf = transformers.AutoModelForCausalLM.from_pretrained(store_dir, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    total = 0.0
    for single in singles:
        logits = ref(input_ids=single.x).logits
        total = total + torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), single.y.reshape(-1), ignore_index=-100, reduction="sum"
        )
    (total / N).backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if "lora_" in n}
    assert set(theirs) == set(ours)
    worst = max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()) for k in ours)
    print(f"\n{case}: packed loss {loss:.6f}, peft {float(total / N):.6f}, max relative gradient error {worst:.2e}")
    assert abs(loss - float(total / N)) < 1e-5
    assert worst < 1e-4, worst


# --------------------------------------------------------------------------------------------
# the training loop on examples


def test_train_on_examples_weighs_micro_batches_by_trained_targets(tmp_path, train_dir):
    """`odyssey train` on examples data (LoRA, grad_accum 2, --no-packing, --too-long drop): the
    line on the examples is printed once, the settings are recorded, and the step's loss is the
    mean over the trained targets of both micro-batches."""
    exs = make_examples(40, 500, 4, 30, seed=5)
    d = write_examples(tmp_path / "ex", {"train": exs, "val": exs[:8]}, vocab=500)
    shutil.copy(train_dir / "tok" / "tokenizer.json", d / "tokenizer.json")
    out = tmp_path / "run"
    p = run_cli(
        "train", "--no-guard", "--model", train_dir / "store", "--data", d, "--out", out, "--ram-budget", "1GiB",
        "--quiet", "--steps", "2", "--no-packing", "--too-long", "drop", "seq_len=24", "batch_size=2",
        "grad_accum=2", "eval_every=2", "eval_batches=2", "warmup_steps=0", "compute_dtype=fp32",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("train: ") == 1 and "one per window" in p.stderr and "dropped as too long" in p.stderr
    run = RunDir(out)
    cfg = run.config_path.read_text()
    assert "packing: false" in cfg and "too_long: drop" in cfg
    steps = run.read_metrics("step")
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) and s["loss"] > 0 for s in steps)
    vals = run.read_metrics("val")
    assert [v["step"] for v in vals] == [0, 2]
    # the first step's loss, recomputed: the same 4 windows, the same adapter at init
    store = Store.open(train_dir / "store")
    s = BatchSampler(TokenData(d), "train", 24, 2, seed=0, packing=False, too_long="drop")
    b1, b2 = s.next_batch(), s.next_batch()
    torch.manual_seed(0)
    from odyssey.learners import LoraLearner

    learner = LoraLearner(store, TrainConfig(seq_len=24, compute_dtype="fp32", lora=LoraSettings()))
    ev = eval_batches(TokenData(d), 24, 2, 2, packing=False, too_long="drop")
    counts = [b.trained for b in ev]
    assert counts[0] != counts[1]
    val = sum(learner.eval_loss(b) * n for b, n in zip(ev, counts, strict=True)) / sum(counts)
    assert abs(val - vals[0]["val_loss"]) < 1e-5  # the mean over the eval set's answer tokens
    n1, n2 = b1.trained, b2.trained
    assert n1 != n2  # otherwise the weighting is not tested
    loss = learner.step(b1, n1 / (n1 + n2), None) * n1 / (n1 + n2) + learner.step(b2, n2 / (n1 + n2), None) * n2 / (
        n1 + n2
    )
    learner.close()
    assert abs(loss - steps[0]["loss"]) < 1e-5


def test_two_ranks_weigh_their_trained_targets(tmp_path, train_dir):
    """Data-parallel on examples (2 ranks of batch 2 against 1 rank of batch 4, the same windows a
    step): the ranks train different numbers of targets, and the weighted all-reduce gives the
    single rank's losses and adapter."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.conftest import ROOT

    exs = make_examples(120, 500, 4, 30, seed=9)
    d = write_examples(tmp_path / "ex", {"train": exs, "val": exs[:8]}, vocab=500)
    shutil.copy(train_dir / "tok" / "tokenizer.json", d / "tokenizer.json")
    common = ["--steps", "2", "seq_len=32", "lr=1e-2", "warmup_steps=0", "eval_every=0", "compute_dtype=fp32"]

    def run(out, *extra):
        store = str(train_dir / "store")
        c = [sys.executable, "-m", "odyssey", "train", *extra, "--no-guard", "--quiet", "--model", store,
             "--data", str(d), "--out", str(out), "--ram-budget", "1GiB", *common]  # fmt: skip
        p = subprocess.run(c, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]

    run(tmp_path / "one", "batch_size=4")
    run(tmp_path / "two", "--nproc=2", "batch_size=2")
    s = [BatchSampler(TokenData(d), "train", 32, 2, rank=r, world_size=2) for r in range(2)]
    assert s[0].next_batch().trained != s[1].next_batch().trained  # the ranks' counts differ
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 1e-3
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)  # as tests/test_distributed.py
    l1 = {r["step"]: r["loss"] for r in RunDir(tmp_path / "one").read_metrics("step")}
    l2 = {r["step"]: r["loss"] for r in RunDir(tmp_path / "two").read_metrics("step")}
    assert l1.keys() == l2.keys() == {1, 2} and all(abs(l1[k] - l2[k]) < 1e-5 for k in l1)
