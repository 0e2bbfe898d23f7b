"""Model and training configuration: typed dataclasses, strict YAML, dotted overrides.

No torch import here: the guard and the monitor import this module and must stay light.

Model configs (`odyssey.modelconfig.ModelConfig`) use the family's Hugging Face config key names,
so one becomes a `config.json` that `transformers` reads unchanged, and the reverse.
Training configs (`configs/lora.yaml`) nest `lora:` and `guard:` sections; any key can be overridden
on the command line as `key=value` or `section.key=value` (the value is parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from odyssey.errors import OdysseyError

if TYPE_CHECKING:
    from odyssey.modelconfig import ModelConfig

# --------------------------------------------------------------------------------------------
# sizes


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int | float, flag: str = "--ram-budget") -> int:
    """'1.5GiB', '1500MiB', '2G', '2GB', '123456' -> bytes. K/M/G/T with or without 'i' are 1024-based
    (RAM sizes are binary on every OS; '2G' meaning 2 GiB is what users expect of a RAM budget)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise OdysseyError(f"{flag} must be a size like 1.5GiB, 1500MiB or 2G, got {text!r}")
        number, unit = float(m.group(1)), m.group(2).upper()
        value = int(number * 1024 ** " KMGT".index(unit or " "))
    if value <= 0:
        raise OdysseyError(f"{flag} must be > 0, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# --------------------------------------------------------------------------------------------
# strict loading of nested dataclasses


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raises OdysseyError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except OdysseyError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # "q_proj,v_proj" on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise OdysseyError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise OdysseyError(f"{key} must be a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .nan, .inf in YAML: never a meaningful setting
                raise OdysseyError(f"{key} must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise OdysseyError(f"{key} must be of type {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls, data: dict, prefix: str = "", ignore: tuple[str, ...] = ()):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(k for k in data if k not in names and k not in ignore)
    if unknown:
        raise OdysseyError(f"unknown config key {prefix}{unknown[0]!s}; known keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items() if k in names}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise OdysseyError(f"{prefix or cls.__name__}: {e}; add the missing key") from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings to a nested dict (values parsed as YAML, so `lr=1e-4` is a float)."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise OdysseyError(f"override {item!r} must look like key=value, e.g. lora.r=32")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d*\.?\d+[eE][-+]?\d+", value):
            value = float(value)  # YAML 1.1 reads '1e-4' as a string
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise OdysseyError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _floatify(data):
    """YAML 1.1 (PyYAML) reads 1e-4 as a string; read such strings as floats."""
    if isinstance(data, dict):
        return {k: _floatify(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_floatify(v) for v in data]
    if isinstance(data, str) and re.fullmatch(r"[-+]?\d*\.?\d+[eE][-+]?\d+", data):
        return float(data)
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise OdysseyError(f"config file {path} not found; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise OdysseyError(f"config file {path} is not valid YAML{where}; fix its syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OdysseyError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return _floatify(data)


# --------------------------------------------------------------------------------------------
# training


LORA_TARGETS_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS_ALLOWED = set(LORA_TARGETS_DEFAULT) | {"lm_head"}


@dataclass
class LoraSettings:
    r: int = 16
    """LoRA rank: adapter matrices are (r, in) and (out, r)."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the LoRA input path (0 keeps recompute in backward exact and cheap)."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS_DEFAULT))
    """Module names that get adapters; lm_head only if listed."""

    def __post_init__(self):
        if self.r <= 0:
            raise OdysseyError(f"lora.r must be > 0, got {self.r}")
        if self.alpha <= 0:
            raise OdysseyError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise OdysseyError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS_ALLOWED]
        if bad or not self.targets:
            raise OdysseyError(
                f"lora.targets: unknown module {bad[0] if bad else '(empty list)'}; "
                f"choose from {', '.join(sorted(LORA_TARGETS_ALLOWED))}"
            )


@dataclass
class GuardSettings:
    enabled: bool = True
    """Start the guard process with `odyssey train` (--no-guard turns it off)."""
    interval_s: float = 0.5
    """Seconds between samples."""
    soft_pct: float = 90.0
    """Anonymous RAM above this % of the budget: ask for a checkpoint and warn."""
    hard_pct: float = 97.0
    """Anonymous RAM above this % of the budget: ask to stop (checkpoint, exit status 3)."""
    min_available_mib: float = 150.0
    """System MemAvailable below this many MiB: ask to stop."""
    max_temp_c: float = 90.0
    """CPU temperature above this: ask to pause."""
    resume_temp_c: float = 80.0
    """CPU temperature back below this: ask to resume."""
    heartbeat_s: float = 2.0
    """The trainer reports the guard lost when its heartbeat is older than this."""
    on_guard_lost: str = "continue"
    """continue (with a warning) or stop, when the guard process disappears."""
    thermal_file: str | None = None
    """A file holding the temperature in millidegrees C (like /sys/class/thermal/*/temp)."""
    enforce_cgroup: bool = False
    """Also run the trainer inside a memory cgroup set to the budget (Linux, root)."""

    def __post_init__(self):
        if self.interval_s <= 0:
            raise OdysseyError(f"guard.interval_s must be > 0, got {self.interval_s}")
        if not 0 < self.soft_pct <= self.hard_pct:
            raise OdysseyError(f"guard: need 0 < soft_pct <= hard_pct, got {self.soft_pct} and {self.hard_pct}")
        if self.resume_temp_c >= self.max_temp_c:
            raise OdysseyError(
                f"guard.resume_temp_c ({self.resume_temp_c}) must be below max_temp_c ({self.max_temp_c})"
            )
        if self.on_guard_lost not in ("continue", "stop"):
            raise OdysseyError(f"guard.on_guard_lost must be continue or stop, got {self.on_guard_lost!r}")


@dataclass
class TrainConfig:
    seq_len: int = 512
    """Tokens per sequence."""
    batch_size: int = 1
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    steps: int = 100
    """Optimizer steps in the run (--steps overrides)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW), reached after warmup, then cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm over trained parameters); 0 disables."""
    seed: int = 0
    checkpoint_every: int = 50
    """Steps between checkpoints (also written on stop, SIGINT and SIGTERM)."""
    keep_checkpoints: int = 2
    """How many step-N checkpoints to keep (older ones are removed after a new one is complete)."""
    eval_every: int = 50
    """Steps between validation-loss evaluations; 0 disables."""
    eval_batches: int = 4
    packing: bool = True
    """Examples data (chat, completions, alpaca): pack whole examples into each seq_len window,
    each attending only to itself (positions restart per example); false: one example per window,
    padded. Text data is unaffected (its windows run across documents)."""
    too_long: str = "truncate"
    """Examples longer than seq_len + 1 tokens: truncate (keep the first seq_len + 1) or drop."""
    mode: str = "lora"
    """lora: frozen paged base + adapters. full: all parameters in RAM (small models only)."""
    compute_dtype: str = "auto"
    """auto (bf16 where the CPU has native bf16, else fp32; the environment variable
    ODYSSEY_COMPUTE_DTYPE overrides that choice), bf16 or fp32."""
    slots: int = 2
    """Pager buffer slots (the units paged through them; pinned units have buffers of their own)."""
    pin: bool = True
    """Keep units resident across steps (read once, never evicted) with what the step leaves of
    the budget (--no-pin: page every unit through the slots, as benchmarks of paging want)."""
    recompute: str = "auto"
    """auto: the last layers keep their activations where the budget allows (no recompute in
    backward: about 4N instead of 6N FLOP a token for them); all: recompute every layer (--recompute all)."""
    spill: str | bool = "auto"
    """Layers whose activations the budget cannot keep in RAM: write them to disk in forward and
    read them back for backward instead of recomputing them (odyssey/spill.py): auto (when the
    disk measured in spill_dir moves a layer's bytes faster than the layer computes), on, off."""
    spill_dir: str = ""
    """Where the spill file goes (unnamed, gone with the process): "" = the run directory. The
    optimizer offload's file goes there too."""
    optimizer_offload: str | bool = "auto"
    """AdamW's two moments wait on disk between optimizer steps instead of in RAM through forward
    and backward (odyssey/offload.py): auto (when that lets the budget spill or keep layers it
    would otherwise recompute, or fit at all), on, off. LoRA only."""
    direct_io: str | bool = "auto"
    """How the pager reads the layers it pages a step (odyssey/readmode.py): O_DIRECT (no
    page-cache copy: less CPU) or buffered (the kernel's read-ahead: faster on some disks). auto
    (O_DIRECT when the store's measured O_DIRECT rate is well above what a step needs), on, off."""
    compile: str | bool = "off"
    """torch.compile each decoder layer (odyssey/compiling.py): off (default: it measured no faster
    than eager on the 1.2B step once the bf16 LoRA path removed the copies it fused) or on (needs a
    C++ compiler, else eager; the first step compiles). YAML's true/false read as on/off."""
    dist_timeout_s: float = 300.0
    """Distributed runs: seconds a rank waits for the others in a collective before it stops with
    a checkpoint (a dead rank is usually noticed at once)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "checkpoint_every", "slots", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise OdysseyError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_batches"):
            if getattr(self, name) < 0:
                raise OdysseyError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise OdysseyError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise OdysseyError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise OdysseyError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.dist_timeout_s <= 0:
            raise OdysseyError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if self.too_long not in ("truncate", "drop"):
            raise OdysseyError(f"too_long (--too-long) must be truncate or drop, got {self.too_long!r}")
        if not isinstance(self.packing, bool):
            raise OdysseyError(f"packing (--packing/--no-packing) must be true or false, got {self.packing!r}")
        if self.mode not in ("lora", "full"):
            raise OdysseyError(f"mode must be lora or full, got {self.mode!r}")
        if self.recompute not in ("auto", "all"):
            raise OdysseyError(f"recompute (--recompute) must be auto or all, got {self.recompute!r}")
        if isinstance(self.spill, bool):  # YAML reads on/off as booleans
            self.spill = "on" if self.spill else "off"
        if self.spill not in ("auto", "on", "off"):
            raise OdysseyError(f"spill (--spill) must be auto, on or off, got {self.spill!r}")
        if isinstance(self.optimizer_offload, bool):
            self.optimizer_offload = "on" if self.optimizer_offload else "off"
        if self.optimizer_offload not in ("auto", "on", "off"):
            raise OdysseyError(
                f"optimizer_offload (--optimizer-offload) must be auto, on or off, got {self.optimizer_offload!r}"
            )
        if isinstance(self.direct_io, bool):
            self.direct_io = "on" if self.direct_io else "off"
        if self.direct_io not in ("auto", "on", "off"):
            raise OdysseyError(f"direct_io must be auto, on or off, got {self.direct_io!r}")
        if isinstance(self.compile, bool):  # YAML reads on/off as booleans
            self.compile = "on" if self.compile else "off"
        if self.compile not in ("on", "off"):
            raise OdysseyError(f"compile (--compile) must be on or off, got {self.compile!r}")
        if not isinstance(self.pin, bool):
            raise OdysseyError(f"pin (--pin/--no-pin) must be true or false, got {self.pin!r}")
        if self.compute_dtype not in ("auto", "bf16", "fp32"):
            raise OdysseyError(f"compute_dtype must be auto, bf16 or fp32, got {self.compute_dtype!r}")


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """A model YAML (configs/nano.yaml ...) -> ModelConfig, strict."""
    from odyssey.modelconfig import ModelConfig

    data = apply_overrides(read_yaml(path), list(overrides))
    try:
        return from_dict(ModelConfig, data)
    except OdysseyError as e:
        raise OdysseyError(f"{path}: {e}") from None


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A training YAML (configs/lora.yaml) plus `key=value` overrides -> TrainConfig, strict."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    return from_dict(TrainConfig, data, prefix="")


def dump_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=False, allow_unicode=True)
