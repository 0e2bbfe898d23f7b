"""Shared helpers of the benchmarks: the machine's description, result files (JSON, markdown, PNG),
the stores and token data they run on (created under a cache directory when missing), and the
parsing of `odyssey train` metrics. No torch import: the drivers stay light; the work runs in
subprocesses (each in its own memory cgroup where the benchmark measures memory).

Result files, all under benchmarks/results/ by default:
    NAME.json   everything measured, with `machine`, `date` and the settings
    NAME.md     the tables, each with a one-line title saying what the figures are medians of
    NAME.png    a chart (matplotlib, the `bench` extra; skipped with a note when it is missing)
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py`: make `odyssey` and `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from odyssey import atomic  # noqa: E402  (after the path fix above)
from odyssey.dtypes import MIB  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache" / "bench"
GIB = 1 << 30
PYTHON = sys.executable  # the venv's python when run as `.venv/bin/python benchmarks/...`


# --------------------------------------------------------------------------------------------
# the machine


def _mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine() -> dict:
    """What the figures were measured on: CPU, cores, RAM, SIMD flags, the compute probe's matmul
    GFLOP/s in bf16 and fp32 at the 1.2B's largest projection and the dtype `auto` picks from them
    (odyssey.probe: cached per machine; imports torch), library versions, allocator and cgroup support."""
    from odyssey.probe import probe, shape_text
    from odyssey.runtime import allocator, cgroup
    from odyssey.runtime.cpu import cpu_flags
    from odyssey.runtime.cpu import native_bf16 as bf16_native

    model, flags = cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "bf16") if f in flags]
    native_bf16 = bf16_native(flags)
    measured = probe()
    ok, where = cgroup.available()
    mem = _mem_total_bytes()
    return {
        "host": platform.node(),
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem / GIB, 1) if mem else None,
        "simd": simd,
        "native_bf16": native_bf16,
        "compute_dtype": measured.fastest,  # what `auto` computes a bf16 store in here
        "matmul_gflops": {k: round(v, 1) for k, v in measured.gflops.items()},
        "matmul_shape": shape_text(measured.key.shape),
        "kernels": measured.key.kernels,  # ATen's ISA and any variable limiting the kernels' ISA
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("torch", "transformers", "peft", "accelerate", "safetensors")},
        "jemalloc": allocator.find_jemalloc(),
        "cgroup": where if ok else f"unavailable: {where}",
    }


def _matmul(m: dict) -> str:
    g = m.get("matmul_gflops")
    if not g:  # a result written before the probe existed
        return f"compute in {m.get('compute_dtype')}"
    return (
        f"matmul {m.get('matmul_shape')} bf16 {g['bf16']:,.0f} / fp32 {g['fp32']:,.0f} GFLOP/s, "
        f"so Odyssey computes bf16 stores in {m.get('compute_dtype')}"
    )


def describe_machine(m: dict) -> str:
    """One line for titles and the README."""
    v = m.get("versions", {})
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val and k != "safetensors")
    return (
        f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM, "
        f"SIMD {'/'.join(m.get('simd') or ['-'])} (native bf16: {'yes' if m.get('native_bf16') else 'no'}), "
        f"{_matmul(m)}, Linux {m.get('kernel')}, {libs}"
    )


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M")


# --------------------------------------------------------------------------------------------
# tables and result files


def fmt(value, digits: int = 2, unit: str = "") -> str:
    """A table cell: '-' for None, numbers rounded, strings as they are."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """GitHub markdown table. `align` has one character per column: l, r or c (default: l).
    Pipes inside cells are escaped so an error message cannot break the table."""
    headers = list(headers)
    align = (align or "l" * len(headers)).ljust(len(headers), "l")
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells, table has {len(headers)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, obj) -> Path:
    atomic.write_json(Path(path), obj)
    return Path(path)


def write_markdown(path: Path, title: str, sections: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> Path:
    """`# title`, then per section a bold caption line and its table, then the notes as a list."""
    parts = [f"## {title}", ""]
    for caption, table in sections:
        parts += [caption, "", table, ""]
    if notes:
        parts += [f"- {n}" for n in notes] + [""]
    atomic.write_text(Path(path), "\n".join(parts))
    return Path(path)


def write_results(
    out: Path, name: str, result, title: str, sections: Sequence[tuple[str, str]], notes: Sequence[str] = (), chart=None
) -> list[Path]:
    """out/NAME.json, out/NAME.md and, when `chart(path)` draws one (matplotlib present),
    out/NAME.png; prints and returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json(out / f"{name}.json", result), write_markdown(out / f"{name}.md", title, sections, notes)]
    pic = chart(out / f"{name}.png") if chart else None
    if pic:
        written.append(pic)
    for path in written:
        print(f"wrote {path}")
    return written


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: Path) -> Path:
    """Write a PNG atomically (temporary name, then rename) and close the figure."""
    plt = pyplot()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
    return path


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def last_line(text: str) -> str:
    """The last non-empty line of a log (the error a crash ends with), progress bars stripped."""
    for line in reversed(text.replace("\r", "\n").splitlines()):
        line = line.strip()
        if line and not re.match(r"^[\w ]*:?\s*\d+%\|", line):
            return line[:300]
    return ""


