"""Quantized GGUF export (`odyssey export --formats gguf --gguf-type q4_k ...`):

- the k-quantizers (odyssey/gguf/quantize.py) write bytes that the format's reference reader,
  `gguf.quants.dequantize`, reads back as the nearest point of each sub-block's grid, on random
  blocks and on all-zero, constant, tiny, large and outlier blocks (all finite);
- every type written for a small model (hidden 256: every row a whole number of 256-element
  super-blocks) reads back through gguf.GGUFReader with llama-quantize's type mix, and through
  odyssey.gguf.reader/dequant close to the source weights, with the error ordered by bits;
- llama-quantize's fallback for rows that are not whole blocks, said in one line;
- transformers' own GGUF loader runs a q4_0 and a q4_k export close to the source model;
- slow (llama-cpp-python): the k-quant bytes against llama.cpp's own reference quantizers (the
  functions of its libggml-base), llama.cpp running q4_k and q6_k exports against transformers on
  the same files, and this Q4_K against `llama_model_quantize`'s on the same f32 GGUF.
"""

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from odyssey.errors import OdysseyError
from odyssey.export.gguf import gguf_bytes, write_gguf
from odyssey.export.gguf_layout import choose_type, gguf_name, use_more_bits
from odyssey.gguf.dequant import _scale_min_k4, dequantize
from odyssey.gguf.quantize import quantize
from odyssey.gguf.reader import GGUFFile
from tests.test_gguf import hf_values, make_store, undo_permutation

Q = gguf.GGMLQuantizationType
QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
SHAPE = dict(hidden_size=256, intermediate_size=512)  # 4 heads of 64, 2 KV heads: rows of 256 and 512


