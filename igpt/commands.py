"""The small commands of ``python -m igpt`` (sizes, plan, sample, import-hf, export-hf), each a typed config and a
function returning its one-line (or one-table) answer: the CLI is generated from the configs as the jobs' is
(``igpt.cli``), and ``igpt/__main__.py`` dispatches to them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from igpt.config import MODEL_SIZES, PAPER_PARAMS_M, ModelConfig, TrackingConfig
from igpt.data.sources import Format
from igpt.errors import UserError
from igpt.fields import PathStr
from igpt.fields import field_help as _help


# ---- sizes ------------------------------------------------------------------------------------------------------
@dataclass
class SizesConfig:
    """The named model sizes and their parameter counts against the paper."""

    resolution: int | None = _help("override each size's input resolution", default=None)


def sizes(cfg: SizesConfig) -> str:
    rows = ["size   layers  d_model  heads  IR  params (M)  paper (M)  diff"]
    for name in MODEL_SIZES:
        m = ModelConfig.from_name(name, resolution=cfg.resolution)
        p = m.param_count() / 1e6
        paper = PAPER_PARAMS_M.get(name)
        ref = f"{paper:>9,}  {100 * (p - paper) / paper:+.2f}%" if paper else f"{'-':>9}"
        rows.append(f"{name:<6} {m.n_layer:>6}  {m.d_model:>7}  {m.n_head:>5}  {m.resolution:>2}  "
                    f"{p:>10,.1f}  {ref}")
    return "\n".join(rows)


# ---- plan -------------------------------------------------------------------------------------------------------
@dataclass
class PlanConfig:
    """Per-GPU memory of model states and activations (DeepSpeed's accounting), and whether it fits."""

    size: str = _help("a model size, or 'all' for S, M, L and XL", default="all")
    resolution: int | None = _help("input resolution; default: the size's recipe", default=None)
    gpus: int = _help("GPUs in the data-parallel group", default=8)
    gpu_mem: float = _help("memory per GPU, GiB", default=80.0)
    zero_stage: int | None = _help("ZeRO stage 0-3; default: compare 2 and 3", default=None)
    precision: Literal["bf16", "fp16", "fp32"] = _help("training precision", default="bf16")
    offload_optimizer: bool = _help("optimizer states in CPU memory", default=False)
    offload_params: bool = _help("parameters in CPU memory (ZeRO 3)", default=False)
    global_batch: int | None = _help("default: the size's recipe (cluster/recipes.json; paper: 128, 64 for XL)",
                                     default=None)
    micro_batch: int | None = _help("per GPU; default: the recipe's (at most global batch / GPUs)", default=None)
    activation_checkpointing: bool = _help("only with activation checkpointing; default: compare off and on",
                                           default=False)
    gpu: str = _help("the GPU the data path must feed (its dense bf16 peak): H100, H200, A100, L4, A10", default="H100")
    mfu: float = _help("model FLOPs utilization the data path must keep up with (assumed); in (0, 1]", default=0.4)
    decode_rate: float = _help("images per second one CPU core decodes, augments and quantizes; 0: measure it here "
                               "on --decode_data with the recipe's training transform", default=0.0)
    decode_data: PathStr = _help("Parquet file of images the rate is measured on (default: the shipped CIFAR-10 "
                                 "sample; give photographs for an ImageNet plan)", default="")
    recipe: Literal["cifar", "imagenet", "none"] = _help("the training transform of the measured rate",
                                                         default="cifar")

    def __post_init__(self) -> None:
        if not 0 < self.mfu <= 1 or self.decode_rate < 0:
            raise ValueError("mfu must be in (0, 1] and decode_rate >= 0")


def plan(cfg: PlanConfig) -> str:
    from igpt.recipes import recipe
    from igpt.train.plan import PlanInput, table

    rows = []
    for name in (["S", "M", "L", "XL"] if cfg.size == "all" else [cfg.size]):
        m = ModelConfig.from_name(name, resolution=cfg.resolution)
        rec = recipe(name)  # the batch the run will use (cluster/recipes.json), so the plan and the run agree
        global_batch = cfg.global_batch or rec.global_batch
        micro = cfg.micro_batch or min(rec.micro_batch, max(1, global_batch // cfg.gpus))
        for stage in [cfg.zero_stage] if cfg.zero_stage is not None else [2, 3]:
            for ckpt in [True] if cfg.activation_checkpointing else [False, True]:
                p = PlanInput(m, gpus=cfg.gpus, gpu_mem_gib=cfg.gpu_mem, zero_stage=stage,
                              precision=cfg.precision, offload_optimizer=cfg.offload_optimizer,
                              offload_params=cfg.offload_params, micro_batch=micro, activation_checkpointing=ckpt,
                              global_batch=global_batch)  # for the "best mb" column: the largest that fits
                label = f"{name} IR{m.resolution} z{stage} mb{micro}{' ckpt' if ckpt else ''}"
                label += " offl-opt" if cfg.offload_optimizer else ""
                label += " offl-par" if cfg.offload_params else ""
                rows.append((label, p))
    return f"{cfg.gpus} GPUs x {cfg.gpu_mem:g} GiB, {cfg.precision}\n" + table(rows) + "\n\n" + data_path(cfg)


def data_path(cfg: PlanConfig) -> str:
    """The CPU cores per GPU that keep each size fed (igpt/data/feed.py), from a measured or given rate."""
    from igpt import hw
    from igpt.data import feed

    models = {n: ModelConfig.from_name(n, resolution=cfg.resolution)
              for n in (["S", "M", "L", "XL"] if cfg.size == "all" else [cfg.size])}
    rates = {r: cfg.decode_rate or feed.decode_rate(cfg.recipe, r, path=cfg.decode_data or None)
             for r in {m.resolution for m in models.values()}}
    where = "given" if cfg.decode_rate else f"measured through the training stream here, {cfg.recipe} recipe, " \
        f"{hw.describe()}"
    lines = [f"data path (read + decode + augment + quantize per core: {where}; from pre-tokenized shards only the "
             "read):"]
    for n, m in models.items():
        f = feed.Feed(feed.gpu_images_per_s(m, cfg.gpu, cfg.mfu), rates[m.resolution])
        lines.append("  " + feed.line(n, m, cfg.gpu, cfg.mfu, f))
    return "\n".join(lines)


# ---- sample -----------------------------------------------------------------------------------------------------
@dataclass
class SampleConfig:
    """Unconditional samples and top-half completions of a checkpoint, as a PNG grid."""

    checkpoint: PathStr = _help("weights.pt, a checkpoint folder step_*/, or a run folder (its newest complete "
                                "checkpoint); required", default="")
    n: int = _help("unconditional samples, and images to complete from --images", default=8)
    completions: int = _help("completions per given image", default=3)
    temperature: float = _help("0: greedy", default=1.0)
    top_k: int = _help("sample among the k most likely colours; 0: all", default=0)
    seed: int = _help("sampling seed", default=0)
    images: PathStr = _help("a dataset (file, folder or URI, any --images_format) whose images get their top half "
                            "completed: --n of them, picked evenly through the split", default="")
    images_format: Format = _help("layout of --images, as the jobs' --data.format (parquet: key/image columns)",
                               default="parquet")
    images_split: str = _help("split of --images (a parquet/webdataset file: itself)", default="test")
    key_prefix: str = _help("parquet: only rows whose key starts with this (e.g. test/)", default="")
    labels_file: PathStr = _help("imagefolder: a flat split's labels (as the jobs' labels_file)", default="")
    recipe: Literal["imagenet", "cifar", "none"] = _help(
        "eval transform of --images to the model's resolution (imagenet: centre crop, box filter)", default="imagenet")
    cache: bool = _help("decode with the KV cache (--no-cache: without, slow; for checking)", default=True)
    out: PathStr = _help("the PNG to write", default="samples.png")
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """with --tracking.tracking_uri: the PNG logged to a new MLflow run of the sample (or to --run_id)"""
    run_id: str = _help("an existing MLflow run to log the PNG to (under samples/), its params left alone",
                        default="")


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


def sample(cfg: SampleConfig) -> str:
    """Write the picture; log it to MLflow when asked (a run of its own through the one run lifecycle, or an
    existing run). Returns a one-line summary."""
    from pathlib import Path

    if not cfg.checkpoint:
        raise UserError("--checkpoint is required: a weights.pt, a step_* folder or a run folder")
    if not (cfg.tracking.tracking_uri or cfg.run_id):
        return _picture(cfg)[0]
    from igpt import cli
    from igpt.track.tracking import JobRun

    if cfg.run_id:  # an existing run (the checkpoint's own pretraining run, say) only gains the artifact
        from mlflow.tracking import MlflowClient

        msg, out, _ = _picture(cfg)
        MlflowClient(cfg.tracking.tracking_uri).log_artifact(cfg.run_id, str(out), "samples")
        return msg + f"; logged to MLflow run {cfg.run_id} as samples/{Path(cfg.out).name}"
    store = Path(cfg.out).resolve().parent
    with JobRun.open(cfg.tracking, store, "sample", "sample", cli.to_dict(cfg)) as job:
        msg, out, seconds = _picture(cfg)
        job.log_metric("sample/seconds", seconds)
        job.log_artifact(out, "samples")
    return msg + f"; logged to MLflow run {job.run_id} as samples/{out.name}"


def _picture(cfg: SampleConfig) -> tuple:
    """Draw and write the PNG: (summary line, its path, seconds of sampling)."""
    import time
    from pathlib import Path

    import torch
    from PIL import Image

    from igpt.model.sampling import picture
    from igpt.train.checkpoints import load, model_of, palette_of

    data = load(cfg.checkpoint)  # read once: the model and its palette
    model, palette = model_of(data), palette_of(data)
    res = model.cfg.resolution
    images = None
    if cfg.images:
        from igpt.data.sources import DatasetSpec

        spec = DatasetSpec(path=cfg.images, format=cfg.images_format, split=cfg.images_split,
                           key_prefix=cfg.key_prefix, labels_file=cfg.labels_file)
        px = read_images(spec, cfg.n, res, cfg.recipe)
        images = torch.as_tensor(palette.quantize(px).reshape(len(px), res * res).astype(np.int64))
    t0 = time.perf_counter()
    pic = picture(model, palette, images, n=cfg.n, completions=cfg.completions, temperature=cfg.temperature,
                  top_k=cfg.top_k or None, generator=torch.Generator().manual_seed(cfg.seed), use_cache=cfg.cache)
    seconds = time.perf_counter() - t0
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pic).save(out)
    return (f"wrote {out} ({pic.shape[1]}x{pic.shape[0]}): {cfg.n} samples"
            f"{f', {len(images)} images x {cfg.completions} completions' if images is not None else ''}"
            f" in {seconds:.1f} s"), out, seconds


# ---- Hugging Face folders ---------------------------------------------------------------------------------------
@dataclass
class ImportHFConfig:
    """A Hugging Face ImageGPTForCausalImageModeling folder (with its image processor's clusters) as an igpt
    checkpoint, <out>/weights.pt."""

    hf: PathStr = _help("save_pretrained folder: config.json, weights, preprocessor_config.json; required",
                        default="")
    out: PathStr = _help("folder to write weights.pt to; required", default="")
    objective: Literal["ar", "bert"] = _help("objective the checkpoint records", default="ar")


@dataclass
class ExportHFConfig:
    """An igpt AR checkpoint as a Hugging Face ImageGPTForCausalImageModeling folder, with its
    ImageGPTImageProcessor (the palette as clusters)."""

    checkpoint: PathStr = _help("weights.pt, a checkpoint folder step_*/, or a run folder (its newest complete "
                                "checkpoint); required", default="")
    out: PathStr = _help("folder for save_pretrained (model and image processor); required", default="")


def import_hf(cfg: ImportHFConfig) -> str:
    _required(hf=cfg.hf, out=cfg.out)
    return _hf_checkpoints().import_hf(cfg.hf, cfg.out, cfg.objective)


def export_hf(cfg: ExportHFConfig) -> str:
    _required(checkpoint=cfg.checkpoint, out=cfg.out)
    return _hf_checkpoints().export_hf(cfg.checkpoint, cfg.out)


def _required(**flags: str) -> None:
    missing = [f"--{k}" for k, v in flags.items() if not v]
    if missing:
        raise UserError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")


def _hf_checkpoints():
    from igpt.model.hf import require_transformers  # imported here: transformers is optional (the hf extra)
    from igpt.train import hf_checkpoints

    require_transformers().utils.logging.disable_progress_bar()  # the command prints one summary line
    return hf_checkpoints
