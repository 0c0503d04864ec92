"""`igpt plan` against DeepSpeed's own memory estimators (called live, not copied numbers)."""

from dataclasses import replace

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from igpt.config import ModelConfig
from igpt.train.plan import PlanInput, best_micro_batch, largest_layer_params, plan, table


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


@pytest.mark.parametrize("size", ["S", "M", "L", "XL"])
@pytest.mark.parametrize(("gpus", "gpu_mem"), [(8, 80.0), (1, 80.0), (1, 139.0), (2, 24.0)])
@pytest.mark.parametrize("ckpt", [False, True])
def test_best_micro_batch_is_the_largest_power_of_two_the_plan_fits(size, gpus, gpu_mem, ckpt):
    cfg = ModelConfig.from_name(size, activation_checkpointing=ckpt)
    global_batch = 64 if size == "XL" else 128
    p = PlanInput(cfg, gpus=gpus, gpu_mem_gib=gpu_mem, zero_stage=3 if size == "XL" else 2,
                  activation_checkpointing=ckpt, global_batch=global_batch)
    per_worker = global_batch // gpus
    best = best_micro_batch(p)
    if best is None:  # not even one image per GPU fits
        assert not plan(replace(p, micro_batch=1)).fits
        return
    assert best & (best - 1) == 0 and per_worker % best == 0  # a power of two the accumulation can reach
    assert plan(replace(p, micro_batch=best)).fits
    # the next power of two is past the per-worker batch, or does not fit the memory
    assert 2 * best > per_worker or not plan(replace(p, micro_batch=2 * best)).fits


def test_best_micro_batch_fills_the_memory_the_headroom_leaves():
    s = PlanInput(ModelConfig.from_name("S"), gpus=1, global_batch=128)
    assert best_micro_batch(s) == 128  # iGPT-S: every image of the batch at once on one 80 GB card
    assert best_micro_batch(replace(s, gpus=8)) == 16  # ... but each of 8 GPUs has only 16
    assert best_micro_batch(replace(s, gpus=3)) is None  # 128 images do not split over 3 GPUs
    # less usable memory (more headroom): a smaller micro batch, the one whose plan fits under the new limit
    tight = replace(s, gpu_mem_gib=16.0, usable=0.5)
    best = best_micro_batch(tight)
    assert best is not None and best < 128
    limit = 0.5 * 16 * 2**30
    assert plan(replace(tight, micro_batch=best)).total <= limit < plan(replace(tight, micro_batch=2 * best)).total
    with pytest.raises(ValueError, match="global_batch"):
        best_micro_batch(PlanInput(ModelConfig.from_name("S")))


def test_plan_table_shows_the_best_micro_batch_when_the_global_batch_is_known():
    s = ModelConfig.from_name("S")
    out = table([("S known", PlanInput(s, gpus=8, global_batch=128)), ("S unknown", PlanInput(s))]).splitlines()
    assert out[0].split()[-2:] == ["best", "mb"]
    assert out[2].split()[-1] == "16" and out[3].split()[-1] == "-"


def test_the_gpu_benchmark_plans_s_m_l_at_the_best_micro_batch_within_its_budget(capsys):
    """benchmarks/gpu_pretrain.py --dry: its runs and time estimates, without a GPU (the real run needs one)."""
    from benchmarks.gpu_pretrain import main

    main(["--dry", "--gpu-mem", "139.8"])  # an H200
    out = capsys.readouterr().out
    runs = [line.split(":")[0].split()[-6:] for line in out.splitlines() if " z" in line]
    # size, resolution, ZeRO stage, micro batch, accumulation, eager/compiled
    assert runs[:5] == [["S", "32x32", "z2", "mb128", "x1", "eager"], ["S", "32x32", "z2", "mb128", "x1", "compiled"],
                        ["L", "32x32", "z2", "mb32", "x4", "eager"], ["M", "32x32", "z2", "mb64", "x2", "eager"],
                        ["XL", "64x64", "z3", "mb1", "x1", "eager"]]
    total = float(out.splitlines()[-1].split("~")[1].split()[0])
    assert total < 600  # one device call of at most 10 minutes


def test_the_data_path_plan_is_cores_per_gpu_at_the_training_streams_measured_rate(ray_local):
    """``igpt plan``'s data-path line: the images/s a GPU trains on at the assumed MFU (datasheet peak x MFU over
    the model's FLOPs per image) divided by the rate per core the plan measures through a worker's training stream.
    That rate is checked against the same work measured apart, in this process on one core with no Ray (decode,
    crop and flip, lookup table): per CPU the stream does that work and more, so it cannot be much faster, and its
    overhead is bounded."""
    import re
    import time

    import numpy as np
    import pyarrow.parquet as pq

    from igpt.commands import PlanConfig, data_path
    from igpt.data import feed, ingest
    from igpt.data.palette import Palette

    from .conftest import SAMPLE

    m = ModelConfig.from_name("S")
    per_gpu = feed.gpu_images_per_s(m, "H100", 0.4)
    assert per_gpu == pytest.approx(989e12 * 0.4 / (m.train_flops_per_token() * 32 * 32))
    rate = feed.decode_rate("cifar", 32)
    rows = pq.read_table(SAMPLE, columns=["key", "image"]).to_pylist()
    lut = Palette(np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32)).lut
    t, t0 = ingest.TransformSpec("cifar", 32, True, 0, 0), time.perf_counter()
    for r in rows:
        lut[ingest.colour_keys(ingest.record_pixels(r["image"], 0, r["key"], t))]
    bare = len(rows) / (time.perf_counter() - t0)
    assert bare / 20 < rate < 1.5 * bare, (rate, bare)
    out = data_path(PlanConfig(size="S", decode_rate=rate))
    cores = float(re.search(r"-> ([\d.]+) CPU cores per GPU", out).group(1))
    assert cores == pytest.approx(per_gpu / rate, abs=0.006) and "S IR32" in out
    with pytest.raises(ValueError, match="unknown GPU 'V100'"):
        feed.gpu_images_per_s(m, "V100", 0.4)