def edge_blocks() -> torch.Tensor:
    """(64, 256) f32: N(0, 0.02) rows, the first ones replaced by the blocks that break quantizers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * 0.02
    x[0] = 0.0  # all zero
    x[1] = 0.01  # constant, positive (Q4_K: min clamped to 0)
    x[2] = -0.03  # constant, negative
    x[3, 5] = 1.0  # one outlier of 50 sigma
    x[4, ::16] *= 40  # an outlier in every 16-element sub-block
    x[5, :32] = 0.0  # one zero sub-block
    x[6] *= 1e-2  # small: f16 scales in their subnormal range
    x[11] *= 1e-5  # tiny: scales below f16's smallest subnormal (llama.cpp's quantizers write zeros)
    x[7] *= 3e3  # large: |x| up to ~200
    x[8, :128], x[8, 128:] = 0.0, 0.5  # half zero, half constant
    x[9] = x[9].abs()  # all positive
    x[10] = -x[10].abs()  # all negative
    return x


def grids(blocks: np.ndarray, qtype: str, n: int):
    """Each sub-block's grid as stored: (step d * sc, offset, levels) with value = step * q - offset,
    q in 0..levels - 1; shapes (n, sub-blocks)."""
    b = torch.from_numpy(blocks)
    if qtype == "Q6_K":
        d = b[:, 208:210].contiguous().view(torch.float16).float()
        sc = b[:, 192:208].contiguous().view(torch.int8).float()
        step = d * sc
        return step.numpy(), (32 * step).numpy(), 64  # (q - 32) * step
    d, dmin = (b[:, i : i + 2].contiguous().view(torch.float16).float() for i in (0, 2))
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (d * sc.float()).numpy(), (dmin * mn.float()).numpy(), 16 if qtype == "Q4_K" else 32


@pytest.mark.parametrize("qtype", K_TYPES)
def test_k_quant_bytes_read_back_as_the_nearest_grid_point(qtype):
    """gguf.quants.dequantize (the format's reference reader) and Odyssey's dequantizer read our
    bytes as the same values, and each value is the grid point of its sub-block nearest to the
    source (ties aside); a sub-block of step 0 reads as its offset. So the values, scales and
    offsets sit where the format puts them, and the quantizer rounds to nearest as llama.cpp's."""
    x = edge_blocks()
    raw = quantize(x, qtype)
    y = gguf.quants.dequantize(raw, Q[qtype])
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(dequantize(raw, qtype, x.shape).numpy(), y)  # our reader agrees bit for bit

    step, offset, levels = grids(raw, qtype, x.shape[0])
    sub = step.shape[1]
    xs, ys = x.numpy().reshape(64, sub, -1), y.reshape(64, sub, -1)
    st, off = step[..., None], offset[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.round((xs + off) / st), 0, levels - 1)
    nearest = np.where(st != 0, st * q - off, -off)
    err = np.abs(ys - nearest)
    tie = np.abs(np.abs((xs + off) / np.where(st != 0, st, 1)) % 1 - 0.5) < 1e-3  # rounding ties: either side
    assert (err <= 1e-6 * (np.abs(xs) + np.abs(off)) + 1e-12)[~tie].all(), qtype

    # the blocks that break quantizers
    assert (y[0] == 0).all()  # all zero stays zero
    assert np.abs(y[1] - 0.01).max() <= 0.01 / 30 and np.abs(y[2] + 0.03).max() <= 0.03 / 30  # constants
    assert np.abs(y[5, :32]).max() <= 0.02 / 10  # a zero sub-block next to non-zero ones
    assert np.abs(y[3, 5] - 1.0) < 0.05  # the outlier itself survives
    for row, bound in ((6, 0.3), (7, 0.15)):  # small (coarser scales) and large: near the plain rows' error
        rel = np.sqrt(((y[row] - x[row].numpy()) ** 2).mean()) / x[row].std().item()
        assert rel < bound, (row, rel)
    assert np.abs(y[11]).max() <= np.abs(x[11].numpy()).max()  # tiny: never larger than the source


def test_k_quant_error_ordered_by_bits():
    """On N(0, 1) blocks, relative RMS error: Q6_K < Q5_K < Q4_K, each near what its step predicts
    (a uniform quantizer of step s errs by s / sqrt(12) RMS). Q4_K, Q5_K: 16 or 32 levels over a
    32-element sub-block's range (~4 sigma, min clamped to <= 0) -> ~0.08 and ~0.04 sigma, less
    with llama.cpp's refit scale; Q6_K: 64 levels over +-max of 16 elements (~2 x 1.8 sigma) ->
    ~0.016 sigma. Measured 0.071, 0.036, 0.018 (bounds 1.4 times that)."""
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    rel = {}
    for qtype in K_TYPES:
        y = gguf.quants.dequantize(quantize(x, qtype), Q[qtype])
        rel[qtype] = float(np.sqrt(((y - x.numpy()) ** 2).mean()))
    print({k: round(v, 4) for k, v in rel.items()})
    assert rel["Q6_K"] < rel["Q5_K"] < rel["Q4_K"]
    assert rel["Q4_K"] < 0.1 and rel["Q5_K"] < 0.05 and rel["Q6_K"] < 0.025


def test_chunks_on_threads_write_what_one_call_writes(monkeypatch):
    """quantize() splits a tensor into chunks of rows, quantized on a pool of threads: the bytes
    equal the kernel's on the whole tensor (k-quants) and gguf.quants' (the others)."""
    import odyssey.gguf.quantize as qz

    x = torch.randn(24, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    monkeypatch.setattr(qz, "CHUNK_ELEMENTS", 2 * 512)  # 2 rows a chunk: 12 chunks
    monkeypatch.setattr(qz, "GGUF_CHUNK_ELEMENTS", 2 * 512)
    assert torch.get_num_threads() >= 1
    for qtype, kernel in qz._K_KERNELS.items():
        whole = kernel(x.reshape(-1, 256)).reshape(24, -1).numpy()
        np.testing.assert_array_equal(quantize(x, qtype), whole, err_msg=qtype)
    for qtype in ("Q8_0", "Q4_0", "Q5_1"):
        np.testing.assert_array_equal(quantize(x, qtype), gguf.quants.quantize(x.numpy(), Q[qtype]), err_msg=qtype)
    threads = torch.get_num_threads()
    quantize(x, "Q4_K")
    assert torch.get_num_threads() == threads  # the caller's intra-op threads are restored


def test_values_a_f16_scale_cannot_hold_are_refused():
    x = torch.zeros(2, 256)
    for bad, what in ((float("nan"), "NaN or inf"), (float("inf"), "NaN or inf"), (1e6, r"magnitude 1e\+06")):
        x[1, 7] = bad
        for qtype in ("Q8_0", "Q4_K"):
            with pytest.raises(OdysseyError, match=rf"blk.0.attn_q.weight holds (a value of )?{what}.*--gguf-type f32"):
                quantize(x, qtype, "blk.0.attn_q.weight")


# --------------------------------------------------------------------------------------------
# which tensor gets which type


def test_use_more_bits_is_llama_quantizes_layer_choice():
    """Llama 3.1 8B's 32 layers: llama-quantize's Q4_K_M gives attn_v and ffn_down of these Q6_K."""
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(2) if use_more_bits(i, 2)] == [1]


def test_type_mix_and_fallbacks():
    def t(gguf_type, shape, name="blk.0.attn_q.weight", n=32, tied=False):
        qtype, chosen = choose_type(gguf_type, shape, name, n, tied)
        return qtype.name, chosen

    # vectors F32; the head Q6_K in the 4- to 6-bit files (the tied embedding too), Q8_0 in q8_0
    assert t("q4_k", (4096,), "blk.0.attn_norm.weight") == ("F32", None)
    assert t("q4_0", (128256, 4096), "output.weight") == ("Q6_K", None)
    assert t("q4_0", (128256, 4096), "token_embd.weight") == ("Q4_0", None)
    assert t("q4_0", (128256, 4096), "token_embd.weight", tied=True) == ("Q6_K", None)
    assert t("q8_0", (128256, 4096), "output.weight") == ("Q8_0", None)
    # Q4_K_M / Q5_K_M: attn_v and ffn_down Q6_K where use_more_bits, the rest the mix's type
    assert t("q4_k", (1024, 4096), "blk.0.attn_v.weight") == ("Q6_K", None)
    assert t("q4_k", (1024, 4096), "blk.4.attn_v.weight") == ("Q4_K", None)
    assert t("q5_k", (4096, 14336), "blk.31.ffn_down.weight") == ("Q6_K", None)
    assert t("q5_k", (4096, 14336), "blk.5.ffn_down.weight") == ("Q5_K", None)
    assert t("q4_k", (14336, 4096), "blk.0.ffn_up.weight") == ("Q4_K", None)
    # rows not whole blocks: llama-quantize's fallback (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), else F16
    assert t("q4_k", (64, 320)) == ("Q5_0", "Q4_K")
    assert t("q5_k", (64, 320)) == ("Q5_1", "Q5_K")
    assert t("q6_k", (64, 320)) == ("Q8_0", "Q6_K")
    assert t("q4_k", (64, 336)) == ("F16", "Q4_K")  # 336 is not a multiple of 32 either
    assert t("q4_0", (64, 48)) == ("F16", "Q4_0")
    assert t("q4_0", (320, 64), "output.weight") == ("Q8_0", "Q6_K")  # the head of a 64-wide model


# --------------------------------------------------------------------------------------------
# exports


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("gguf-quant"), **SHAPE).root


