"""Extract features once: every layer's average-pooled features of every image, per split, from one checkpoint.

    python -m pipelines.extract --name s-cifar --checkpoint runs/train/s-cifar \\
        --train.path ../shared/datasets/cifar10 --test.path ../shared/datasets/cifar10
    ray job submit --working-dir . -- python -m pipelines.extract ... --storage_path s3://bucket/features

Splits: ``train`` and ``val`` are the training split's records outside / inside the held-out share (a hash of
the key, ``--holdout``), ``test`` the test split. Images go through the eval transform (no augmentation) and the
run's own palette. One forward pass per image (per mask for BERT models) gives every layer at once: layers
0 .. L of an L-block model, layer L being the final norm's output (manifest: ``n_layer``, ``layers``). Each split
is written into ``<split>/`` (a local folder or object storage: ``s3://``, ``gs://``), emptied first;
``manifest.json`` is written last, and a feature set without it is incomplete (probes refuse it). Probes
(igpt/eval/probe_job.py) then sweep layers and learning rates without recomputing anything.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import ray

from igpt import cli
from igpt.config import IngestLimits, TrackingConfig, TransformConfig
from igpt.data import ingest, sources
from igpt.data.sources import DatasetSpec
from igpt.errors import UserError
from igpt.eval import features
from igpt.eval.ensemble import N_MASKS
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.raysetup import init_ray
from igpt.storage import Loc
from igpt.track.tags import TAG_CHECKPOINT, TAG_FEATURES_AT, TAG_RANDOM_INIT
from igpt.track.tracking import JobRun, lineage_tags
from igpt.train import checkpoints


@dataclass
class ExtractJobConfig:
    """From a checkpoint, every layer's average-pooled features of every image, once per split (train, val, test)."""

    name: str = _help("feature set name: written to <storage_path>/<name>/<split>/", default="features")
    storage_path: PathStr = _help("folder for feature sets (shared storage on a cluster)", default="runs/features")
    checkpoint: PathStr = _help("a pretraining run folder (its newest complete checkpoint), a step_* folder or a "
                                "weights.pt (required)", default="")
    random_init: bool = _help("the checkpoint's architecture with fresh initial weights instead: the random-init "
                              "twin a probe is compared with", default=False)
    seed: int = _help("initialisation seed of the random-init twin", default=0)
    train: DatasetSpec = field(default_factory=DatasetSpec)
    test: DatasetSpec = field(default_factory=lambda: DatasetSpec(split="test"))
    holdout: float = _help("share of the training split held out as val (by a hash of the key); in (0, 1)",
                           default=0.1)
    transform: TransformConfig = field(default_factory=TransformConfig)
    batch_size: int = _help("images per forward pass", default=64)
    concurrency: int = _help("model replicas (Ray Data actors) computing features at once", default=1)
    cpus_per_actor: float = _help("CPUs reserved per replica (its torch threads)", default=1.0)
    use_gpu: bool = _help("one GPU per replica", default=False)
    pixels: bool = _help("also store the images' pixels (palette colours, scaled to [0, 1]) for the "
                         "raw-pixel baseline", default=True)
    log_features_max_mb: int = _help("log the feature shards to MLflow when they total at most this many MB "
                                     "(else only their manifest and location)", default=64)
    limits: IngestLimits = field(default_factory=IngestLimits)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("batch_size and concurrency must be >= 1")


ROWS_PER_SHARD = 10_000
# the manifest says it in words, so a reader of a feature set needs no code to know what layer L is
LAYER_DEFINITION = ("layer l < n_layer: sequence mean of ln_1 of block l's input (layer 0: the embeddings); "
                    "layer n_layer: sequence mean of ln_f of the last block's output (what fine-tuning pools)")


def split_specs(cfg: ExtractJobConfig) -> dict[str, sources.DatasetSpec]:
    rest, holdout, _ = cfg.train.held_out_split(cfg.holdout)
    return {"train": rest, "val": holdout, "test": cfg.test}


