"""Generation benchmark: greedy decoding tokens/s of one model and prompt, side by side in one
process, with CPU time per token:

- Odyssey resident: a budget that holds the whole model, every unit pinned and held (bound once in
  the compute dtype: engine.Engine `hold_pinned`), fp32 and bf16 compute;
- Odyssey paged: `--no-pin`, the budget of two layer slots: every unit is read from disk for every
  token (the pager drops each range from the page cache after use), so page-in bytes per token over
  the disk's raw read rate is the bound: the table sets that bound against the measured s/token;
- transformers in RAM: `model.generate` greedy with its KV cache, fp32 and bf16 (the faster counts).

Each configuration generates the same new tokens from the same prompt (the first token, the
prompt's pass, is timed apart); the configurations take turns for `--rounds` rounds (the machine
is shared: turns spread the noise over all of them) and the median round counts. Greedy tokens are
compared with transformers fp32 (`same` column). The models: SmolLM2-135M-Instruct (its Q4_1 GGUF,
odyssey.realmodel, imported to a bf16 store once) and, with `--model`, any store (the 1.2B:
`--model odyssey-1.2b` makes it with benchmarks/common.ensure_store).

    .venv/bin/python benchmarks/generation.py [--model smollm2-135m] [--new-tokens 32] [--rounds 3]

Writes generation-MODEL.{json,md} in --out-dir.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TITLE = "Generation"
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def smollm2_store(cache: Path = common.CACHE) -> Path:
    """SmolLM2-135M-Instruct as a bf16 store (its Q4_1 GGUF imported once)."""
    from odyssey.gguf.importer import import_gguf
    from odyssey.realmodel import smollm2_gguf

    out = cache / "smollm2-135m"
    if not (out / "config.json").is_file():
        import_gguf(smollm2_gguf(), out, dtype="bf16", force=True, progress=False)
    return out


def resolve_model(name: str) -> Path:
    if name == "smollm2-135m":
        return smollm2_store()
    if Path(name).is_dir():
        return Path(name)
    return common.ensure_store(name)


def disk_mb_s(store) -> float:
    """The disk's raw sequential read rate of the store's files, page cache dropped first."""
    from odyssey import bench

    bench._drop_all(store)
    return store.total_bytes() / 1e6 / bench.raw_read(store)


class OdysseyRun:
    """An open engine (resident or paged) generating greedily."""

    def __init__(self, store, prompt: list[int], n: int, dtype: str, paged: bool, hold: bool = True):
        from odyssey.generate import open_engine

        self.prompt, self.n, self.paged = prompt, n, paged
        budget = None if paged else 1 << 40  # no budget: two slots, nothing pinned
        self._ctx = open_engine(
            store,
            adapter=None,
            seq_len=len(prompt) + n,
            budget=budget,
            compute_dtype=dtype,
            pin=not paged,
            show=False,
            hold=hold,
        )
        self.eng = self._ctx.__enter__()
        what = (
            "paged (2 slots, --no-pin)"
            if paged
            else "resident (pinned, held)"
            if hold
            else "resident (pinned, rebound per token)"
        )
        self.name = f"Odyssey {what}"
        self.dtype = str(self.eng.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")

    def round(self) -> dict:
        from odyssey.generate import generate_ids

        self.eng.pass_stats(0.0)
        t0 = time.perf_counter()
        it = generate_ids(self.eng, self.prompt, self.n)
        first = next(it)
        t1, c1 = time.perf_counter(), cpu_s()
        self.eng.pass_stats(0.0)  # the prompt's pass apart
        rest = list(it)
        t2, c2 = time.perf_counter(), cpu_s()
        st = self.eng.pass_stats(t2 - t1)
        k = max(len(rest), 1)
        return {
            "tokens": [first, *rest],
            "first_s": t1 - t0,
            "s_per_token": (t2 - t1) / k,
            "cpu_s_per_token": (c2 - c1) / k,
            "pagein_bytes_per_token": st.pagein_bytes / k,
            "read_s_per_token": st.read_s / k,
            "stall_s_per_token": st.stall_s / k,
        }

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


class TransformersRun:
    def __init__(self, store_dir: Path, prompt: list[int], n: int, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(store_dir, dtype=self.torch_dtype).eval()
        self.ids = torch.tensor([prompt])
        self.n, self.name, self.dtype, self.paged = n, "transformers in RAM (generate, KV cache)", dtype, False

    def _generate(self, n: int) -> list[int]:
        with self.torch.no_grad():
            out = self.model.generate(self.ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, self.ids.shape[1] :].tolist()

    def round(self) -> dict:
        t0, c0 = time.perf_counter(), cpu_s()
        self._generate(1)  # the prompt's pass alone, to take it out of the per-token figures
        t1, c1 = time.perf_counter(), cpu_s()
        tokens = self._generate(self.n)
        t2, c2 = time.perf_counter(), cpu_s()
        k = max(self.n - 1, 1)
        return {
            "tokens": tokens,
            "first_s": t1 - t0,
            "s_per_token": ((t2 - t1) - (t1 - t0)) / k,
            "cpu_s_per_token": ((c2 - c1) - (c1 - c0)) / k,
        }

    def close(self) -> None:
        del self.model


def run(
    model: str,
    new_tokens: int,
    rounds: int,
    threads: int | None,
    dtypes: list[str],
    before: bool = False,
    progress=print,
) -> dict:
    import torch

    from odyssey.dtypes import compute_dtype_line
    from odyssey.probe import DECODE_TOKENS
    from odyssey.store import open_model, tokenizer_dir
    from odyssey.tokenizer import load_model_tokenizer

    if threads:
        torch.set_num_threads(threads)
    store_dir = resolve_model(model)
    store = open_model(store_dir)
    tok = load_model_tokenizer(tokenizer_dir(store)) if store.tokenizer_path() else None
    prompt = tok.encode(PROMPT) if tok is not None else list(range(1, 20))
    progress(
        f"{model}: {store.config.num_parameters() / 1e6:.0f}M parameters, {store.dtype} store, "
        f"prompt {len(prompt)} tokens, {new_tokens} new, {rounds} rounds, {torch.get_num_threads()} threads"
    )
    mb_s = disk_mb_s(store)
    progress(f"disk raw read: {mb_s:,.0f} MB/s")
    runs = []
    for dt in dtypes:
        runs.append(TransformersRun(store_dir, prompt, new_tokens, dt))
    for dt in dtypes:
        runs.append(OdysseyRun(store, prompt, new_tokens, dt, paged=False))
    if before:  # the engine as it was: pinned units bound, converted and unbound for every token
        for dt in dtypes:
            runs.append(OdysseyRun(store, prompt, new_tokens, dt, paged=False, hold=False))
    runs.append(OdysseyRun(store, prompt, new_tokens, dtypes[0], paged=True))
    measured: list[list[dict]] = [[] for _ in runs]
    for r in range(rounds + 1):  # round 0 warms up (first reads, pinning, oneDNN kernels)
        for i, run_ in enumerate(runs):
            m = run_.round()
            if r > 0:
                measured[i].append(m)
                progress(f"  round {r} {run_.name} {run_.dtype}: {1 / m['s_per_token']:.1f} tok/s")
    ref = measured[0][0]["tokens"]  # transformers fp32 (or the first dtype)
    rows = []
    for run_, ms in zip(runs, measured, strict=True):
        s_tok = statistics.median(m["s_per_token"] for m in ms)
        row = {
            "name": run_.name,
            "dtype": run_.dtype,
            "paged": run_.paged,
            "tokens_per_s": 1 / s_tok,
            "s_per_token": s_tok,
            "cpu_ms_per_token": 1000 * statistics.median(m["cpu_s_per_token"] for m in ms),
            "first_s": statistics.median(m["first_s"] for m in ms),
            "same_tokens": all(m["tokens"] == ref for m in ms),
            "rounds": [{k: v for k, v in m.items() if k != "tokens"} for m in ms],
        }
        if "pagein_bytes_per_token" in ms[0]:
            row["pagein_bytes_per_token"] = statistics.median(m["pagein_bytes_per_token"] for m in ms)
            row["read_s_per_token"] = statistics.median(m["read_s_per_token"] for m in ms)
            row["bound_s_per_token"] = row["pagein_bytes_per_token"] / 1e6 / mb_s
        rows.append(row)
        run_.close()
    best_hf = max((r for r in rows if r["name"].startswith("transformers")), key=lambda r: r["tokens_per_s"])
    for r in rows:
        r["vs_transformers"] = r["tokens_per_s"] / best_hf["tokens_per_s"]
    return {
        "model": Path(model).name,
        "store": str(store_dir),
        "parameters": store.config.num_parameters(),
        "store_bytes": store.total_bytes(),
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "disk_mb_s": mb_s,
        "machine": common.machine(),
        "date": common.today(),
        "rows": rows,
        # what `odyssey generate` computes this store in with `--compute-dtype auto` (one token a pass)
        "auto": compute_dtype_line("auto", store.dtype, store.config, DECODE_TOKENS),
    }


def table(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        paged = ""
        if r.get("paged"):
            paged = (
                f"{r['pagein_bytes_per_token'] / 1e6:,.1f} MB; at {result['disk_mb_s']:,.0f} MB/s "
                f"{r['bound_s_per_token'] * 1000:,.0f} ms"
            )
            if r.get("read_s_per_token"):  # the pager's own reads (page cache hits included)
                paged += f"; read at {r['pagein_bytes_per_token'] / 1e6 / r['read_s_per_token']:,.0f} MB/s"
        rows.append(
            (
                r["name"],
                r["dtype"],
                f"{r['tokens_per_s']:.1f}",
                f"{r['s_per_token'] * 1000:.0f}",
                f"{r['cpu_ms_per_token']:.0f}",
                f"{r['vs_transformers']:.2f}",
                "yes" if r["same_tokens"] else "no",
                paged,
            )
        )
    return common.markdown_table(
        [
            "run",
            "compute",
            "tokens/s",
            "ms/token",
            "CPU ms/token",
            "vs best transformers",
            "same tokens",
            "page-in a token; disk bound",
        ],
        rows,
        "llrrrrll",
    )


def markdown(result: dict) -> str:
    head = (
        f"{result['model']} ({result['parameters'] / 1e6:.0f}M parameters, {result['store_bytes'] / 1e6:,.0f} MB "
        f"store), greedy, prompt {result['prompt_tokens']} tokens, {result['new_tokens']} new, median of "
        f"{result['rounds']} rounds taking turns, {result['threads']} threads; {result['date']}, "
        f"{common.describe_machine(result['machine'])}."
    )
    if result.get("auto"):  # results written before generating had its own probe lack it
        head += f" `odyssey generate` with `--compute-dtype auto`: {result['auto'].removeprefix('compute dtype: ')}."
    notes = (
        "tokens/s and ms/token count the tokens after the first (the prompt's pass is timed apart); CPU "
        "ms/token is this process's CPU time per token (the machine is shared: wall time is noisy, CPU "
        "time less so). `vs best transformers`: tokens/s over the faster transformers row. The paged row "
        "reads every unit from disk per token (cold: the pager drops what it read from the page cache), "
        "so its bound is page-in bytes per token over the disk's raw read rate; `read at`: the pager's "
        "own read rate (higher than the disk's when another process keeps the store in the page cache)."
    )
    return f"## {TITLE}\n\n{head}\n\n{table(result)}\n\n{notes}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a config name (odyssey-1.2b) or a store")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtypes", default="fp32,bf16", help="compute dtypes for the resident and transformers rows")
    p.add_argument("--before", action="store_true", help="add resident rows without held units (the engine before)")
    p.add_argument("--out-dir", default=str(common.RESULTS))
    args = p.parse_args(argv)
    result = run(args.model, args.new_tokens, args.rounds, args.threads, args.dtypes.split(","), args.before)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.model).name
    common.write_json(out / f"generation-{name}.json", result)
    common.atomic.write_text(out / f"generation-{name}.md", markdown(result))
    print("\n" + markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