def expected_types(gguf_type: str, name: str) -> str:
    """The mix of a 2-layer, untied model of hidden 256 (every matrix row a multiple of 256)."""
    base = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1"}.get(gguf_type)
    base = base or gguf_type.upper()
    if name.endswith("norm.weight"):
        return "F32"
    if name == "output.weight":
        return "Q8_0" if gguf_type == "q8_0" else "Q6_K"
    if gguf_type in ("q4_k", "q5_k") and name in ("blk.1.attn_v.weight", "blk.1.ffn_down.weight"):
        return "Q6_K"  # use_more_bits(1, 2)
    return base


def test_every_type_reads_back_close_to_the_source(built, tmp_path):
    """Each type: general.file_type as llama-quantize writes it, quantization_version 2, every
    tensor's type as llama-quantize's mix, the summary's type mix, the free-disk estimate an upper
    bound; values (odyssey.gguf.reader + dequant, Q/K permutation undone) within the type's error of
    the source. Relative RMS error of the matrices in the file's own type (N(0, 0.02) weights):
    Q8_0 < Q6_K < every 5-bit type < every 4-bit type."""
    from odyssey.store import Store

    store = Store.open(built)
    cfg = store.config
    ftype = {
        "q8_0": "MOSTLY_Q8_0",
        "q4_0": "MOSTLY_Q4_0",
        "q4_1": "MOSTLY_Q4_1",
        "q5_0": "MOSTLY_Q5_0",
        "q5_1": "MOSTLY_Q5_1",
        "q4_k": "MOSTLY_Q4_K_M",
        "q5_k": "MOSTLY_Q5_K_M",
        "q6_k": "MOSTLY_Q6_K",
    }
    err = {}
    for gguf_type in QUANT_TYPES:
        path = tmp_path / f"m-{gguf_type}.gguf"
        s = write_gguf(store, path, gguf_type, progress=False)
        r = gguf.GGUFReader(path)
        assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType[ftype[gguf_type]])
        assert r.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION == 2
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types == {n: expected_types(gguf_type, n) for n in types}, gguf_type
        mix = {k: v["tensors"] for k, v in s["types"].items()}
        assert mix == {k: list(types.values()).count(k) for k in set(types.values())}
        assert 0 < gguf_bytes(store, gguf_type) - path.stat().st_size < 2 << 20

        f = GGUFFile.open(path)
        own = []  # relative RMS errors of the tensors in the file's own type
        for hf_name in cfg.all_shapes():
            name = gguf_name(hf_name, cfg.family)
            t = f.tensor(name)
            got = undo_permutation(name, dequantize(f.read_raw(name), t.qtype, t.shape).numpy(), cfg)
            want = hf_values(store, hf_name)
            rel = float(np.sqrt(((got - want) ** 2).mean()) / want.std()) if want.ndim == 2 else 0.0
            if want.ndim == 1:
                np.testing.assert_array_equal(got, want)  # norms: F32, exact
            else:
                assert rel < 0.2, (gguf_type, name, rel)
            if types[name] == expected_types(gguf_type, "blk.0.attn_q.weight"):
                own.append(rel)
        err[gguf_type] = float(np.mean(own))
    print({k: round(v, 4) for k, v in err.items()})
    five, four = [err[t] for t in ("q5_0", "q5_1", "q5_k")], [err[t] for t in ("q4_0", "q4_1", "q4_k")]
    assert err["q8_0"] < err["q6_k"] < min(five) and max(five) < min(four)
    assert err["q8_0"] < 0.01 and max(four) < 0.15


