"""Compare the planner's estimate with the measured peak anonymous RSS of the real work.

    python tools/plan_accuracy.py STORE SEQ            # forward: a generation of SEQ + 4 tokens
    python tools/plan_accuracy.py STORE SEQ lora [R]   # LoRA training: 2 steps at batch 1 x SEQ, rank R

Prints one JSON line: measured bytes, plan bytes and their ratio (below 1: the plan is safe)."""

import json
import sys

from odyssey.runtime import allocator

allocator.ensure(sys.argv)  # the same allocator as the odyssey commands
import torch  # noqa: E402

from odyssey.planner import plan_for_store  # noqa: E402
from odyssey.runtime.memory import PeakSampler  # noqa: E402
from odyssey.store import Store  # noqa: E402

store = Store.open(sys.argv[1])
T = int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "forward"
V = store.config.vocab_size
if mode == "lora":
    from odyssey.config import LoraSettings, TrainConfig
    from odyssey.learners import LoraLearner

    r = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    cfg = TrainConfig(seq_len=T, lora=LoraSettings(r=r, alpha=2 * r))
    p = plan_for_store(store, mode="lora", seq_len=T, lora=cfg.lora)
    with PeakSampler() as s:
        learner = LoraLearner(store, cfg)
        opt = torch.optim.AdamW(learner.parameters(), lr=1e-4)
        for _ in range(2):
            x, y = torch.randint(0, V, (1, T)), torch.randint(0, V, (1, T))
            learner.step(x, y, 1.0, None)
            opt.step()
            opt.zero_grad(set_to_none=True)
        learner.close()
else:
    from odyssey.engine import Engine
    from odyssey.generate import generate_ids

    new = 4
    p = plan_for_store(store, mode="forward", seq_len=T + new)
    prompt = torch.randint(0, V, (T,)).tolist()
    with PeakSampler() as s:
        with Engine(store) as eng:
            list(generate_ids(eng, prompt, new))
print(
    json.dumps(
        {
            "mode": mode,
            "seq_len": T,
            "measured_bytes": s.peak_bytes,
            "plan_bytes": p.total,
            "ratio": round(s.peak_bytes / p.total, 3),
            "terms": p.terms,
        }
    )
)
