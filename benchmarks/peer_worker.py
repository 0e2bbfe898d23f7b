"""The peers' side of peers.py: one worker process, one peer (transformers + peft in RAM, or with
accelerate disk offload), one task (LoRA training steps or greedy generation), run inside the
memory cgroup peers.py made for it. It writes what it measured to a JSON file after every step,
so a run killed by the cgroup still leaves its figures up to the kill.

    peers.py worker --task train --peer inram --dtype bf16 --checkpointing --model STORE ...
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import common
from common import MIB

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA, LR = 16, 32, 2e-4


def generation_summary(arrivals: Sequence[float], n_tokens: int) -> dict:
    """Seconds per generated token = median gap between consecutive token arrivals after the
    first (the first includes start-up and the prompt pass)."""
    gaps = [b - a for a, b in pairwise(arrivals)]
    return {
        "new_tokens": n_tokens,
        "s_per_token": common.median(gaps),
        "decode_steps": len(gaps),
        "first_token_s": arrivals[0] if arrivals else None,
    }


def worker(args) -> int:
    from odyssey.runtime.memory import PeakSampler

    res: dict = {"task": args.task, "peer": args.peer, "done": False, "loadavg": [round(os.getloadavg()[0], 2)]}

    def save(**kw):
        res.update(kw)
        common.write_json(Path(args.result), res)

    with PeakSampler(interval_s=0.05) as sampler:
        t0 = time.perf_counter()
        import torch

        from odyssey.runtime import allocator

        torch.manual_seed(0)
        save(allocator=allocator.active(), threads=torch.get_num_threads(), import_s=round(time.perf_counter() - t0, 2))
        model, device_map = _load_peer(args, torch)
        save(
            load_s=round(time.perf_counter() - t0, 2),
            device_map=device_map,
            peak_anon_mib=round(sampler.peak_bytes / MIB, 1),
        )
        if args.task == "train":
            _train(args, torch, model, sampler, save)
        else:
            _generate(args, torch, model, sampler, save)
    save(
        done=True,
        peak_anon_mib=round(sampler.peak_bytes / MIB, 1),
        loadavg=res["loadavg"] + [round(os.getloadavg()[0], 2)],
    )
    return 0


def _load_peer(args, torch):
    """The model as the peer loads it: every weight in RAM, or accelerate's placement with
    max_memory cpu = --cpu-weights (or the budget less the reserve) and the rest on disk; in bf16
    for the bf16 configuration (the store is bf16: nothing lost), else fp32."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.peer == "inram":
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype), {"cpu": "all"}
    cpu = args.cpu_weights or max(args.budget - args.reserve, 64 * MIB)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, device_map="auto", max_memory={"cpu": cpu}, offload_folder=args.offload_folder
    )
    counts = offload_summary(model, getattr(model, "hf_device_map", {}))
    counts["cpu_max_memory_mib"] = cpu // MIB
    return model, counts


def offload_summary(model, device_map: dict) -> dict:
    """How much of the model accelerate placed where: parameters per device and their share."""
    per: dict = {}
    for name, where in device_map.items():
        mod = model.get_submodule(name) if name else model
        per[str(where)] = per.get(str(where), 0) + sum(p.numel() for p in mod.parameters())
    total = sum(per.values()) or 1
    return {"params": per, "disk_share": round(per.get("disk", 0) / total, 3), "entries": len(device_map)}


def _train(args, torch, model, sampler, save):
    """The LoRA steps as a knowledgeable user writes them: peft on the loaded model, gradient
    checkpointing (non-reentrant, as transformers recommends) when asked, the forward under CPU
    bf16 autocast in the bf16 configuration (peft keeps LoRA weights in fp32), the loss in fp32."""
    import contextlib

    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from odyssey.data import BatchSampler, TokenData

    if args.checkpointing:
        model.config.use_cache = False
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(
        model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    save(
        trainable=sum(p.numel() for p in params),
        lora_devices=sorted({str(p.device) for p in params}),
        lora_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        checkpointing=_checkpointing(model),
    )
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    batches = BatchSampler(TokenData(args.data), "train", args.seq_len, 1, seed=0)

    def autocast():
        if args.dtype == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    steps, losses, cpus = [], [], []
    for _ in range(args.steps):
        batch = batches.next_batch()  # text data: (1, T) int64 each, every target trained
        x, y = batch.x, batch.y
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast():
            logits = model(input_ids=x, use_cache=False).logits  # (1, T, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(round(time.perf_counter() - t0, 3))
        cpus.append(round(time.process_time() - c0, 2))  # all threads of this process
        losses.append(round(float(loss.detach()), 5))
        del logits, loss
        save(step_s_all=steps, cpu_s_all=cpus, losses=losses, peak_anon_mib=round(sampler.peak_bytes / MIB, 1))
    save(step_s=common.median(steps[1:]), cpu_s=common.median(cpus[1:]), measured_steps=len(steps[1:]))


def _checkpointing(model) -> bool:
    """Whether the model recomputes its layers in backward (transformers 5.24 renamed the flag)."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


def _generate(args, torch, model, sampler, save):
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.t, self.cpu = [], []

        def put(self, value):
            self.t.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def end(self):
            pass

    ids = torch.tensor([[int(i) for i in args.prompt_ids.split(",")]])
    clock = Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.new_tokens,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
        )
    new = [int(t) for t in out[0, ids.shape[1] :]]
    arrivals = [t - t0 for t in clock.t[1:]]  # the first put() is the prompt
    summary = generation_summary(arrivals, len(new))
    summary["cpu_s_per_token"] = common.median([b - a for a, b in pairwise(clock.cpu[1:])])
    save(tokens=new, generate_s=round(time.perf_counter() - t0, 2), **summary)