def test_rows_that_are_not_whole_blocks_fall_back_with_one_note(tmp_path, capsys):
    """intermediate 320: ffn_down's rows (320) are not whole 256-element blocks: Q4_K -> Q5_0 in
    layer 0, its Q6_K (use_more_bits) -> Q8_0 in layer 1, as llama-quantize does; said in one line."""
    store = make_store(tmp_path, hidden_size=256, intermediate_size=320)
    path = tmp_path / "m.gguf"
    write_gguf(store, path, "q4_k", progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q5_0" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == types["blk.0.ffn_gate.weight"] == "Q4_K"  # rows of 256
    notes = [line for line in capsys.readouterr().out.splitlines() if "fall back" in line]
    assert notes == [
        "note: 2 matrices fall back as llama-quantize does: 1 as Q5_0 instead of Q4_K (rows of 320, not a "
        "multiple of 256); 1 as Q8_0 instead of Q6_K (rows of 320, not a multiple of 256)"
    ]


def test_cli_prints_the_type_mix(built, tmp_path):
    from tests.conftest import run_cli

    p = run_cli("export", built, "--out", tmp_path / "exp", "--formats", "gguf", "--gguf-type", "q4_k", "--quiet")
    assert p.returncode == 0, p.stderr
    line = next(s for s in p.stdout.splitlines() if "tensors:" in s)
    assert "Q4_K 13 (" in line and "Q6_K 3 (" in line and "F32 5 (" in line, line
    assert (tmp_path / "exp" / "model-q4_k.gguf").exists()


# --------------------------------------------------------------------------------------------
# transformers' GGUF loader


@pytest.mark.parametrize("gguf_type", ["q4_0", "q4_k"])
def test_transformers_runs_the_export_close_to_the_source(built, tmp_path, gguf_type):
    """AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (which dequantizes with gguf's
    readers) against the engine on the source store, fp32, 16 positions. The f32 export agrees to
    1e-5 (so the comparison measures the quantization alone); Q4 weights err by ~0.1-0.14 of their
    RMS (test above), and this near-linear model (weights N(0, 0.02), two layers) carries that into
    the logits: measured RMS logit error / logit std 0.14 (q4_k), 0.19 (q4_0); bound 0.3. A broken
    layout (the Q/K permutation left out, values in the wrong nibbles) gives errors of the order of
    the logits themselves (>= 1)."""
    from transformers import AutoModelForCausalLM

    from odyssey.engine import Engine
    from odyssey.store import Store

    store = Store.open(built)
    ids = torch.tensor([[1, 5, 9, 40, 77, 120, 200, 33, 8, 250, 17, 3, 99, 150, 42, 7]])
    with Engine(store, compute_dtype="fp32") as eng:
        want = eng.logits(ids).numpy()[0]
    rel = {}
    for t in ("f32", gguf_type):
        write_gguf(store, tmp_path / f"m-{t}.gguf", t, progress=False)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"m-{t}.gguf", dtype=torch.float32)
        with torch.no_grad():
            got = model(ids).logits.numpy()[0]
        rel[t] = float(np.sqrt(((got - want) ** 2).mean()) / want.std())
    print(rel)
    assert rel["f32"] < 1e-4
    assert 0.01 < rel[gguf_type] < 0.3


