"""adapters.lora_forward (PEFT's LoRA Linear forward with fewer passes over the output) against
PEFT's own forward: values and gradients, in fp32, and in bf16 against PEFT under CPU autocast;
which modules get it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from odyssey.adapters import inject, lora_forward, lora_parameters, use_lora_forward
from odyssey.config import LoraSettings


class Block(nn.Module):
    def __init__(self, d: int = 48, f: int = 80):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=True)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(self.q_proj(x))))


def _pair(dtype: torch.dtype, alpha: int, dropout: float = 0.0):
    """Two identical blocks with LoRA on all three Linears (fp32 adapters, base in `dtype`); the
    second uses lora_forward."""
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        m = Block()
        m.to(dtype)
        settings = LoraSettings(r=4, alpha=alpha, dropout=dropout, targets=["q_proj", "up_proj", "down_proj"])
        inject(m, settings, seed=1)
        torch.manual_seed(2)
        for k, p in lora_parameters(m).items():
            if "lora_B" in k:
                nn.init.normal_(p, std=0.1)
        out.append(m)
    assert use_lora_forward(out[1]) == 3
    return out


def _run(m, x, g, seed=7):
    xi = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = m(xi)
    y.backward(g)
    return y.detach(), xi.grad, {k: p.grad.clone() for k, p in lora_parameters(m).items()}


@pytest.mark.parametrize("alpha", [8, 5])  # scale 2 (exact) and 1.25
def test_lora_forward_equals_peft_fp32(alpha):
    peft_m, ours_m = _pair(torch.float32, alpha)
    x = torch.randn(2, 9, 48)
    g = torch.randn(2, 9, 48)
    y0, gx0, gp0 = _run(peft_m, x, g)
    y1, gx1, gp1 = _run(ours_m, x, g)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-6)
    assert set(gp0) == set(gp1) and len(gp0) == 6
    for k in gp0:
        torch.testing.assert_close(gp1[k], gp0[k], rtol=1e-5, atol=1e-6)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("alpha,dropout", [(8, 0.0), (5, 0.0), (8, 0.2)])
def test_bf16_lora_forward_equals_peft_under_autocast(alpha, dropout):
    """bf16 base and input, fp32 adapters: lora_forward computes the LoRA path in bf16 (no fp32
    copy of x or of the output) as PEFT does under torch.autocast("cpu", bf16), the peer's
    configuration. Output, input gradient and LoRA gradients within bf16 precision of PEFT under
    autocast, and the output closer to it than PEFT without autocast (the LoRA path in fp32, what
    lora_forward computed before) is; the tolerance sees the LoRA term (the base alone fails it).
    LoRA gradients come out fp32, the output bf16."""
    peft_m, ours_m = _pair(torch.bfloat16, alpha, dropout=dropout)
    fp32_m = _pair(torch.bfloat16, alpha, dropout=dropout)[0]  # PEFT's forward without autocast
    for m in (peft_m, ours_m, fp32_m):
        m.train(dropout > 0)
    x = torch.randn(2, 9, 48).to(torch.bfloat16)
    g = torch.randn(2, 9, 48).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0, gx0, gp0 = _run(peft_m, x, g)
    y1, gx1, gp1 = _run(ours_m, x, g)
    y2, _, _ = _run(fp32_m, x, g)
    base_m = _pair(torch.bfloat16, alpha)[0]
    with torch.no_grad():
        for k, p in lora_parameters(base_m).items():
            if "lora_B" in k:
                p.zero_()  # the base alone
        base = base_m(x)
    assert y1.dtype == y0.dtype == torch.bfloat16 and gx1.dtype == torch.bfloat16
    assert all(gp1[k].dtype == torch.float32 for k in gp1)
    err, err_fp32, err_base = _rel(y1, y0), _rel(y2, y0), _rel(base, y0)
    assert err < 2**-7 < err_base, (err, err_base)
    assert err <= err_fp32, (err, err_fp32)
    assert _rel(gx1, gx0) < 2**-6
    assert set(gp1) == set(gp0) and len(gp0) == 6
    for k in gp0:
        assert _rel(gp1[k], gp0[k]) < 2e-2, (k, _rel(gp1[k], gp0[k]))


def _activation_copies(m: nn.Module, T: int = 64, dtype: torch.dtype = torch.bfloat16) -> int:
    """aten::copy_ calls on (T, .) tensors in a forward and backward of `m` on an x (T, 48) in `dtype`."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(T, 48).to(dtype).requires_grad_(True)
    g = torch.randn(T, 48).to(dtype)  # contiguous (sum()'s expanded gradient makes mm copy)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        m(x).backward(g)
    return sum(1 for e in prof.events() if e.name == "aten::copy_" and e.input_shapes[0][:1] == [T])


