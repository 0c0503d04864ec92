"""``igpt``: small commands around the library. The jobs themselves live in ``pipelines/``."""

from __future__ import annotations

import argparse

import numpy as np

from igpt.config import MODEL_SIZES, PAPER_PARAMS_M, ModelConfig
from igpt.data.sources import FORMATS
from igpt.errors import UserError


def sizes(resolution: int | None) -> str:
    rows = ["size   layers  d_model  heads  IR  params (M)  paper (M)  diff"]
    for name in MODEL_SIZES:
        cfg = ModelConfig.from_name(name, resolution=resolution)
        p = cfg.param_count() / 1e6
        paper = PAPER_PARAMS_M.get(name)
        ref = f"{paper:>9,}  {100 * (p - paper) / paper:+.2f}%" if paper else f"{'-':>9}"
        rows.append(f"{name:<6} {cfg.n_layer:>6}  {cfg.d_model:>7}  {cfg.n_head:>5}  {cfg.resolution:>2}  "
                    f"{p:>10,.1f}  {ref}")
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igpt", allow_abbrev=False)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, allow_abbrev=False, **kw)  # a subparser does not inherit it

    p = add("sizes", help="the named model sizes and their parameter counts against the paper")
    p.add_argument("--resolution", type=int, default=None, help="override each size's input resolution")
    p = add("plan", help="per-GPU memory of model states and activations, and whether it fits")
    p.add_argument("--size", default="all", help="a model size, or 'all' for S, M, L and XL")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the data-parallel group")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU, GiB")
    p.add_argument("--zero", type=int, default=None, help="ZeRO stage 0-3 (default: compare 2 and 3)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--offload-params", action="store_true")
    p.add_argument("--global-batch", type=int, default=None,
                   help="default: the size's recipe (cluster/recipes.json; paper: 128, 64 for XL)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="per GPU; default: the recipe's (at most global batch / GPUs)")
    p.add_argument("--activation-checkpointing", action="store_true", help="(default: compare off and on)")
    p = add("sample", help="unconditional samples and top-half completions of a checkpoint, as a PNG grid")
    p.add_argument("--checkpoint", required=True,
                   help="weights.pt, a checkpoint folder step_*/, or a run folder (its newest complete checkpoint)")
    p.add_argument("--n", type=int, default=8, help="unconditional samples, and images to complete from --images")
    p.add_argument("--completions", type=int, default=3, help="completions per given image")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely colours; 0: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", default=None,
                   help="a dataset (file, folder or URI, any --images_format) whose images get their top half "
                        "completed: --n of them, picked evenly through the split")
    p.add_argument("--images_format", choices=FORMATS, default="parquet",
                   help="layout of --images, as the jobs' --data.format (parquet: key/image columns)")
    p.add_argument("--images_split", default="test", help="split of --images (a parquet/webdataset file: itself)")
    p.add_argument("--key_prefix", default="", help="parquet: only rows whose key starts with this (e.g. test/)")
    p.add_argument("--labels_file", default="", help="imagefolder: a flat split's labels (as the jobs' labels_file)")
    p.add_argument("--recipe", choices=["imagenet", "cifar", "none"], default="imagenet",
                   help="eval transform of --images to the model's resolution (imagenet: centre crop, box filter)")
    p.add_argument("--no_cache", action="store_true", help="decode without the KV cache (slow; for checking)")
    p.add_argument("--out", default="samples.png", help="the PNG to write")
    p.add_argument("--tracking_uri", default=None, help="MLflow store to log the PNG to (default: MLflow's own)")
    p.add_argument("--run_id", default=None,
                   help="MLflow run to log the PNG to (under samples/); with only --tracking_uri, a new run is made")
    p.add_argument("--experiment", default="igpt", help="experiment of the new run (only without --run_id)")
    p = add("import-hf", help="a Hugging Face ImageGPTForCausalImageModeling folder (with its image processor's "
                              "clusters) as an igpt checkpoint, <out>/weights.pt")
    p.add_argument("--hf", required=True, help="save_pretrained folder: config.json, weights, preprocessor_config.json")
    p.add_argument("--out", required=True, help="folder to write weights.pt to")
    p.add_argument("--objective", choices=["ar", "bert"], default="ar", help="objective the checkpoint records")
    p = add("export-hf", help="an igpt AR checkpoint as a Hugging Face ImageGPTForCausalImageModeling folder, "
                              "with its ImageGPTImageProcessor (the palette as clusters)")
    p.add_argument("--checkpoint", required=True,
                   help="weights.pt, a checkpoint folder step_*/, or a run folder (its newest complete checkpoint)")
    p.add_argument("--out", required=True, help="folder for save_pretrained (model and image processor)")
    add("compare", add_help=False, help="pretraining runs in MLflow side by side: table (CSV, Markdown) "
                   "and plots, logged as a run; flags: python -m igpt compare --help")
    return parser


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # its flags are CompareJobConfig's (igpt.cli), as for pipelines.compare
        from igpt.track.compare import main as compare

        compare(argv[1:], prog="python -m igpt compare")
        return
    args = _parser().parse_args(argv)
    command = {"sizes": lambda: sizes(args.resolution), "plan": lambda: plan_table(args),
               "sample": lambda: sample_command(args),
               "import-hf": lambda: _hf("import_hf", args.hf, args.out, args.objective),
               "export-hf": lambda: _hf("export_hf", args.checkpoint, args.out)}[args.cmd]
    try:
        print(command())
    except UserError as e:  # a user's mistake: one line, exit 2 (as igpt.cli.main does for the jobs)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _hf(name: str, *args) -> str:
    from igpt.model import hf  # imported here: transformers is optional (the hf extra)

    hf.require_transformers().utils.logging.disable_progress_bar()  # the command prints one summary line
    return getattr(hf, name)(*args)


