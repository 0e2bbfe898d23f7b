"""LoRA adapters with `peft`: injected into the meta skeleton, materialised, saved and loaded in
PEFT's own format.

On disk (what `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(store), dir)` reads,
the store loaded with its family's class; `AutoPeftModelForCausalLM.from_pretrained(dir)` finds the
store by base_model_name_or_path):
  adapter_config.json        PEFT `LoraConfig` (task_type CAUSAL_LM, r, lora_alpha, target_modules:
                             the seven projections, named alike in every family, base_model_name_or_path:
                             the store, ...)
  adapter_model.safetensors  base_model.model.<HF module>.lora_A.weight (r, in) and .lora_B.weight
                             (out, r), fp32
  odyssey_adapter.json       Odyssey's own record of the base it was trained on (fingerprint and
                             shapes), so an adapter for another base is refused; optional, since
                             adapters made by other tools lack it (then shapes alone are checked).

In memory the skeleton keeps HF module names (`inject_adapter_in_model`, no PeftModel wrapper);
each targeted Linear becomes a PEFT `lora.Linear` whose base weight stays on `meta` until the
engine binds a paged view, while `lora_A`/`lora_B` hold real fp32 tensors that stay resident.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from odyssey import atomic
from odyssey.config import LORA_TARGETS_DEFAULT, LoraSettings
from odyssey.errors import OdysseyError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ODYSSEY_NAME = "odyssey_adapter.json"
PEFT_PREFIX = "base_model.model."
ALLOWED_TARGETS = tuple(LORA_TARGETS_DEFAULT)  # every decoder Linear; never the paged head


class AdapterError(OdysseyError):
    pass


def check_targets(targets: list[str]) -> list[str]:
    targets = list(targets)
    bad = [t for t in targets if t not in ALLOWED_TARGETS]
    if bad or not targets:
        raise AdapterError(
            f"lora.targets {bad or targets} not supported: choose among {', '.join(ALLOWED_TARGETS)} "
            f"(the head and embeddings are paged and stay frozen)"
        )
    return targets


def peft_config(settings: LoraSettings, base_path: str | None = None):
    """PEFT's LoraConfig for `settings`: the same seven projection names in every family (HF
    names), task CAUSAL_LM, and the base store's path, so `AutoPeftModelForCausalLM` loads the
    store with the family's transformers class and the adapter on it."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=check_targets(settings.targets),
        bias="none",
        base_model_name_or_path=base_path,
    )


