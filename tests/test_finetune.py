"""Fine-tuning from a real pretraining checkpoint: Ray Tune trials, each a Ray Train job of DeepSpeed engines (CPU,
gloo), early stopping on held-out accuracy, the refit on train + held-out evaluated on test, all in real MLflow."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from igpt import cli
from igpt.config import ModelConfig
from igpt.data.sources import DatasetSpec, in_part
from igpt.eval.ensemble import eval_masks, modal
from igpt.model import IGPT
from igpt.train import checkpoints
from igpt.train import finetune_job as finetune
from igpt.train import pretrain_job as pretrain
from igpt.train.finetune_job import FinetuneJobConfig
from igpt.train.finetune_loop import Classifier, load_classifier, predict

from .conftest import SAMPLE
from .test_pretrain import job, palette_path  # noqa: F401  (the module-scoped palette fixture)

RES = 16  # 256 tokens: a fine-tuning epoch of the small set takes seconds on 2 cores
HOLDOUT = 0.2


# ------------------------------------------------------------------------------------------------ in-process
@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_classifier_pools_the_last_layer_and_its_gen_loss_is_the_pretraining_loss(objective):
    torch.manual_seed(0)
    backbone = IGPT(ModelConfig(size="debug", resolution=8, objective=objective))
    with torch.no_grad():
        backbone.head.weight.normal_(std=0.1)  # a trained-looking output layer (it starts at zero)
    model = Classifier(backbone, 10).eval()
    tokens = torch.randint(0, 512, (4, 64))
    mask = backbone.bert_mask(tokens, torch.Generator().manual_seed(1)) if objective == "bert" else None
    logits, gen = model(tokens, mask)
    assert torch.equal(logits, torch.zeros(4, 10))  # the zero-initialised head: every class equally likely
    assert gen.item() == pytest.approx(backbone.loss(tokens, objective, mask).item(), rel=1e-6)
    with torch.no_grad():
        model.clf.weight.normal_()
        inputs = backbone.ar_inputs(tokens) if objective == "ar" else tokens
        pooled = backbone._blocks(backbone._embed(inputs, mask), objective == "ar").mean(1)  # after ln_f
        assert torch.allclose(model(tokens, mask, gen_loss=False)[0], model.clf(pooled), atol=1e-6)
    if objective == "bert":
        with pytest.raises(ValueError, match="mask"):
            model(tokens)


class Recording(Classifier):
    """The classifier, remembering every mask its forward pass was given."""

    def __init__(self, backbone, n_classes):
        super().__init__(backbone, n_classes)
        self.masks, self.logits = [], []

    def forward(self, tokens, mask=None, gen_loss=True):
        out = super().forward(tokens, mask, gen_loss)
        self.masks.append(None if mask is None else mask.clone())
        self.logits.append(out[0].clone())
        return out


def test_bert_evaluation_uses_five_distinct_keyed_masks_and_the_modal_vote():
    torch.manual_seed(0)
    backbone = IGPT(ModelConfig(size="debug", resolution=8, objective="bert"))
    model = Recording(backbone, 10).eval()
    with torch.no_grad():
        model.clf.weight.normal_(std=3.0)  # predictions that depend on the mask
    tokens = torch.randint(0, 512, (24, 64))
    keys = [f"train/img/{i:04d}" for i in range(24)]
    pred = predict(model, tokens, keys)
    assert len(model.masks) == 5  # one forward per mask, all images at once
    seen = torch.stack(model.masks)  # (5, B, T)
    assert torch.equal(seen, eval_masks(keys, 64, backbone.cfg.bert_mask_prob))  # the keyed masks of each image
    for b in range(24):
        assert len({seen[k, b].numpy().tobytes() for k in range(5)}) == 5  # five distinct masks per image
    scores = torch.stack(model.logits)  # (5, B, C)
    votes = scores.argmax(-1)
    assert torch.equal(pred, modal(votes, scores))
    # a real vote: on some image the modal class is not what the first mask alone says
    assert (pred != votes[0]).any()
    for b in range(24):  # and the winner has the most votes
        counts = torch.bincount(votes[:, b], minlength=10)
        assert counts[pred[b]] == counts.max()
    # the same image gets the same masks whatever batch it is in
    model.masks.clear()
    predict(model, tokens[5:7], keys[5:7])
    assert torch.equal(torch.stack(model.masks), seen[:, 5:7])
    # an AR model: one plain forward, no mask
    ar = Recording(IGPT(ModelConfig(size="debug", resolution=8)), 10).eval()
    predict(ar, tokens, keys)
    assert ar.masks == [None]


def test_the_job_refuses_splits_it_draws_itself(tmp_path):
    cfg = cli.from_dict(FinetuneJobConfig, {"checkpoint": str(tmp_path), "train": {"holdout": 0.3, "part": "rest"}})
    with pytest.raises(ValueError, match="--holdout"):
        finetune.run(cfg)


def test_best_trial_prefers_accuracy_then_fewer_epochs_then_smaller_lr():
    t = lambda acc, ep, lr: {"val_accuracy": acc, "best_epoch": ep, "lr": lr}  # noqa: E731
    assert finetune.best_trial([t(0.5, 3, 1e-4), t(0.6, 9, 3e-4), t(0.4, 1, 1e-5)])["lr"] == 3e-4
    assert finetune.best_trial([t(0.6, 3, 1e-4), t(0.6, 2, 3e-4)])["lr"] == 3e-4
    assert finetune.best_trial([t(0.6, 2, 1e-4), t(0.6, 2, 3e-4)])["lr"] == 1e-4


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory):
    """A class-balanced slice of the packaged sample: 25 training and 10 test images per class."""
    table = pq.read_table(SAMPLE).to_pylist()
    rows = []
    for split, per_class in (("train/", 25), ("test/", 10)):
        for c in range(10):
            rows += [r for r in table if r["key"].startswith(split) and r["label"] == c][:per_class]
    path = tmp_path_factory.mktemp("data") / "small.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def pretrained(tmp, palette, objective, steps):
    """A debug model pretrained a few steps at 16x16 (its checkpoint is what fine-tuning starts from)."""
    return pretrain.run(job(tmp, palette, objective, 2, max_steps=steps, resolution=RES, **{
        "model.objective": objective,
        "checkpoint.every_steps": steps, "completions": 0, "val_images": 16}))


@pytest.fixture(scope="module")
def ar_checkpoint(tmp_path_factory, palette_path, ray_local):  # noqa: F811
    return pretrained(tmp_path_factory.mktemp("pre"), palette_path, "ar", 6)


def finetune_cfg(tmp, summary, palette, data, name, *extra) -> FinetuneJobConfig:
    """``palette``: the pretraining run's palette file (its lookup table cached beside it), or None: the job then
    builds the table from the checkpoint's palette once and keeps it in its folder."""
    return cli.parse(FinetuneJobConfig, [
        "--name", name, "--storage_path", str(tmp / "ft"), "--checkpoint", summary["run_dir"],
        *(["--palette_path", str(palette)] if palette else []), "--tracking.tracking_uri", summary["tracking_uri"],
        "--train.path", str(data), "--train.key_prefix", "train/", "--test.path", str(data),
        "--test.key_prefix", "test/", "--holdout", str(HOLDOUT), "--transform.resolution", str(RES),
        "--deepspeed.preset", "cpu", "--deepspeed.zero_stage", "2", "--deepspeed.precision", "fp32",
        "--deepspeed.micro_batch", "8", "--optim.global_batch", "16", "--optim.warmup_steps", "10",
        "--scaling.workers", "2", "--scaling.cpus_per_worker", "0.4", *extra])


