"""Weights to and from Hugging Face ``transformers`` ``ImageGPTForCausalImageModeling``.

So that a user can start from the public iGPT checkpoints (``openai/imagegpt-small|medium|large``, downloaded
by the user; nothing is fetched here) and hand our checkpoints to HF tooling.

Layout differences handled here:
- HF's ``Conv1D`` stores weights as (in, out); ``nn.Linear`` as (out, in). HF fuses q, k, v in ``c_attn``.
- HF layers carry biases; the iGPT release has none (HF's converter fills them with zeros). Converting *from*
  HF refuses a non-zero bias rather than silently dropping it; converting *to* HF writes zeros.
- Vocabulary: both keep SOS as embedding row 512 and a 512-way untied output (``lm_head``).
"""

from __future__ import annotations

import torch

from igpt.model import IGPT
from igpt.model.config import MODEL_SIZES, ModelConfig


def config_from_hf(hf_config, objective: str = "ar") -> ModelConfig:
    """Our config for an HF ``ImageGPTConfig`` (square images; context n_positions = IR^2)."""
    res = round(hf_config.n_positions**0.5)
    if res * res != hf_config.n_positions:
        raise ValueError(f"n_positions={hf_config.n_positions} is not a square image")
    if hf_config.activation_function != "quick_gelu":
        raise ValueError(f"iGPT uses quick_gelu (x*sigmoid(1.702x)); got {hf_config.activation_function}")
    inner = hf_config.n_inner if hf_config.n_inner is not None else 4 * hf_config.n_embd
    if inner != 4 * hf_config.n_embd:
        raise ValueError("only n_inner = 4 * n_embd is supported")
    if hf_config.scale_attn_by_inverse_layer_idx or not hf_config.scale_attn_weights:
        raise ValueError("only the standard 1/sqrt(head_dim) attention scaling is supported")
    # pick the named size whose shape matches, else 'debug' with explicit overrides
    shape = dict(n_layer=hf_config.n_layer, d_model=hf_config.n_embd, n_head=hf_config.n_head)
    size = next((k for k, v in MODEL_SIZES.items() if all(v[x] == shape[x] for x in shape)), "debug")
    return ModelConfig(size=size, **shape, resolution=res, n_colors=hf_config.vocab_size - 1, objective=objective)


def hf_config_from(cfg: ModelConfig):
    from transformers import ImageGPTConfig

    return ImageGPTConfig(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function="quick_gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
    )


def _no_bias(name: str, t: torch.Tensor) -> None:
    if t.abs().max().item() != 0.0:
        raise ValueError(f"{name} is non-zero; the iGPT architecture has no biases, so it cannot be represented")


@torch.no_grad()
def from_hf(hf_model, objective: str = "ar") -> IGPT:
    """An :class:`IGPT` with the weights of an HF ``ImageGPTForCausalImageModeling``."""
    cfg = config_from_hf(hf_model.config, objective)
    sd = {k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}
    model = IGPT(cfg)
    model.wte.weight.copy_(sd["transformer.wte.weight"])
    model.wpe.weight.copy_(sd["transformer.wpe.weight"])
    model.ln_f.weight.copy_(sd["transformer.ln_f.weight"])
    model.head.weight.copy_(sd["lm_head.weight"])
    for i, blk in enumerate(model.h):
        p = f"transformer.h.{i}."
        for b in ("attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):
            _no_bias(p + b, sd[p + b])
        blk.attn.qkv.weight.copy_(sd[p + "attn.c_attn.weight"].T)  # (d, 3d) Conv1D -> (3d, d), q|k|v in order
        blk.attn.proj.weight.copy_(sd[p + "attn.c_proj.weight"].T)
        blk.mlp.fc.weight.copy_(sd[p + "mlp.c_fc.weight"].T)
        blk.mlp.proj.weight.copy_(sd[p + "mlp.c_proj.weight"].T)
        blk.ln_1.weight.copy_(sd[p + "ln_1.weight"])
        blk.ln_2.weight.copy_(sd[p + "ln_2.weight"])
    return model


@torch.no_grad()
def to_hf(model: IGPT):
    """An HF ``ImageGPTForCausalImageModeling`` (float32, biases zero, dropout off) with our weights."""
    from transformers import ImageGPTForCausalImageModeling

    hf = ImageGPTForCausalImageModeling(hf_config_from(model.cfg)).float().eval()
    sd = hf.state_dict()
    new = {
        "transformer.wte.weight": model.wte.weight,
        "transformer.wpe.weight": model.wpe.weight,
        "transformer.ln_f.weight": model.ln_f.weight,
        "lm_head.weight": model.head.weight,
    }
    for i, blk in enumerate(model.h):
        p = f"transformer.h.{i}."
        a = blk.attn
        new[p + "attn.c_attn.weight"] = a.qkv.weight.T
        new[p + "attn.c_proj.weight"] = a.proj.weight.T
        new[p + "mlp.c_fc.weight"] = blk.mlp.fc.weight.T
        new[p + "mlp.c_proj.weight"] = blk.mlp.proj.weight.T
        new[p + "ln_1.weight"] = blk.ln_1.weight
        new[p + "ln_2.weight"] = blk.ln_2.weight
        for b in ("attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):
            new[p + b] = torch.zeros_like(sd[p + b])
    missing = {k for k in sd if not k.endswith(".attn.bias") and not k.endswith("masked_bias")} - set(new)
    if missing:
        raise RuntimeError(f"HF parameters left unset by the conversion: {sorted(missing)}")
    for k, v in new.items():
        sd[k].copy_(v.detach().float())
    return hf


# ---- the optional dependency (folders to and from checkpoints: igpt/train/hf_checkpoints.py) -------------------
HF_CLASS = "ImageGPTForCausalImageModeling"
INSTALL_HINT = "pip install -e '.[hf]'"


def require_transformers():
    """The ``transformers`` module, or a one-line :class:`UserError` saying how to install it."""
    from igpt.errors import UserError

    try:
        import transformers
    except ImportError:
        raise UserError(f"Hugging Face checkpoints need the transformers package: {INSTALL_HINT}") from None
    return transformers
