"""The targets of issue 18 and their table: Odyssey's step against the fastest peer, and Odyssey's
tokens/s against the machine's compute limit, each with its goal and pass/fail. Pure logic.

The compute limit of a LoRA step (frozen base, no weight gradients of the base) is the fastest
matmul FLOP/s measured in the same run (bf16 or fp32, at the model's largest projection) divided
by the FLOP per token: 2 x parameters forward, 2 x parameters for the input gradients, and 2 x a
layer's parameters again for each layer whose forward is recomputed in backward. So 6 x parameters
when every layer is recomputed, 4 x a layer's parameters for each layer the run kept (read from
Odyssey's metrics.jsonl where it reports them). Attention's score matmuls and the elementwise work
are not counted: the limit is a ceiling.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import common

GOALS = {  # target -> (comparison, goal)
    "step_1g": ("<=", 1.25),
    "step_4g": ("<=", 1.0),
    "compute_1g": (">=", 0.8),
}

# metrics.jsonl keys that may carry how many layers a run kept (not recomputed), in any record
KEPT_KEYS = ("layers_kept", "kept_layers", "layers_not_recomputed", "no_recompute_layers", "saved_layers")
RECOMPUTED_KEYS = ("layers_recomputed", "recomputed_layers", "recompute_layers")


def layers_kept(records: Sequence[dict], num_layers: int) -> int | None:
    """How many decoder layers a run did not recompute in backward, from its metrics records: the
    last record naming a kept count (KEPT_KEYS) or a recomputed count (RECOMPUTED_KEYS, kept = L -
    recomputed); an int or a list of layer ids. Layers that spilled their activations to disk
    (`spilled_layers`, odyssey/spill.py) are not recomputed either. None when no record says (count
    every layer as recomputed)."""
    found = None
    for r in records:
        for key in KEPT_KEYS:
            if key in r:
                found = _count(r[key])
                if found is not None and _count(r.get("spilled_layers")):
                    found += _count(r["spilled_layers"])
        for key in RECOMPUTED_KEYS:
            if key in r and _count(r[key]) is not None:
                found = max(0, num_layers - _count(r[key]))
    return None if found is None else min(max(found, 0), num_layers)


def _count(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, list | tuple):
        return len(v)
    return None


_DTYPE_RE = re.compile(r"compute dtype:\s*(bf16|fp32|fp16)")
_PAGE_IN_RE = re.compile(r"page-in:\s*(O_DIRECT|buffered)")
_PINNED_RE = re.compile(r"residency:\s*(\d+ of \d+ units pinned(?: \([^)]*\))?)")


def _reported(records: Sequence[dict], pattern: re.Pattern) -> str | None:
    for r in records:
        m = pattern.search(str(r.get("message", "")))
        if m:
            return m.group(1)
    return None


def compute_dtype_of(records: Sequence[dict]) -> str | None:
    """The compute dtype an `odyssey train` run reported in its start event ("compute dtype: bf16 (...)")."""
    return _reported(records, _DTYPE_RE)


def page_in_of(records: Sequence[dict]) -> str | None:
    """How an `odyssey train` run read the layers it paged ("O_DIRECT" or "buffered", from its
    start event's "page-in: ..." line); None where it said nothing (nothing paged, or direct_io=off)."""
    return _reported(records, _PAGE_IN_RE)


def pinned_of(records: Sequence[dict]) -> str | None:
    """The units an `odyssey train` run kept in RAM across steps, as its start event said it
    ("15 of 26 units pinned (1.21 GiB)"); None where it said nothing."""
    return _reported(records, _PINNED_RE)


def flop_per_token(parameters: int, layer_parameters: int, kept: int = 0) -> float:
    """6 x parameters, less 2 x a layer's parameters for each layer not recomputed."""
    return 6.0 * parameters - 2.0 * layer_parameters * kept


def compute_limit_tokens_s(gflops: dict, parameters: int, layer_parameters: int, kept: int = 0) -> float | None:
    """Tokens/s at the fastest measured matmul rate; None without figures."""
    rates = [v for v in gflops.values() if v]
    if not rates:
        return None
    return max(rates) * 1e9 / flop_per_token(parameters, layer_parameters, kept)


def loss_tolerance(dtype: str | None, reference: float) -> float:
    """How far a first-step loss may sit from the fp32 reference: 1e-4 relative in fp32 (summation
    order), 1e-2 relative in bf16 (8 mantissa bits through every layer)."""
    rel = 1e-4 if dtype == "fp32" else 1e-2
    return max(abs(reference) * rel, 1e-5)


def check_losses(rows: list[dict], reference: float | None) -> list[str]:
    """Sets each row's `loss_check` ("agrees", "DIFFERS by X (tolerance Y)" or "") against the
    reference loss; returns a line per disagreement."""
    out = []
    for r in rows:
        loss = r.get("first_loss")
        if loss is None or reference is None:
            r["loss_check"] = ""
            continue
        tol = loss_tolerance(r.get("dtype"), reference)
        diff = abs(loss - reference)
        if diff <= tol:
            r["loss_check"] = "agrees"
        else:
            r["loss_check"] = f"DIFFERS by {diff:.4g} (tolerance {tol:.2g})"
            out.append(
                f"{r['label']}: loss of step 1 {loss:.5f} differs from the reference {reference:.5f} by {diff:.4g}"
            )
    return out


def _verdict(kind: str, value: float | None) -> str:
    if value is None:
        return "not measured"
    op, goal = GOALS[kind]
    ok = value <= goal if op == "<=" else value >= goal
    return "pass" if ok else "FAIL"


ROUND_KEYS = {"step_1g": "odyssey", "step_4g": "odyssey-4g"}  # a paired round's step of each target


def round_ratios(rounds: Sequence[dict] | None, key: str) -> list[float]:
    """Per paired round (each {"odyssey": s, "odyssey-4g": s, "peer": s}, the three runs back to
    back), Odyssey's step over the peer's in that round; rounds missing either are left out."""
    return [round(r[key] / r["peer"], 2) for r in rounds or () if r.get(key) and r.get("peer")]


def round_rate(r: dict) -> float | None:
    """The fastest matmul GFLOP/s a paired round measured beside its 1 GiB run (None: none)."""
    return max((v for v in (r.get("gflops") or {}).values() if v), default=None)


def round_limit_ratios(rounds: Sequence[dict] | None, tokens_per_step: int, flop: float | None) -> list[float]:
    """Per paired round that measured the matmul beside its Odyssey 1 GiB run ({"odyssey": s,
    "gflops": {dtype: GFLOP/s}}), that run's tokens/s over the compute limit at that measurement's
    fastest rate (`flop` FLOP a token); rounds missing either are left out."""
    out = []
    for r in rounds or ():
        rate = round_rate(r)
        if rate and r.get("odyssey") and flop:
            out.append(round(tokens_per_step / r["odyssey"] / (rate * 1e9 / flop), 2))
    return out


def targets(
    ody_1g: dict | None,
    ody_4g: dict | None,
    peer: dict | None,
    limit_tokens_s: float | None,
    tokens_per_step: int,
    floor_s: float | None = None,
    rounds: Sequence[dict] | None = None,
    flop: float | None = None,
) -> list[dict]:
    """The three targets from Odyssey's 1 GiB and 4 GiB rows, the fastest peer's row (each with
    `step_s`, `label`) and the compute limit (tokens/s). Each: {"target", "figures", "value",
    "goal", "verdict"}. With `rounds` (paired rounds: Odyssey and the peer run back to back, the
    first being the rows themselves) a step target's value is the median of the rounds' ratios,
    so that a machine slowing down between two runs does not decide it; likewise the compute
    target's, from rounds that measured the matmul beside their 1 GiB run (`flop` FLOP a token,
    round_limit_ratios), since a limit measured at the fast end of a drifting hour and a step
    timed at its slow end compare two machines. With `floor_s` (the step's
    kernel floor, floor.py) two rows of evidence follow, without a goal: the fastest peer's and
    Odyssey's 1 GiB step against that floor."""

    def step(r):
        return r.get("step_s") if r and r.get("status") == "runs" else None

    p = step(peer)
    out = []
    for kind, row, name in (("step_1g", ody_1g, "1 GiB"), ("step_4g", ody_4g, "4 GiB")):
        s = step(row)
        value = round(s / p, 2) if s and p else None
        figures = (
            f"{common.fmt(s, 1)} s / {common.fmt(p, 1)} s"
            + (f" ({peer['label']})" if peer else " (no peer ran)")
            + ("" if row is None or s else f"; Odyssey {name}: {row.get('error') or 'did not run'}")
        )
        paired = round_ratios(rounds, ROUND_KEYS[kind])
        if value is not None and len(paired) > 1:
            value = round(common.median(paired), 2)
            figures = f"median of {len(paired)} paired rounds ({', '.join(f'{x:.2f}' for x in paired)}); " + figures
        op, goal = GOALS[kind]
        out.append(
            {
                "target": f"Odyssey step in {name} / fastest peer's step",
                "figures": figures,
                "value": value,
                "goal": f"{op} {goal:g}",
                "verdict": _verdict(kind, value),
            }
        )
    s = step(ody_1g)
    tps = tokens_per_step / s if s else None
    value = round(tps / limit_tokens_s, 2) if tps and limit_tokens_s else None
    figures = f"{common.fmt(tps, 1)} / {common.fmt(limit_tokens_s, 1)} tokens/s"
    paired = round_limit_ratios(rounds, tokens_per_step, flop)
    if value is not None and len(paired) > 1:
        value = round(common.median(paired), 2)
        figures = (
            f"median of {len(paired)} paired rounds, each against the matmul measured beside it "
            f"({', '.join(f'{x:.2f}' for x in paired)}); against the run's fastest matmul: " + figures
        )
    op, goal = GOALS["compute_1g"]
    out.append(
        {
            "target": "tokens/s of the 1 GiB step / compute limit",
            "figures": figures,
            "value": value,
            "goal": f"{op} {goal:g}",
            "verdict": _verdict("compute_1g", value),
        }
    )
    if floor_s:
        for row, who in ((peer, "the fastest peer's step"), (ody_1g, "Odyssey's 1 GiB step")):
            s = step(row)
            out.append(
                {
                    "target": f"kernel floor / {who} (evidence)",
                    "figures": f"{common.fmt(floor_s, 1)} s / {common.fmt(s, 1)} s",
                    "value": round(floor_s / s, 2) if s else None,
                    "goal": "-",
                    "verdict": "-",
                }
            )
    return out


def fp32_evidence(rows: Sequence[dict]) -> list[dict]:
    """The two step targets in fp32 alone, from Odyssey's fp32 rows and the fastest fp32 peer
    ("odyssey-1g-fp32", "odyssey-4g-fp32", the in-RAM fp32 peers): what a CPU without native bf16
    (AVX2 only: fp32 everywhere) would be held to, measured here by forcing fp32. Evidence rows
    (no verdict); none where `auto` picked fp32 (the targets are then these already)."""
    by = {r["name"]: r for r in rows}
    if (by.get("odyssey") or {}).get("dtype") == "fp32":
        return []
    peers = [r for r in rows if r["name"].startswith("inram-") and r.get("dtype") == "fp32" and r.get("step_s")]
    peer = min(peers, key=lambda r: r["step_s"], default=None)
    out = []
    for name, budget, goal in (("odyssey-1g-fp32", "1 GiB", "1.25"), ("odyssey-4g-fp32", "4 GiB", "1.0")):
        s = (by.get(name) or {}).get("step_s")
        if not s or peer is None:
            continue
        out.append(
            {
                "target": f"fp32 forced: Odyssey step in {budget} / fastest fp32 peer's (evidence: AVX2-only)",
                "figures": f"{common.fmt(s, 1)} s / {common.fmt(peer['step_s'], 1)} s ({peer['label']})",
                "value": round(s / peer["step_s"], 2),
                "goal": f"(<= {goal} there)",
                "verdict": "-",
            }
        )
    return out


def table(rows: Sequence[dict]) -> str:
    return common.markdown_table(
        ["target", "figures", "ratio", "goal", "verdict"],
        [(t["target"], t["figures"], common.fmt(t["value"]), t["goal"], t["verdict"]) for t in rows],
        "llrcc",
    )