# --------------------------------------------------------------------------------------------
# llama.cpp (slow: needs llama-cpp-python, which `make test-slow` builds)


def ggml_base():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed in this environment; run `make test-slow`")
    lib = next(Path(llama_cpp.__file__).parent.glob("lib/libggml-base.so*"))
    return ctypes.CDLL(str(lib))


def llama_reference(x: torch.Tensor, qtype: str) -> np.ndarray:
    """llama.cpp's own quantize_row_<type>_ref (ggml-quants.c, the path llama-quantize takes
    without an importance matrix) on x (n, 256) -> (n, block bytes)."""
    fn = getattr(ggml_base(), f"quantize_row_{qtype[:2].lower()}_K_ref")
    a = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    out = np.zeros((a.shape[0], gguf.GGML_QUANT_SIZES[Q[qtype]][1]), dtype=np.uint8)
    fn(a.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(a.size))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("qtype", K_TYPES)
def test_k_quant_bytes_equal_llama_cpps(qtype):
    """Against llama.cpp's reference quantizer on 4096 blocks (N(0, 0.02) plus the edge blocks):
    the same bytes for at least 95% of the blocks (the rest: two candidate scales whose errors agree
    to ~1e-7, which float32 sums in another order rank the other way; measured 97.6% Q4_K, 97.5%
    Q5_K, 99.5% Q6_K), the same RMS error within 0.5% (measured: equal to 5-6 digits); the zero,
    tiny and one-signed edge blocks byte for byte, the others with no larger error."""
    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    x[:64] = edge_blocks()
    ours, theirs = quantize(x, qtype), llama_reference(x, qtype)
    same = float((ours == theirs).all(axis=1).mean())
    err = [(gguf.quants.dequantize(b, Q[qtype]) - x.numpy()) ** 2 for b in (ours, theirs)]  # (4096, 256)
    rms = [float(np.sqrt(e[64:].mean())) for e in err]  # the N(0, 0.02) blocks
    print(f"{qtype}: {same:.2%} of blocks identical; RMS error ours {rms[0]:.6g}, llama.cpp {rms[1]:.6g}")
    assert same >= 0.95
    assert abs(rms[0] / rms[1] - 1) < 0.005
    degenerate = [0, 5, 6, 8, 9, 10, 11]  # zeros, small, tiny, one-signed: no near-ties
    np.testing.assert_array_equal(ours[degenerate], theirs[degenerate])
    # outliers, large, constants (for a constant block the least-squares determinant is 0 up to the
    # float32 residue of the sums, whose sign decides llama.cpp's choice): no larger error, to
    # within 0.3% of the values' RMS
    for row in (1, 2, 3, 4, 7):
        slack = 1e-5 * float((x[row] ** 2).mean())
        assert err[0][row].mean() <= 1.05 * err[1][row].mean() + slack, row


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """test_llamacpp's "peaked" model (hidden 256, FFN 512, a clear winner at every position) with
    its trained tokenizer: its f32, q4_k and q6_k exports."""
    from odyssey.data import prepare_data
    from odyssey.store import Store
    from odyssey.tokenizer import copy_tokenizer
    from tests.conftest import ROOT
    from tests.test_llamacpp import write_peaked

    tmp = tmp_path_factory.mktemp("quant-llamacpp")
    prepare_data([ROOT / "data" / "sample" / "stories_en.txt"], tmp / "data", vocab_size=480, progress=False)
    write_peaked(tmp / "peaked")
    copy_tokenizer(tmp / "data", tmp / "peaked")
    store = Store.open(tmp / "peaked")
    paths = {t: tmp / f"model-{t}.gguf" for t in ("f32", "q4_k", "q6_k")}
    for t, p in paths.items():
        write_gguf(store, p, t, progress=False)
    return store, paths


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["q4_k", "q6_k"])
def test_llama_cpp_runs_the_export_as_transformers_reads_it(peaked, gguf_type):
    """llama.cpp and transformers on the very same file: transformers dequantizes the weights
    (gguf's readers) and computes in fp32; llama.cpp multiplies with its quantized kernels (the
    activations quantized to 8 bits, Q8_K, on the way), so the two differ by that rounding only:
    argmax at every position, max abs diff under 0.15 logit std (measured 0.069 q4_k, 0.067 q6_k;
    the weights' own quantization error, llama.cpp on this file against the f32 export, is 0.84
    and 0.18: a file whose values sat elsewhere than transformers reads them would show that)."""
    from transformers import AutoModelForCausalLM

    from tests.test_llamacpp import llama_logits, prompt_ids

    store, paths = peaked
    ids = prompt_ids(store)
    path = paths[gguf_type]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits.numpy()[0]
    got = llama_logits(path, ids)
    f32 = llama_logits(paths["f32"], ids)
    std = want.std()
    diff, quant = np.abs(got - want).max() / std, np.abs(got - f32).max() / std
    agree = float((got.argmax(1) == want.argmax(1)).mean())
    print(f"{gguf_type}: llama.cpp vs transformers max diff {diff:.3f} std, argmax {agree:.0%}; vs f32 {quant:.3f} std")
    assert agree == 1.0
    assert diff < 0.15


