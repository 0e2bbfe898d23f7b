"""Budget-aware residency and selective recompute (odyssey/residency.py): pinned units are read once
and never again, layers that keep activations give peft's gradients, the planner's choices at a
huge, a tight and a middle budget, generation that reads nothing once everything is pinned, and a
run that pins half the model inside a real memory cgroup."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from odyssey.adapters import lora_parameters
from odyssey.config import LoraSettings, format_bytes
from odyssey.engine import Engine
from odyssey.pager import Pager
from odyssey.planner import plan_for_store
from odyssey.residency import FILL, UnitSize, decide, schedule, steady_reads, units_from_labels
from odyssey.runtime import cgroup
from odyssey.store import Store, init_store
from tests.conftest import ROOT, assert_user_error, load_tool, run_cli, tiny_config
from tests.helpers_lora import lora_skeleton, poison_released_slots

MIB = 1 << 20
LORA = LoraSettings(r=4, alpha=8)


def four_layer_store(tmp_path, tied: bool = False, dtype: str = "f32", **kw) -> Store:
    cfg = tiny_config(num_hidden_layers=4, tie_word_embeddings=tied, **kw)
    out = tmp_path / f"s4-{int(tied)}-{dtype}"
    init_store(cfg, out, dtype=dtype, seed=5, progress=False)
    return Store.open(out)


# ---------------------------------------------------------------------------------------------
# the pager: pinned units


def test_pinned_units_are_read_once_across_steps(tmp_path):
    """Layers 2 and 3 pinned, 0, 1 and the head paged through 2 slots: over five training
    schedules the pinned ones are read exactly once (their first use) and served from RAM after."""
    store = four_layer_store(tmp_path)
    sched = schedule("lora", 4, ["head"])
    with Pager(store, slots=2, pinned=[2, 3]) as pager:
        for _ in range(5):
            pager.prefetch(sched)
            for u in sched:
                res = pager.get(u)
                ref = store.load_tensors(u)
                assert all(torch.equal(t, ref[n]) for n, t in res.tensors.items())
                pager.release(res)
        stats = pager.take_stats()
        assert pager.pinned_bytes > 0 and pager.pinned_units == [2, 3]
    reads = [s.unit for s in stats if not s.reused]
    assert reads.count(2) == 1 and reads.count(3) == 1, reads
    assert reads.count("head") == 5 and reads.count(0) >= 5  # the paged ones are still read every step
    # the planner's replay of the slot policy predicts the steady state the pager shows
    last = [s.unit for s in stats[-len(sched) :] if not s.reused]
    assert last == steady_reads(sched, {2, 3}, 2)


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_steady_reads_replays_the_pager(tmp_path, slots):
    """Without pins, the planner's replay of the slot policy names the units the pager reads in
    the third step (2 slots is the default; the reader runs at most one unit ahead then)."""
    store = four_layer_store(tmp_path, tied=True)
    heads = ["head", "embed"]
    sched = schedule("lora", 4, heads)
    with Pager(store, slots=slots) as pager:
        for _ in range(3):
            pager.prefetch(sched)
            for u in sched:
                res = pager.get(u)
                # Like the engine, which computes on a unit while the next is read: hold it until
                # the reader has placed the next unit (else the order depends on thread timing).
                # With one slot the reader waits for this release.
                with pager._cv:
                    assert slots == 1 or pager._cv.wait_for(lambda: pager._order or not pager._queue, 30)
                pager.release(res)
        stats = pager.take_stats()
    got = [s.unit for s in stats[-len(sched) :] if not s.reused]
    if slots <= 2:
        assert got == steady_reads(sched, set(), slots)
    else:  # the reader may run further ahead: the replay is an estimate, never fewer reads
        assert len(got) <= len(steady_reads(sched, set(), slots)) + 1


# ---------------------------------------------------------------------------------------------
# selective recompute: gradients equal peft in RAM


@pytest.mark.parametrize("keep", [0, 1, 3, 4])
def test_kept_layers_give_peft_gradients(tmp_path, keep):
    """LoRA on all seven targets, dropout off, fp32: with 0, some and all layers keeping their
    activations, none of them pinned (their slots serve other units between their forward and
    their backward), the loss and every LoRA gradient equal transformers + peft holding the model
    in RAM, and backward asks the pager for every layer again, kept or recomputed."""
    import peft
    import transformers

    store = four_layer_store(tmp_path)
    skel = lora_skeleton(store, tmp_path, std=0.02)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with Engine(store, compute_dtype="fp32", model=skel, keep=keep) as eng:
        loss = eng.train_step(ids, tgt)
        units = [s.unit for s in eng.pager.take_stats()]
        assert eng.pager.pinned_units == []  # keeping a layer no longer pins it
    assert units == list(range(4)) + ["head"] + list(range(3, -1, -1))
    ours = {k: p.grad for k, p in lora_parameters(skel).items()}

    hf = transformers.LlamaForCausalLM.from_pretrained(store.root, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    logits = ref(input_ids=ids).logits
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tgt.reshape(-1))
    ref_loss.backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if "lora_" in n}
    assert set(theirs) == set(ours) and len(ours) == 2 * 7 * 4
    assert abs(loss - float(ref_loss.detach())) < 1e-5, (loss, float(ref_loss.detach()))
    worst = max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()) for k in ours)
    assert worst < 1e-5, worst


# (keep, pinned layers): kept without pin, kept and pinned, mixed, a recomputed layer pinned
KEEP_PIN = [(2, []), (4, []), (4, [0, 1, 2, 3]), (2, [3]), (3, [0, 3])]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_kept_layers_change_no_number(tmp_path, monkeypatch, dtype):
    """Keeping activations changes where the graph comes from, not what it computes (fp32
    compute): every layer recomputed, and layers kept without pin, kept and pinned, or a mix,
    give the same losses and gradients bit for bit, two steps each, while the pager scribbles
    NaNs over every slot it releases (a saved tensor left in a slot would poison the gradients):
    the slot of each kept layer that is not pinned was scribbled over before its backward. A bf16
    store computes with copies converted to fp32: the kept graphs hold none of them."""
    store = four_layer_store(tmp_path, dtype=dtype)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    tgt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))

    def run(keep, pinned):
        skel = lora_skeleton(store, std=0.02)
        with Engine(store, compute_dtype="fp32", model=skel, keep=keep, pinned=pinned) as eng:
            losses = [eng.train_step(ids, tgt) for _ in range(2)]
        return losses, {k: p.grad.clone() for k, p in lora_parameters(skel).items()}

    ref_losses, ref_grads = run(0, [])  # the plain pager, every layer recomputed
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in ref_grads.values())
    poisoned = poison_released_slots(monkeypatch)
    for keep, pinned in [(0, [])] + KEEP_PIN:
        poisoned.clear()
        losses, grads = run(keep, pinned)
        assert losses == ref_losses, (keep, pinned)
        assert all(torch.equal(grads[k], ref_grads[k]) for k in grads), (keep, pinned)
        # the layers kept and not pinned, but the last (its backward may come from its slot)
        assert {i for i in range(4 - keep, 3) if i not in pinned} <= set(poisoned), (keep, poisoned)


@pytest.mark.parametrize("keep", [0, 2])
def test_matrices_converted_at_each_use_change_no_number(tmp_path, monkeypatch, keep):
    """A bf16 store computed in fp32 converts each projection into the workspace at its use and
    again in backward (CastWeight), not the layer at once, and the head's chunks into the same
    workspace: the losses and LoRA gradients are those of the whole-layer copies and new head
    chunks, bit for bit, and the workspace holds one matrix, the largest of a layer's matrix and
    a head chunk (here the head: 256 rows of 64 against 160 x 64)."""
    from odyssey.dtypes import VOCAB_CHUNK
    from odyssey.planner import largest_layer_matrix

    store = four_layer_store(tmp_path, dtype="bf16")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))

    def run(per_matrix):
        monkeypatch.setattr(Engine, "cast_per_matrix", per_matrix)
        skel = lora_skeleton(store, std=0.02)
        with Engine(store, compute_dtype="fp32", model=skel, keep=keep) as eng:
            losses = [eng.train_step(ids, ids) for _ in range(2)]
            work = eng.workspace.nbytes
        return losses, {k: p.grad.clone() for k, p in lora_parameters(skel).items()}, work

    losses, grads, work = run(True)
    ref_losses, ref_grads, ref_work = run(False)
    assert losses == ref_losses
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    chunk = min(store.config.vocab_size, VOCAB_CHUNK) * store.config.hidden_size
    assert chunk > largest_layer_matrix(store) and work == chunk * 4 and ref_work == 0


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_kept_graph_holds_no_base_weight(tmp_path, monkeypatch, dtype):
    """All four layers keep their graphs, none pinned. When backward starts, no base weight bound
    during forward is alive (a slot view; with a bf16 store, its copy converted to fp32): autograd
    saved each layer's nine weights (seven projections, two norms) as handles, or with a bf16
    store (fp32 compute) its two norms, the projections converted at each use into the workspace
    (CastWeight) and saving nothing; no tensor it saved lies in a pager slot or the workspace."""
    import gc
    import weakref

    from odyssey.saved import SavedWeights, WeightHandle

    store = four_layer_store(tmp_path, dtype=dtype)
    storages = []  # weak references to the storage of every weight bound so far
    real_bind = Engine.bind

    def bind(self, res):
        real_bind(self, res)
        storages.extend(
            weakref.ref(self.bound_weight(n).untyped_storage())
            for n in res.tensors
            if n in self._bound and self._bound[n][1] is not None  # a CastWeight binds no Parameter
        )

    saved = []
    real_pack = SavedWeights.pack

    def pack(self, t):
        saved.append(real_pack(self, t))
        return saved[-1]

    monkeypatch.setattr(Engine, "bind", bind)
    monkeypatch.setattr(SavedWeights, "pack", pack)
    alive = []

    def between():  # called after each layer's forward, then after the head pass
        between.calls += 1
        if between.calls == 5:  # backward comes next
            gc.collect()
            alive.append((len(storages), sum(r() is not None for r in storages)))

    between.calls = 0
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    skel = lora_skeleton(store, std=0.02)
    with Engine(store, compute_dtype="fp32", model=skel, keep=4) as eng:
        eng.train_step(ids, ids, between=between)
        slots = []
        for s in eng.pager._slots:
            view = torch.frombuffer(s.buf, dtype=torch.uint8)
            slots.append((view.data_ptr(), view.numel()))
            del view
        assert all(s.grad is not None for s in lora_parameters(skel).values())
        work = [(b.data_ptr(), b.untyped_storage().nbytes()) for b in eng.workspace._bufs.values()]
    # f32: nine Parameters a layer (seven projections, two norms); a bf16 store in fp32 binds its
    # projections as CastWeights (converted into the workspace at each use, saving nothing): two
    params = 9 if dtype == "f32" else 2
    assert alive == [(4 * params, 0)] and len(storages) == 2 * 4 * params  # bound again in backward
    handles = {h.name for h in saved if isinstance(h, WeightHandle)}
    assert handles == {
        n for i in range(4) for n, t in store.page(i).tensors.items() if dtype == "f32" or len(t[2]) == 1
    }
    assert (len(work) == 1) == (dtype == "bf16")  # the workspace exists only where weights convert
    tensors = [t for t in saved if isinstance(t, torch.Tensor) and t.numel()]
    assert len(tensors) > 4 * 9
    for t in tensors:  # nothing saved lies in a slot, nor in the workspace the next matrix overwrites
        lo, hi = t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()
        assert not any(lo < a + n and a < hi for a, n in slots + work), t.shape


# ---------------------------------------------------------------------------------------------
# the plan


def test_plan_huge_tight_and_between(tmp_path):
    """A huge budget pins every unit and keeps every layer's activations (no buffer pool: the
    slots are never touched); the smallest budget that fits pins nothing, keeps nothing and plans
    exactly what it planned before residency; a budget between pins and keeps some."""
    store = four_layer_store(tmp_path, hidden_size=128, intermediate_size=352, vocab_size=512)
    kw = dict(mode="lora", seq_len=64, lora=LORA, runtime=100 * MIB, compute_dtype="fp32")
    free = plan_for_store(store, **kw)  # no budget: no residency, the plan of old
    assert free.residency is None
    huge = plan_for_store(store, budget=1 << 40, **kw)
    r = huge.residency
    assert r.kept == 4 and len(r.pinned) == r.units == 5 and r.read_bytes == 0
    assert huge.terms["buffer pool"] == 0 and huge.terms["pinned units"] == r.pinned_bytes
    assert "4 of 4 layers keep activations" in huge.table() and "5 of 5 units pinned" in huge.table()

    tight = plan_for_store(store, budget=free.total, **kw)
    assert tight.residency.kept == 0 and tight.residency.pinned == []
    assert tight.terms == free.terms and tight.peak == free.peak
    assert tight.residency.read_bytes > 0
    # the residency never takes the plan past 90 % of the budget (the guard's checkpoint line)
    assert plan_for_store(store, budget=huge.total, **kw).residency.pinned != huge.residency.pinned

    kept_one = huge.residency.kept_bytes // 4  # what a kept layer holds
    half = plan_for_store(store, budget=int((free.total + 2.5 * kept_one) / FILL), **kw).residency
    # activations first: a layer is kept before any unit is pinned; only what is left, smaller than
    # another layer's activations, may go to pins
    assert 0 < half.kept < 4 and half.pinned_bytes < half.kept_bytes / half.kept
    mid_budget = int((free.total + 7 * huge.total) / 8 / FILL)  # residency fills 90 % of a budget
    mid = plan_for_store(store, budget=mid_budget, **kw)
    m = mid.residency
    assert mid.fits and 0 < len(m.pinned) < m.units and 0 < m.read_bytes < tight.residency.read_bytes
    assert m.kept == 4 and m.pinned[0] == 3  # every layer kept, then pins from the last layer
    assert m.kept_paged == 4 - sum(isinstance(u, int) for u in m.pinned) > 0  # kept layers need no pin
    assert f"4 of 4 layers keep activations ({format_bytes(m.kept_bytes)}), 0 recomputed in backward\n" in mid.table()
    assert f"{m.kept_paged} kept layer(s) not pinned: paged in again for backward" in mid.table()
    # --no-pin: nothing pinned, the same layers kept; --recompute all: none kept
    nopin = plan_for_store(store, budget=mid_budget, pin=False, **kw)
    assert nopin.residency.pinned == [] and nopin.residency.kept == 4 and "(--no-pin)" in nopin.table()
    allre = plan_for_store(store, budget=1 << 40, recompute="all", **kw).residency
    assert allre.kept == 0 and len(allre.pinned) == 5


def test_decide_keeps_every_layer_it_can_then_pins():
    """A plan that costs 10 bytes a kept layer plus the pinned buffers (20 a layer, 15 the head
    unit): 75 bytes keep all four layers and pin layer 3 and the head with the 35 left. Before,
    a kept layer was pinned too (30 each): 75 kept two. 35 bytes keep three and pin nothing;
    --no-pin keeps the same four; --recompute all pins; generation keeps none. With spill, the
    layers not kept spill their activations to disk when one in flight fits."""
    layer = lambda i: UnitSize(i, 18, 20)  # noqa: E731
    head = [UnitSize("head", 12, 15)]

    def decide_at(cap, **kw):
        return decide(
            mode=kw.pop("mode", "lora"),
            layers=4,
            head=head,
            layer_size=layer,
            slots=2,
            fits=lambda pinned, kept, paged_any, spilled: 10 * kept + pinned + 15 * spilled <= cap,
            **kw,
        )

    r = decide_at(75)
    assert (r.kept, r.pinned, r.pinned_bytes, r.kept_paged) == (4, [3, "head"], 35, 3)
    assert r.unit_bytes == 8 * 18 + 12  # every layer twice a step, kept or not
    assert r.to_json()["kept_paged"] == 3 and r.to_json()["pinned"] == [3, "head"]
    assert r.read_bytes == 18 * len(steady_reads(schedule("lora", 4, ["head"]), {3, "head"}, 2)) > 0
    assert r.lines()[3].strip() == "3 kept layer(s) not pinned: paged in again for backward"
    assert (decide_at(35).kept, decide_at(35).pinned) == (3, [])
    nopin = decide_at(75, pin=False)
    assert (nopin.kept, nopin.pinned) == (4, []) and "(--no-pin)" in nopin.lines()[0]
    allre = decide_at(75, recompute="all")
    assert (allre.kept, allre.pinned) == (0, [3, 2, 1, "head"])
    everything = decide_at(1000)
    assert everything.kept == 4 and everything.kept_paged == 0 and everything.read_bytes == 0
    assert len(everything.lines()) == 3  # no kept layer is paged
    assert decide_at(75, mode="forward").kept == 0
    # spill (15 bytes in flight): 35 keeps two and spills the other two instead of keeping three
    # and recomputing one; a budget that keeps all spills none; 14 cannot afford the spill
    sp = decide_at(35, spill=True)
    assert (sp.kept, sp.spilled, sp.pinned) == (2, 2, []) and "2 layer(s) keep theirs on disk" in sp.lines()[3]
    assert (decide_at(75, spill=True).kept, decide_at(75, spill=True).spilled) == (4, 0)
    assert (decide_at(14, spill=True).kept, decide_at(14, spill=True).spilled) == (1, 0)
    assert decide_at(75, spill=True, recompute="all").spilled == 0
    assert decide_at(75, spill=True, mode="forward").spilled == 0


def test_generation_plan_pins_with_what_is_left(tmp_path):
    store = four_layer_store(tmp_path, tied=True)
    kw = dict(mode="forward", seq_len=32, runtime=100 * MIB, compute_dtype="fp32")
    free = plan_for_store(store, **kw)
    huge = plan_for_store(store, budget=(free.total + 64 * MIB) * 2, **kw).residency
    assert huge.kept == 0 and huge.pinned == [3, 2, 1, 0, "head", "embed"] and huge.read_bytes == 0
    assert "a token" in huge.lines()[1]
    assert plan_for_store(store, budget=free.total, **kw).residency.pinned == []


# ---------------------------------------------------------------------------------------------
# generation


def test_generation_with_everything_pinned_reads_nothing_after_the_first_token(tmp_path):
    from odyssey.generate import generate_ids

    store = four_layer_store(tmp_path, tied=True)
    p = plan_for_store(store, mode="forward", seq_len=32, budget=1 << 40, runtime=0, compute_dtype="fp32")
    pinned = units_from_labels(store, p.residency.pinned)
    assert len(pinned) == 6
    with Engine(store, compute_dtype="fp32") as plain:
        want = list(generate_ids(plain, [1, 2, 3], 6))
    with Engine(store, compute_dtype="fp32", pinned=pinned) as eng:
        per_token = []
        got = []
        for tok in generate_ids(eng, [1, 2, 3], 6):
            got.append(tok)
            per_token.append(eng.pass_stats(0.0).pagein_bytes)
    assert got == want
    assert per_token[0] == sum(store.page(u).nbytes for u in pinned)
    assert per_token[1:] == [0] * 5


# ---------------------------------------------------------------------------------------------
# a run that pins half the model, inside a real memory cgroup

OK, WHY = cgroup.available()


@pytest.mark.skipif(not OK, reason=f"memory cgroups cannot be made here: {WHY}")
def test_training_that_pins_half_stays_under_its_budget_in_a_cgroup(tmp_path):
    """8 layers of 12.6 MiB (f32): at a budget between the plan without residency and the plan
    with everything pinned, `odyssey train` keeps every layer's activations, pins part of the
    model with what is left, reads the rest every step (kept layers too), and its cgroup peak (anonymous and file pages)
    stays under the budget, which is the cgroup's limit."""
    from odyssey.data import prepare_data
    from odyssey.planner import RUNTIME_FALLBACK

    cfg = tiny_config(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    init_store(cfg, tmp_path / "store", dtype="f32", seed=1, progress=False)
    load_tool("make_sample_corpus").write_corpus(tmp_path / "corpus", "stories", 40, seed=2)
    prepare_data(
        [tmp_path / "corpus"], tmp_path / "tok", vocab_size=512, model_store=tmp_path / "store", progress=False
    )
    store = Store.open(tmp_path / "store")
    kw = dict(mode="lora", seq_len=128, lora=LoraSettings(), runtime=RUNTIME_FALLBACK["lora"], compute_dtype="fp32")
    low = plan_for_store(store, **kw).total
    high = plan_for_store(store, budget=1 << 40, **kw).total
    budget = int((low + high) / 2 / FILL)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "odyssey",
        "train",
        "--model",
        str(tmp_path / "store"),
        "--data",
        str(tmp_path / "tok"),
    ]
    cmd += ["--out", str(run), "--ram-budget", str(budget), "--steps", "3", "--quiet", "--no-guard"]
    cmd += ["seq_len=128", "eval_every=0", "checkpoint_every=3", "compute_dtype=fp32"]
    r = cgroup.run_in_cgroup(cmd, budget, cwd=ROOT, timeout=300)
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind":"step"' in x]
    print(
        f"\nbudget {budget / MIB:.0f} MiB (plan {low / MIB:.0f} paged .. {high / MIB:.0f} resident): peak "
        f"{r.peak_bytes / MIB:.0f} MiB, pinned {[s['pinned_units'] for s in steps]} ({steps[-1]['pinned_mib']} MiB), "
        f"kept {steps[-1]['kept_layers']}, read {[s['pagein_bytes'] for s in steps]}"
    )
    assert r.returncode == 0 and not r.oom_killed, r
    assert [s["step"] for s in steps] == [1, 2, 3]
    last = steps[-1]
    assert 0 < last["pinned_units"] < 9 and last["kept_layers"] == 8  # kept first; most of them paged
    assert 0 < last["pagein_bytes"] < steps[0]["pagein_bytes"]  # the pinned units were read in step 1 only
    assert r.peak_bytes <= budget
    assert last["rss_anon_mib"] * MIB < 0.9 * budget  # the guard's checkpoint line stays clear


