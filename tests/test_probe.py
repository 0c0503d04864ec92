"""Features once, probes many: extraction from a real pretraining checkpoint, then Ray Tune probe sweeps with
refit, all logged to a real MLflow store (parent run + one child per trial)."""

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from igpt import cli
from igpt.eval import extract_job as extract
from igpt.eval import features, probe, probe_job
from igpt.eval.extract_job import ExtractJobConfig
from igpt.eval.probe_job import ProbeJobConfig
from igpt.storage import Loc
from igpt.train import pretrain_job as pretrain

from .conftest import SAMPLE, SHARED_CIFAR
from .test_pretrain import job, palette_path  # noqa: F401  (the module-scoped palette fixture)

RES = 16


def data_args(prefix_train="--train", prefix_test="--test"):
    shared = (SHARED_CIFAR / "train-00000-of-00005.parquet").exists()
    if shared:
        return [f"{prefix_train}.path", str(SHARED_CIFAR), f"{prefix_train}.max_images", "1000",
                f"{prefix_test}.path", str(SHARED_CIFAR), f"{prefix_test}.max_images", "300"]
    return [f"{prefix_train}.path", str(SAMPLE), f"{prefix_train}.key_prefix", "train/",
            f"{prefix_test}.path", str(SAMPLE), f"{prefix_test}.key_prefix", "test/"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, palette_path, ray_local):  # noqa: F811
    tmp = tmp_path_factory.mktemp("probe")
    # at 16x16: a quarter of 32x32's tokens for the pretraining and both extractions; what is checked is the same
    summary = pretrain.run(job(tmp, palette_path, "ar", 2, max_steps=40, resolution=RES,
                               **{"checkpoint.every_steps": 40, "completions": 0}))
    return tmp, summary


def extract_cfg(tmp, summary, name, *extra):
    return cli.parse(ExtractJobConfig, ["--name", name, "--storage_path", str(tmp / "features"),
                                        "--checkpoint", summary["run_dir"], *data_args(), "--holdout", "0.2",
                                        "--tracking.tracking_uri", summary["tracking_uri"], *extra])


@pytest.fixture(scope="module")
def feature_sets(pretrained, s3):
    """The trained model's features on the local disk; its random-init twin's on S3 (moto on 127.0.0.1), where
    the probe below reads them from."""
    tmp, summary = pretrained
    trained = extract.run(extract_cfg(tmp, summary, "trained"))
    twin = extract.run(extract_cfg(tmp, summary, "random", "--random_init", "--no-pixels",
                                   "--storage_path", f"{s3}/{tmp.name}/features"))
    twin["at"] = f"{s3}/{tmp.name}/features/random"
    return tmp, summary, trained, twin


