"""Compare the planner's forward estimate with the measured peak anonymous RSS of a generation
(prompt of SEQ tokens + 4 new ones). Usage: python tools/plan_accuracy.py STORE SEQ"""
import sys

from odyssey import allocator

allocator.ensure(sys.argv)  # the same allocator as `odyssey generate`
import torch  # noqa: E402
from odyssey.store import Store
from odyssey.engine import Engine
from odyssey.generate import generate_ids
from odyssey.planner import plan_for_store
from odyssey.memory import PeakSampler
store = Store.open(sys.argv[1]); T = int(sys.argv[2]); new = 4
p = plan_for_store(store, mode="forward", seq_len=T + new)
prompt = torch.randint(0, store.config.vocab_size, (T,)).tolist()
with PeakSampler() as s:
    with Engine(store) as eng:
        list(generate_ids(eng, prompt, new))
import json
print(json.dumps({"measured_bytes": s.peak_bytes, "plan_bytes": p.total, "ratio": s.peak_bytes / p.total}))
