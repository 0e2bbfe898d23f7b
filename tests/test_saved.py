"""What a kept or spilled layer's graph saves (odyssey/saved.py): the norms' and the GLU's outputs
are saved as recipes and computed again in backward, bit for bit, for fewer bytes held or spilled;
a noted output changed in place after it was saved is an error, never a wrong gradient."""

from __future__ import annotations

import pytest
import torch

from odyssey.adapters import lora_parameters
from odyssey.engine import Engine
from odyssey.saved import Derived, DerivedHandle, note, noting
from tests.helpers_lora import lora_skeleton, poison_released_slots
from tests.test_residency import four_layer_store
from tests.test_spill import LORA, batch


def run(store, tmp_path, keep, spill, compute, derive):
    ids, tgt = batch(n=32)
    skel = lora_skeleton(store, std=0.02, settings=LORA)
    with Engine(
        store, compute_dtype=compute, model=skel, keep=keep, spill=spill, spill_dir=tmp_path, derive_saved=derive
    ) as eng:
        if spill:
            eng._spill.min_bytes = 0
        losses = [eng.train_step(ids, tgt) for _ in range(2)]
        st = eng.pass_stats(1.0)
    return losses, {k: p.grad.clone() for k, p in lora_parameters(skel).items()}, st


@pytest.mark.parametrize("dtype,compute", [("f32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")])
def test_kept_and_spilled_layers_recompute_norm_and_glu_outputs_bit_for_bit(tmp_path, monkeypatch, dtype, compute):
    """Every layer kept, or every layer spilled, over two steps while the pager scribbles NaNs over
    each slot it releases: the losses and LoRA gradients with the norms' and the GLU's outputs saved
    as recipes equal those with the outputs saved, bit for bit, and the spill writes fewer bytes:
    the (2d + f) values a token of the three outputs fewer, of the layer's (3d + 2q + 2kv + 3f)."""
    store = four_layer_store(tmp_path, dtype=dtype)
    cfg = store.config
    poisoned = poison_released_slots(monkeypatch)
    for keep, spill in [(4, 0), (0, 4), (1, 2)]:
        ref_losses, ref_grads, ref_st = run(store, tmp_path, keep, spill, compute, derive=False)
        poisoned.clear()
        losses, grads, st = run(store, tmp_path, keep, spill, compute, derive=True)
        assert 0 in poisoned
        assert losses == ref_losses, (keep, spill)
        assert all(torch.equal(grads[k], ref_grads[k]) for k in grads) and len(grads) == 4 * 7 * 2
        assert all(torch.isfinite(g).all() for g in grads.values())
        if spill:
            d, f = cfg.hidden_size, cfg.intermediate_size
            ci = 2 if compute == "bf16" else 4
            fewer = 2 * spill * 32 * (2 * d + f) * ci  # written and read back, a step
            assert ref_st.spill_bytes - st.spill_bytes >= fewer, (ref_st.spill_bytes, st.spill_bytes, fewer)


def test_views_of_a_noted_output_share_one_recomputation():
    """Two views of a noted output saved: one recipe, its inputs packed once, the function run once
    in backward; each view comes back with its geometry and the output's values."""
    calls = []

    def fn(a, b, gelu):
        calls.append(1)
        return torch.nn.functional.silu(a) * b

    a, b = torch.randn(6, 10), torch.randn(6, 10)
    derived = Derived()
    packed = []
    with noting(derived):
        out = note(fn(a, b, False), fn, a, b, False)
        h1 = derived.find(out).handle(out, lambda t: packed.append(t) or t)
        h2 = derived.find(out[2:5].t()).handle(out[2:5].t(), lambda t: packed.append(t) or t)
    assert isinstance(h1, DerivedHandle) and h1.recipe is h2.recipe and len(packed) == 2
    want = out.clone()
    del out
    calls.clear()
    v1, v2 = h1.recipe.view(h1, lambda t: t), h2.recipe.view(h2, lambda t: t)
    assert len(calls) == 1 and torch.equal(v1, want) and torch.equal(v2, want[2:5].t())
    assert v2.stride() == want[2:5].t().stride()


def test_a_noted_output_changed_in_place_after_it_was_saved_is_an_error():
    a = torch.randn(4, 4)
    derived = Derived()
    with pytest.raises(RuntimeError, match="changed in place"):
        with noting(derived):
            out = note(a * 2, torch.mul, a, 2)
            derived.find(out).handle(out, lambda t: t)
            out.add_(1)
    outside = torch.randn(3)
    assert note(outside, torch.neg, outside) is outside and Derived().find(outside) is None  # not noting: nothing
