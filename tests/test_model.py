"""odyssey.model against transformers' LlamaForCausalLM with the same weights."""

import pytest
import torch

from odyssey.model import KVCache, LlamaForCausalLM
from tests.conftest import tiny_config


def hf_twin(cfg, ours):
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    hf = HFLlama(
        LlamaConfig(
            **{k: v for k, v in cfg.to_hf_dict("float32").items() if k not in ("architectures", "dtype", "torch_dtype")}
        )
    )
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_transformers(tied):
    torch.manual_seed(0)
    cfg = tiny_config(tie_word_embeddings=tied, rope_theta=500000.0)
    ours = LlamaForCausalLM(cfg).eval()
    for p in ours.parameters():  # non-trivial norms too
        torch.nn.init.normal_(p, std=0.2)
    hf = hf_twin(cfg, ours)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        a = ours(ids)
        b = hf(ids).logits
    assert a.shape == (2, 33, cfg.vocab_size)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_names_are_hf_names():
    cfg = tiny_config()
    names = set(LlamaForCausalLM(cfg).state_dict())
    assert names == set(cfg.all_shapes())


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    cfg = tiny_config()
    m = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(cfg.num_hidden_layers)
        parts = [m(ids[:, :12], cache)]
        parts += [m(ids[:, i : i + 1], cache) for i in range(12, 16)]
        parts.append(m(ids[:, 16:], cache))  # several new tokens after a cache
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
