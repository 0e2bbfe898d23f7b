"""Compare the planner's estimate with the measured peak memory of the real work (anonymous + pool).

    python tools/plan_accuracy.py STORE SEQ            # forward: a generation of SEQ + 4 tokens
    python tools/plan_accuracy.py STORE SEQ lora [R]   # LoRA training: 2 steps at batch 1 x SEQ, rank R

Prints one JSON line: the measured peak (anonymous memory + the pager's pool, a shared mapping
counted as RssShmem: what the plan bounds), its two parts, the plan and their ratio (below 1: the
plan is safe), the plan's terms and, for training, the phase it is sized by and the step times."""

import json
import sys
import time

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
    from odyssey.data import Batch
    from odyssey.learners import LoraLearner

    r = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    cfg = TrainConfig(seq_len=T, lora=LoraSettings(r=r, alpha=2 * r))
    p = plan_for_store(store, mode="lora", seq_len=T, lora=cfg.lora)
    step_s = []
    with PeakSampler() as s:
        learner = LoraLearner(store, cfg)
        opt = torch.optim.AdamW(learner.parameters(), lr=1e-4)
        for _ in range(2):  # the second step has AdamW's moments: the peak
            t0 = time.perf_counter()
            x, y = torch.randint(0, V, (1, T)), torch.randint(0, V, (1, T))
            learner.step(Batch(x, y), 1.0, None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_s.append(round(time.perf_counter() - t0, 2))
        pool = learner.engine.pager.pool_bytes
        learner.close()
else:
    from odyssey.engine import Engine
    from odyssey.generate import generate_ids

    new = 4
    p = plan_for_store(store, mode="forward", seq_len=T + new)
    prompt = torch.randint(0, V, (T,)).tolist()
    step_s = []
    with PeakSampler() as s:
        with Engine(store) as eng:
            list(generate_ids(eng, prompt, new))
            pool = eng.pager.pool_bytes
print(
    json.dumps(
        {
            "mode": mode,
            "seq_len": T,
            "measured_bytes": s.peak_with_shmem_bytes,
            "anon_bytes": s.peak_bytes,
            "pool_bytes": pool,
            "plan_bytes": p.total,
            "ratio": round(s.peak_with_shmem_bytes / p.total, 3),
            "terms": p.terms,
            "peak": p.peak,
            "step_s": step_s,
        }
    )
)
