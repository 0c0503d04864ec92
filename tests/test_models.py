"""Models in MLflow (igpt.track.models) on a real local store: logged, registered, loaded back by the flavours'
own ``load_model`` and MLflow's pyfunc, each reproducing the prediction it was logged from."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from igpt import cli
from igpt.config import ModelConfig, ModelTrackingConfig
from igpt.data.palette import Palette
from igpt.eval import probe
from igpt.model import IGPT
from igpt.track.models import log_pretrained, log_probe, to_sklearn
from igpt.track.tracking import JobRun
from igpt.train import checkpoints


@pytest.fixture
def run(tmp_path):
    r = JobRun.open(ModelTrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path, "m",
                    "pretrain", None)
    yield r
    r.end("FINISHED")


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_pretrained_weights_round_trip_through_the_registry_and_pyfunc(tmp_path, run, objective):
    torch.manual_seed(0)
    m = IGPT(ModelConfig(size="debug", resolution=8, objective=objective)).eval()
    torch.nn.init.normal_(m.head.weight, std=0.5)  # the released init zeroes it: every logit would be equal
    pal = Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    weights = checkpoints.write_weights(tmp_path, m.state_dict(), cli.to_dict(m.cfg), pal.centres, step=7)
    info = log_pretrained(run, weights, register=f"igpt-{objective}")
    client = MlflowClient(run.uri)
    assert client.get_model_version(f"igpt-{objective}", "1").run_id == run.run_id
    lm = mlflow.get_logged_model(info.model_id)
    assert lm.experiment_id == run.experiment_id and lm.source_run_id == run.run_id
    assert (lm.params["size"], lm.params["objective"], lm.params["step"]) == ("debug", objective, "7")
    loaded = mlflow.pytorch.load_model(f"models:/igpt-{objective}/1")
    x = torch.randint(0, 513, (3, 64))
    with torch.no_grad():
        want = m(x, causal=objective == "ar")  # the attention each objective trained with
        assert isinstance(loaded, IGPT) and torch.equal(loaded(x), want)
    # what serving sees: the signature's int64 ids in, logits out, through pyfunc (it calls the model on ids alone)
    assert [s.type for s in info.signature.inputs.inputs] == [np.dtype(np.int64)]
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    np.testing.assert_array_equal(pyfunc.predict(x.numpy()), want.numpy())
    where = lm.artifact_location
    example = json.loads(Path(mlflow.artifacts.download_artifacts(f"{where}/input_example.json")).read_text())
    assert np.asarray(example["inputs"] if isinstance(example, dict) else example).shape == (1, 16)
    centres = np.load(mlflow.artifacts.download_artifacts(f"{where}/extra_files/palette.npy"))
    np.testing.assert_array_equal(centres, pal.centres)


@pytest.mark.parametrize("classes", [2, 5])
def test_a_probe_is_the_sklearn_pipeline_it_logs_and_loads_back(tmp_path, run, classes):
    rng = np.random.default_rng(classes)
    y = np.arange(300) % classes
    x = (rng.normal(size=(300, 1, 16)) + y[:, None, None] * 0.3).astype(np.float32) * 50 + 7  # unstandardised
    p = probe.fit_lbfgs(x, y, C=1.0)
    xt = (rng.normal(size=(200, 1, 16)) * 50 + 7).astype(np.float32)
    np.testing.assert_array_equal(to_sklearn(p).predict(xt[:, 0]), p.predict(xt))
    info = log_probe(run, p, 3, xt[:5, 0], register="probe", features="somewhere")
    loaded = mlflow.sklearn.load_model("models:/probe/1")
    np.testing.assert_array_equal(loaded.predict(xt[:, 0]), p.predict(xt))
    assert mlflow.get_logged_model(info.model_id).params["layer"] == "3"
    assert [s.type for s in info.signature.inputs.inputs] and info.signature.outputs is not None


def test_register_needs_a_logged_model():
    with pytest.raises(ValueError, match="tracking.register needs tracking.log_model"):
        ModelTrackingConfig(register="x", log_model=False)
