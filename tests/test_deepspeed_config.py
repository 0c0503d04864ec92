"""DeepSpeed configs and presets, parsed by DeepSpeed itself and run by a real DeepSpeed engine on the CPU."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig as DSParsed

from igpt.config import CLUSTER_DIR, DeepSpeedConfig, ModelConfig, OptimConfig
from igpt.train import deepspeed_config

PRESETS = sorted((CLUSTER_DIR / "deepspeed").glob("*.json"))


def test_there_are_presets_for_every_paper_size():
    assert {p.stem for p in PRESETS} >= {"S", "M", "L", "XL", "cpu"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_parses_in_deepspeed(preset):
    data = json.loads(preset.read_text())
    assert set(data) <= {"_comment", "deepspeed", "model"} and data["_comment"]
    ModelConfig(**data.get("model", {}))  # the model settings are real ModelConfig fields
    micro = 4
    conf, model = deepspeed_config.build(DeepSpeedConfig(preset=preset.stem, micro_batch=micro),
                                         OptimConfig(global_batch=micro * 2),
                                         world_size=1, on_gpu=preset.stem != "cpu")
    parsed = DSParsed(conf)  # DeepSpeed's own validation (world size 1 here)
    assert parsed.train_batch_size == micro * 2 and parsed.gradient_accumulation_steps == 2
    assert parsed.zero_optimization_stage == data["deepspeed"]["zero_optimization"]["stage"]
    assert conf["optimizer"]["params"]["betas"] == [0.9, 0.95] and conf["optimizer"]["params"]["weight_decay"] == 0


def test_explicit_fields_override_the_preset_and_batch_arithmetic_is_checked():
    conf, model = deepspeed_config.build(
        DeepSpeedConfig(preset="XL", zero_stage=3, precision="fp32", offload_optimizer=True, offload_params=True,
                        micro_batch=2), OptimConfig(global_batch=64), world_size=8, on_gpu=True)
    assert conf["gradient_accumulation_steps"] == 4 and conf["train_micro_batch_size_per_gpu"] == 2
    assert conf["bf16"] == {"enabled": False} and conf["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert model == {"activation_checkpointing": True}
    with pytest.raises(ValueError, match="not a multiple"):
        deepspeed_config.build(DeepSpeedConfig(micro_batch=3), OptimConfig(global_batch=128), 8, False)
    with pytest.raises(ValueError, match="stage 3"):
        deepspeed_config.build(DeepSpeedConfig(zero_stage=2, offload_params=True), OptimConfig(global_batch=8), 1,
                               False)
    with pytest.raises(FileNotFoundError, match="known presets"):
        DeepSpeedConfig(preset="XXL")


ENGINE_SCRIPT = r"""
import json, sys, torch, deepspeed
from igpt.train import deepspeed_config
from igpt.config import DeepSpeedConfig, ModelConfig, OptimConfig
from igpt.model import IGPT
deepspeed.init_distributed(dist_backend="gloo")
out = {}
RUNS = {  # name: (DeepSpeedConfig fields, activation checkpointing)
    "z0": (dict(zero_stage=0), False), "z1": (dict(zero_stage=1), False), "z2": (dict(zero_stage=2), False),
    "z3": (dict(zero_stage=3), False),
    "z2-bf16-offload-opt": (dict(zero_stage=2, precision="bf16", offload_optimizer=True), False),
    "z3-bf16-offload-all-ckpt": (dict(zero_stage=3, precision="bf16", offload_optimizer=True,
                                      offload_params=True), True),
}
for name, (fields, ckpt) in RUNS.items():
    torch.manual_seed(0)
    conf, _ = deepspeed_config.build(DeepSpeedConfig(preset="cpu", micro_batch=4, **fields),
                                     OptimConfig(lr=3e-3, global_batch=8), world_size=1, on_gpu=False)
    model = IGPT(ModelConfig(size="debug", resolution=8, activation_checkpointing=ckpt))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=conf)
    x = torch.randint(0, 16, (8, 64))  # 16 colours only: learnable in a few steps
    losses = []
    for step in range(12):
        for micro in x.split(4):
            loss = engine.module.loss(micro)
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    p = next(engine.module.parameters())
    out[name] = {"losses": losses, "steps": engine.global_steps, "dtype": str(p.dtype),
                 "optimizer": type(engine.basic_optimizer).__name__,
                 "offload": bool(conf["zero_optimization"].get("offload_optimizer"))}
print("RESULT " + json.dumps(out))
"""


def test_deepspeed_engine_trains_with_every_zero_stage_on_cpu(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert len(result) == 6
    for name, r in result.items():
        assert r["steps"] == 12, name  # 12 optimizer steps of 2 accumulated micro-batches
        assert r["losses"][-1] < r["losses"][0] - 1.0, (name, r["losses"])
        assert r["optimizer"] == "AdamW", name  # torch's: nothing compiled on the CPU
    assert result["z2-bf16-offload-opt"]["dtype"] == "torch.bfloat16" and result["z2-bf16-offload-opt"]["offload"]
    assert result["z3-bf16-offload-all-ckpt"]["dtype"] == "torch.bfloat16"
