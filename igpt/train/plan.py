"""``igpt plan``: per-GPU memory of a pretraining configuration, and whether it fits.

Model states follow DeepSpeed's own accounting for mixed-precision Adam, so that the figures can be checked
against ``estimate_zero2/3_model_states_mem_needs`` (tested): per parameter, 2 bytes of 16-bit weights plus 18
bytes of 16-bit gradients (2), 32-bit gradients (4), 32-bit master weights (4) and Adam's two moments (8).

- stage 0: everything replicated: 2 + 18 bytes per parameter on every GPU;
- stage 1: optimizer state (32-bit weights, moments) partitioned: 2 + 2 + 4 replicated, 12 / N;
- stage 2: gradients too: 2 replicated, 18 / N; optimizer offload leaves the 2 on the GPU;
- stage 3: everything partitioned, plus the largest layer gathered in 32 bits (4 bytes per parameter of it);
  optimizer offload keeps 2 / N on the GPU; parameter offload keeps only the gathered layer.
fp32 training (no 16-bit copies) counts 4 (weights) + 4 (gradients) + 8 (moments) = 16 bytes instead.

Activations per GPU (Korthikanti et al. 2022, "Reducing activation recomputation", 16-bit): s*b*h*34 bytes per
layer with flash/memory-efficient attention (no s^2 score matrix is stored); the s^2 term 5*a*s^2*b comes back
with the plain math kernel. Activation checkpointing stores each block's input (2*s*b*h) and recomputes one
block at a time. Plus the logits: s*b*V in 16 bits and 32 bits for the loss. fp32 doubles the 16-bit terms.
A configuration fits when the sum is under ``usable`` (default 90%) of the GPU's memory: the rest goes to the
CUDA context, allocator fragmentation and communication buffers.

:func:`best_micro_batch` picks the micro batch that fills that memory: larger matmuls (more rows per weight
read) and fewer micro-batches per optimizer step, each with its fixed costs (kernel launches, gradient
reduction). Only the activations grow with it, linearly, so the largest power of two that fits and divides the
per-worker batch is the one to try first (``benchmarks/gpu_pretrain.py`` measures it beside its half).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from igpt.model.config import ModelConfig

GiB = 1024**3


@dataclass
class PlanInput:
    model: ModelConfig
    gpus: int = 8
    gpu_mem_gib: float = 80.0
    zero_stage: int = 2
    precision: str = "bf16"  # bf16 | fp16 | fp32
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch: int = 16
    activation_checkpointing: bool = False
    flash_attention: bool = True
    usable: float = 0.9
    global_batch: int | None = None  # images per optimizer step over all GPUs: what best_micro_batch divides

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("parameter offload needs ZeRO stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("optimizer offload needs ZeRO stage >= 1")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32, got {self.precision}")


@dataclass
class Plan:
    params: int
    largest_layer: int
    model_states: float  # bytes per GPU
    activations: float  # bytes per GPU
    cpu_offload: float  # bytes of host memory per GPU for offloaded states (not counted against the GPU)
    limit: float

    @property
    def total(self) -> float:
        return self.model_states + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.limit


def largest_layer_params(cfg: ModelConfig) -> int:
    """Parameters of the largest single module ZeRO-3 gathers at once: an MLP matrix (4 d^2), or an embedding."""
    d = cfg.d_model
    return max(4 * d * d, cfg.vocab_size * d, cfg.n_ctx * d)


def model_state_bytes(p: PlanInput) -> tuple[float, float]:
    """(GPU bytes, host bytes) of parameters, gradients and optimizer state, per GPU."""
    n, params, big = p.gpus, p.model.param_count(), largest_layer_params(p.model)
    # (bytes per parameter replicated on every GPU, bytes per parameter split over the N GPUs)
    if p.precision == "fp32":  # 4 weights + 4 gradients + 8 moments; no 16-bit copies
        w16 = 0.0
        stage_parts = {0: (16, 0), 1: (8, 8), 2: (4, 12), 3: (0, 16)}
    else:  # 2 weights16 + 2 grads16 + 4 grads32 + 4 weights32 + 8 moments
        w16 = 2.0
        # stage 3 as DeepSpeed's estimator counts it: 18 / N (plus the gathered layer below)
        stage_parts = {0: (20, 0), 1: (4, 16), 2: (2, 18), 3: (0, 18)}
    replicated, partitioned = stage_parts[p.zero_stage]
    gathered = 4.0 * big if p.zero_stage == 3 else 0.0
    host = 0.0
    if p.offload_optimizer:
        # the partitioned optimizer state moves to the host; on the GPU stay the 16-bit weights
        host = partitioned * params / n
        if p.zero_stage == 3:
            return (gathered + (0.0 if p.offload_params else w16 * params / n),
                    host + (w16 * params / n if p.offload_params else 0))
        return replicated * params, host
    return replicated * params + partitioned * params / n + gathered, host


def activation_bytes(p: PlanInput) -> float:
    m = p.model
    s, b, h, a, layers, vocab = m.n_ctx, p.micro_batch, m.d_model, m.n_head, m.n_layer, m.n_colors
    scale = 2.0 if p.precision == "fp32" else 1.0
    per_layer = s * b * h * 34 + (0 if p.flash_attention else 5 * a * s * s * b)
    body = layers * 2 * s * b * h + per_layer if p.activation_checkpointing else layers * per_layer
    logits = s * b * vocab * (2 + 4)
    return scale * body + logits


def plan(p: PlanInput) -> Plan:
    gpu, host = model_state_bytes(p)
    return Plan(p.model.param_count(), largest_layer_params(p.model), gpu, activation_bytes(p), host,
                p.usable * p.gpu_mem_gib * GiB)


def best_micro_batch(p: PlanInput) -> int | None:
    """The largest power-of-two micro batch that divides the per-worker batch (``global_batch / gpus``) and whose
    plan fits (total under ``usable`` of the GPU memory: ``1 - usable`` is the headroom); ``p.micro_batch`` is
    ignored. None when none does: not even 1 fits, or the GPUs do not divide the global batch."""
    if p.global_batch is None:
        raise ValueError("best_micro_batch needs PlanInput.global_batch")
    per_worker, rest = divmod(p.global_batch, p.gpus)
    best, micro = None, 1
    while not rest and micro <= per_worker and per_worker % micro == 0:
        if not plan(replace(p, micro_batch=micro)).fits:
            break  # activations only grow with the micro batch: no larger one fits either
        best, micro = micro, 2 * micro
    return best


def table(rows: list[tuple[str, PlanInput]]) -> str:
    head = (f"{'config':<34} {'params':>8} {'states GiB':>10} {'activ GiB':>9} {'total GiB':>9} "
            f"{'limit GiB':>9} {'host/GPU':>8}  fits  best mb")
    out = [head, "-" * len(head)]
    for name, p in rows:
        r = plan(p)
        best = "-" if p.global_batch is None else best_micro_batch(p) or "none"  # "-": no global batch given
        out.append(f"{name:<34} {r.params / 1e6:>7.0f}M {r.model_states / GiB:>10.1f} {r.activations / GiB:>9.1f} "
                   f"{r.total / GiB:>9.1f} {r.limit / GiB:>9.1f} {r.cpu_offload / GiB:>8.1f}  "
                   f"{'yes' if r.fits else 'NO':<4} {best:>7}")
    return "\n".join(out)


def of_run(model: ModelConfig, ds_conf: dict, workers: int, mem_gib: float) -> PlanInput:
    """The plan input of a resolved run: its DeepSpeed config (stage, precision, offload, batch) and model."""
    from igpt.train.deepspeed_config import offloads, precision_of

    optimizer, params = offloads(ds_conf)
    return PlanInput(model, gpus=workers, gpu_mem_gib=mem_gib, zero_stage=ds_conf["zero_optimization"].get("stage", 0),
                     precision=precision_of(ds_conf), offload_optimizer=optimizer, offload_params=params,
                     micro_batch=ds_conf["train_micro_batch_size_per_gpu"],
                     activation_checkpointing=model.activation_checkpointing, global_batch=ds_conf["train_batch_size"])


def refusal(p: PlanInput, where: str) -> str | None:
    """Why ``p`` will not fit (one paragraph with the ways out), or None when it fits. ``where``: how the memory
    figure was found."""
    r = plan(p)
    if r.fits:
        return None
    best = best_micro_batch(p)
    way = (f"--deepspeed.micro_batch {best} fits" if best else
           "no micro batch fits: a higher --deepspeed.zero_stage, --deepspeed.offload_optimizer, "
           "--model.activation_checkpointing or more workers")
    return (f"`igpt plan` says this run will not fit: {p.model.size} ({r.params / 1e6:.0f}M parameters), ZeRO-"
            f"{p.zero_stage}, {p.precision}, micro batch {p.micro_batch}, {p.gpus} worker(s) needs {r.total / GiB:.1f} "
            f"GiB per worker (model states {r.model_states / GiB:.1f}, activations {r.activations / GiB:.1f}) and "
            f"{p.usable:.0%} of {p.gpu_mem_gib:.1f} GiB is there ({where}). {way[0].upper() + way[1:]}; or "
            "--scaling.ignore_plan to start anyway")
