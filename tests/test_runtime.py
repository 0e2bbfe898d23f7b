"""odyssey/runtime/ stays light: every module in it imports where torch, peft and transformers cannot.

The modules are discovered with pkgutil, so a module added later is checked too. Each is imported in
its own interpreter, with a `sys.meta_path` finder in front that refuses the heavy packages, so a
module that needs one of them at import (directly or through another odyssey module) fails here.
Also the one /proc/PID/stat parser the guard and the monitor share (`memory.proc_stat`).
"""

from __future__ import annotations

import json
import os
import pkgutil
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import odyssey.runtime

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "peft", "transformers", "accelerate")
"""Packages the light side must not import (`import torch` alone is about 220 MB of RSS, peft 340 MB more)."""

RUNTIME_MODULES = sorted(m.name for m in pkgutil.iter_modules(odyssey.runtime.__path__, "odyssey.runtime."))

IMPORT_BLOCKED = """\
import importlib, json, sys

HEAVY = set(sys.argv[2].split(","))


class RefuseHeavy:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            raise ImportError(f"{name} is made unimportable by tests/test_runtime.py")
        return None


sys.meta_path.insert(0, RefuseHeavy())
try:
    import torch  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
importlib.import_module(sys.argv[1])
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in HEAVY)
print(json.dumps({"blocked": blocked, "loaded": loaded}))
"""


def test_runtime_modules_are_discovered():
    names = {m.rpartition(".")[2] for m in RUNTIME_MODULES}
    assert {"guard", "control", "runlog", "cgroup", "memory", "allocator", "cpu", "doctor"} <= names


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_runtime_module_imports_without_torch(module):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_BLOCKED, module, ",".join(HEAVY)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"{module} does not import without {', '.join(HEAVY)}:\n{out.stderr}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["blocked"], "the finder did not refuse torch"
    assert result["loaded"] == [], f"{module} imported {result['loaded']}"


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_proc_stat_reads_state_and_start_time_past_a_tricky_name(tmp_path):
    """The one /proc/PID/stat parser (guard and monitor): a command name with spaces and ')' does
    not shift the fields; a zombie reads "Z"; a reaped pid reads None. (A child just started may be in
    uninterruptible sleep, "D", while exec pages its binary in.)"""
    from odyssey.runtime.memory import proc_stat

    link = tmp_path / "a) S 1 (b"  # the command name is the executable's file name
    link.symlink_to(shutil.which("sleep") or "/bin/sleep")
    child = subprocess.Popen([str(link), "30"])
    try:
        first = proc_stat(child.pid)
        assert first is not None and first.state in ("R", "S", "D") and first.start_ticks > 0
        assert proc_stat(child.pid).start_ticks == first.start_ticks
        assert proc_stat(os.getpid()).start_ticks <= first.start_ticks and first.cpu_ticks >= 0
        child.kill()
        deadline = time.monotonic() + 10
        while proc_stat(child.pid).state != "Z" and time.monotonic() < deadline:  # killed, not yet reaped
            time.sleep(0.01)
        assert proc_stat(child.pid).state == "Z"
    finally:
        child.kill()
        child.wait()
    assert proc_stat(child.pid) is None