@pytest.mark.slow
def test_extraction_writes_every_layer_of_every_split(feature_sets):
    tmp, summary, man, twin = feature_sets
    # 2 blocks -> layers 0, 1, 2: layer 2 is the final norm's output, which the manifest says in words
    assert man["n_layer"] == 2 and man["layers"] == [0, 1, 2] and "ln_f" in man["layer_definition"]
    assert man["masks"] == 1 and man["d_model"] == 64
    n = {s: man["splits"][s]["images"] for s in ("train", "val", "test")}
    assert n["train"] + n["val"] == 1000 and 120 < n["val"] < 280 and n["test"] in (200, 300)
    root = Path(tmp / "features" / "trained")
    for split in ("train", "val", "test"):
        for layer in (0, 1, 2):
            x, y, keys = features.load(root, split, layer)
            assert x.shape == (n[split], 1, 64) and x.dtype == np.float32 and np.isfinite(x).all()
            assert y.shape == (n[split],) and set(y) <= set(range(10))
        px, _, _ = features.load(root, split, "pixels")
        assert px.shape == (n[split], 1, RES * RES * 3) and px.min() >= 0 and px.max() <= 1
    # train and val partition the training split by key; test keys are apart
    tr, va = features.load(root, "train", 0)[2], features.load(root, "val", 0)[2]
    assert not set(tr) & set(va) and len(set(tr)) == len(tr)
    # the features are the model's: recompute a few from the checkpoint directly
    import pyarrow.parquet as pq
    import torch

    from igpt.data.ingest import TransformSpec, record_pixels
    from igpt.train import checkpoints

    model = checkpoints.load_model(summary["run_dir"])
    pal = checkpoints.load_palette(summary["run_dir"])
    x0, _, k0 = features.load(root, "test", 1)
    src = SHARED_CIFAR / "test-00000-of-00001.parquet"
    table = pq.read_table(src if src.exists() else SAMPLE).to_pylist()
    rows = {r["key"]: r for r in table}
    t = TransformSpec("cifar", RES, False)
    tok = torch.from_numpy(np.stack([pal.quantize(record_pixels(rows[k]["image"], 0, k, t)).reshape(-1)
                                     for k in k0[:4]]).astype(np.int64))
    np.testing.assert_allclose(model.features(tok, [1])[1].numpy(), x0[:4, 0], rtol=1e-4, atol=1e-5)
    x2 = features.load(root, "test", 2)[0]  # the last layer: ln_f of the last block's output, pooled
    with torch.no_grad():
        h = model._embed(model.ar_inputs(tok), None)
        for blk in model.h:
            h = blk(h, True)
        np.testing.assert_allclose(model.ln_f(h).mean(1).numpy(), x2[:4, 0], rtol=1e-4, atol=1e-5)
    # the random-init twin: same shapes, different values, no pixels
    xr, _, kr = features.load(twin["at"], "test", 1)
    assert list(kr) == list(k0) and not np.allclose(xr, x0)
    assert twin["random_init"] and not twin["pixels"] and features.manifest(twin["at"])["run_id"] == twin["run_id"]
    assert Loc(twin["at"]).parent.children()[0].name == "random" and (Loc(twin["at"]) / "test.errors.tsv").exists()
    # each split's error report logged once (it was twice), at the run's top level
    arts = [a.path for a in MlflowClient(summary["tracking_uri"]).list_artifacts(twin["run_id"])]
    assert "errors" not in arts and \
        sorted(a for a in arts if a.endswith("errors.tsv")) == ["test.errors.tsv", "train.errors.tsv", "val.errors.tsv"]
    client = MlflowClient(summary["tracking_uri"])
    ext = client.get_run(man["run_id"])
    assert ext.data.metrics["test/images"] == n["test"] and ext.info.status == "FINISHED"
    assert "manifest.json" in {a.path for a in client.list_artifacts(man["run_id"])}


@pytest.mark.slow
def test_probe_sweep_refits_and_logs_parent_and_children(feature_sets):
    tmp, summary, man, twin_set = feature_sets  # the twin's features are on S3
    argv = ["--name", "probe-trained", "--storage_path", str(tmp / "probe"), "--features",
            str(tmp / "features" / "trained"), "--tracking.tracking_uri", summary["tracking_uri"]]
    space = tmp / "space.json"
    space.write_text(json.dumps({"job": "probe_lbfgs", "params": {"layer": {"grid_search": "all"},
                                                                 "C": {"grid_search": [0.01, 1.0]}}}))
    res = probe_job.run(cli.parse(ProbeJobConfig, argv + ["--space", str(space)]))
    assert res["trials"] == 6 and set(res["val_accuracy_by_layer"]) == {0, 1, 2}  # layers 0..L, L = 2
    assert res["best"]["layer"] in (0, 1, 2) and res["best"]["C"] in (0.01, 1.0)
    assert res["best_val_accuracy"] == max(res["val_accuracy_by_layer"].values())
    assert res["test_accuracy"] > 0.2, res  # chance is 0.1 (200-300 test images: a clear margin)
    assert 0.1 < res["pixels"]["test_accuracy"] < 1.0
    # both probes' per-image results, on the same test images (what a paired test of the two reads)
    z, zp = np.load(res["test_predictions"]), np.load(res["pixels"]["test_predictions"])
    assert list(z["keys"]) == list(zp["keys"]) and len(z["keys"]) == res["test_images"]
    assert z["correct"].mean() == pytest.approx(res["test_accuracy"])
    assert zp["correct"].mean() == pytest.approx(res["pixels"]["test_accuracy"])
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(res["run_id"])
    assert parent.info.status == "FINISHED" and \
           parent.data.metrics["test/accuracy"] == pytest.approx(res["test_accuracy"])
    assert parent.data.metrics["best_layer_relative"] == res["best"]["layer"] / 2
    # test keys are apart from train/val; whatever else was warned of is tagged on the parent, word for word
    assert "test_keys_in_train_val" not in res["warnings"]
    assert {k: v for k, v in parent.data.tags.items() if k.startswith("igpt.warning.")} == \
           {f"igpt.warning.{k}": v for k, v in res["warnings"].items()}
    assert {"trials.csv", "plots", "result.json", "search_space.json"} <= \
           {a.path for a in client.list_artifacts(res["run_id"])}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{res['run_id']}'")
    layer_children = [c for c in children if c.data.tags.get("igpt.sweep") == "layers"]
    assert len(layer_children) == 6 and len(children) == 8  # 6 layer x C trials + 2 raw-pixel trials
    assert all(c.info.status == "FINISHED" and "val_accuracy" in c.data.metrics for c in children)
    assert not any({"pid", "timestamp", "done", "time_total_s"} & set(c.data.metrics) for c in children)
    assert {c.data.params["layer"] for c in layer_children} == {"0", "1", "2"}

    # the random-init twin, probed the same way for the record beside it, its outputs on S3 beside its features
    bucket = twin_set["at"].rsplit("/features/", 1)[0] + "/probe"
    twin = probe_job.run(cli.parse(ProbeJobConfig, ["--name", "probe-random", "--storage_path", bucket,
                                                   "--features", twin_set["at"], "--space",
                                                   str(space), "--tracking.tracking_uri", summary["tracking_uri"]]))
    from igpt.track.study_report import load_predictions

    assert {"result.json", "test_predictions.npz", "trials.csv", "val_accuracy_by_layer.png"} <= \
        {f.name for f in (Loc(bucket) / "probe-random").children()}
    assert twin["test_predictions"] == f"{bucket}/probe-random/test_predictions.npz"
    assert load_predictions(twin["test_predictions"])["correct"].mean() == pytest.approx(twin["test_accuracy"])
    assert json.loads((Loc(bucket) / "probe-random" / "result.json").read_text())["trials"] == 6
    print(f"\nprobe test accuracy: trained {res['test_accuracy']:.3f} (layer {res['best']['layer']}), "
          f"random-init {twin['test_accuracy']:.3f}, raw pixels {res['pixels']['test_accuracy']:.3f}")
    assert "pixels" not in twin and 0.0 < twin["test_accuracy"] < 1.0


