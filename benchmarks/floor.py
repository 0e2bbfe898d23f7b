"""The kernel floor of a LoRA step: the seconds of the kernels any implementation of the step must
run, each timed at the model's own shapes on this machine, in the compute dtype, summed over the
model. The compute limit (goals.py) charges every FLOP at the probe's best matmul rate and leaves
attention out; the floor measures what the step's kernels really take, so a step can be judged
against work that cannot be avoided:

- per decoder layer, for every projection (q, k, v, o, gate, up, down): the forward x @ W.T and
  the input gradient g @ W (a frozen base computes no weight gradient), and the causal
  scaled-dot-product attention forward and backward (torch's fused CPU kernel, GQA);
- the head: logits h @ W.T and their input gradient, in vocab chunks as Odyssey runs them.

LoRA's rank-r matmuls, norms, activations, the loss's exp and the optimizer are left out: the floor
is a lower bound, and the step over the floor is the overhead of everything else.

    python benchmarks/floor.py [--config odyssey-1.2b] [--seq-len 512] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _time(fn, reps: int) -> float:
    """Median seconds of fn() over `reps` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return common.median(times)


def measure(cfg, seq_len: int, dtype: str, reps: int = 5, vocab_chunk: int | None = None) -> dict:
    """{"seconds": the step's floor, "parts": {name: seconds for the whole model}, "dtype", "seq_len"}
    for the model config `cfg` (odyssey.modelconfig.ModelConfig) at batch 1."""
    import torch
    import torch.nn.functional as F

    from odyssey.dtypes import VOCAB_CHUNK, compute_dtype_info

    dt = compute_dtype_info(dtype).torch()
    T, d, L = seq_len, cfg.hidden_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.head_dim or d // heads
    projections = {  # name -> (in, out)
        "q": (d, heads * hd),
        "k": (d, kv * hd),
        "v": (d, kv * hd),
        "o": (heads * hd, d),
        "gate": (d, cfg.intermediate_size),
        "up": (d, cfg.intermediate_size),
        "down": (cfg.intermediate_size, d),
    }
    gen = torch.Generator().manual_seed(0)
    parts = {}
    seen = {}  # shapes timed once: q and o, gate and up often share them
    for name, (i, o) in projections.items():
        if (i, o) not in seen:
            W = torch.randn(o, i, generator=gen, dtype=dt) * 0.02
            x, g = torch.randn(T, i, generator=gen, dtype=dt), torch.randn(T, o, generator=gen, dtype=dt)
            seen[(i, o)] = _time(lambda x=x, W=W: F.linear(x, W), reps) + _time(lambda g=g, W=W: g @ W, reps)
            del W, x, g
        parts[f"{name} (forward + input gradient)"] = seen[(i, o)] * L
    q = torch.randn(1, heads, T, hd, generator=gen, dtype=dt, requires_grad=True)
    k = torch.randn(1, kv, T, hd, generator=gen, dtype=dt, requires_grad=True)
    v = torch.randn(1, kv, T, hd, generator=gen, dtype=dt, requires_grad=True)
    go = torch.randn(1, heads, T, hd, generator=gen, dtype=dt)

    def attention():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != heads)
        out.backward(go)

    parts["attention (forward + backward)"] = _time(attention, reps) * L
    C = min(vocab_chunk or VOCAB_CHUNK, cfg.vocab_size)
    W = torch.randn(C, d, generator=gen, dtype=dt) * 0.02
    h, e = torch.randn(T, d, generator=gen, dtype=dt), torch.randn(T, C, generator=gen, dtype=dt)
    per_chunk = _time(lambda: F.linear(h, W), reps) + _time(lambda: e @ W, reps)
    parts["head (logits + input gradient)"] = per_chunk * cfg.vocab_size / C
    return {
        "seconds": round(sum(parts.values()), 6),
        "parts": {k: round(v, 6) for k, v in parts.items()},
        "dtype": dtype,
        "seq_len": seq_len,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="odyssey-1.2b")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    args = ap.parse_args(argv)
    from odyssey.config import load_model_config

    cfg = load_model_config(str(common.ROOT / "configs" / f"{args.config}.yaml"), [])
    print(json.dumps(measure(cfg, args.seq_len, args.dtype), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
