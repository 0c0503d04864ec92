"""Extract features once: every layer's average-pooled features of every image, per split, from one checkpoint.

    python -m pipelines.extract --name s-cifar --checkpoint runs/train/s-cifar \\
        --train.path ../shared/datasets/cifar10 --test.path ../shared/datasets/cifar10
    ray job submit --working-dir . -- python -m pipelines.extract ... --output_dir s3://bucket/features

Splits: ``train`` and ``val`` are the training split's records outside / inside the held-out share (a hash of
the key, ``--holdout``), ``test`` the test split. Images go through the eval transform (no augmentation) and the
run's own palette. One forward pass per image (per mask for BERT models) gives every layer at once: layers
0 .. L of an L-block model, layer L being the final norm's output (manifest: ``n_layer``, ``layers``). Each split
is written into ``<split>.partial/`` and renamed when complete; ``manifest.json`` is written last. Probes
(pipelines/probe.py) then sweep layers and learning rates without recomputing anything.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray

from igpt import checkpoints, cli, features, ingest, sources
from igpt.config import ExtractJobConfig
from igpt.errors import UserError
from igpt.raysetup import init_ray
from igpt.tracking import JobRun

ROWS_PER_SHARD = 10_000
# the manifest says it in words, so a reader of a feature set needs no code to know what layer L is
LAYER_DEFINITION = ("layer l < n_layer: sequence mean of ln_1 of block l's input (layer 0: the embeddings); "
                    "layer n_layer: sequence mean of ln_f of the last block's output (what fine-tuning pools)")


def split_specs(cfg: ExtractJobConfig) -> dict[str, sources.DatasetSpec]:
    return {"train": replace(cfg.train, holdout=cfg.holdout, part="rest"),
            "val": replace(cfg.train, holdout=cfg.holdout, part="holdout"),
            "test": cfg.test}


def run(cfg: ExtractJobConfig) -> dict:
    import mlflow

    if not cfg.checkpoint:
        raise UserError("checkpoint is required: a pretraining run folder, a step_* folder or a weights.pt")
    ckpt = checkpoints.load(cfg.checkpoint)  # a clear error now rather than in every actor
    model_cfg, palette = ckpt["model"], ckpt["palette"].numpy()
    res = model_cfg["resolution"]
    cfg.transform.check_model(res)
    specs = split_specs(cfg)
    plans = {s: sources.check(spec) for s, spec in specs.items()}
    out = Path(cfg.output_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the set is complete only once the manifest is back

    init_ray()
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same keys, same shard order
    from igpt.palette import Palette

    lut_ref = ray.put(Palette(palette).lut)
    t = cfg.transform
    tspec = ingest.TransformSpec(t.recipe, res, False, t.seed, 0, t.draft)
    m = 5 if model_cfg["objective"] == "bert" else 1
    d = model_cfg["d_model"]
    n_layer = model_cfg["n_layer"]
    shape = {features.layer_key(l): (m, d) for l in range(n_layer + 1)}  # 0..L: layer L is ln_f's output
    if cfg.pixels:
        shape["pixels"] = (1, res * res * 3)

    run_ = JobRun.open(cfg.tracking, cfg.output_dir, cfg.name, "extract", cli.to_dict(cfg), fluent=True)
    uri = run_.uri
    counts: dict[str, dict] = {}
    with run_:
        mlflow.set_tag("igpt.checkpoint", str(checkpoints.resolve(cfg.checkpoint)))
        mlflow.set_tag("igpt.random_init", str(cfg.random_init))
        if checkpoints.pretrain_run_id(cfg.checkpoint):
            mlflow.set_tag("igpt.pretrain_run_id", checkpoints.pretrain_run_id(cfg.checkpoint))
        for split, spec in specs.items():
            t0 = time.perf_counter()
            log = ingest.ErrorLog.remote()
            ds = ingest.tokenize(sources.read(spec, plans[split]), lut_ref, tspec, log)
            ds = ds.map_batches(
                features.FeatureActor, batch_format="pyarrow", batch_size=None,
                compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0,
                fn_constructor_kwargs=dict(checkpoint=cfg.checkpoint, random_init=cfg.random_init, seed=cfg.seed,
                                           batch_size=cfg.batch_size, pixels=cfg.pixels, use_gpu=cfg.use_gpu))
            partial, final = out / f"{split}.partial", out / split
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            written, shard, pending, buffered = 0, 0, [], 0

            def flush(tables) -> None:
                nonlocal shard
                import pyarrow as pa

                arrays = features.table_to_arrays(pa.concat_tables(tables), shape)
                np.savez(partial / f"shard-{shard:05d}.npz", **arrays)
                shard += 1

            with ingest.error_report(log, out / f"{split}.errors.tsv", cfg.limits) as guard:
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    if batch.num_rows == 0:
                        continue
                    pending.append(batch)
                    buffered += batch.num_rows
                    if buffered >= ROWS_PER_SHARD:
                        flush(pending)
                        written += buffered
                        pending, buffered = [], 0
                    guard.check()
                if buffered:
                    flush(pending)
                    written += buffered
            if written == 0:
                raise UserError(f"split {split} produced no images ({guard.skipped} skipped; see "
                                 f"{out / f'{split}.errors.tsv'})")
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            seconds = time.perf_counter() - t0
            counts[split] = {"images": written, "skipped": guard.skipped, "shards": shard,
                             "seconds": round(seconds, 2)}
            mlflow.log_metrics({f"{split}/images": written, f"{split}/skipped": guard.skipped,
                                f"{split}/images_per_s": written / seconds})
            mlflow.log_artifact(str(out / f"{split}.errors.tsv"), "errors")
            print(f"{split}: {written} images, {guard.skipped} skipped, {shard} shard(s), {seconds:.1f} s")
        man = {"n_layer": n_layer, "layers": list(range(n_layer + 1)), "layer_definition": LAYER_DEFINITION,
               "d_model": d, "masks": m, "objective": model_cfg["objective"],
               "resolution": res, "pixels": cfg.pixels, "columns": {k: list(v) for k, v in shape.items()},
               "splits": counts, "checkpoint": str(checkpoints.resolve(cfg.checkpoint)),
               "checkpoint_step": ckpt["step"], "random_init": cfg.random_init, "model": model_cfg,
               "holdout": cfg.holdout, "run_id": run_.info.run_id, "tracking_uri": uri,
               "pretrain_run_id": checkpoints.pretrain_run_id(cfg.checkpoint)}
        (out / "manifest.json").write_text(json.dumps(man, indent=2))
        mlflow.log_artifact(str(out / "manifest.json"))
        size_mb = sum(f.stat().st_size for f in out.rglob("shard-*.npz")) / 2**20
        mlflow.log_metric("features_mb", size_mb)
        if size_mb <= cfg.log_features_max_mb:
            for split in specs:
                mlflow.log_artifacts(str(out / split), f"features/{split}")
        else:
            mlflow.set_tag("igpt.features_at", str(out.resolve()))
    print(f"features of layers 0..{n_layer} ({n_layer} blocks; layer {n_layer}: the final norm's output) x {m} "
          f"mask(s) in {out}")
    return man


def main(argv: list[str] | None = None) -> None:
    cli.main(run, ExtractJobConfig, argv, prog="python -m pipelines.extract")


if __name__ == "__main__":
    main(sys.argv[1:])