def run(cfg: ExtractJobConfig) -> dict:
    if not cfg.checkpoint:
        raise UserError("checkpoint is required: a pretraining run folder, a step_* folder or a weights.pt")
    ckpt = checkpoints.header(cfg.checkpoint)  # a clear error now rather than in every actor
    model_cfg, palette = ckpt["model"], ckpt["palette"].numpy()
    res = model_cfg["resolution"]
    cfg.transform.check_model(res)
    specs = split_specs(cfg)
    plans = {s: sources.check(spec) for s, spec in specs.items()}
    out = Loc(cfg.storage_path) / cfg.name  # a local folder, or s3://… / gs://…
    (out / "manifest.json").unlink()  # the set is complete only once the manifest is back

    init_ray()
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same keys, same shard order
    from igpt.data.palette import Palette

    lut_ref = ray.put(Palette(palette).lut)
    t = cfg.transform
    tspec = ingest.TransformSpec.of(t, res, cfg.limits.max_pixels, train=False, epoch=0)
    m = N_MASKS if model_cfg["objective"] == "bert" else 1
    d = model_cfg["d_model"]
    n_layer = model_cfg["n_layer"]
    shape = {features.layer_key(l): (m, d) for l in range(n_layer + 1)}  # 0..L: layer L is ln_f's output
    if cfg.pixels:
        shape["pixels"] = (1, res * res * 3)

    counts: dict[str, dict] = {}
    with JobRun.open(cfg.tracking, cfg.storage_path, cfg.name, "extract", cli.to_dict(cfg)) as job:
        job.set_tags({TAG_CHECKPOINT: str(checkpoints.resolve(cfg.checkpoint)), TAG_RANDOM_INIT: str(cfg.random_init),
                      **lineage_tags(model_cfg, checkpoints.pretrain_run_id(cfg.checkpoint), job.client)})
        for split, spec in specs.items():  # the test split with each image's loss too (paired comparisons)
            counts[split] = _extract_split(cfg, split, spec, plans[split], lut_ref, tspec,
                                           {**shape, "loss": (1, 1)} if split == "test" else shape, out, job)
        man = {"n_layer": n_layer, "layers": list(range(n_layer + 1)), "layer_definition": LAYER_DEFINITION,
               "d_model": d, "masks": m, "objective": model_cfg["objective"],
               "resolution": res, "pixels": cfg.pixels, "columns": {k: list(v) for k, v in shape.items()},
               "losses": ["test"],  # per-image validation losses (features.load_losses)
               "splits": counts, "checkpoint": str(checkpoints.resolve(cfg.checkpoint)),
               "checkpoint_step": ckpt["step"], "random_init": cfg.random_init, "model": model_cfg,
               "holdout": cfg.holdout, "run_id": job.run_id, "tracking_uri": job.uri,
               "pretrain_run_id": checkpoints.pretrain_run_id(cfg.checkpoint)}
        (out / "manifest.json").write_text(json.dumps(man, indent=2))  # last: the set is complete
        job.log_dict(man, "manifest.json")
        size_mb = sum(n for f, n in out.files().items() if f.rsplit("/", 1)[-1].startswith("shard-")) / 2**20
        job.log_metric("features_mb", size_mb)
        if size_mb <= cfg.log_features_max_mb:
            for split in specs:
                with tempfile.TemporaryDirectory() as tmp:
                    local = (out / split).download(tmp) if out.remote else (out / split).local()
                    job.log_artifacts(local, f"features/{split}")
        else:
            job.set_tag(TAG_FEATURES_AT, out.uri)
    print(f"features of layers 0..{n_layer} ({n_layer} blocks; layer {n_layer}: the final norm's output) x {m} "
          f"mask(s) in {out}")
    return man


def _extract_split(cfg: ExtractJobConfig, split: str, spec, plan, lut_ref, tspec, shape: dict, out: Loc,
                   job) -> dict:
    """One split's features through a pool of model replicas, written as shards into ``<split>/`` (emptied
    first; the set counts as complete only once ``manifest.json`` is written, after every split); its counts,
    logged to the job's MLflow run."""
    t0 = time.perf_counter()
    log = ingest.error_log()
    ds = ingest.tokenize(sources.read(spec, plan), lut_ref, tspec, log)
    ds = ds.map_batches(
        features.FeatureActor, batch_format="pyarrow", batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0,
        fn_constructor_kwargs=dict(checkpoint=cfg.checkpoint, random_init=cfg.random_init, seed=cfg.seed,
                                   batch_size=cfg.batch_size, pixels=cfg.pixels, use_gpu=cfg.use_gpu,
                                   losses="loss" in shape))
    final = out / split
    final.rmtree()  # an earlier attempt's shards (a longer split) must not mix in

    def write(table, index: int) -> None:
        buf = io.BytesIO()
        np.savez(buf, **features.table_to_arrays(table, shape))
        (final / f"shard-{index:05d}.npz").write_bytes(buf.getvalue())  # whole: locally or one PUT

    with ingest.error_report(log, out / f"{split}.errors.tsv", cfg.limits, job) as guard:
        written, shard = ingest.write_shards(ds.iter_batches(batch_format="pyarrow", batch_size=None),
                                             ROWS_PER_SHARD, write, guard)
    if written == 0:
        raise UserError(f"split {split} produced no images ({guard.skipped} skipped; see "
                        f"{out / f'{split}.errors.tsv'})")
    seconds = time.perf_counter() - t0
    job.log_metrics({f"{split}/images": written, f"{split}/skipped": guard.skipped,
                        f"{split}/images_per_s": written / seconds})
    print(f"{split}: {written} images, {guard.skipped} skipped, {shard} shard(s), {seconds:.1f} s")
    return {"images": written, "skipped": guard.skipped, "shards": shard, "seconds": round(seconds, 2)}