@pytest.mark.slow
def test_q4_k_error_matches_llama_quantize(peaked, tmp_path):
    """`llama_model_quantize` (llama-quantize) on our f32 export to Q4_K_M, against our q4_k export
    of the same model: the same type for every tensor, and for the Q4_K tensors the same RMS error
    against the f32 weights within 5% (measured: ratio 1.0001)."""
    import llama_cpp

    _, paths = peaked
    theirs = tmp_path / "llama-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(paths["f32"]).encode(), str(theirs).encode(), params) == 0
    f32, ours, ref = (gguf.GGUFReader(p) for p in (paths["f32"], paths["q4_k"], theirs))
    src = {t.name: np.asarray(t.data, dtype=np.float32) for t in f32.tensors}
    ref_t = {t.name: t for t in ref.tensors}
    sums = {"ours": 0.0, "llama.cpp": 0.0}
    for t in ours.tensors:
        r = ref_t[t.name]
        assert t.tensor_type == r.tensor_type, t.name
        if t.tensor_type != Q.Q4_K:
            continue
        for key, tt in (("ours", t), ("llama.cpp", r)):
            sums[key] += float(((gguf.quants.dequantize(tt.data, tt.tensor_type) - src[t.name]) ** 2).sum())
    ratio = (sums["ours"] / sums["llama.cpp"]) ** 0.5
    print(f"Q4_K squared error sum: ours {sums['ours']:.6g}, llama.cpp {sums['llama.cpp']:.6g}; RMS ratio {ratio:.4f}")
    assert sums["ours"] > 0 and abs(ratio - 1) < 0.05