# ---------------------------------------------------------------------------------------------
# the commands


def test_train_with_residency_gives_the_losses_of_paging_everything(train_dir, tmp_path):
    """`odyssey train` at 1 GiB (the tiny model: every unit pinned, both layers keep activations)
    and with `--no-pin --recompute all` (everything paged and recomputed, as before residency):
    the same losses, bit for bit; the step records say what each did."""
    from odyssey.runtime.runlog import RunDir

    def train(out, *extra):
        p = run_cli(
            "train", "--no-guard", "--quiet", "--model", train_dir / "store", "--data", train_dir / "tok",
            "--out", out, "--ram-budget", "1GiB", "--steps", "3", "seq_len=32", "eval_every=0",
            "compute_dtype=fp32", *extra,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        events = " ".join(r.get("message", "") for r in RunDir(out).read_metrics("event"))
        assert "residency:" not in p.stderr  # --quiet: the start notes stay in the run's events
        return RunDir(out).read_metrics("step"), events

    on, said = train(tmp_path / "on")
    off, said_off = train(tmp_path / "off", "--no-pin", "--recompute", "all")
    assert "residency: 3 of 3 units pinned" in said and "2 of 2 layers keep activations; reads" in said
    assert "residency: 0 of 3 units pinned (0 B), 0 of 2 layers keep activations" in said_off
    assert [r["loss"] for r in on] == [r["loss"] for r in off]
    assert [r["grad_norm"] for r in on] == [r["grad_norm"] for r in off]
    assert (on[-1]["pinned_units"], on[-1]["kept_layers"], on[-1]["pagein_bytes"]) == (3, 2, 0)
    assert (off[-1]["pinned_units"], off[-1]["kept_layers"]) == (0, 0) and off[-1]["pagein_bytes"] > 0
    assert on[0]["pagein_bytes"] > 0 and on[0]["resident_bytes"] < on[-1]["resident_bytes"]


def test_plan_command_shows_residency_and_its_options(train_dir):
    store = train_dir / "store"
    p = run_cli("plan", "--model", store, "--ram-budget", "1GiB", "--seq-len", "32")
    assert p.returncode == 0, p.stderr
    assert "residency: 3 of 3 units pinned" in p.stdout and "2 of 2 layers keep activations" in p.stdout
    p = run_cli("plan", "--model", store, "--ram-budget", "1GiB", "--seq-len", "32", "--no-pin", "--recompute", "all")
    assert p.returncode == 0, p.stderr
    assert (
        "residency: 0 of 3 units pinned" in p.stdout and "0 of 2 layers keep activations (--recompute all)" in p.stdout
    )
    p = run_cli("plan", "--model", store, "--ram-budget", "1GiB", "--mode", "forward", "--seq-len", "32")
    assert "residency: 3 of 3 units pinned" in p.stdout and "keep activations" not in p.stdout
    p = run_cli("train", "--model", store, "--data", train_dir / "tok", "--out", train_dir / "bad", "--ram-budget",
                "1GiB", "recompute=some")  # fmt: skip
    assert_user_error(p, "recompute", "auto or all")
    assert not (train_dir / "bad").exists()
