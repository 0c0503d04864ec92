"""The model's config and its named sizes: plain data, importable without Ray, pyarrow or MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from igpt.fields import field_help as _help

# One named table of model sizes. The paper's four (Chen et al. 2020, Table 1 / appendix) and small ones that
# train on a CPU in tests. XL's heads are our choice (the paper does not state them): 24 heads give a head
# dimension of 128, the size flash-attention kernels are tuned for (S: 64, M: 128, L: 96), and it is the head
# dimension of GPT-3 6.7B. Head count does not change the parameter count.
# The input resolution a size trains at is part of its recipe (cluster/recipes.json, igpt.recipes).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "debug": dict(n_layer=2, d_model=64, n_head=2),
    "tiny": dict(n_layer=4, d_model=128, n_head=4),
    "small": dict(n_layer=8, d_model=256, n_head=8),
    "S": dict(n_layer=24, d_model=512, n_head=8),
    "M": dict(n_layer=36, d_model=1024, n_head=8),
    "L": dict(n_layer=48, d_model=1536, n_head=16),
    "XL": dict(n_layer=60, d_model=3072, n_head=24),
}

# The paper's parameter counts (millions), which tests check our sizes against.
PAPER_PARAMS_M = {"S": 76, "M": 455, "L": 1362, "XL": 6801}


@dataclass
class ModelConfig:
    DERIVED = ("n_layer", "d_model", "n_head", "resolution")  # filled from the size table when not given

    size: str = _help(f"named size from MODEL_SIZES: one of {', '.join(MODEL_SIZES)}", default="debug")
    n_layer: int | None = _help("blocks; default from the size table; >= 1", default=None)
    d_model: int | None = _help("width; default from the size table; divisible by n_head", default=None)
    n_head: int | None = _help("attention heads; default from the size table; >= 1", default=None)
    resolution: int | None = _help(
        "input resolution IR (images are IR x IR, context IR^2); default from the size's recipe "
        "(cluster/recipes.json: 32 for S/M/L, 64 for XL); the paper uses 32, 48 or 64; 1..64",
        default=None,
    )
    n_colors: int = _help("palette size (vocabulary without SOS); 2..65535", default=512)
    objective: Literal["ar", "bert"] = _help("pretraining objective: autoregressive or BERT", default="ar")
    bert_mask_prob: float = _help("BERT: probability each position is masked; in (0, 1)", default=0.15)
    activation_checkpointing: bool = _help("recompute each block's activations in backward", default=False)
    compile: bool = _help("train the model compiled by torch.compile (igpt.train.compile): same results, fused "
                          "kernels; the first steps of each input shape wait for compilation", default=False)

    def __post_init__(self) -> None:
        if self.size not in MODEL_SIZES:
            raise ValueError(f"model.size: unknown size {self.size!r}; choose one of {sorted(MODEL_SIZES)}")
        for k, v in MODEL_SIZES[self.size].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.resolution is None:
            from igpt.recipes import recipe

            self.resolution = recipe(self.size).resolution
        if self.n_layer < 1 or self.n_head < 1 or self.d_model < 1:
            raise ValueError("model: n_layer, n_head and d_model must be >= 1")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if not 1 <= self.resolution <= 64:
            raise ValueError(f"model.resolution must be in 1..64, got {self.resolution}")
        if not 2 <= self.n_colors <= 65535:
            raise ValueError(f"model.n_colors must be in 2..65535, got {self.n_colors}")
        if self.objective not in ("ar", "bert"):
            raise ValueError(f"model.objective must be 'ar' or 'bert', got {self.objective!r}")
        if not 0.0 < self.bert_mask_prob < 1.0:
            raise ValueError(f"model.bert_mask_prob must be in (0, 1), got {self.bert_mask_prob}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        return cls(size=name, **overrides)

    @property
    def n_ctx(self) -> int:
        return self.resolution**2

    @property
    def vocab_size(self) -> int:
        return self.n_colors + 1

    @property
    def sos_id(self) -> int:
        return self.n_colors

    def param_count(self) -> int:
        """Closed form, equal to ``IGPT(cfg).num_params()`` (tested)."""
        d = self.d_model
        per_block = 12 * d * d + 2 * d  # q, k, v, proj (4 d^2) + MLP (8 d^2) + two norm gains
        return self.n_layer * per_block + (self.vocab_size + self.n_ctx + self.n_colors) * d + d

    def non_embedding_params(self) -> int:
        """N of the scaling laws (Kaplan et al. 2020, Henighan et al. 2020): the parameters less every vocabulary
        and position matrix (token and position embeddings, the untied output head): the blocks and the final norm."""
        return non_embedding_params(self.n_layer, self.d_model)

    def train_flops_per_token(self) -> float:
        """Model FLOPs per trained token (see :func:`train_flops_per_token`)."""
        return train_flops_per_token(self.n_layer, self.d_model, self.n_ctx, self.n_colors)


def non_embedding_params(n_layer: int, d_model: int) -> int:
    """Blocks (q, k, v, proj, MLP: 12 d², two norm gains: 2 d) and the final norm's gain (d)."""
    return n_layer * (12 * d_model**2 + 2 * d_model) + d_model


def train_flops_per_token(n_layer: int, d_model: int, n_ctx: int, n_colors: int = 512) -> float:
    """Model FLOPs per trained token: forward + backward = 3x forward; the blocks' matmuls (2 · 12 · L · d²),
    attention's context term (2 · 2 · L · n_ctx · d, causal not halved) and the output head (2 · d · n_colors).
    The one formula of MFU, a run's ``summary/train_flops`` and the compute axis of ``igpt compare`` and the
    scaling laws (6 · N · D would leave attention out and count the embeddings: 0.58-0.90 of this, unevenly by size).
    A BERT run counts every position: the model computes all of them, though its loss is on the masked ones."""
    d, n = d_model, n_layer
    return 3 * (2 * 12 * n * d * d + 2 * 2 * n * n_ctx * d + 2 * d * n_colors)


def train_compute(n_layer: int | None, d_model: int | None, resolution: int | None, steps: int | None,
                  global_batch: int | None, n_colors: int | None = 512):
    """Training compute: the model's own FLOPs per token (:func:`train_flops_per_token`, attention included, the
    formula MFU uses) × tokens, tokens = ``steps.total`` × ``optim.global_batch`` × IR² (each image is
    IR² tokens). ``steps.total`` is the run's planned step count, so a run still in progress is counted as if
    finished. Returns (tokens, FLOPs), None where a number is missing."""
    if None in (n_layer, d_model, resolution, steps, global_batch):
        return None, None
    tokens = steps * global_batch * resolution**2
    return tokens, train_flops_per_token(n_layer, d_model, resolution**2, n_colors or 512) * tokens