def keys_of(data, prefix):
    return [k for k in pq.read_table(data, columns=["key"])["key"].to_pylist() if k.startswith(prefix)]


def metric(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def n_held_out(data):
    return int(in_part(keys_of(data, "train/"), DatasetSpec(holdout=HOLDOUT, part="holdout")).sum())


@pytest.fixture(scope="module")
def trial_cfg(tmp_path_factory, ar_checkpoint, palette_path, small_cifar):  # noqa: F811
    return finetune_cfg(tmp_path_factory.mktemp("trials"), ar_checkpoint, palette_path, small_cifar, "trials",
                        "--max_epochs", "4", "--patience", "1")


def test_a_palette_file_must_be_the_checkpoints_and_without_one_the_job_keeps_its_own(trial_cfg, tmp_path, s3):
    """--palette_path must hold the checkpoint's palette; without one the job writes the checkpoint's palette and
    its lookup table into its folder, here on the S3 test server, where trials on any node read it."""
    from dataclasses import replace

    from igpt.data.palette import Palette
    from igpt.storage import Loc

    assert finetune.palette_file(trial_cfg) == trial_cfg.palette_path
    centres = np.asarray(checkpoints.load_palette(trial_cfg.checkpoint).centres)
    np.save(tmp_path / "other.npy", centres[::-1].copy())
    with pytest.raises(ValueError, match="not the palette of checkpoint"):
        finetune.palette_file(replace(trial_cfg, palette_path=str(tmp_path / "other.npy")))
    own = replace(trial_cfg, palette_path="", storage_path=f"{s3}/{tmp_path.name}")
    path = finetune.palette_file(own)
    assert path == f"{s3}/{tmp_path.name}/{own.name}/palette.npy"
    names = {f.name for f in Loc(path).parent.children()}
    assert names == {"palette.npy", Palette(centres).lut_path(Path("palette.npy")).name}
    loaded = Palette.load(path)
    assert np.array_equal(loaded.centres, centres) and loaded._lut is not None  # the table read, not rebuilt
    assert finetune.palette_file(own) == path  # found there the second time


def test_a_trial_learns_and_keeps_the_best_epoch_evaluated_on_every_held_out_image(trial_cfg, small_cifar,
                                                                                     ray_local):
    from dataclasses import replace

    # 3 epochs, no early stop (patience 3): after 2 the last epoch's mean L_CLF was 2.259 in two suite runs this
    # session, over the bar of 2.203, and passed when run alone (a guess: the blocks Ray deals to each worker vary
    # with the load)
    out = finetune.fit(replace(trial_cfg, patience=3), lr=3e-3, folder="learn", part="rest", epochs=3)
    client = MlflowClient(finetune.tracking_uri(trial_cfg))
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["igpt.job"] == "finetune_trial"
    n_val, n_train = n_held_out(small_cifar), len(keys_of(small_cifar, "train/"))
    assert 20 < n_val < 80 and out["val_images"] == n_val
    assert metric(client, out["run_id"], "val/images") == [n_val] * out["epochs"]  # every epoch, all of them
    assert run.data.params["data.train_images"] == str(n_train - n_val)  # trained on the rest
    steps_per_epoch = (n_train - n_val) // 16
    clf = metric(client, out["run_id"], "train/loss_clf")
    assert out["epochs"] == 3 and len(clf) == out["steps"] == 3 * steps_per_epoch
    assert clf[0] == pytest.approx(math.log(10), abs=1e-5)  # the zero-initialised head
    assert np.mean(clf[-steps_per_epoch:]) < math.log(10) - 0.1, clf  # it learns to classify
    total = metric(client, out["run_id"], "train/loss")
    assert np.mean(total[-steps_per_epoch:]) < total[0] - 0.3, total  # and L_CLF + L_GEN falls
    gen = metric(client, out["run_id"], "train/loss_gen")
    assert np.allclose(np.array(clf) + np.array(gen), total)
    assert len(metric(client, out["run_id"], "epoch/loss_clf")) == 3
    # every step's data wait (the slowest rank's, seconds and share of the step), and the run's share
    shares = metric(client, out["run_id"], "train/data_wait_share")
    assert len(shares) == len(metric(client, out["run_id"], "train/data_wait_s")) == out["steps"]
    assert all(0 <= v <= 1 for v in shares) and 0 <= run.data.metrics["summary/data_wait_share"] <= 1
    acc = metric(client, out["run_id"], "val/accuracy")
    assert out["best_val_accuracy"] == max(acc) and out["best_epoch"] == acc.index(max(acc)) + 1
    assert run.data.metrics["best/val_accuracy"] == max(acc)
    # the skipped-records report beside the trial's checkpoints and in its run (none skipped here), and the
    # model's lineage as tags
    assert (Path(trial_cfg.storage_path) / trial_cfg.name / "learn" / "errors.tsv").read_text() == "key\treason\n"
    assert "errors.tsv" in {a.path for a in client.list_artifacts(out["run_id"])}
    assert run.data.tags["igpt.size"] == "debug" and run.data.tags["igpt.objective"] in ("ar", "bert")
    # the kept weights are the best epoch's, and the workers' accuracy is theirs on the held-out images
    kept = torch.load(Path(out["classifier"]) / "classifier.pt", weights_only=True)
    assert kept["epoch"] == out["best_epoch"] and kept["val_accuracy"] == out["best_val_accuracy"]
    tokens, labels, keys = held_out(small_cifar, checkpoints.load_palette(trial_cfg.checkpoint))
    correct = int((predict(load_classifier(out["classifier"]), tokens, keys) == labels).sum())
    assert correct / n_val == pytest.approx(out["best_val_accuracy"], abs=1e-12)


def test_early_stopping_ends_a_flat_trial_after_patience_epochs(trial_cfg, small_cifar, ray_local):
    """With clf_weight 0 the head gets no gradient and stays exactly zero (Adam's update of a zero gradient is 0):
    every image is predicted class 0 in every epoch, so validation accuracy is flat, and with patience 1 the run
    must stop after epoch 2 of at most 4 (the backbone does train: L_GEN falls)."""
    out = finetune.fit(trial_cfg, lr=3e-3, clf_weight=0.0, folder="flat", part="rest", epochs=trial_cfg.max_epochs)
    client = MlflowClient(finetune.tracking_uri(trial_cfg))
    assert out["stopped_early"] and out["best_epoch"] == 1
    assert out["epochs"] == 1 + trial_cfg.patience == 2 < trial_cfg.max_epochs
    acc = metric(client, out["run_id"], "val/accuracy")
    tokens, labels, keys = held_out(small_cifar, checkpoints.load_palette(trial_cfg.checkpoint))
    assert acc == [float((labels == 0).sum()) / len(labels)] * 2  # class 0 for everyone, both epochs
    assert all(v == pytest.approx(math.log(10), abs=1e-6) for v in metric(client, out["run_id"], "train/loss_clf"))
    gen = metric(client, out["run_id"], "train/loss_gen")
    assert np.mean(gen[-3:]) < gen[0] - 0.2, gen
    assert client.get_run(out["run_id"]).info.status == "FINISHED"


@pytest.mark.slow  # ~2 min: a Tune sweep of 2 fine-tuning trials and the refit, each a Ray Train job
def test_sweep_picks_the_best_trial_refits_on_train_and_val_and_reports_test_accuracy(
        tmp_path, ar_checkpoint, palette_path, small_cifar, ray_local, s3):  # noqa: F811
    """The job kept on S3 (moto on 127.0.0.1): Tune's experiment, each run's classifier, the job's records."""
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"_comment": "test", "job": "finetune",
                                 "params": {"lr": {"grid_search": [3e-3, 1e-3]}}}))
    cfg = finetune_cfg(tmp_path, ar_checkpoint, palette_path, small_cifar, "sweep", "--space", str(space),
                       "--max_epochs", "2", "--patience", "1", "--storage_path", f"{s3}/{tmp_path.name}")
    summary = finetune.run(cfg)
    client = MlflowClient(summary["tracking_uri"])
    assert sorted(t["lr"] for t in summary["trials"]) == [1e-3, 3e-3] and not summary["failed_trials"]
    for t in summary["trials"]:  # each trial is an early-stopped fine-tuning run on the rest, validated on all of val
        assert t["val_images"] == n_held_out(small_cifar) and 1 <= t["best_epoch"] <= t["epochs"] <= 2
        assert metric(client, t["run_id"], "val/accuracy")[t["best_epoch"] - 1] == t["val_accuracy"]
    best = max(summary["trials"], key=lambda t: (t["val_accuracy"], -t["best_epoch"], -t["lr"]))
    assert summary["best"]["lr"] == best["lr"]
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["igpt.job"] == "finetune"
    assert parent.data.tags["igpt.pretrain_run_id"] == ar_checkpoint["run_id"]  # what igpt.track.compare links by
    assert parent.data.metrics["best/lr"] == best["lr"]
    assert parent.data.metrics["best/val_accuracy"] == best["val_accuracy"]
    assert metric(client, summary["parent_run_id"], "trial/val_accuracy") == \
        [t["val_accuracy"] for t in sorted(summary["trials"], key=lambda t: t["lr"])]
    refit = summary["refit"]
    run = client.get_run(refit["run_id"])
    assert run.data.params["lr"] == str(best["lr"]) and run.data.params["part"] == "all"
    assert int(run.data.params["epochs"]) == best["best_epoch"] == refit["epochs"]  # no early stopping
    assert run.data.params["data.train_images"] == str(len(keys_of(small_cifar, "train/")))  # train + val
    assert refit["test_images"] == 100 and parent.data.metrics["test/images"] == 100
    assert parent.data.metrics["test/accuracy"] == refit["test_accuracy"] == run.data.metrics["test/accuracy"]
    # the test accuracy is that of the refit's weights on the 100 test images, recomputed here in one process
    tokens, labels, keys = tokenized(small_cifar, "test/", checkpoints.load_palette(cfg.checkpoint))
    assert refit["classifier"].startswith(f"{s3}/{tmp_path.name}/sweep/")  # read back from the bucket
    correct = int((predict(load_classifier(refit["classifier"]), tokens, keys) == labels).sum())
    assert correct / 100 == pytest.approx(refit["test_accuracy"], abs=1e-12)
    # every run of the job is a finished child of the parent
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert sorted(r.data.tags["igpt.job"] for r in children) == ["finetune_refit", "finetune_trial", "finetune_trial"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.info.run_id for r in children if r.data.tags["igpt.job"] == "finetune_trial"} == \
        {t["run_id"] for t in summary["trials"]}
    with pytest.raises(FileExistsError):  # a finished job is not run again under the same name
        finetune.run(cfg)