@pytest.mark.slow
def test_low_data_protocol_uses_balanced_subsets_and_reports_mean_and_std(feature_sets):
    tmp, summary, _, _ = feature_sets
    y = features.load(tmp / "features" / "trained", "train", 0)[1]
    idx = probe.balanced_subset(y, 40, seed=0)
    assert len(idx) == 40 and np.bincount(y[idx], minlength=10).tolist() == [4] * 10
    assert not np.array_equal(idx, probe.balanced_subset(y, 40, seed=1))
    with pytest.raises(ValueError, match="balanced"):
        probe.balanced_subset(y, 45, seed=0)
    space = tmp / "one.json"
    space.write_text(json.dumps({"job": "probe_lbfgs", "params": {"layer": {"grid_search": [1]},
                                                                 "C": {"grid_search": [0.1]}}}))
    res = probe_job.run(cli.parse(ProbeJobConfig, [
        "--name", "low", "--storage_path", str(tmp / "probe"), "--features", str(tmp / "features" / "trained"),
        "--space", str(space), "--no-pixels", "--low_data", "20,40", "--low_data_seeds", "3",
        "--tracking.tracking_uri", summary["tracking_uri"]]))
    assert set(res["low_data"]) == {20, 40}
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(res["run_id"])
    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{res['run_id']}' and "
                                "tags.`igpt.job` = 'probe_low_data'")
    for n, r in res["low_data"].items():  # the summary is the mean and spread of its 3 trials' test accuracies
        acc = np.array([t.data.metrics["test_accuracy"] for t in trials if t.data.params["labels"] == str(n)])
        assert r["seeds"] == len(acc) == 3
        assert r["mean"] == pytest.approx(acc.mean()) and r["std"] == pytest.approx(acc.std(ddof=1))
        assert parent.data.metrics[f"low_data/{n}_mean"] == pytest.approx(acc.mean())


