"""Every search space shipped in tune_spaces/ is valid and becomes Ray Tune's own sampling objects."""

import json

import pytest
from ray import tune
from ray.tune.search.sample import Domain

from igpt import tune_space

FILES = sorted(tune_space.SPACES_DIR.glob("*.json"))


def test_there_is_a_space_for_every_job():
    assert {tune_space.load(f)["job"] for f in FILES} == set(tune_space.JOBS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_space_file_validates_and_converts(path):
    data = tune_space.load(path)
    assert data["_comment"] if "_comment" in json.loads(path.read_text()) else False, "say why these values"
    out = tune_space.to_tune(data["params"], n_layer=4)
    for name, spec in data["params"].items():
        kind = next(iter(spec))
        if kind == "grid_search":
            assert isinstance(out[name], dict) and "grid_search" in out[name]
        elif kind == "ordered":
            assert out[name] == spec["ordered"]
        else:
            assert isinstance(out[name], Domain)
    if "layer" in out and data["params"]["layer"]["grid_search"] == "all":
        assert out["layer"] == tune.grid_search([0, 1, 2, 3, 4])  # every layer, the final norm's output (4) too


@pytest.mark.parametrize("bad, match", [
    ({"job": "probe_lbfgs", "params": {"layer": {"grid_search": [0]}}}, "missing"),
    ({"job": "probe_lbfgs", "params": {"layer": {"grid_search": [0]}, "C": {"grid_search": [-1]}}}, "> 0"),
    ({"job": "probe_lbfgs", "params": {"layer": {"grid_search": [0]}, "C": {"loguniform": [1, 0.1]}}}, "low"),
    ({"job": "probe_sgd", "params": {"layer": {"ordered": [0]}, "lr": {"grid_search": [1]}}}, "sweep_lr"),
    ({"job": "nope", "params": {}}, "unknown job"),
    ({"job": "sweep_lr", "params": {"lr": {"ordered": [0.1]}, "momentum": {"choice": [0.9]}}}, "unknown"),
])
def test_bad_spaces_are_rejected_with_a_reason(tmp_path, bad, match):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(tune_space.SpaceError, match=match):
        tune_space.load(p)


def test_layers_beyond_the_model_are_rejected():
    with pytest.raises(tune_space.SpaceError, match="out of range"):
        tune_space.to_tune({"layer": {"grid_search": [0, 9]}, "C": {"grid_search": [1.0]}}, n_layer=4)
    with pytest.raises(tune_space.SpaceError, match=r"layer 5 out of range \[0, 4\]"):
        tune_space.to_tune({"layer": {"grid_search": [5]}, "C": {"grid_search": [1.0]}}, n_layer=4)
    assert tune_space.to_tune({"layer": {"grid_search": [4]}, "C": {"grid_search": [1.0]}}, n_layer=4)