def tokenized(data, prefix, palette):
    """(tokens, labels, keys) of the split's images, eval transform, quantized here without Ray."""
    from igpt.data.ingest import TransformSpec, record_pixels

    rows = [r for r in pq.read_table(data).to_pylist() if r["key"].startswith(prefix)]
    t = TransformSpec("cifar", RES, False)
    tokens = np.stack([palette.quantize(record_pixels(r["image"], 0, r["key"], t)).reshape(-1) for r in rows])
    return (torch.from_numpy(tokens.astype(np.int64)), torch.tensor([r["label"] for r in rows]),
            [r["key"] for r in rows])


def held_out(data, palette):
    """The validation share of the training split (part=holdout), tokenized here."""
    tokens, labels, keys = tokenized(data, "train/", palette)
    val = torch.from_numpy(in_part(keys, DatasetSpec(holdout=HOLDOUT, part="holdout")))
    return tokens[val], labels[val], [k for k, v in zip(keys, val, strict=False) if v]


@pytest.mark.slow  # ~2 min: a BERT checkpoint, then a fine-tuning run evaluated under 5 masks per image
def test_bert_finetuning_evaluates_held_out_images_under_five_masks(tmp_path, palette_path, small_cifar,  # noqa: F811
                                                                    ray_local):
    summary = pretrained(tmp_path, palette_path, "bert", 6)
    cfg = finetune_cfg(tmp_path, summary, None, small_cifar, "bert", "--space", "", "--optim.lr", "3e-3",
                       "--max_epochs", "2", "--patience", "2", "--no-refit")
    out = finetune.run(cfg)
    client = MlflowClient(out["tracking_uri"])
    (t,) = out["trials"]
    run = client.get_run(t["run_id"])
    assert run.data.params["objective"] == "bert" and run.data.params["eval.masks"] == "5"
    assert run.info.status == "FINISHED" and out["refit"] is None
    assert client.get_run(out["parent_run_id"]).info.status == "FINISHED"
    job_palette = Path(cfg.storage_path) / "bert" / "palette.npy"  # no --palette_path: the job built its own table
    assert np.array_equal(np.load(job_palette), checkpoints.load_palette(cfg.checkpoint).centres)
    assert len(list(job_palette.parent.glob("palette.lut-*.npy"))) == 1
    # the distributed evaluation equals the 5-mask modal vote of the kept weights, recomputed here
    model = load_classifier(Path(cfg.storage_path) / "bert" / "lr_0.003" / "classifier")
    tokens, labels, keys = held_out(small_cifar, checkpoints.load_palette(cfg.checkpoint))
    correct = int((predict(model, tokens, keys) == labels).sum())
    assert t["val_images"] == len(keys) and correct / len(keys) == pytest.approx(t["val_accuracy"], abs=1e-12)