def inject(model: nn.Module, settings: LoraSettings, seed: int = 0) -> nn.Module:
    """Adds LoRA modules (adapter "default") to `model` (the meta skeleton or an in-RAM model) in
    place and returns it. LoRA weights are materialised on CPU in fp32 and initialised as PEFT does
    (A Kaiming-uniform, B zero) from a generator seeded by `seed`; everything else is frozen."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config(settings), model)
    with torch.random.fork_rng():  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        for mod in model.modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                for part in (mod.lora_A["default"], mod.lora_B["default"]):
                    if part.weight.device.type == "meta":
                        part.to_empty(device="cpu")
                    part.float()
                mod.reset_lora_parameters("default", True)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def lora_forward(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PEFT's `lora.Linear.forward` for one plain adapter ("default": not merged, no variant), with
    fewer passes over the (T, out) output. Two cases, by the dtype of x against the LoRA weights'
    (fp32, as PEFT keeps them):

    - x in the LoRA weights' dtype (fp32 compute): PEFT computes
      `base(x) + lora_B(lora_A(dropout(x))) * s`: four passes over (T, out) besides the matmuls
      (the LoRA product, its scaling, the add, the cast back). Here the scale goes on the (T, r)
      product and the LoRA product is added into the base result by the matmul itself: an in-place
      `addmm_` on the base result made 2-D, which autograd does not save (an out-of-place addmm
      copied each base result first: 1.3 % more CPU for a 1.2B layer, `benchmarks/lora_layer.py
      --dtype fp32`, 30 interleaved rounds). Same values up to float rounding (bit for bit when s
      is a power of two: alpha = 2r); gradients equal peft's (tests/test_adapters.py,
      tests/test_train.py).
    - x in a lower precision than the LoRA weights (bf16/fp16 compute): PEFT's forward as it runs
      under `torch.autocast("cpu", x.dtype)`, the configuration the fastest in-RAM peer trains the
      same fp32 LoRA weights in (benchmarks/peer_worker.py). There, peft 0.21.2's
      `_cast_input_dtype` casts x to fp32 for lora_A, dropout draws its mask on that fp32 x, and
      autocast casts it back: `linear` is on torch's CPU autocast list of ops run in the lower
      precision, so both LoRA matmuls take bf16 inputs (A and B cast to bf16) and give bf16
      outputs; `mul` by the scaling and the `add` into the base result are on no autocast list
      and run in bf16 (both operands are bf16); the final `.to(result dtype)` is a no-op. Here
      the same: A and B cast to x's dtype ((r, in) and (out, r): tiny), the (T, r) product
      `x @ A.T` scaled in x's dtype, and added into the base result by an in-place
      `addmm_(h, B.T)` in x's dtype, which autograd does not save. No (T, in) or (T, out) copy
      in fp32 (with dropout > 0 in training, x is cast to fp32 for the mask as PEFT does; the
      mask is then the same). Rounding differs only in where it happens: the LoRA term is
      rounded once, inside the matmul's add, instead of after lora_B, the scaling and the add;
      the values are within bf16 precision of PEFT under autocast (tests/test_adapters.py).

    Measured at the 1.2B shapes (benchmarks/lora_layer.py, benchmarks/results/lora-bf16.md): one
    bf16 layer's forward, recompute and backward took 9 % less CPU than with the LoRA path in fp32
    (the casts of x and of the output were most of `aten::copy_` in profile-1.2b.md)."""
    if mod.merged or mod.disable_adapters:  # changed since use_lora_forward: PEFT's own path
        return type(mod).forward(mod, x)
    A = mod.lora_A["default"].weight  # (r, in) fp32
    B = mod.lora_B["default"].weight  # (out, r) fp32
    dropout = mod.lora_dropout["default"]
    lead = x.shape[:-1]
    # (N, in): the base result comes out 2-D, not a view, so the in-place adds below cost autograd
    # nothing (on a view it would add a zero fill and a copy in backward: CopySlices)
    x2 = x.reshape(-1, x.shape[-1])
    result = mod.base_layer(x2)  # (N, out) base dtype (x's in low-precision compute)
    if x.dtype.itemsize >= A.dtype.itemsize or not x.is_floating_point():
        h = F.linear(dropout(x2.to(A.dtype)), A) * mod.scaling["default"]  # (N, r)
        if result.dtype == B.dtype:  # fp32 compute: the LoRA product added in place, no (N, out) copy
            result.addmm_(h, B.t())
            return result.view(*lead, result.shape[-1])
        acc = torch.addmm(result.to(B.dtype), h, B.t())
        return acc.view(*lead, acc.shape[-1]).to(result.dtype)
    # low-precision compute, as PEFT under autocast: everything in x's dtype
    cd = result.dtype
    if not isinstance(dropout, nn.Identity):  # the mask drawn on fp32 x, as PEFT does
        x2 = dropout(x2.to(A.dtype))
    h = F.linear(x2.to(cd), A.to(cd)) * mod.scaling["default"]  # (N, r) x's dtype
    result.addmm_(h, B.to(cd).t())
    return result.view(*lead, result.shape[-1])


def use_lora_forward(model: nn.Module) -> int:
    """Gives every PEFT LoRA Linear of `model` with one plain adapter `lora_forward`; returns how
    many. Modules in another state (merged, disabled, several adapters, a variant such as DoRA)
    keep PEFT's forward."""
    import types

    n = 0
    for mod in model.modules():
        lora_A = getattr(mod, "lora_A", None)
        if not isinstance(lora_A, nn.ModuleDict) or not hasattr(mod, "base_layer"):
            continue
        plain = (
            list(lora_A.keys()) == ["default"]
            and list(getattr(mod, "active_adapters", [])) == ["default"]
            and not getattr(mod, "merged", False)
            and not getattr(mod, "disable_adapters", False)
            and not getattr(mod, "lora_variant", {})
            and isinstance(mod.base_layer, nn.Linear)
        )
        if plain:
            mod.forward = types.MethodType(lora_forward, mod)
            n += 1
    return n


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """HF-style key (PEFT's saved name) -> the trainable LoRA parameter, in a fixed order."""
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            out[PEFT_PREFIX + n.replace(".default", "")] = p
    return out


def base_record(store) -> dict:
    cfg = store.config
    return {
        "base_fingerprint": store.fingerprint(),
        "base_path": str(Path(store.root).resolve()),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
    }


