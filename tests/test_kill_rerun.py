"""kill -9 at random moments, then the plain re-run: for `init`, `import`, `prepare-data`, `merge`
and `export` on the nano model. After each kill the output is absent (nothing under its final
name claims to be a result) or complete, valid and equal to an uninterrupted run's; the same
command run again without --force succeeds, gives that same result and leaves no temporary file,
journal or unfinished record; the inputs' bytes never change.

The kill moment (seeded), from an uninterrupted reference run's timings: a quarter of the trials
are killed at a uniform moment between the start and the reference's first write (imports and
checks); 60% once the output directory appears (polled every millisecond), after a uniform delay
within the reference's writing (until its result was complete under its final name: the index,
the manifest, the last output); the rest after that, until the reference's exit. The fast suite
runs 2 trials per command; the full battery (`-m slow`) runs 10 per command. Each prints its
counts per command.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from odyssey import atomic
from odyssey.store import INDEX_NAME, JOURNAL_NAME, Store, StoreError, init_store
from tests.conftest import ROOT, cli_in_process, load_tool
from tests.test_merge import make_adapter
from tests.test_outputs import tree_sums

COMMANDS = ("init", "import", "prepare-data", "merge", "export")
EXPORT_OUTPUTS = ("safetensors", "model.pth", "model-f16.gguf")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Inputs: the nano model (bf16, with a tokenizer), an HF checkpoint of it, an adapter for it
    and a corpus."""
    from odyssey.config import load_model_config
    from odyssey.data import prepare_data
    from odyssey.export import export_model

    d = tmp_path_factory.mktemp("kill-inputs")
    load_tool("make_sample_corpus").write_corpus(d / "corpus", "stories", 300, seed=5)
    init_store(load_model_config(ROOT / "configs" / "nano.yaml"), d / "base", dtype="bf16", seed=0, progress=False)
    prepare_data([d / "corpus"], d / "tok", model_store=d / "base", progress=False)
    export_model(d / "base", d / "hf-export", "safetensors", progress=False)
    make_adapter(d / "base", d / "adapter")
    return d


def argv(cmd: str, ws: Path, out: Path) -> list:
    return {
        "init": ["init", "--config", ROOT / "configs" / "nano.yaml", "--out", out, "--quiet"],
        "import": ["import", ws / "hf-export" / "safetensors", "--out", out, "--quiet"],
        "prepare-data": ["prepare-data", ws / "corpus", "--out", out, "--vocab-size", "1024", "--quiet"],
        "merge": ["merge", "--model", ws / "base", "--adapter", ws / "adapter", "--out", out, "--quiet"],
        "export": ["export", ws / "base", "--out", out, "--formats", "safetensors,pth,gguf", "--quiet"],
    }[cmd]


def _sha(path: Path) -> str:
    if path.is_dir():
        return json.dumps({p.name: _sha(p) for p in sorted(path.iterdir())})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def examine(cmd: str, out: Path) -> tuple[str, dict]:
    """("absent" | "partial" | "complete", {file: sha256} of what is there). Fails the test when
    something under a final name is not a valid result (the one thing a kill must never leave)."""
    if cmd in ("init", "import", "merge"):
        if not (out / INDEX_NAME).exists():
            if out.exists():
                with pytest.raises(StoreError):  # an unfinished store is refused by every command
                    Store.open(out)
            return "absent", {}
        store = Store.open(out)
        assert store.verify(progress=False) == [], (cmd, out)
        files = [p for p in out.iterdir() if p.name.startswith("model-") or p.name.startswith("tokenizer")]
        assert (out / "config.json").is_file()
        return "complete", {p.name: _sha(p) for p in files}
    if cmd == "prepare-data":
        if not (out / "manifest.json").exists():
            return "absent", {}
        from odyssey.data import TokenData

        data = TokenData(out)
        manifest = json.loads((out / "manifest.json").read_text())
        for split in ("train", "val"):
            assert len(data.tokens(split)) == manifest["splits"][split]["tokens"]
        return "complete", {n: _sha(out / n) for n in ("train.bin", "val.bin", "tokenizer.json")}
    present = {}
    for name in EXPORT_OUTPUTS:
        path = out / name
        if not path.exists():
            continue
        if name == "safetensors":
            from safetensors import safe_open

            assert json.loads((path / "config.json").read_text())["hidden_size"] == 128
            with safe_open(path / "model.safetensors", "pt") as f:
                assert len(list(f.keys())) == 4 * 9 + 3
        elif name == "model.pth":
            import torch

            assert len(torch.load(path, mmap=True, weights_only=True)) == 4 * 9 + 3
        else:
            import gguf

            assert len(gguf.GGUFReader(path).tensors) == 4 * 9 + 3
        present[name] = _sha(path)
    state = "absent" if not present else "complete" if len(present) == len(EXPORT_OUTPUTS) else "partial"
    return state, present


def finished(cmd: str, out: Path) -> bool:
    """The result is under its final name (polled during the reference run)."""
    if cmd in ("init", "import", "merge"):
        return (out / INDEX_NAME).exists()
    if cmd == "prepare-data":
        return (out / "manifest.json").exists()
    return all((out / n).exists() for n in EXPORT_OUTPUTS)


