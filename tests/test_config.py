import json
from pathlib import Path

import pytest

from igpt import cli
from igpt.config import MODEL_SIZES, ModelConfig, OptimConfig
from igpt.study.main_job import MainJobConfig
from igpt.train.pretrain_job import PretrainJobConfig


def test_from_name_fills_the_table_and_keeps_overrides():
    s = ModelConfig.from_name("S")
    assert (s.n_layer, s.d_model, s.n_head, s.resolution, s.n_ctx) == (24, 512, 8, 32, 1024)
    xl = ModelConfig.from_name("XL")
    assert (xl.n_layer, xl.d_model, xl.resolution, xl.n_ctx) == (60, 3072, 64, 4096)
    m48 = ModelConfig.from_name("M", resolution=48)
    assert (m48.n_layer, m48.n_ctx) == (36, 48 * 48)
    assert ModelConfig.from_name("debug", n_layer=3).n_layer == 3
    assert ModelConfig().vocab_size == 513 and ModelConfig().sos_id == 512


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(size="XXL"), "model.size"),
        (dict(d_model=65), "divisible"),
        (dict(resolution=0), "model.resolution"),
        (dict(objective="mlm"), "model.objective"),
        (dict(bert_mask_prob=1.0), "model.bert_mask_prob"),
    ],
)
def test_bad_model_config_is_a_clear_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_bad_train_config_is_a_clear_error():
    with pytest.raises(ValueError, match="warmup"):
        MainJobConfig(steps=5, optim=OptimConfig(global_batch=16, warmup_steps=6))
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=float("nan"))


def test_cli_is_generated_from_every_field():
    parser = cli.build_parser(PretrainJobConfig)
    flags = {a for action in parser._actions for a in action.option_strings}
    expected = {"--name", "--storage_path", "--model.size", "--model.n_layer", "--model.objective",
                "--model.activation_checkpointing", "--no-model.activation_checkpointing", "--steps",
                "--train.path", "--tracking.tracking_uri"}
    assert expected <= flags
    # every leaf field of the tree has a flag
    leaves = set(_leaf_names(cli.to_dict(PretrainJobConfig())))
    assert len(leaves) > 20
    assert {f"--{leaf}" for leaf in leaves} <= flags


def _leaf_names(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaf_names(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_cli_parses_flags_and_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"model": {"size": "tiny", "objective": "bert"}, "steps": 7}))
    cfg = cli.parse(PretrainJobConfig, ["--config", str(f), "--steps", "9", "--model.activation_checkpointing"])
    assert cfg.model.size == "tiny" and cfg.model.n_layer == MODEL_SIZES["tiny"]["n_layer"]
    assert cfg.model.objective == "bert" and cfg.model.activation_checkpointing is True
    assert cfg.steps == 9  # the flag wins over the file
    assert cfg.optim.lr == OptimConfig().lr


def test_cli_rejects_bad_values_and_unknown_keys(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.parse(PretrainJobConfig, ["--model.size", "huge"])
    assert "model.size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse(MainJobConfig, ["--objective", "mlm"])
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"optim": {"stepz": 7}}))
    with pytest.raises(SystemExit):
        cli.parse(MainJobConfig, ["--config", str(f)])
    assert "stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse(MainJobConfig, ["--data.path", str(tmp_path / "missing.parquet")])
    assert "data.path does not exist" in capsys.readouterr().err


def test_config_round_trips_through_a_dict():
    cfg = cli.parse(MainJobConfig, ["--sizes", "small", "--optim.lr", "0.001"])
    assert cli.from_dict(MainJobConfig, cli.to_dict(cfg)) == cfg


def test_nested_defaults_of_a_parent_survive_partial_overrides():
    from igpt.train.pretrain_job import PretrainJobConfig

    cfg = cli.parse(PretrainJobConfig, ["--val.path", "x", "--model.size", "tiny"])
    assert cfg.val.split == "test" and cfg.val.path == "x"  # the parent's default for val, not DatasetSpec()'s
    assert cfg.transform.augment is True
    assert cfg.model.n_layer == 4  # derived from the chosen size, not kept from the default size


