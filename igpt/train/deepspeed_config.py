"""The DeepSpeed config of a run, generated from the typed config: preset < explicit fields < batch arithmetic.

A preset (``cluster/deepspeed/<name>.json``) holds native DeepSpeed keys under ``"deepspeed"`` and model
settings it needs under ``"model"`` (XL needs activation checkpointing). Explicit ``DeepSpeedConfig`` fields
override the preset. The batch keys are always computed here: ``gradient_accumulation_steps`` = global batch /
(micro batch x data-parallel workers), which must divide exactly. The optimizer is the paper's Adam. On a GPU it
is DeepSpeed's (fused Adam, or its CPU Adam for offloaded states: many times torch's speed on the host). On the
CPU it is torch's Adam (``torch_adam``), offloaded or not, so no DeepSpeed op has to compile (~1 min each).
"""

from __future__ import annotations

import copy
import json

from igpt.config import DeepSpeedConfig, OptimConfig, preset_path


def load_preset(name: str) -> dict:
    if not name:
        return {"deepspeed": {}, "model": {}}
    data = json.loads(preset_path(name).read_text())
    if not isinstance(data.get("deepspeed"), dict) or not isinstance(data.get("model", {}), dict):
        raise ValueError(f"preset {name}: expected a 'deepspeed' object and an optional 'model' object")
    return data


def precision_of(conf: dict) -> str:
    """bf16 | fp16 | fp32: the precision a built DeepSpeed config trains in."""
    return "bf16" if conf.get("bf16", {}).get("enabled") else "fp16" if conf.get("fp16", {}).get("enabled") else "fp32"


def offloads(conf: dict) -> tuple[bool, bool]:
    """(optimizer offloaded, parameters offloaded) in a built DeepSpeed config: the keys' presence, as build reads
    it when it picks the optimizer."""
    zero = conf.get("zero_optimization", {})
    return "offload_optimizer" in zero, "offload_param" in zero


def build(ds: DeepSpeedConfig, optim: OptimConfig, world_size: int, on_gpu: bool) -> tuple[dict, dict]:
    """(DeepSpeed config dict, model settings from the preset)."""
    preset = load_preset(ds.preset)
    conf = copy.deepcopy(preset["deepspeed"])
    zero = conf.setdefault("zero_optimization", {})
    if ds.zero_stage is not None:
        zero["stage"] = ds.zero_stage
    stage = zero.setdefault("stage", 0)

    if ds.precision is not None:
        conf["bf16"] = {"enabled": ds.precision == "bf16"}
        conf["fp16"] = {"enabled": ds.precision == "fp16"}
    if conf.get("bf16", {}).get("enabled") and conf.get("fp16", {}).get("enabled"):
        raise ValueError("bf16 and fp16 cannot both be enabled")

    if optim.global_batch is None:
        raise ValueError("optim.global_batch is unresolved: pretraining takes it from the size's recipe "
                         "(igpt.train.schedule.resolve) before building the DeepSpeed config")
    micro = ds.micro_batch or conf.get("train_micro_batch_size_per_gpu", 1)
    if optim.global_batch % (micro * world_size):
        raise ValueError(f"global batch {optim.global_batch} is not a multiple of micro batch {micro} x "
                         f"{world_size} workers; change optim.global_batch or deepspeed.micro_batch")
    conf["train_batch_size"] = optim.global_batch
    conf["train_micro_batch_size_per_gpu"] = micro
    conf["gradient_accumulation_steps"] = optim.global_batch // (micro * world_size)

    if ds.offload_optimizer is not None:
        zero.pop("offload_optimizer", None)
        if ds.offload_optimizer:
            if stage < 1:
                raise ValueError("optimizer offload needs ZeRO stage >= 1")
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params is not None:
        zero.pop("offload_param", None)
        if ds.offload_params:
            if stage != 3:
                raise ValueError("parameter offload needs ZeRO stage 3")
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    offloaded = "offload_optimizer" in zero
    if offloaded and not on_gpu:
        conf["zero_force_ds_cpu_optimizer"] = False  # torch's Adam on host states (the check expects CPU Adam)

    conf["optimizer"] = {
        "type": "Adam",
        "params": {"lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps,
                   "weight_decay": optim.weight_decay, "adam_w_mode": True,
                   # on the CPU, torch's Adam: DeepSpeed's fused or CPU Adam would compile first (~1 min)
                   **({"torch_adam": True} if not on_gpu else {})},
    }
    conf.setdefault("gradient_clipping", 0.0)  # the paper clips nothing
    conf["steps_per_print"] = 10**9  # we log; DeepSpeed's own prints would only repeat it
    conf.setdefault("wall_clock_breakdown", False)
    return conf, dict(preset.get("model", {}))
