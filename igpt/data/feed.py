"""How many CPU cores keep a GPU fed: the images per second a GPU trains on at a size and resolution, against
the images per second one core reads, decodes, augments and quantizes (``igpt plan``'s data-path lines).

The GPU side is arithmetic: ``peak x MFU / (model FLOPs per token x tokens per image)``, with the datasheet's dense
bf16 peak (:data:`igpt.hw.GPU_PEAK_BF16`) and an MFU the planner assumes (default 40%, the project's goal for S to
L; ``benchmarks/gpu_pretrain.py`` measures it on a card). The CPU side is measured: :func:`decode_rate` times the
training stream's own Ray Data pipeline here, per CPU of the runtime; or a rate measured elsewhere is given. A run
from pre-tokenized shards (``--train.format tokens``) only reads Parquet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igpt import hw
from igpt.model.config import ModelConfig


@dataclass(frozen=True)
class Feed:
    images_per_s_per_gpu: float
    """images one GPU trains on per second at the assumed MFU"""
    rate_per_core: float
    """images one CPU core decodes, augments and quantizes per second"""

    @property
    def cores_per_gpu(self) -> float:
        return self.images_per_s_per_gpu / self.rate_per_core


def gpu_images_per_s(model: ModelConfig, gpu: str, mfu: float) -> float:
    peak = next((v for k, v in hw.GPU_PEAK_BF16.items() if k.lower() in gpu.lower()), None)
    if peak is None:
        raise ValueError(f"unknown GPU {gpu!r}: one of {', '.join(hw.GPU_PEAK_BF16)}")
    return peak * mfu / (model.train_flops_per_token() * model.n_ctx)


def decode_rate(recipe: str, resolution: int, path: str | None = None, epochs: int = 20) -> float:
    """Images per second per CPU through the stream a training worker reads (``igpt.data.stream.TrainStream``:
    read, decode, the recipe's training transform, the palette's lookup table, micro-batches of 16) on this
    machine's Ray runtime (a local one if none runs), past its first micro-batch (start-up left out), over
    ``epochs`` passes of a Parquet file's images (default: the shipped CIFAR-10 sample; give photographs for an
    ImageNet plan: their decode costs far more). Enough passes that what Ray Data buffered during the start-up is
    a small part: over 3 passes of the sample that buffer made the rate 26,870 images/s per core, over 20 6,033."""
    import ray

    from igpt.data import ingest, sources, stream
    from igpt.data.palette import Palette
    from igpt.raysetup import init_ray

    init_ray()
    spec = sources.DatasetSpec(path or str(Path(__file__).with_name("cifar10_sample.parquet")))
    plan = sources.check(spec)
    lut = ray.put(Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)).lut)
    s = stream.TrainStream(spec, ray.put(plan), tuple(u.take for u in plan.units), epochs, 1, lut,
                           ingest.TransformSpec(recipe, resolution, True, 0, 0), ingest.error_log())
    n, start = 0, None
    for batch in s.batches(0, 16):
        if start is None:  # the first micro-batch pays the start-up
            start = time.perf_counter()
            continue
        n += len(batch["tokens"])
    if not n:
        raise ValueError(f"{spec.path}: too few images to time the stream")
    return n / (time.perf_counter() - start) / ray.cluster_resources().get("CPU", 1.0)


def line(name: str, model: ModelConfig, gpu: str, mfu: float, feed: Feed) -> str:
    return (f"{name} IR{model.resolution}: {feed.images_per_s_per_gpu:,.0f} images/s per {gpu} at {mfu:.0%} MFU "
            f"-> {feed.cores_per_gpu:.2f} CPU cores per GPU at {feed.rate_per_core:,.0f} images/s per core")