# --------------------------------------------------------------------------------------------
# running a command in a memory cgroup


def run_capped(
    cmd: Sequence,
    budget_bytes: int | None,
    log: Path,
    timeout_s: float | None = None,
    env: dict | None = None,
    stdout_path: Path | None = None,
) -> tuple[int | None, int | None, bool, str, float]:
    """Run `cmd` from ROOT inside a fresh memory cgroup capped at `budget_bytes` (None: no cgroup, no
    cap), stderr into `log`, stdout into `stdout_path` when given (else into the log with stderr).
    Returns (returncode, peak_bytes, oom_killed, error_line, seconds): returncode None when it ran
    past `timeout_s`; error_line '' when it exited 0, else 'OOM-killed' or the log's last line."""
    from odyssey.runtime.cgroup import run_in_cgroup

    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        out = open(stdout_path, "w") if stdout_path else err
        try:
            if budget_bytes is None:
                rc, peak, oom = (
                    subprocess.run(
                        list(cmd), timeout=timeout_s, stdout=out, stderr=err, cwd=ROOT, env=env, check=False
                    ).returncode,
                    None,
                    False,
                )
            else:
                rc, peak, oom = run_in_cgroup(
                    cmd, budget_bytes, timeout=timeout_s, stdout=out, stderr=err, cwd=ROOT, env=env
                )
        except subprocess.TimeoutExpired:
            return None, None, False, f"timed out after {timeout_s:.0f} s", time.perf_counter() - t0
        finally:
            if stdout_path:
                out.close()
    seconds = time.perf_counter() - t0
    error = ""
    if rc != 0:
        error = "OOM-killed" if oom else (last_line(log.read_text(errors="replace")) or f"exit {rc}")
    return rc, peak, oom, error, seconds


# --------------------------------------------------------------------------------------------
# stores and data under the cache directory


def odyssey_cmd(*args) -> list[str]:
    return [PYTHON, "-m", "odyssey", *map(str, args)]


def store_ok(path: Path, config_yaml: Path | None = None) -> bool:
    """A complete store (index present, shards of the right sizes) whose architecture matches the
    config YAML when one is given."""
    try:
        from odyssey.config import load_model_config
        from odyssey.store import Store

        store = Store.open(path)
        if config_yaml is not None:
            want = load_model_config(str(config_yaml), [])
            return store.config == want
        return True
    except Exception:
        return False


