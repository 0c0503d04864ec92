"""Hugging Face ``save_pretrained`` folders to and from igpt checkpoints (``weights.pt``): ``python -m igpt
import-hf`` / ``export-hf``. The state-dict mapping itself is the model's (igpt/model/hf.py); this module adds what a
checkpoint holds beside the weights (the palette, the step) and the checks on the folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from igpt import cli
from igpt.data.palette import Palette
from igpt.errors import Conflict, MissingInput, UserError
from igpt.model.hf import HF_CLASS, from_hf, require_transformers, to_hf
from igpt.train.checkpoints import WEIGHTS, load, model_of, palette_of, resolve, write_weights


def _read_json(path, what: str) -> dict:
    if not path.is_file():
        raise MissingInput(f"no {path.name} in {path.parent}: {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def read_hf_folder(hf_dir):
    """``(config dict, palette)`` of a ``save_pretrained`` folder, checked before any weights are read."""
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
