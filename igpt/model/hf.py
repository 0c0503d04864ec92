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

import numpy as np
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


# ---- folders: ``python -m igpt import-hf`` / ``export-hf`` ------------------------------------------------------
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


def _read_json(path, what: str) -> dict:
    import json

    from igpt.errors import MissingInput, UserError

    if not path.is_file():
        raise MissingInput(f"no {path.name} in {path.parent}: {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def read_hf_folder(hf_dir):
    """``(config dict, palette)`` of a ``save_pretrained`` folder, checked before any weights are read."""
    from pathlib import Path

    from igpt.data.palette import Palette
    from igpt.errors import MissingInput, UserError

    d = Path(hf_dir)
    if not d.is_dir():
        raise MissingInput(f"no Hugging Face model folder at {d}")
    cfg = _read_json(d / "config.json", f"expected a save_pretrained folder of {HF_CLASS}")
    arch = cfg.get("architectures") or []
    if cfg.get("model_type") != "imagegpt" or (arch and HF_CLASS not in arch):
        raise UserError(f"{d} holds a {cfg.get('model_type')!r} model ({', '.join(arch) or 'no architectures'}), "
                        f"not an ImageGPT {HF_CLASS} (model_type 'imagegpt')")
    need = (f"the image processor's preprocessor_config.json (ImageGPTImageProcessor, with its clusters) is needed "
            f"beside the model; save it there with processor.save_pretrained({d})")
    proc = d / "preprocessor_config.json"
    clusters = _read_json(proc, need).get("clusters") if proc.is_file() else None
    if clusters is None:
        raise UserError(f"{d} has no colour palette: {need}")
    return cfg, Palette(np.asarray(clusters, dtype=np.float32))


def import_hf(hf_dir, out, objective: str = "ar") -> str:
    """A ``save_pretrained`` folder of ``ImageGPTForCausalImageModeling`` plus its image processor's clusters
    -> ``<out>/weights.pt``, a checkpoint like a pretraining run's (step 0). Returns a one-line summary."""
    from pathlib import Path

    from igpt import cli
    from igpt.errors import Conflict, UserError
    from igpt.train.checkpoints import WEIGHTS, write_weights

    transformers = require_transformers()
    out = Path(out)
    if (out / WEIGHTS).exists():
        raise Conflict(f"{out / WEIGHTS} already exists; choose another --out")
    _, palette = read_hf_folder(hf_dir)
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(str(hf_dir)).float().eval()
    try:
        model = from_hf(hf, objective)
    except ValueError as e:  # a non-zero bias, an unsupported shape or activation: the model cannot be represented
        raise UserError(str(e)) from None
    cfg = model.cfg
    if len(palette.centres) != cfg.n_colors:
        raise UserError(f"the image processor has {len(palette.centres)} clusters but the model predicts "
                        f"{cfg.n_colors} colours (vocab_size {cfg.vocab_size} less SOS)")
    out.mkdir(parents=True, exist_ok=True)
    path = write_weights(out, model.state_dict(), cli.to_dict(cfg), palette.centres, step=0)
    return (f"imported {hf_dir} -> {path}: size {cfg.size}, {cfg.n_layer} layers, d_model {cfg.d_model}, "
            f"{cfg.resolution}x{cfg.resolution}, {cfg.n_colors} colours, objective {cfg.objective}")


def export_hf(checkpoint, out) -> str:
    """An igpt AR checkpoint (weights.pt, step folder or run folder) -> a folder that
    ``ImageGPTForCausalImageModeling.from_pretrained`` and ``ImageGPTImageProcessor.from_pretrained`` load."""
    from pathlib import Path

    from igpt.errors import Conflict, UserError
    from igpt.train.checkpoints import load, model_of, palette_of, resolve

    transformers = require_transformers()
    out = Path(out)
    taken = [n for n in ("config.json", "preprocessor_config.json") if (out / n).exists()]
    if taken:
        raise Conflict(f"{out} already holds a Hugging Face model ({', '.join(taken)}); choose another --out")
    weights = resolve(checkpoint)
    data = load(weights)  # read once: the model and its palette
    model, palette = model_of(data), palette_of(data)
    cfg = model.cfg
    if cfg.objective != "ar":
        raise UserError(f"{weights} was trained with the {cfg.objective!r} objective; {HF_CLASS} is a causal (AR) "
                        f"model and Hugging Face has no BERT iGPT head, so it would compute something this model "
                        f"was not trained for (no masked positions, a causal mask): only AR checkpoints export")
    to_hf(model).save_pretrained(str(out))
    # the PIL processor where transformers has both (same file; the default one would want torchvision)
    cls = getattr(transformers, "ImageGPTImageProcessorPil", None) or transformers.ImageGPTImageProcessor
    res = cfg.resolution
    cls(clusters=palette.centres.tolist(), size={"height": res, "width": res}).save_pretrained(str(out))
    return (f"exported {weights} -> {out}: {HF_CLASS} + ImageGPTImageProcessor, size {cfg.size}, "
            f"{cfg.n_layer} layers, d_model {cfg.d_model}, {res}x{res}, {cfg.n_colors} colours")