def save_adapter(model: nn.Module, settings: LoraSettings, out: str | os.PathLike, store, **extra) -> Path:
    """Writes the three adapter files into `out` (each to a temporary name, then renamed)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.detach().float().contiguous().clone() for k, p in lora_parameters(model).items()}
    with atomic.atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    cfg = peft_config(settings, base_path=str(Path(store.root).resolve())).to_dict()
    cfg = json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    atomic.write_json(out / CONFIG_NAME, cfg)
    atomic.write_json(out / ODYSSEY_NAME, {**base_record(store), **extra})
    return out


@dataclass
class AdapterFile:
    """An adapter directory read into RAM: `pairs` maps an HF module name
    ("model.layers.3.self_attn.q_proj") to (A (r, in), B (out, r)) fp32; W' = W + scale * B @ A."""

    path: Path
    r: int
    alpha: float
    dropout: float
    targets: list
    scale: float
    pairs: dict
    record: dict | None  # odyssey_adapter.json, None for adapters made elsewhere

    def settings(self) -> LoraSettings:
        return LoraSettings(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=list(self.targets))

    def layer_pairs(self, i: int) -> dict:
        prefix = f"model.layers.{i}."
        return {k: v for k, v in self.pairs.items() if k.startswith(prefix)}

    def check_base(self, store) -> None:
        """Refuses an adapter made for another base: fingerprint when recorded, shapes always."""
        cfg = store.config
        rec = self.record
        if rec and rec.get("base_fingerprint") not in (None, store.fingerprint()):
            dims = all(rec.get(k) == getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size"))
            what = "other weights of the same shape" if dims else "a model of another shape"
            raise AdapterError(
                f"adapter {self.path} was trained on {rec.get('base_path', 'another base')} "
                f"({what}), not on {store.root}; use it with its own base (--model)"
            )
        shapes = cfg.all_shapes()  # HF tensor name -> (out, in) for every Linear of the base
        for name, (A, B) in self.pairs.items():
            want = shapes.get(f"{name}.weight")
            if want is None or len(want) != 2:
                raise AdapterError(
                    f"adapter {self.path} has a LoRA module {name!r} that this {cfg.family.architecture} "
                    f"base does not have; use an adapter trained for this model"
                )
            if A.shape[1] != want[1] or B.shape[0] != want[0]:
                raise AdapterError(
                    f"adapter {self.path} does not fit {store.root}: {name} is "
                    f"{tuple(B.shape[:1]) + tuple(A.shape[1:])} (out, in) but the base has "
                    f"{want}; use the adapter's own base"
                )


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Reads and checks an adapter directory in PEFT format."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise AdapterError(
            f"{path} is not an adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
            f"pass RUN/adapter or a checkpoint's adapter directory"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
        record = json.loads((path / ODYSSEY_NAME).read_text()) if (path / ODYSSEY_NAME).is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: adapter config is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(cfg, dict) or (record is not None and not isinstance(record, dict)):
        raise AdapterError(f"{path}: {CONFIG_NAME} must hold a JSON object; re-save the adapter")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{path} holds a {cfg.get('peft_type')} adapter; Odyssey merges LoRA adapters only")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{w_path} is unreadable ({e}); the adapter is damaged, use a checkpoint's copy") from None
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", cfg.get("r", 8))
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{cfg_path}: r must be a whole number > 0, got {r!r}; the adapter is damaged")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{cfg_path}: lora_alpha must be a finite number > 0, got {alpha!r}; the adapter is damaged")
    alpha = float(alpha)
    scale = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r
    pairs: dict = {}
    for key, t in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key.removeprefix(PEFT_PREFIX).split(".lora_")[0]
        slot = 0 if ".lora_A." in key else 1
        pairs.setdefault(module, [None, None])[slot] = t.float()
    broken = [m for m, (a, b) in pairs.items() if a is None or b is None or a.shape[0] != b.shape[1]]
    if broken or not pairs:
        raise AdapterError(
            f"{w_path}: {'LoRA pairs incomplete for ' + broken[0] if broken else 'no LoRA weights'}; "
            f"the adapter is damaged"
        )
    found = sorted({m.split(".")[-1] for m in pairs})
    targets = cfg.get("target_modules") or found
    if isinstance(targets, str):
        targets = found
    if not isinstance(targets, list) or not set(found) <= set(targets):
        raise AdapterError(
            f"{cfg_path}: target_modules {targets!r} do not cover the weights' modules {found}; the adapter is damaged"
        )
    wrong_rank = [m for m, (a, _) in pairs.items() if a.shape[0] != r]
    if wrong_rank:
        raise AdapterError(f"{w_path}: {wrong_rank[0]} has rank {pairs[wrong_rank[0]][0].shape[0]}, not r={r}")
    return AdapterFile(
        path=path,
        r=r,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout", 0.0)),
        targets=sorted(targets),
        scale=scale,
        pairs={k: tuple(v) for k, v in pairs.items()},
        record=record,
    )


def load_into(model: nn.Module, adapter: AdapterFile) -> None:
    """Copies an adapter's weights into a model injected with the same settings."""
    params = lora_parameters(model)
    for module, (A, B) in adapter.pairs.items():
        for part, t in (("lora_A", A), ("lora_B", B)):
            key = f"{PEFT_PREFIX}{module}.{part}.weight"
            if key not in params or params[key].shape != t.shape:
                raise AdapterError(
                    f"adapter {adapter.path}: {key} does not match this model's LoRA layout "
                    f"(r={adapter.r}, targets {adapter.targets}); use matching lora settings"
                )
            with torch.no_grad():
                params[key].copy_(t)


def adapter_skeleton(store, adapter: AdapterFile) -> nn.Module:
    """A meta skeleton of `store`'s model with `adapter` injected and loaded (for generate/eval)."""
    from odyssey.model import CausalLM

    adapter.check_base(store)
    with torch.device("meta"):
        model = CausalLM(store.config)
    inject(model, adapter.settings())
    load_into(model, adapter)
    return model
