"""Reading GGUF (odyssey/gguf): every dequantizer bit for bit against `gguf.quants.dequantize` on
random blocks (extreme, zero and negative scales), row ranges, the header parser against
gguf.GGUFReader, Odyssey's own GGUF exports (f32, f16, q8_0) read back as the store they came
from (ModelConfig and every tensor), and the structural refusals (one line, naming the file and
the fix, the file untouched)."""

import hashlib
import shutil
import struct

import gguf
import numpy as np
import pytest
import torch

import odyssey.gguf.dequant as dq
from odyssey.errors import OdysseyError
from odyssey.export.gguf import write_gguf
from odyssey.export.gguf_layout import ROPE_FREQS, gguf_name, hf_name, unpermute_qk
from odyssey.families import FAMILIES
from odyssey.gguf.blocks import BLOCKS, SUPPORTED
from odyssey.gguf.model import hf_names, load_tensor, model_config
from odyssey.gguf.reader import GGUFFile
from tests.conftest import run_cli, tiny_config
from tests.test_gguf import make_store

Q = gguf.GGMLQuantizationType
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")  # gguf has no quantizer for these: random bytes, finite f16 scales
# where each K block keeps its f16 scales: byte offsets of d (and dmin)
K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def bits(x) -> torch.Tensor:
    """float32 values as their int32 bit patterns (NaN payloads, -0.0 and all compared)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x
    return t.contiguous().view(torch.int32)


def f16_scales(rng, n: int) -> np.ndarray:
    """n finite f16 values, as bytes (n, 2): zeros, negatives, subnormals, the largest ones."""
    mags = np.concatenate([[0.0, 6.0e-8, 6.1e-5, 65504.0, 1.0], 10.0 ** rng.uniform(-7, 4.8, n)])[:n]
    v = (mags * rng.choice([-1.0, 1.0], n)).astype(np.float16)
    return v.view(np.uint8).reshape(n, 2)


def sample(name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """GGUF bytes (rows, row bytes) of one type: quantized from random rows with per-row scales
    from 1e-6 to 1e4, a zero row and a negative one (types gguf quantizes), random bytes with finite
    f16 scales (K types), every 16-bit pattern (F16, BF16) or random values with infinities (F32)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-6, 4, (rows, 1))
    x[0] = 0.0
    x[1] = -np.abs(x[1])
    x = x.astype(np.float32)
    if name == "F32":
        x[2, :4] = [np.inf, -np.inf, -0.0, 1e-42]  # infinities, signed zero, a subnormal
        return x.view(np.uint8)
    if name in ("F16", "BF16"):  # every bit pattern: NaN payloads, infinities, subnormals, -0.0
        return np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols).view(np.uint8)
    elems, nbytes = BLOCKS[name]
    if name not in K_TYPES:
        return gguf.quants.quantize(x, Q[name])
    raw = rng.integers(0, 256, (rows * cols // elems, nbytes), dtype=np.uint8)
    for off in K_SCALES[name]:
        raw[:, off : off + 2] = f16_scales(rng, raw.shape[0])
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("name", SUPPORTED)
def test_dequantize_is_bit_exact_against_gguf(name, monkeypatch):
    monkeypatch.setattr(dq, "CHUNK_ELEMENTS", 1000)  # several chunks, the last one partial
    rows, cols = (128, 512) if name in ("F16", "BF16") else (24, 512)  # 16-bit types: all 65,536 patterns
    raw = sample(name, rows, cols)
    ref = gguf.quants.dequantize(raw, Q[name])  # (rows, cols) f32
    got = dq.dequantize(raw, name, (rows, cols))
    assert got.shape == (rows, cols) and got.dtype == torch.float32
    assert torch.equal(bits(got), bits(ref))
    assert np.isfinite(ref).any() and (ref != 0).any()  # the sample is not degenerate
    # same bits from a torch uint8 tensor, into a reused (larger) workspace, and cast after
    work = torch.full((rows * cols + 7,), 3.0)
    again = dq.dequantize(torch.from_numpy(raw.copy()), Q[name], (rows, cols), out=work)
    assert again.data_ptr() == work.data_ptr() and torch.equal(bits(again), bits(ref))
    as_bf16 = dq.dequantize(raw, name, (rows, cols), dtype=torch.bfloat16)
    assert torch.equal(as_bf16.view(torch.int16), torch.from_numpy(ref).to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("name", SUPPORTED)
def test_dequantize_rows_equals_the_slice(name):
    rows, cols = 10, 256
    raw = sample(name, rows, cols, seed=3)
    whole = dq.dequantize(raw, name, (rows, cols))
    for r0, r1 in ((0, 10), (3, 7), (9, 10), (4, 4)):
        part = dq.dequantize_rows(raw, name, (rows, cols), r0, r1)
        assert torch.equal(bits(part), bits(whole[r0:r1])), (r0, r1)


def test_dequantize_refuses_wrong_sizes_and_types():
    with pytest.raises(OdysseyError, match="Q8_0 tensor of shape \\[2, 64\\] needs 136 bytes, got 135"):
        dq.dequantize(np.zeros(135, np.uint8), "Q8_0", (2, 64))
    with pytest.raises(OdysseyError, match="multiple of 256"):
        dq.dequantize(np.zeros(144, np.uint8), "Q4_K", (1, 128))
    with pytest.raises(OdysseyError, match="GGML type Q2_K, which Odyssey does not read; supported: F32, F16"):
        dq.dequantize(np.zeros(84, np.uint8), Q.Q2_K, (1, 256))
    with pytest.raises(ValueError, match="outside"):
        dq.dequantize_rows(np.zeros(68, np.uint8), "Q8_0", (2, 32), 1, 3)


def test_block_sizes_are_gguf_own():
    assert {n: tuple(gguf.GGML_QUANT_SIZES[Q[n]]) for n in SUPPORTED} == BLOCKS


def test_hf_names_invert_gguf_names_for_every_family():
    for fam in FAMILIES.values():
        act = fam.activations[0]
        cfg = tiny_config(model_type=fam.model_type, hidden_act=act, attention_bias=fam.qkv_bias == "config")
        for n in cfg.all_shapes():
            assert hf_name(gguf_name(n, fam), fam) == n
    with pytest.raises(ValueError):
        hf_name(ROPE_FREQS)


# --------------------------------------------------------------------------------------------
# Odyssey's own exports read back

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(store kind, gguf type): (store, path)}: an untied store with Llama 3 RoPE and a tied one with
    attention biases, each exported as f32, f16 and q8_0."""
    d = tmp_path_factory.mktemp("gguf-read")
    stores = {
        "llama3": make_store(d, "llama3", rope_scaling=LLAMA3, rms_norm_eps=1e-6, rope_theta=500000.0),
        "tied": make_store(d, "tied", tie_word_embeddings=True, attention_bias=True, max_position_embeddings=256),
    }
    out = {}
    for kind, store in stores.items():
        for ty in ("f32", "f16", "q8_0"):
            path = d / f"{kind}-{ty}.gguf"
            write_gguf(store, path, ty, progress=False)
            out[kind, ty] = (store, path)
    return out


def store_tensor(store, name: str) -> torch.Tensor:
    unit = "embed" if "embed" in name else "head" if name in ("model.norm.weight", "lm_head.weight") else None
    unit = int(name.split(".")[2]) if unit is None else unit
    return store.load_tensors(unit, torch.float32)[name]


@pytest.mark.parametrize("kind", ["llama3", "tied"])
@pytest.mark.parametrize("ty", ["f32", "f16", "q8_0"])
def test_export_reads_back_as_its_store(exports, kind, ty):
    store, path = exports[kind, ty]
    gf = GGUFFile.open(path)
    cfg = model_config(gf)
    assert cfg == store.config  # every field: sizes, heads, rope (llama3 mapped), eps, context, tied, biases
    assert gf.chat_template and len(gf.metadata["tokenizer.ggml.tokens"]) == cfg.vocab_size
    names = hf_names(gf, cfg)
    assert list(names) == list(cfg.all_shapes()) and (ROPE_FREQS in gf.tensors) == (kind == "llama3")
    for hf, gg in names.items():
        t = gf.tensors[gg]
        got, want = load_tensor(gf, hf, cfg), store_tensor(store, hf)
        assert got.shape == want.shape, hf
        if ty == "f32" or t.qtype == "F32":  # norms and biases stay f32 in every file type
            assert torch.equal(got, want), hf
        elif t.qtype == "F16":
            assert torch.equal(got, want.to(torch.float16).float()), hf
        else:  # Q8_0: gguf's own dequantization of the same bytes, rows back in HF order
            ref = torch.from_numpy(gguf.quants.dequantize(gf.read_raw(gg).reshape(t.shape[0], -1), Q.Q8_0))
            heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(hf.split(".")[-2])
            ref = unpermute_qk(ref, heads) if heads else ref
            assert torch.equal(bits(got), bits(ref)), hf
            assert torch.allclose(got, want, atol=float(want.abs().max()) / 100), hf


def test_tensors_equal_transformers_own_gguf_load(exports):
    """transformers dequantizes a GGUF with gguf and undoes the Q/K permutation its own way: the
    same tensors, bit for bit, and the same shape of model. (The untied store: transformers' GGUF
    loader drops a llama's attention biases.) The same held on SmolLM2-135M-Instruct's Q4_1 GGUF
    made by llama.cpp (272 of 272 tensors), checked by hand: it is not part of the suite."""
    from transformers import AutoModelForCausalLM

    _, path = exports["llama3", "q8_0"]
    gf = GGUFFile.open(path)
    cfg = model_config(gf)
    m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    sd = m.state_dict()
    for hf in hf_names(gf, cfg):
        assert torch.equal(bits(load_tensor(gf, hf, cfg)), bits(sd[hf])), hf
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads"):
        assert getattr(m.config, k) == getattr(cfg, k), k


NANO = dict(
    hidden_size=128, intermediate_size=352, num_hidden_layers=4, max_position_embeddings=1024
)  # configs/nano.yaml


def test_cli_export_of_a_nano_store_reads_back(tmp_path):
    """`odyssey export --formats gguf --gguf-type q8_0` of a store of nano's shape (vocabulary 320):
    the config and every tensor come back (Q8_0 matrices within their quantization step)."""
    store = make_store(tmp_path, "nano", **NANO)
    p = run_cli("export", store.root, "--out", tmp_path / "exp", "--formats", "gguf", "--gguf-type", "q8_0", "--quiet")
    assert p.returncode == 0, p.stderr
    gf = GGUFFile.open(tmp_path / "exp" / "model-q8_0.gguf")
    cfg = model_config(gf)
    assert cfg == store.config and gf.summary() == {"F32": 2 * 4 + 1, "Q8_0": 7 * 4 + 2}
    for hf in hf_names(gf, cfg):
        want = store_tensor(store, hf)
        step = (
            want.abs().amax(dim=-1, keepdim=True) / 127 if want.dim() == 2 else 0.0
        )  # per-row bound of a block's step
        # half a step, plus the f16 rounding of the block scale (127 x 2^-11 of a step)
        assert torch.all((load_tensor(gf, hf, cfg) - want).abs() <= step * 0.57 + 1e-7), hf


def test_header_parser_agrees_with_gguf_reader(exports):
    _, path = exports["llama3", "q8_0"]
    gf, r = GGUFFile.open(path), gguf.GGUFReader(path)
    assert gf.data_offset == r.data_offset and gf.alignment == r.alignment == 32
    assert [t.name for t in r.tensors] == list(gf.tensors)
    for t in r.tensors:
        mine = gf.tensors[t.name]
        assert (mine.offset, mine.nbytes, mine.qtype) == (t.data_offset, t.n_bytes, t.tensor_type.name)
        assert mine.shape == tuple(reversed([int(s) for s in t.shape]))
        assert np.array_equal(gf.read_raw(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))
    theirs = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(theirs) == list(gf.metadata)
    for k, v in theirs.items():
        assert gf.metadata[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), k
    assert gf.metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-6  # the decimal it was written from
    for i in range(2):  # one pread per layer: its tensors lie together, apart only by alignment padding
        layer = [n for n in gf.tensors if n.startswith(f"blk.{i}.")]
        ((a, b),) = gf.ranges(layer)
        assert (a, b) == (gf.tensors[layer[0]].offset, gf.tensors[layer[-1]].end)
    assert len(gf.ranges(["blk.0.attn_q.weight", "blk.1.attn_q.weight"])) == 2
    rows = gf.read_raw("token_embd.weight", 5, 9)
    embd = gf.tensors["token_embd.weight"]
    assert np.array_equal(rows, gf.read_raw("token_embd.weight").reshape(embd.shape[0], -1)[5:9].reshape(-1))


# --------------------------------------------------------------------------------------------
# refusals: one line naming the file and the fix; the file untouched


def refused(path, *needles, **kw) -> str:
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(OdysseyError) as e:
        gf = GGUFFile.open(path, **kw)
        model_config(gf)
    msg = str(e.value)
    assert "\n" not in msg and msg.count(str(path)) == 1, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    return msg


@pytest.fixture
def q8(exports, tmp_path):
    """A private copy of the Llama 3 store's q8_0 export (tests damage it)."""
    return shutil.copy(exports["llama3", "q8_0"][1], tmp_path / "m.gguf")


def info_pos(path, name: str) -> int:
    """Byte position of tensor `name`'s n_dims field in the header."""
    data = path.read_bytes()
    enc = name.encode()
    i = data.index(struct.pack("<Q", len(enc)) + enc)
    return i + 8 + len(enc)


def patch(path, pos: int, fmt: str, value) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(struct.pack(fmt, value))


def test_truncated_file_refused(q8):
    size = q8.stat().st_size
    with open(q8, "r+b") as f:
        f.truncate(size - 100)
    refused(q8, "is truncated: tensor output.weight needs bytes", f"the file has {size - 100}", "download or convert")
    with open(q8, "r+b") as f:
        f.truncate(300)  # inside the metadata
    refused(q8, "is truncated or corrupt: its header needs bytes up to")


def test_bad_magic_and_version_refused(q8, tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model")
    refused(text, "is not a GGUF file (it starts with b'hell'", "pass a llama.cpp .gguf model")
    patch(q8, 4, "<I", 1)
    refused(q8, "is GGUF version 1; Odyssey reads versions 2 and 3")
    patch(q8, 4, "<I", 3 << 24)
    refused(q8, "big-endian")


def test_unsupported_tensor_type_refused(q8):
    pos = info_pos(q8, "blk.1.ffn_up.weight")
    patch(q8, pos + 4 + 2 * 8, "<I", int(Q.Q2_K))  # n_dims, ne[2], then the type
    refused(q8, "tensor blk.1.ffn_up.weight has GGML type Q2_K, which Odyssey does not read", "Q4_K, Q5_K, Q6_K")
    patch(q8, pos + 4 + 2 * 8, "<I", 999)
    refused(q8, "GGML type #999 (unknown)")


def test_misaligned_and_overlapping_tensors_refused(q8):
    gf = GGUFFile.open(q8)
    pos = info_pos(q8, "blk.0.attn_k.weight")
    rel = gf.tensors["blk.0.attn_k.weight"].offset - gf.data_offset
    patch(q8, pos + 4 + 2 * 8 + 4, "<Q", rel + 2)
    refused(q8, "tensor blk.0.attn_k.weight starts at byte", "not on the file's 32-byte alignment")
    patch(q8, pos + 4 + 2 * 8 + 4, "<Q", gf.tensors["blk.0.attn_q.weight"].offset - gf.data_offset + 32)
    refused(q8, "tensors blk.0.attn_q.weight and blk.0.attn_k.weight overlap")


def write_small(path, arch: str, **keys) -> None:
    w = gguf.GGUFWriter(path, arch)
    for k, v in keys.items():
        if isinstance(v, int):
            w.add_uint32(k, v)
        else:
            w.add_string(k, v)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_model_kinds_refused(tmp_path):
    """A mixture of experts, a RoPE scaling llama.cpp names that Odyssey does not compute."""
    llama = {"embedding_length": 32, "block_count": 1, "feed_forward_length": 64, "attention.head_count": 4}
    llama = {f"llama.{k}": v for k, v in {**llama, "context_length": 64}.items()}
    write_small(tmp_path / "moe.gguf", "llama", **llama, **{"llama.expert_count": 8})
    refused(tmp_path / "moe.gguf", "is a mixture-of-experts model (llama.expert_count)")
    write_small(tmp_path / "yarn.gguf", "llama", **llama, **{"llama.rope.scaling.type": "yarn"})
    refused(tmp_path / "yarn.gguf", "RoPE scaling 'yarn' (llama.rope.scaling.type) is not implemented")
    write_small(tmp_path / "noheads.gguf", "llama", **{**llama, "llama.attention.head_count": 0})
    refused(tmp_path / "noheads.gguf", "num_attention_heads must be > 0, got 0")
    write_small(tmp_path / "text.gguf", "llama", **{**llama, "llama.block_count": "two"})
    refused(tmp_path / "text.gguf", "llama.block_count must be an integer, got 'two'")
    write_small(tmp_path / "nokeys.gguf", "llama")
    refused(tmp_path / "nokeys.gguf", "lacks metadata key llama.embedding_length; convert the model again")


def test_unsupported_architecture_and_adapter_refused(tmp_path):
    write_small(tmp_path / "q.gguf", "gemma3")
    refused(
        tmp_path / "q.gguf",
        "has llama.cpp's gemma3 architecture (Odyssey's gemma3 family)",
        "reads llama, qwen2, qwen3",
        "odyssey import",
    )
    write_small(tmp_path / "f.gguf", "falcon")
    refused(
        tmp_path / "f.gguf",
        "has architecture 'falcon'",
        "Odyssey has no family for it: use a model of the llama architecture",
    )
    write_small(tmp_path / "a.gguf", "llama", **{"general.type": "adapter"})
    refused(tmp_path / "a.gguf", "is a LoRA adapter GGUF, not a model")
    assert GGUFFile.open(tmp_path / "q.gguf", architectures=None).architecture == "gemma3"  # structure alone


def rename(path, old: str, new: str) -> None:
    """Rename a tensor in the header (same length)."""
    patch(path, info_pos(path, old) - len(old), f"{len(new)}s", new.encode())


def test_model_refusals(q8, exports, tmp_path):
    gf = GGUFFile.open(q8)
    t = gf.tensors[ROPE_FREQS]  # RoPE divisors that Llama 3's parameters do not make
    with open(q8, "r+b") as f:
        f.seek(t.offset)
        f.write(np.linspace(1.0, 3.0, t.shape[0], dtype=np.float32).tobytes())
    refused(q8, "rope_freqs.weight holds RoPE divisors that Llama 3's parameters", "do not reproduce", "odyssey import")
    rename(q8, ROPE_FREQS, "rope_frexs.weight")  # a tensor Odyssey's llama has no place for
    refused(q8, "has tensor rope_frexs.weight, which Odyssey's llama model does not compute")
    missing = shutil.copy(exports["tied", "f16"][1], tmp_path / "missing.gguf")
    rename(missing, "blk.1.ffn_up.weight", "blk.1.ffn_uq.weight")
    refused(missing, "lacks tensor blk.1.ffn_up.weight (model.layers.1.mlp.up_proj.weight)")
