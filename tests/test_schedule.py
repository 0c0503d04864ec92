"""The pretraining schedule: recipes as data, length in steps, one-epoch warm-up from the records actually in the
split, the dry run, and BERT masks per rank. Fast: no Ray."""

import json
import subprocess
import sys

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig as DSParsed

from igpt import cli, recipes
from igpt.config import MODEL_SIZES, DeepSpeedConfig, ModelConfig, OptimConfig, preset_path
from igpt.model import IGPT
from igpt.train import deepspeed_config
from igpt.train.plan import PlanInput, plan
from igpt.train.pretrain_job import PretrainJobConfig
from igpt.train.schedule import resolve
from igpt.train.train_loop import bert_mask

from .conftest import ROOT, SAMPLE


def test_every_size_has_a_valid_recipe_and_the_paper_sizes_have_the_papers():
    table = recipes.load()
    assert set(table) == set(MODEL_SIZES)
    for size in ("S", "M", "L"):  # the paper: batch 128, 1M iterations, IR 32 (ImageNet models)
        r = table[size]
        assert (r.global_batch, r.steps, r.resolution) == (128, 1_000_000, 32)
    xl = table["XL"]
    assert (xl.global_batch, xl.steps, xl.resolution) == (64, 2_000_000, 64)
    for r in table.values():
        preset_path(r.preset)  # exists
        # the recipe's batch arithmetic on 8 workers is one DeepSpeed accepts
        workers = 8 if r.size in ("S", "M", "L", "XL") else 2
        conf, _ = deepspeed_config.build(DeepSpeedConfig(preset=r.preset, micro_batch=r.micro_batch),
                                         OptimConfig(global_batch=r.global_batch), workers, on_gpu=r.preset != "cpu")
        assert conf["train_batch_size"] == r.global_batch
        DSParsed(dict(conf, train_batch_size=r.global_batch // workers, gradient_accumulation_steps=
                      r.global_batch // (r.micro_batch * workers)))  # DeepSpeed's own check, world size 1


@pytest.mark.parametrize("size", ["S", "M", "L", "XL"])
def test_the_paper_recipes_fit_8_h100s_as_igpt_plan_sees_them(size):
    r = recipes.recipe(size)
    conf, model_over = deepspeed_config.build(DeepSpeedConfig(preset=r.preset, micro_batch=r.micro_batch),
                                              OptimConfig(global_batch=r.global_batch), 8, on_gpu=True)
    p = PlanInput(ModelConfig.from_name(size), gpus=8, gpu_mem_gib=80, zero_stage=conf["zero_optimization"]["stage"],
                  micro_batch=r.micro_batch, activation_checkpointing=model_over.get("activation_checkpointing", False))
    assert plan(p).fits


def test_a_bad_recipe_file_is_refused(tmp_path):
    bad = tmp_path / "recipes.json"
    bad.write_text(json.dumps({"S": {"global_batch": 128, "steps": 10, "resolution": 32, "preset": "S",
                                     "micro_batch": 48}}))
    with pytest.raises(ValueError, match="not a multiple of micro_batch"):
        recipes.load(bad)
    bad.write_text(json.dumps({"S": {"global_batch": 128, "steps": 10}}))
    with pytest.raises(ValueError, match="expected"):
        recipes.load(bad)


def cfg(*argv) -> PretrainJobConfig:
    return cli.parse(PretrainJobConfig, ["--train.path", str(SAMPLE), "--train.key_prefix", "train/", *argv])


def test_recipe_defaults_xl_trains_at_batch_64():
    s = resolve(cfg("--model.size", "XL", "--scaling.workers", "8"), records=1_281_167)
    assert (s.global_batch, s.micro_batch, s.grad_accum, s.total_steps, s.resolution) == (64, 8, 1, 2_000_000, 64)
    assert s.steps_per_epoch == 1_281_167 // 64 and s.warmup_steps == s.steps_per_epoch  # one epoch
    s = resolve(cfg("--model.size", "S", "--scaling.workers", "4"), records=1_281_167)
    assert (s.global_batch, s.grad_accum, s.total_steps) == (128, 2, 1_000_000)


def test_length_in_steps_cycles_epochs_and_warmup_is_one_epoch_of_the_split():
    s = resolve(cfg("--optim.global_batch", "16", "--steps", "500"), records=840)
    assert s.steps_per_epoch == 52 and s.warmup_steps == 52 and s.total_steps == 500
    assert s.epochs * 840 >= 500 * 16 + 840  # the steps' worth of passes plus a spare one
    s = resolve(cfg("--optim.global_batch", "16", "--steps", "500", "--optim.warmup_steps", "7"), records=840)
    assert s.warmup_steps == 7
    half = resolve(cfg("--optim.global_batch", "16", "--steps", "500", "--schedule_fraction", "0.1"), records=840)
    assert (half.total_steps, half.warmup_steps) == (50, 5)  # the same shape, shrunk


def test_a_warmup_as_long_as_the_run_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"never decay: give --optim.warmup_steps below 40 \(e.g. 4\)"):
        resolve(cfg("--optim.global_batch", "16", "--steps", "40"), records=1000)  # one epoch = 62 steps
    with pytest.raises(ValueError, match="not one full global batch"):
        resolve(cfg("--optim.global_batch", "16", "--steps", "40"), records=10)
    with pytest.raises(ValueError, match="not a multiple of micro batch"):
        resolve(cfg("--optim.global_batch", "16", "--deepspeed.micro_batch", "16", "--scaling.workers", "2"),
                records=1000)


def test_dry_run_counts_the_records_left_by_max_images_and_holdout_and_prints_one_json_object(tmp_path):
    """The issue's case: an ImageNet-style folder, max_images then a 50% holdout; steps per epoch and the
    one-epoch warm-up come from the records that remain, not from the file count."""
    from hashlib import blake2b

    from igpt.data.sources import held_out

    from .fixtures import encode, rand_images

    keys = []
    for i, img in enumerate(rand_images(60, 8)):
        d = tmp_path / "folder" / "train" / f"n{i % 3:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.png").write_bytes(encode(img))
        keys.append(f"train/n{i % 3:02d}/{i:03d}.png")
    # max_images takes records in the plan's file order (a keyed hash of each path below the split folder, so
    # that chunks mix classes), before the holdout split
    first = sorted(keys, key=lambda k: blake2b(k[len("train"):].encode(), digest_size=8).digest())[:40]
    kept = int((~held_out(first, 0.5)).sum())
    argv = ["--train.path", str(tmp_path / "folder"), "--train.format", "imagefolder", "--train.max_images", "40",
            "--train.holdout", "0.5", "--train.part", "rest", "--model.size", "debug", "--optim.global_batch", "2",
            "--deepspeed.micro_batch", "1", "--steps", "30", "--dry_run"]
    p = subprocess.run([sys.executable, "-m", "pipelines.pretrain", *argv], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["records"] == kept and 10 < kept < 30
    assert out["steps_per_epoch"] == kept // 2 and out["warmup_steps"] == kept // 2
    for key in ("records", "steps_per_epoch", "total_steps", "warmup_steps", "global_batch", "micro_batch",
                "grad_accum", "workers", "lr"):
        assert key in out
    assert (out["total_steps"], out["global_batch"], out["grad_accum"], out["workers"]) == (30, 2, 1, 2)


def test_bert_masks_differ_between_ranks_and_repeat_on_resume():
    model = IGPT(ModelConfig(size="debug", resolution=8, objective="bert"))
    x = torch.randint(0, 512, (4, 64))
    r0, r1 = bert_mask(model, x, 0, 0, 5), bert_mask(model, x, 0, 1, 5)
    assert not torch.equal(r0, r1)  # two data-parallel ranks, the same micro-batch index
    assert torch.equal(r0, bert_mask(model, x, 0, 0, 5))  # a resumed run draws the same mask again
    assert not torch.equal(r0, bert_mask(model, x, 0, 0, 6))  # and a new one each micro-batch
    assert 0.05 < r0.float().mean() < 0.25  # about 15% masked


def test_sweep_trials_run_a_shrunk_schedule_and_the_refit_the_whole_one():
    from igpt.train.sweep_lr_job import SweepLRJobConfig, pretrain_config

    sweep = cli.parse(SweepLRJobConfig, ["--pretrain.train.path", str(SAMPLE), "--pretrain.train.key_prefix",
                                         "train/", "--pretrain.optim.global_batch", "16", "--pretrain.steps", "400",
                                         "--trial_fraction", "0.1", "--holdout", "0.2"])
    trial, refit = pretrain_config(sweep, 0.003, None), pretrain_config(sweep, 0.003, None, refit=True)
    t, r = resolve(trial, records=800), resolve(refit, records=1000)
    assert (t.total_steps, t.warmup_steps) == (40, 5)  # a tenth of 400 steps and of one 50-step epoch
    assert (r.total_steps, r.warmup_steps) == (400, 62)  # the whole schedule on train + held-out
    assert trial.train.part == "rest" and refit.train.part == "all" and trial.optim.lr == 0.003
