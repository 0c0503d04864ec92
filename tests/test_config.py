import json

import pytest

from igpt import cli
from igpt.config import MODEL_SIZES, MainJobConfig, ModelConfig, TrainConfig


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
        TrainConfig(steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="train.lr"):
        TrainConfig(lr=float("nan"))


def test_cli_is_generated_from_every_field():
    parser = cli.build_parser(MainJobConfig)
    flags = {a for action in parser._actions for a in action.option_strings}
    expected = {"--name", "--output_dir", "--model.size", "--model.n_layer", "--model.objective",
                "--model.activation_checkpointing", "--no-model.activation_checkpointing", "--train.steps",
                "--palette.sample_pixels", "--data.path", "--tracking.tracking_uri"}
    assert expected <= flags
    # every leaf field of the tree has a flag
    leaves = set(_leaf_names(cli.to_dict(MainJobConfig())))
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
    f.write_text(json.dumps({"model": {"size": "tiny", "objective": "bert"}, "train": {"steps": 7}}))
    cfg = cli.parse(MainJobConfig, ["--config", str(f), "--train.steps", "9", "--model.activation_checkpointing"])
    assert cfg.model.size == "tiny" and cfg.model.n_layer == MODEL_SIZES["tiny"]["n_layer"]
    assert cfg.model.objective == "bert" and cfg.model.activation_checkpointing is True
    assert cfg.train.steps == 9  # the flag wins over the file
    assert cfg.train.batch_size == TrainConfig().batch_size


def test_cli_rejects_bad_values_and_unknown_keys(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.parse(MainJobConfig, ["--model.size", "huge"])
    assert "model.size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse(MainJobConfig, ["--model.objective", "mlm"])
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"stepz": 7}}))
    with pytest.raises(SystemExit):
        cli.parse(MainJobConfig, ["--config", str(f)])
    assert "stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse(MainJobConfig, ["--data.path", str(tmp_path / "missing.parquet")])
    assert "data.path does not exist" in capsys.readouterr().err


def test_config_round_trips_through_a_dict():
    cfg = cli.parse(MainJobConfig, ["--model.size", "small", "--train.lr", "0.001"])
    assert cli.from_dict(MainJobConfig, cli.to_dict(cfg)) == cfg


def test_nested_defaults_of_a_parent_survive_partial_overrides():
    from igpt.config import PretrainJobConfig

    cfg = cli.parse(PretrainJobConfig, ["--val.path", "x", "--model.size", "tiny"])
    assert cfg.val.split == "test" and cfg.val.path == "x"  # the parent's default for val, not DatasetSpec()'s
    assert cfg.transform.augment is True
    assert cfg.model.n_layer == 4  # derived from the chosen size, not kept from the default size


def test_abbreviated_flags_are_refused(capsys):
    from igpt.config import PretrainJobConfig

    with pytest.raises(SystemExit):
        cli.parse(PretrainJobConfig, ["--model.si", "S"])  # argparse would take it as --model.size
    assert "unrecognized arguments: --model.si" in capsys.readouterr().err
    from igpt.__main__ import main

    with pytest.raises(SystemExit):
        main(["plan", "--siz", "S"])
