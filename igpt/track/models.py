"""Models in MLflow: pretraining's final weights (PyTorch flavour) and a probe's refit classifier (scikit-learn
flavour), each with a signature and an input example, logged to the run that made them (MLflow 3: a logged model
linked to the run, shown on its page) and, with ``--tracking.register NAME``, a new version of a registered model.

Loading them back (``mlflow.pytorch.load_model`` / ``mlflow.sklearn.load_model``) needs the ``igpt`` package
importable for the PyTorch model (it is pickled as :class:`igpt.model.IGPT`, so the loaded object is the same model
with its ``features``, ``loss`` and KV-cache decoding); the probe is plain scikit-learn.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

EXAMPLE_POSITIONS = 16  # the input example's length: any T <= n_ctx works; short, so that checking it is cheap


def _as_run(run) -> None:
    """Point MLflow's fluent state at the run's store and experiment: the flavours' ``log_model`` creates the
    logged model in the *active* experiment (else experiment 0), whatever run it is linked to."""
    import mlflow

    mlflow.set_tracking_uri(run.uri)
    mlflow.set_experiment(experiment_id=run.experiment_id)


def log_pretrained(run, weights, register: str | None = None):
    """The model of a checkpoint (``weights.pt``, any ZeRO stage: it holds the consolidated fp32 weights) as the
    run's MLflow model ``model``. Input: token ids (B, T <= n_ctx) int64; AR: SOS (the last id) then the colour
    tokens shifted right by one, BERT: the colour tokens. Output: logits (B, T, n_colors) float32. The palette
    (``extra_files/palette.npy``, (n_colors, 3) in [-1, 1]) and the model's config travel with it."""
    import mlflow.pytorch
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from igpt import cli
    from igpt.train.checkpoints import load, model_of, palette_of

    _as_run(run)
    data = load(weights)  # once: the model, its palette and its step
    model, palette = model_of(data), palette_of(data)
    cfg = model.cfg
    grey = np.zeros((1, EXAMPLE_POSITIONS, 1, 3), np.uint8) + 128  # a mid-grey row of pixels
    tokens = torch.as_tensor(palette.quantize(grey).reshape(1, -1).astype(np.int64))
    example = (model.ar_inputs(tokens) if cfg.objective == "ar" else tokens).numpy()
    # unnamed tensors: a named one makes serving pass a dict, which the PyTorch flavour does not take
    signature = ModelSignature(Schema([TensorSpec(np.dtype(np.int64), (-1, -1))]),
                               Schema([TensorSpec(np.dtype(np.float32), (-1, -1, cfg.n_colors))]))
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "palette.npy", palette.centres)
        (Path(tmp) / "model_config.json").write_text(json.dumps(cli.to_dict(cfg), indent=2))
        return mlflow.pytorch.log_model(
            model, name="model", run_id=run.run_id, signature=signature, input_example=example,
            registered_model_name=register, serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            extra_files=[str(Path(tmp) / "palette.npy"), str(Path(tmp) / "model_config.json")],
            params={"size": cfg.size, "objective": cfg.objective, "resolution": cfg.resolution,
                    "n_layer": cfg.n_layer, "d_model": cfg.d_model, "step": int(data.get("step", 0))},
            metadata={"igpt.weights": str(weights), "igpt.input": "token ids: AR, SOS then the colour tokens "
                      "shifted right; BERT, the colour tokens", "igpt.palette": "extra_files/palette.npy"})


def to_sklearn(probe):
    """A fitted :class:`igpt.eval.probe.LinearProbe` as the scikit-learn pipeline it is: standardise, then the
    linear classifier (classes 0 .. C-1). Its ``predict`` on one mask's features (N, d) is the probe's argmax; a
    BERT probe's job votes over its 5 masks' predictions (igpt.eval.ensemble), which a caller does the same way."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    st = probe.standardize
    d, c = st.mean.shape[0], probe.weight.shape[0]
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_ = st.mean.astype(np.float64), st.std.astype(np.float64)
    scaler.var_, scaler.n_features_in_, scaler.n_samples_seen_ = scaler.scale_ ** 2, d, 0
    clf = LogisticRegression()
    clf.classes_ = np.arange(c)
    clf.coef_, clf.intercept_ = probe.weight.astype(np.float64), probe.bias.astype(np.float64)
    clf.n_features_in_, clf.n_iter_ = d, np.zeros(1, np.int32)
    return Pipeline([("standardize", scaler), ("classify", clf)])


def log_probe(run, probe, layer, example: np.ndarray, register: str | None = None, **params):
    """A refit probe as the run's MLflow model ``probe`` (scikit-learn flavour): input one mask's features of
    ``layer`` (N, d) float32, output the class; ``layer`` and ``params`` (the features it reads) as its params."""
    import mlflow.sklearn
    import sklearn

    _as_run(run)
    return mlflow.sklearn.log_model(
        to_sklearn(probe), name="probe", run_id=run.run_id, input_example=example.astype(np.float32),
        registered_model_name=register, serialization_format="cloudpickle",
        pip_requirements=[f"scikit-learn=={sklearn.__version__}", f"numpy=={np.__version__}"],
        params={"layer": layer, **params})