def leftovers(out: Path) -> list[str]:
    """Temporary files, a journal or an unfinished export record under `out`."""
    found = [
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.name.endswith(".tmp") or atomic.parse_temp_name(p.name) or p.name == JOURNAL_NAME
    ]
    record = out / ".odyssey-export.json"
    if record.exists():
        states = {k: v["state"] for k, v in json.loads(record.read_text())["outputs"].items()}
        found += [f"{record.name}:{k}={v}" for k, v in states.items() if v != "done"]
    return found


def start(cmd: str, ws: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "odyssey", *map(str, argv(cmd, ws, out))],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for(proc: subprocess.Popen, until, timeout: float = 120.0) -> None:
    """Poll every millisecond until `until()` or the process ends."""
    end = time.monotonic() + timeout
    while proc.poll() is None and not until():
        assert time.monotonic() < end, "the command hung"
        time.sleep(0.001)


@pytest.fixture(scope="module")
def references(ws, tmp_path_factory) -> dict:
    """Per command, an uninterrupted run: (seconds to its first write, to its result complete,
    in all; its result)."""
    d = tmp_path_factory.mktemp("kill-reference")
    refs = {}
    for cmd in COMMANDS:
        out = d / cmd
        t0 = time.monotonic()
        proc = start(cmd, ws, out)
        wait_for(proc, out.exists)
        t_first = time.monotonic() - t0
        wait_for(proc, lambda out=out, cmd=cmd: finished(cmd, out))
        t_done = time.monotonic() - t0
        _, err = proc.communicate(timeout=300)
        t_all = time.monotonic() - t0
        assert proc.returncode == 0, err.decode()
        state, result = examine(cmd, out)
        assert state == "complete" and not leftovers(out), (cmd, state, leftovers(out))
        refs[cmd] = (t_first, t_done, t_all, result)
    return refs


def battery(ws: Path, references: dict, runs: Path, trials: int, seed: int) -> dict:
    before = tree_sums(ws)
    counts = {}
    for cmd in COMMANDS:
        t_first, t_done, t_all, reference = references[cmd]
        rng = random.Random(seed * 1_000_003 + zlib.crc32(cmd.encode()))
        c = dict.fromkeys(("trials", "killed", "absent", "partial", "complete", "tmp after kill"), 0)
        c.update({"re-run ok": 0, "leftovers": 0})
        for i in range(trials):
            out = runs / f"{cmd}-{i}"
            t0 = time.monotonic()
            proc = start(cmd, ws, out)
            u = rng.random()
            if u < 0.25:  # before the reference run's first write
                moment = t0 + rng.uniform(0.0, t_first)
            else:  # once the output directory appears: while writing, or after the result is complete
                wait_for(proc, out.exists)
                lo, hi = (0.0, t_done - t_first) if u < 0.85 else (t_done - t_first, t_all - t_first)
                moment = time.monotonic() + rng.uniform(lo, max(hi, lo + 0.01))
            wait_for(proc, lambda moment=moment: time.monotonic() >= moment)
            killed = proc.poll() is None
            if killed:
                proc.kill()
            proc.communicate(timeout=60)
            c["trials"] += 1
            c["killed"] += killed
            state, result = examine(cmd, out)
            c[state] += 1
            for name, sha in result.items():  # whatever is under a final name equals the uninterrupted result
                assert sha == reference[name], (cmd, i, name)
            c["tmp after kill"] += bool(out.exists() and leftovers(out))
            # the plain re-run: the same command, no --force (in this process: what it finds and
            # leaves is the point; the killed runs and the references are real processes)
            p = cli_in_process(*argv(cmd, ws, out))
            assert p.returncode == 0, (cmd, i, state, p.stderr)
            state, result = examine(cmd, out)
            assert state == "complete" and result == reference, (cmd, i, state)
            c["re-run ok"] += 1
            left = leftovers(out)
            c["leftovers"] += len(left)
            assert not left, (cmd, i, left)
        counts[cmd] = c
    assert tree_sums(ws) == before  # the inputs were never written to
    return counts


def show(counts: dict, capsys, title: str) -> None:
    keys = list(next(iter(counts.values())))
    lines = [title, f"  {'command':<13}" + "".join(f"{k:>16}" for k in keys)]
    lines += [f"  {cmd:<13}" + "".join(f"{c[k]:>16}" for k in keys) for cmd, c in counts.items()]
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_kill_and_rerun_fast(ws, references, tmp_path, capsys):
    counts = battery(ws, references, tmp_path, trials=2, seed=0)
    show(counts, capsys, "kill -9 and re-run, 2 trials per command")
    assert all(c["re-run ok"] == c["trials"] == 2 for c in counts.values())


@pytest.mark.slow
def test_kill_and_rerun_battery(ws, references, tmp_path, capsys):
    counts = battery(ws, references, tmp_path, trials=10, seed=1)
    show(counts, capsys, "kill -9 and re-run, 10 trials per command")
    assert all(c["re-run ok"] == c["trials"] == 10 for c in counts.values())
    # the moments drawn reach the middle of the work, not only before or after it
    assert sum(c["killed"] for c in counts.values()) >= 25
    assert sum(c["absent"] for c in counts.values()) >= 5
