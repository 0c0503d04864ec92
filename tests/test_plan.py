"""`igpt plan` against DeepSpeed's own memory estimators (called live, not copied numbers)."""

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from igpt.config import ModelConfig
from igpt.train.plan import PlanInput, largest_layer_params, plan


@pytest.mark.parametrize("size", ["S", "M", "L", "XL"])
@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_model_states_equal_deepspeed_estimators(size, gpus):
    cfg = ModelConfig.from_name(size)
    total, big = cfg.param_count(), largest_layer_params(cfg)
    for offload in (False, True):
        ours = plan(PlanInput(cfg, gpus=gpus, zero_stage=2, offload_optimizer=offload)).model_states
        _, ds = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=offload)
        assert ours == pytest.approx(ds, rel=1e-6), (size, gpus, "zero2", offload)
    for offload, offload_params in ((False, False), (True, False), (True, True)):
        ours = plan(PlanInput(cfg, gpus=gpus, zero_stage=3, offload_optimizer=offload,
                              offload_params=offload_params)).model_states
        _, ds, _ = estimate_zero3_model_states_mem_needs(total, big, num_gpus_per_node=gpus, cpu_offload=offload,
                                                         cpu_offload_params=offload_params)
        assert ours == pytest.approx(ds, rel=1e-6), (size, gpus, "zero3", offload, offload_params)


def test_stages_order_and_what_fits():
    xl = ModelConfig.from_name("XL")
    states = [plan(PlanInput(xl, zero_stage=s)).model_states for s in (0, 1, 2, 3)]
    assert states == sorted(states, reverse=True) and states[0] > 2 * states[3]
    # 6.8B with plain data parallelism: 20 bytes/param = 127 GiB of states alone, over an 80 GB card
    assert not plan(PlanInput(xl, zero_stage=0, micro_batch=1, activation_checkpointing=True)).fits
    # ZeRO-3 over 8 GPUs with checkpointing: fits
    assert plan(PlanInput(xl, zero_stage=3, micro_batch=8, activation_checkpointing=True)).fits
    # activation checkpointing saves memory, and flash attention drops the s^2 score term
    s = ModelConfig.from_name("S")
    assert (plan(PlanInput(s, activation_checkpointing=True)).activations
            < plan(PlanInput(s)).activations < plan(PlanInput(s, flash_attention=False)).activations)


def test_bad_plans_are_errors():
    with pytest.raises(ValueError, match="stage 3"):
        PlanInput(ModelConfig.from_name("S"), zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="0..3"):
        PlanInput(ModelConfig.from_name("S"), zero_stage=4)