def read_images(spec, n: int, resolution: int, recipe: str = "imagenet") -> np.ndarray:
    """Up to ``n`` images of a dataset spec (any format igpt.data.sources reads), picked evenly through the split,
    each through the eval transform to uint8 (IR, IR, 3). Records that do not decode are skipped with a note on
    stderr."""
    import sys

    from igpt.data.images import BadImage
    from igpt.data.ingest import TransformSpec, record_pixels
    from igpt.data.sources import pick

    rows = pick(spec, n).to_pylist()
    if not rows:
        raise UserError(f"no images in {spec.path} (split {spec.split!r}, key prefix {spec.key_prefix!r})")
    t, out = TransformSpec(recipe, resolution, train=False), []
    for r in rows:
        try:
            if r["error"]:
                raise BadImage(r["error"])
            out.append(record_pixels(r["image"] or b"", r["raw_size"], r["key"], t))
        except BadImage as e:
            print(f"skipped {r['key']}: {e}", file=sys.stderr)
    if not out:
        raise UserError(f"none of the {len(rows)} images picked from {spec.path} could be decoded")
    return np.stack(out)


def sample_command(args) -> str:
    """``python -m igpt sample``: write the picture; log it to MLflow when asked. Returns a one-line summary."""
    import time
    from pathlib import Path

    import torch
    from PIL import Image

    from igpt.model.sampling import picture
    from igpt.train.checkpoints import load, model_of, palette_of  # imported here: only this command needs it

    data = load(args.checkpoint)  # read once: the model and its palette
    model, palette = model_of(data), palette_of(data)
    res = model.cfg.resolution
    images = None
    if args.images:
        from igpt.data.sources import DatasetSpec

        spec = DatasetSpec(path=args.images, format=args.images_format, split=args.images_split,
                           key_prefix=args.key_prefix, labels_file=args.labels_file)
        px = read_images(spec, args.n, res, args.recipe)
        images = torch.as_tensor(palette.quantize(px).reshape(len(px), res * res).astype(np.int64))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    pic = picture(model, palette, images, n=args.n, completions=args.completions, temperature=args.temperature,
                  top_k=args.top_k or None, generator=g, use_cache=not args.no_cache)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pic).save(out)
    msg = (f"wrote {out} ({pic.shape[1]}x{pic.shape[0]}): {args.n} samples"
           f"{f', {len(images)} images x {args.completions} completions' if images is not None else ''}"
           f" in {seconds:.1f} s")
    if args.tracking_uri or args.run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(args.tracking_uri)
        run_id = args.run_id
        if run_id is None:  # a run of its own, with what made the picture
            from igpt.track.tracking import ensure_experiment

            uri = client.tracking_uri
            # a local SQLite store keeps its artifacts beside it, as the jobs' stores do (igpt.track.tracking)
            root = Path(uri[len("sqlite:///"):]).parent / "mlartifacts" if uri.startswith("sqlite:///") else None
            exp = ensure_experiment(uri, args.experiment, root)
            run_id = client.create_run(exp, run_name="sample", tags={"igpt.job": "sample"}).info.run_id
            for k in ("checkpoint", "n", "completions", "temperature", "top_k", "seed", "images", "images_format",
                      "images_split", "recipe"):
                client.log_param(run_id, k, getattr(args, k))
            client.log_metric(run_id, "sample/seconds", seconds)
        # an existing run (the checkpoint's own pretraining run, say) only gains the artifact: its params stay
        client.log_artifact(run_id, str(out), "samples")
        if args.run_id is None:
            client.set_terminated(run_id, "FINISHED")
        msg += f"; logged to MLflow run {run_id} as samples/{out.name}"
    return msg


def plan_table(args) -> str:
    from igpt.train.plan import PlanInput, table
    from igpt.train.recipes import recipe

    rows = []
    for name in (["S", "M", "L", "XL"] if args.size == "all" else [args.size]):
        cfg = ModelConfig.from_name(name, resolution=args.resolution)
        rec = recipe(name)  # the batch the run will use (cluster/recipes.json), so the plan and the run agree
        global_batch = args.global_batch or rec.global_batch
        micro = args.micro_batch or min(rec.micro_batch, max(1, global_batch // args.gpus))
        for stage in [args.zero] if args.zero is not None else [2, 3]:
            for ckpt in [True] if args.activation_checkpointing else [False, True]:
                p = PlanInput(cfg, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, zero_stage=stage,
                              precision=args.precision, offload_optimizer=args.offload_optimizer,
                              offload_params=args.offload_params, micro_batch=micro, activation_checkpointing=ckpt,
                              global_batch=global_batch)  # for the "best mb" column: the largest that fits
                label = f"{name} IR{cfg.resolution} z{stage} mb{micro}{' ckpt' if ckpt else ''}"
                label += " offl-opt" if args.offload_optimizer else ""
                label += " offl-par" if args.offload_params else ""
                rows.append((label, p))
    return f"{args.gpus} GPUs x {args.gpu_mem:g} GiB, {args.precision}\n" + table(rows)


if __name__ == "__main__":
    main()
