"""Setting up a training run: the effective config written to RUN/config.yaml, and the rules of
`--resume` (the run's saved settings, with --config and key=value laid over them; what may change).
Everything a user can get wrong is checked here, before anything is written."""

from __future__ import annotations

from pathlib import Path

from odyssey import atomic
from odyssey.config import TrainConfig, apply_overrides, format_bytes, from_dict, read_yaml, to_dict
from odyssey.errors import OdysseyError
from odyssey.outputs import check_apart
from odyssey.runtime.runlog import RunDir

# Effective-config paths that may differ on --resume (a path covers everything below it): they
# change neither the maths of a step nor the data order. `train.steps` lengthens or shortens the run
# (and so the learning-rate schedule from the resumed step on). The rest must match the run's.
RESUME_FREE = {
    "model",
    "data",
    "ram_budget",
    "ram_budget_bytes",
    "world_size",
    "train.steps",
    "train.guard",
    "train.slots",
    "train.pin",
    "train.recompute",
    "train.compile",
    "train.spill",
    "train.spill_dir",
    "train.optimizer_offload",
    "train.direct_io",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.eval_batches",
    "train.dist_timeout_s",
}


# TrainConfig keys newer than some runs' config.yaml: a run without them resumes at their defaults
ADDED_LATER = (
    "packing",
    "too_long",
    "pin",
    "recompute",
    "compile",
    "spill",
    "spill_dir",
    "optimizer_offload",
    "direct_io",
)


def _effective(model_dir: Path, data_dir: Path, budget: int, cfg: TrainConfig, store, data) -> dict:
    return {
        "model": str(model_dir.resolve()),
        "model_fingerprint": store.fingerprint(),
        "data": str(data_dir.resolve()),
        "data_tokens": data.num_tokens("train"),
        "ram_budget": format_bytes(budget),
        "ram_budget_bytes": budget,
        "train": to_dict(cfg),
    }


def _diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'path (run A, now B)' for every value that differs, outside RESUME_FREE."""
    out = []
    for k in sorted(set(saved) | set(now)):
        if f"{prefix}{k}" in RESUME_FREE:
            continue
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} (run {a!r}, now {b!r})")
    return out


def _merged(base: dict, top: dict) -> dict:
    """`base` with the keys of `top` laid over it, sections merged key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_run_config(run: RunDir) -> dict:
    import yaml

    try:
        saved = yaml.safe_load(run.config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise OdysseyError(
            f"{run.config_path} is unreadable ({type(e).__name__}); the run cannot resume, start a new --out"
        ) from None
    if not isinstance(saved, dict) or "train" not in saved:
        raise OdysseyError(f"{run.config_path} is not an odyssey run config; start a new --out")
    return saved


def prepare(
    out: str,
    model: str | None,
    data_dir: str | None,
    budget: int | None,
    config_path: str | None,
    overrides: list[str],
    resume: bool,
):
    """Checks everything a user can get wrong before anything is written. Returns
    (run, store, data, cfg, budget, effective config)."""
    from odyssey.config import load_train_config, parse_bytes
    from odyssey.data import TokenData
    from odyssey.store import open_model

    run = RunDir(out)
    saved = None
    if resume:
        if not run.config_path.is_file():
            raise OdysseyError(f"--resume: {out} is not a run directory (no config.yaml); drop --resume to start it")
        saved = _read_run_config(run)
        model = model or saved.get("model")
        data_dir = data_dir or saved.get("data")
        budget = budget or saved.get("ram_budget_bytes")
        # the run's own settings, then --config and key=value on top (a resume changes only what it names)
        base = saved["train"] if isinstance(saved["train"], dict) else {}
        if config_path is not None:
            base = _merged(base, read_yaml(config_path))
        cfg = from_dict(TrainConfig, apply_overrides(base, overrides))
    else:
        if run.root.exists() and not run.root.is_dir():  # the model itself (a GGUF), or another file
            check_apart(
                run.root, [(w, f, p) for w, f, p in (("model", "--model", model), ("data", "--data", data_dir)) if p]
            )
            raise OdysseyError(f"--out {out} is a file, not a run directory; choose another --out")
        if run.root.exists() and any(run.root.iterdir()):
            raise OdysseyError(
                f"run directory {out} already holds a run; pass --resume to continue it or choose a new --out"
            )
        cfg = load_train_config(config_path, overrides)
    if model is None or data_dir is None:
        raise OdysseyError("pass --model STORE and --data DIR (made by `odyssey prepare-data`)")

    check_apart(run.root, [("model", "--model", model), ("data", "--data", data_dir)])
    atomic.set_command("train")  # named in its temporary files
    if budget is None:
        raise OdysseyError("pass --ram-budget, e.g. --ram-budget 2GiB (see `odyssey plan`)")
    budget = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    store = open_model(model)
    if cfg.mode != "lora":
        from odyssey.gguf.store import refuse_quantized

        refuse_quantized(store, f"{cfg.mode} fine-tuning (mode={cfg.mode})")
    data = TokenData(data_dir)
    if data.vocab_size > store.config.vocab_size:
        raise OdysseyError(
            f"the tokenizer of {data_dir} has {data.vocab_size} tokens but the model has "
            f"{store.config.vocab_size}; prepare the data with the model's tokenizer "
            f"(`odyssey prepare-data ... --tokenizer {model}`) or a smaller --vocab-size"
        )
    eff = _effective(Path(model), Path(data_dir), budget, cfg, store, data)
    if cfg.mode == "lora":
        from odyssey.adapters import check_targets

        check_targets(cfg.lora.targets)
    if saved is not None:
        # a setting added after the run was made (absent from its config.yaml) ran at its default
        train = saved["train"] if isinstance(saved["train"], dict) else {}
        saved = {**saved, "train": {**{k: v for k, v in to_dict(TrainConfig()).items() if k in ADDED_LATER}, **train}}
        diffs = _diff(saved, eff)
        if diffs:
            free = sorted(k.removeprefix("train.") for k in RESUME_FREE if k.startswith("train."))
            raise OdysseyError(
                f"--resume cannot change {', '.join(diffs[:4])}; a resume may change only "
                f"{', '.join(free)} (the rest as in {run.config_path}), or start a new --out"
            )
    return run, store, data, cfg, budget, eff