def test_abbreviated_flags_are_refused(capsys):
    from igpt.train.pretrain_job import PretrainJobConfig

    with pytest.raises(SystemExit):
        cli.parse(PretrainJobConfig, ["--model.si", "S"])  # argparse would take it as --model.size
    assert "unrecognized arguments: --model.si" in capsys.readouterr().err
    from igpt.__main__ import main

    with pytest.raises(SystemExit):
        main(["plan", "--siz", "S"])


def _changed(flag: str, value, tmp: Path) -> list[str]:
    """One valid value other than the default for each flag of the main job."""
    strings = {"name": "other", "storage_path": str(tmp / "elsewhere"), "sizes": "debug,tiny",
               "data.path": str(tmp / "copy.parquet"), "data.train_prefix": "test/", "data.test_prefix": "train/",
               "data.format": "webdataset", "data.train_split": "val", "data.test_split": "val",
               "data.labels_file": "labels.txt", "recipe": "imagenet",
               "probe_space": "probe_sgd", "tracking.tracking_uri": "sqlite:////tmp/other.db",
               "tracking.experiment": "other", "palette.path": str(tmp / "palette.npy"), "objective": "bert"}
    numbers = {"resolution": 16, "optim.global_batch": 32, "workers": 4, "optim.warmup_steps": 6,
               "optim.beta1": 0.8, "optim.beta2": 0.9, "optim.weight_decay": 0.1, "holdout": 0.3}
    if isinstance(value, bool):
        return [f"--no-{flag}" if value else f"--{flag}"]
    if flag in strings:
        return [f"--{flag}", strings[flag]]
    if flag in numbers:
        return [f"--{flag}", str(numbers[flag])]
    if isinstance(value, float):
        return [f"--{flag}", str(value / 2)]
    if isinstance(value, int):
        return [f"--{flag}", str(value + 1)]
    raise AssertionError(f"no changed value for --{flag} ({value!r}): add one")


def test_every_main_job_flag_changes_some_stage_config(tmp_path):
    """The main job composes the stages' own configs: each of its flags, changed alone, changes what some stage
    runs (a flag that changed nothing would be a lie in --help)."""
    import shutil

    import numpy as np

    from igpt.config import DEFAULT_DATA
    from igpt.study.main_job import stage_configs

    shutil.copy(DEFAULT_DATA, tmp_path / "copy.parquet")
    np.save(tmp_path / "palette.npy", np.linspace(-1, 1, 512 * 3).reshape(512, 3).astype(np.float32))
    base = stage_configs(cli.parse(MainJobConfig, []), "p.npy")
    flat = dict(_leaf_items(cli.to_dict(MainJobConfig())))
    assert len(flat) >= 20
    for flag, value in flat.items():
        changed = stage_configs(cli.parse(MainJobConfig, _changed(flag, value, tmp_path)), "p.npy")
        assert changed != base, f"--{flag} changes no stage's config"


def _leaf_items(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaf_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_the_main_job_reads_an_image_folder_as_every_stage_does(tmp_path):
    """Any layout, not Parquet only: an ImageNet-style folder's train/ and flat val/ (with its labels file) become
    every stage's splits, photographs get the imagenet transforms, and Parquet key prefixes are refused there."""
    from igpt.data import sources
    from igpt.study.main_job import stage_configs

    from . import fixtures

    fixtures.imagefolder(tmp_path / "inet")
    argv = ["--data.path", str(tmp_path / "inet"), "--data.format", "imagefolder", "--data.test_split", "val",
            "--data.labels_file", str(tmp_path / "inet" / "LOC_val_solution.csv"), "--recipe", "imagenet"]
    stages = stage_configs(cli.parse(MainJobConfig, argv), "p.npy")
    pre, ext = stages["pretrain/debug"], stages["extract/debug"]
    assert stages["palette"].data == pre.train == ext.train and pre.val == ext.test
    assert (sources.check(pre.train).count, sources.check(pre.val).count) == (3, 2)  # the fixture's images
    assert pre.train.key_prefix == pre.val.key_prefix == "" and pre.val.labels_file.endswith(".csv")
    assert pre.transform.recipe == ext.transform.recipe == stages["palette"].transform.recipe == "imagenet"
    default = stage_configs(cli.parse(MainJobConfig, []), "p.npy")["pretrain/debug"]
    assert (default.train.key_prefix, default.val.key_prefix, default.val.split) == ("train/", "test/", "test")
    with pytest.raises(SystemExit):
        cli.parse(MainJobConfig, [*argv, "--data.train_prefix", "train/"])