def test_sgd_protocol_and_bert_modal_prediction():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 3
    y = rng.integers(0, 3, 300)
    x = (centres[y] + rng.normal(size=(300, 8)))[:, None].astype(np.float32)
    p = probe.fit_sgd(x, y, lr=1.0, epochs=5, batch_size=32)
    assert p.accuracy(x, y) > 0.9
    with pytest.raises(FloatingPointError):
        probe.fit_sgd(x, y, lr=1e38, epochs=2)  # overflows float32
    # BERT: 5 feature vectors per image; the prediction is the modal class over them
    x5 = np.repeat(x, 5, axis=1)
    x5[:, :2] = centres[(y + 1) % 3][:, None]  # 2 of 5 masks point to the wrong class, 3 to the right one
    lb = probe.fit_lbfgs(x, y, C=1.0)
    per_mask = lb.scores(x5).argmax(-1)  # (5, N)
    assert (per_mask[:2] == (y + 1) % 3).mean() > 0.9
    assert (lb.predict(x5) == y).mean() > 0.9


def test_warnings_detect_unseen_classes_tied_trials_and_leaked_test_keys():
    # (a) classes in val or test that train lacks: the probe can never predict them
    assert probe.unseen_classes(np.array([0, 1, 2, 2]), {"val": np.array([0, 1]), "test": np.array([2])}) is None
    msg = probe.unseen_classes(np.array([0, 1, 1]), {"val": np.array([0, 3]), "test": np.array([2, 3, 0])})
    assert msg.startswith("val has class(es) [3] with no training example; test has class(es) [2, 3]")
    assert "cannot predict" in msg
    # (b) every trial ties: the "best" is arbitrary; one trial, or any difference, is no tie
    assert "all 3 trials tie at validation accuracy 0.2500" in probe.tied_trials([0.25, 0.25, 0.25])
    assert probe.tied_trials([0.25, 0.25, 0.26]) is None and probe.tied_trials([0.5]) is None
    assert probe.tied_trials([]) is None
    assert probe.tied_trials(np.zeros(4)) is not None  # e.g. every SGD trial diverged (reported as 0)
    # (c) test keys among the train/val keys
    assert probe.leaked_keys(np.array(["test/1", "test/2"]), np.array(["train/1", "train/2"])) is None
    msg = probe.leaked_keys(np.array(["a", "b", "c", "d"]), np.array(["d", "b", "x"]))
    assert msg.startswith("2 of 4 test key(s) are also train/val keys (e.g. b, d)") and "not held out" in msg


def _shard(root, split, keys, labels):
    (root / split).mkdir(parents=True)
    np.savez(root / split / "shard-00000.npz", keys=np.asarray(keys), labels=np.asarray(labels, np.int64),
             layer_00=np.zeros((len(keys), 1, 4), np.float32))


def test_probe_job_warns_on_stderr_and_tags_its_parent_run(tmp_path, capsys):

    from igpt.config import TrackingConfig
    from igpt.track.tracking import JobRun, default_tracking_uri

    root = tmp_path / "features"
    _shard(root, "train", ["train/0", "train/1", "train/2"], [0, 1, 1])
    _shard(root, "val", ["train/3", "train/4"], [0, 2])
    _shard(root, "test", ["test/0", "train/1"], [1, 0])  # one test image is a training image
    assert [list(a) for a in features.labels_and_keys(root, "val")] == [[0, 2], ["train/3", "train/4"]]
    cfg = ProbeJobConfig(features=str(root), storage_path=str(tmp_path))
    uri = default_tracking_uri(tmp_path)
    found = {}
    with JobRun.open(TrackingConfig(tracking_uri=uri), tmp_path, "warned", "probe", {}) as job:
        probe_job.check_splits(cfg, job, found)
        probe_job.warn(job, "trials_tied", probe.tied_trials([0.5, 0.5]), found)
        probe_job.warn(job, "never", None, found)  # nothing to warn of: no line, no tag
        run_id = job.run_id
    assert set(found) == {"classes_missing_from_train", "test_keys_in_train_val", "trials_tied"}
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]  # not MLflow's
    assert err == [f"warning: {found[k]}" for k in ("classes_missing_from_train", "test_keys_in_train_val",
                                                     "trials_tied")]
    assert "val has class(es) [2]" in found["classes_missing_from_train"]
    assert "1 of 2 test key(s)" in found["test_keys_in_train_val"]
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("igpt.warning.")} == \
           {f"igpt.warning.{k}": v for k, v in found.items()}


def test_a_feature_set_without_the_last_layer_is_refused():
    assert probe_job.model_blocks({"n_layer": 4, "layers": [0, 1, 2, 3, 4]}, "set") == 4
    with pytest.raises(ValueError, match="no layer L .*extract it again"):
        probe_job.model_blocks({"layers": 4}, "old-set")  # written before layer L existed
