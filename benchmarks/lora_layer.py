"""CPU time of one decoder layer's training work, variant against variant in the same process: the
engine's work per layer at a tight budget (a forward without grad, then the recompute with grad and
its backward), at a model's layer shapes (odyssey-1.2b: T 512, d 2048, ff 5632, 32 heads, 8 kv
heads), LoRA r 16 on the seven projections, in the compute dtype (bf16 by default).

    python benchmarks/lora_layer.py [--config odyssey-1.2b] [--seq-len 512] [--rounds 12]
        [--dtype bf16] [--variants before,after] [--part layer|head]

Variants (each a way to run the same layer; rounds interleave them, so a machine shared with other
work slows all alike): `before`: the LoRA forward as it was before the bf16 path
(`lora_forward_fp32`: the LoRA path in fp32, the base result cast to fp32 and back; with
`--dtype fp32`, the fp32 path as it was before its in-place add: an out-of-place addmm copied the
base result); `after`: `adapters.lora_forward`; `peft`: PEFT's own forward. Prints, per variant,
the median and minimum CPU seconds of this process (all its threads) per round, and the median
wall seconds.
`--part head`: the head's loss and gradient (engine.OnlineCrossEntropy over the whole (V, d)
head), `before` with the gradient's matmul in fp32, `after` in the compute dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from odyssey.adapters import inject, lora_forward, lora_parameters  # noqa: E402
from odyssey.config import LoraSettings, load_model_config  # noqa: E402
from odyssey.model import DecoderLayer, rope_tables  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def lora_forward_fp32(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """adapters.lora_forward as it was before its bf16 path (commit 8875185): the LoRA path in the
    LoRA weights' dtype whatever x's."""
    A = mod.lora_A["default"].weight
    B = mod.lora_B["default"].weight
    result = mod.base_layer(x)
    h = F.linear(mod.lora_dropout["default"](x.to(A.dtype)), A) * mod.scaling["default"]
    shape = result.shape
    acc = torch.addmm(result.reshape(-1, shape[-1]).to(B.dtype), h.reshape(-1, h.shape[-1]), B.t())
    return acc.view(shape).to(result.dtype)


FORWARDS = {"before": lora_forward_fp32, "after": lora_forward, "peft": None}


def build(cfg, dtype: torch.dtype, r: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = DecoderLayer(cfg, 0).to(dtype)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.02)
    inject(layer, LoraSettings(r=r, alpha=2 * r), seed=seed + 1)
    for k, p in lora_parameters(layer).items():
        if "lora_B" in k:
            nn.init.normal_(p, std=0.01)
    return layer


def use(layer: nn.Module, fwd) -> None:
    for mod in layer.modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            if fwd is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = types.MethodType(fwd, mod)


def work(layer: nn.Module, x: torch.Tensor, rope, g: torch.Tensor) -> None:
    """The engine's per-layer work at 1 GiB: forward without grad, recompute with grad, backward."""
    with torch.no_grad():
        layer(x, rope)
    xi = x.detach().requires_grad_(True)
    out = layer(xi, rope)
    torch.autograd.backward(out, g)
    for p in layer.parameters():
        p.grad = None


def head_work(hf: torch.Tensor, tgt: torch.Tensor, W: torch.Tensor, low: bool) -> None:
    """The head's loss and gradient over W (V, d) in one block (engine.OnlineCrossEntropy); low=False:
    the gradient's matmul in fp32 (`e @ W_c.float()`), as before its bf16 path."""
    from odyssey.engine import OnlineCrossEntropy

    ce = OnlineCrossEntropy(hf, tgt, True, W.dtype)
    if not low:
        ce.low, ce.e_t = False, None
    ce.add(0, W)
    ce.result()


def main_head(args, cfg, dtype) -> None:
    T = args.seq_len
    torch.manual_seed(0)
    hf = torch.randn(T, cfg.hidden_size).to(dtype)
    W = (torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.02).to(dtype)
    tgt = torch.randint(0, cfg.vocab_size, (T,))
    names = ["before", "after"]
    cpu: dict = {n: [] for n in names}
    for n in names:
        head_work(hf, tgt, W, n == "after")
    for k in range(args.rounds):
        for n in names if k % 2 == 0 else names[::-1]:
            c0 = time.process_time()
            head_work(hf, tgt, W, n == "after")
            cpu[n].append(time.process_time() - c0)
    print(f"{args.config} head ({cfg.vocab_size} x {cfg.hidden_size}), T {T}, {args.dtype}, {args.rounds} rounds")
    for n in names:
        print(f"{n:8s} CPU median {statistics.median(cpu[n]):.3f} s  min {min(cpu[n]):.3f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="odyssey-1.2b")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--variants", default="before,after")
    ap.add_argument("--part", default="layer", choices=["layer", "head"])
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = load_model_config(ROOT / "configs" / f"{args.config}.yaml")
    if args.part == "head":
        return main_head(args, cfg, dtype)
    layer = build(cfg, dtype, args.r)
    T = args.seq_len
    x = torch.randn(1, T, cfg.hidden_size).to(dtype)
    g = torch.randn(1, T, cfg.hidden_size).to(dtype) * 1e-3
    rope = rope_tables(cfg, torch.arange(T), dtype)
    names = args.variants.split(",")
    cpu: dict = {n: [] for n in names}
    wall: dict = {n: [] for n in names}
    for n in names:  # warm-up
        use(layer, FORWARDS[n])
        work(layer, x, rope, g)
    for k in range(args.rounds):
        for n in names if k % 2 == 0 else names[::-1]:
            use(layer, FORWARDS[n])
            c0, t0 = time.process_time(), time.perf_counter()
            work(layer, x, rope, g)
            cpu[n].append(time.process_time() - c0)
            wall[n].append(time.perf_counter() - t0)
    print(
        f"{args.config} layer, T {T}, r {args.r}, {args.dtype}, {torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    for n in names:
        print(
            f"{n:8s} CPU median {statistics.median(cpu[n]):.3f} s  min {min(cpu[n]):.3f} s  "
            f"wall median {statistics.median(wall[n]):.3f} s"
        )


if __name__ == "__main__":
    main()
