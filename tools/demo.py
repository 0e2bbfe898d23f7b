"""`make demo`: the whole odyssey on this machine, everything under demo/.

DEMO=nano (seconds) or DEMO=1.2b (the default: the real 1.2B model on disk). Each stage is the
`odyssey` command a user would type; the demo prints them, runs them, and ends with a summary.
Stages that later issues add (train, merge, export) join here as they land.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"


def odyssey(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "odyssey", *args]
    print(f"\n$ odyssey {' '.join(shlex.quote(a) for a in args)}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT)
    if check and p.returncode != 0:
        sys.exit(f"demo: `odyssey {args[0]}` failed with status {p.returncode}")
    p.seconds = time.perf_counter() - t0
    return p


def main() -> int:
    which = os.environ.get("DEMO", "1.2b").lower()
    config = {"nano": "configs/nano.yaml", "small": "configs/small.yaml", "1.2b": "configs/odyssey-1.2b.yaml"}.get(which)
    if config is None:
        sys.exit(f"demo: DEMO must be nano, small or 1.2b, got {which!r}")
    model = DEMO / "models" / f"base-{which}"
    budget = "2GiB"
    seconds = {}
    t_all = time.perf_counter()
    # 1. the model on disk: reuse it when present and verified
    if (model / "model.safetensors.index.json").exists() and odyssey("verify", str(model), check=False).returncode == 0:
        print(f"demo: reusing the verified model at {model}")
    else:
        seconds["init"] = odyssey("init", "--config", config, "--out", str(model), "--force").seconds
    odyssey("info", str(model))
    odyssey("plan", "--model", str(model), "--ram-budget", budget, "--seq-len", "512")
    # 2. generation from the paged model (an untrained model babbles; the ids show it runs)
    seconds["generate"] = odyssey("generate", "--model", str(model), "--prompt-ids", "1,100,200,300",
                                  "--max-new-tokens", "8", "--ram-budget", "1GiB", "--temperature", "0").seconds
    print("\n== demo summary ==")
    for k, v in seconds.items():
        print(f"  {k:10s} {v:7.1f} s")
    print(f"  total      {time.perf_counter() - t_all:7.1f} s   (everything is under {DEMO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