def ensure_store(config: str, cache: Path = CACHE, progress=print) -> Path:
    """The store of configs/CONFIG.yaml under `cache` (created with `odyssey init`, seed 0, bf16,
    when missing or invalid; about 20 s for the 1.2B)."""
    yaml = ROOT / "configs" / f"{config}.yaml"
    out = Path(cache) / config
    if store_ok(out, yaml):
        return out
    progress(f"creating {out} (odyssey init --config {yaml.relative_to(ROOT)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(odyssey_cmd("init", "--config", yaml, "--out", out, "--force", "--quiet"), check=True, cwd=ROOT)
    return out


def ensure_data(cache: Path = CACHE, progress=print) -> Path:
    """Token data of the sample corpus (byte-level BPE of 8192 asked; ids fit every config) under
    `cache`. No --model: the stores are left as they are."""
    out = Path(cache) / "tok"
    if (out / "manifest.json").is_file():
        return out
    progress(f"creating {out} (odyssey prepare-data data/sample)")
    subprocess.run(
        odyssey_cmd("prepare-data", ROOT / "data" / "sample", "--out", out, "--force", "--quiet"), check=True, cwd=ROOT
    )
    return out


# --------------------------------------------------------------------------------------------
# odyssey train


def train_available() -> tuple[bool, str]:
    """(True, '') when this checkout has `odyssey train`, else (False, why)."""
    proc = subprocess.run(odyssey_cmd("train", "--help"), capture_output=True, text=True, cwd=ROOT)
    if proc.returncode == 0:
        return True, ""
    return False, (
        "`odyssey train` is not available in this checkout ("
        + (last_line(proc.stderr) or f"exit {proc.returncode}")
        + ")"
    )


def train_cmd(
    store: Path, data: Path, run_dir: Path, budget_bytes: int, steps: int, seq_len: int = 512, extra: Sequence[str] = ()
) -> list[str]:
    """The `odyssey train` command of every benchmark: batch 1, r=16, alpha 32, no eval, no guard
    (the cgroup is the cap), and no periodic checkpoint (checkpoint_every must be > 0, so it is set
    past the last step)."""
    return odyssey_cmd(
        "train",
        "--model",
        store,
        "--data",
        data,
        "--out",
        run_dir,
        "--ram-budget",
        f"{budget_bytes // MIB}MiB",
        "--no-guard",
        "--steps",
        steps,
        f"seq_len={seq_len}",
        "batch_size=1",
        "lora.r=16",
        "lora.alpha=32",
        "eval_every=0",
        f"checkpoint_every={max(steps, 1) * 1000}",
        *extra,
    )


def read_metrics(path: Path) -> list[dict]:
    """Every JSON line of a metrics.jsonl (a torn last line is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out


def summarize_steps(records: list[dict], skip: int = 1) -> dict:
    """From metrics records: the median step_s of the steps after the first `skip` (warm-up), how
    many that is, the peak rss_anon_mib over all steps, the losses and tokens/s."""
    steps = [r for r in records if r.get("kind") == "step"]
    steps.sort(key=lambda r: r.get("step", 0))
    measured = steps[skip:]
    return {
        "steps": len(steps),
        "measured_steps": len(measured),
        "step_s": median([r.get("step_s") for r in measured]),
        "step_s_all": [r.get("step_s") for r in steps],
        "tokens_per_s": median([r.get("tokens_per_s") for r in measured]),
        "peak_rss_anon_mib": max((r["rss_anon_mib"] for r in steps if r.get("rss_anon_mib") is not None), default=None),
        "losses": [r.get("loss") for r in steps],
        "stall_s": median([r.get("stall_s") for r in measured]),
        "pagein_mb_s": median([r.get("pagein_mb_s") for r in measured]),
    }


_NEEDS_RE = re.compile(r"--ram-budget\s+([\d.]+\s*\w+)\s+is too small: the plan needs\s+([\d.]+\s*\w+)")


def short_error(message: str) -> str:
    """An error for a table cell: the planner's long refusal becomes 'planner: 2.00 GiB too small,
    plan needs 2.44 GiB'; anything else is kept (cut at 200 characters)."""
    m = _NEEDS_RE.search(message or "")
    if m:
        return f"planner: {m.group(1)} too small, plan needs {m.group(2)}"
    return (message or "")[:200]


_SUGGEST_RE = re.compile(r"--ram-budget\s+(\d+)\s*MiB\s+or\s+more", re.I)


def suggested_budget(message: str) -> int | None:
    """The smallest budget the planner names in its refusal ('use --ram-budget 1490MiB or more'), bytes."""
    m = _SUGGEST_RE.search(message or "")
    return int(m.group(1)) * MIB if m else None


def parse_budget(text: str) -> int:
    """'2GiB', '1500MiB', '2G' -> bytes (binary units, as `--ram-budget` reads them)."""
    from odyssey.config import parse_bytes

    return parse_bytes(text, "--budget")


def model_label(store_dir: Path) -> str:
    """'1.21B' / '100M' / '2.8M': the store's parameter count, for table titles."""
    from odyssey.store import Store

    n = Store.open(store_dir).config.num_parameters()
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M"