def test_bf16_lora_forward_makes_no_fp32_copy_of_activations():
    """In bf16 compute lora_forward copies no (T, in) or (T, out) activation, forward or backward:
    as many (T, .) copies as the plain base Linears make (addmm's bias, mm's backward), where
    PEFT's forward without autocast adds fp32 casts of x and of the output and back."""
    peft_m, ours_m = _pair(torch.bfloat16, 8)
    torch.manual_seed(0)
    plain = Block().to(torch.bfloat16)
    n_plain, n_ours, n_peft = (_activation_copies(m) for m in (plain, ours_m, peft_m))
    assert n_ours == n_plain < n_peft, (n_plain, n_ours, n_peft)


def test_fp32_lora_forward_copies_no_activation():
    """In fp32 compute the LoRA product goes into the base result in place: as many (T, .) copies
    as the plain base Linears make (an out-of-place addmm copied each base result first: 4 here)."""
    _, ours_m = _pair(torch.float32, 8)
    torch.manual_seed(0)
    plain = Block()
    n_plain, n_ours = (_activation_copies(m, dtype=torch.float32) for m in (plain, ours_m))
    assert n_ours == n_plain, (n_plain, n_ours)


def test_use_lora_forward_leaves_other_states_to_peft():
    """A merged module goes back to PEFT's forward (its result then equals the plain base with
    merged weights); an unadapted Linear is not touched."""
    peft_m, ours_m = _pair(torch.float32, 8)
    x = torch.randn(3, 48)
    ours_m.q_proj.merge()
    peft_m.q_proj.merge()
    with torch.no_grad():
        torch.testing.assert_close(ours_m(x), peft_m(x), rtol=1e-6, atol=1e-6)
    plain = nn.Sequential(nn.Linear(4, 4))
    assert use_lora_forward(plain) == 0
    assert lora_forward.__doc__ and "PEFT" in lora_forward.__doc__


def test_engine_with_and_without_the_fused_lora_forward(tmp_path):
    """The engine's step with lora_forward (the default) and with PEFT's forward (lora_fused=False):
    the same loss and LoRA gradients (fp32; scale 2, so bit for bit up to matmul blocking)."""
    from odyssey.engine import Engine
    from tests.helpers_lora import lora_skeleton
    from tests.test_residency import four_layer_store

    store = four_layer_store(tmp_path)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    tgt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    out = []
    for fused in (False, True):
        skel = lora_skeleton(store, std=0.02)
        with Engine(store, compute_dtype="fp32", model=skel, lora_fused=fused) as eng:
            loss = eng.train_step(ids, tgt)
        out.append((loss, {k: p.grad.clone() for k, p in lora_parameters(skel).items()}))
    (l0, g0), (l1, g1) = out
    assert abs(l0 - l1) < 1e-6
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_layers_give_the_eager_gradients(tmp_path):
    """Engine(compile_layers=True): each decoder layer through torch.compile (inductor); a bf16
    step's loss equals the eager step's bit for bit (inductor told to round bf16 intermediates as
    eager does), two steps, no recompile per layer. LoRA gradients within bf16 rounding of eager's:
    the LoRA path runs in bf16 (lora_forward, as PEFT under autocast), and inductor's backward
    matmuls for it round differently from eager's (measured: at most 1e-2 relative)."""
    import torch._dynamo

    from odyssey.engine import Engine
    from tests.helpers_lora import lora_skeleton
    from tests.test_residency import four_layer_store

    store = four_layer_store(tmp_path, dtype="bf16")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    tgt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = []
    for compiled in (False, True):
        skel = lora_skeleton(store, std=0.02)
        with Engine(store, compute_dtype="bf16", model=skel, compile_layers=compiled) as eng:
            losses = [eng.train_step(ids, tgt) for _ in range(2)]
        out.append((losses, {k: p.grad.clone() for k, p in lora_parameters(skel).items()}))
    assert out[1][0] == out[0][0]
    for k, g in out[0][1].items():
        err = float((out[1][1][k] - g).abs().max() / g.abs().max())
        assert err < 2e-2, (k, err)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # no-grad and grad forward
