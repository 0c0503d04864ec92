"""Search spaces as data: ``tune_spaces/*.json`` -> Ray Tune's own sampling objects.

A file names the job it is for and one entry per swept parameter::

    {"_comment": "why these values", "job": "probe_lbfgs",
     "params": {"layer": {"grid_search": "all"}, "C": {"grid_search": [0.01, 0.1, 1.0]}}}

Kinds: ``grid_search`` (a list; ``"all"`` for every layer of the model, 0 .. L for L blocks, the last being the
final norm's output (``IGPT.features``); filled in by the job), ``choice`` (a list),
``uniform`` / ``loguniform`` (``[low, high]``), ``ordered`` (a list tried in that order until the objective stops
improving: the paper's learning-rate procedure, used by ``sweep_lr``). Every file is validated by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from igpt.errors import MissingInput, UserError

SPACES_DIR = Path(__file__).resolve().parents[1] / "tune_spaces"

# the parameters each job reads from a trial's config; a space may sweep any of them and must sweep the required
JOBS = {
    "probe_lbfgs": {"required": {"layer", "C"}, "allowed": {"layer", "C"}},
    "probe_sgd": {"required": {"layer", "lr"}, "allowed": {"layer", "lr", "epochs", "batch_size"}},
    "sweep_lr": {"required": {"lr"}, "allowed": {"lr"}},
    "finetune": {"required": {"lr"}, "allowed": {"lr", "clf_weight"}},
}
KINDS = {"grid_search", "choice", "uniform", "loguniform", "ordered"}


class SpaceError(UserError):
    pass


def load(path: str | Path, job: str | None = None) -> dict:
    """The validated file as a dict (``{"job", "params"}``); ``job`` must match when given."""
    p = Path(path)
    if not p.exists() and not p.suffix and (SPACES_DIR / f"{p}.json").exists():
        p = SPACES_DIR / f"{p}.json"  # a bare name: one of ours
    if not p.exists():
        ours = ", ".join(sorted(f.stem for f in SPACES_DIR.glob("*.json")))
        raise MissingInput(f"no search space {path} (ours: {ours})")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SpaceError(f"{p}: not JSON: {e}") from None
    validate(data, str(p))
    if job and data["job"] != job:
        raise SpaceError(f"{p} is a {data['job']} space, not {job}")
    return data


def validate(data: dict, where: str = "space") -> None:
    if not isinstance(data, dict) or set(data) - {"_comment", "job", "params"} or "params" not in data:
        raise SpaceError(f"{where}: expected keys _comment, job, params")
    job = data.get("job")
    if job not in JOBS:
        raise SpaceError(f"{where}: unknown job {job!r}; expected one of {sorted(JOBS)}")
    params = data["params"]
    missing = JOBS[job]["required"] - set(params)
    extra = set(params) - JOBS[job]["allowed"]
    if missing or extra:
        raise SpaceError(f"{where}: {job} needs {sorted(JOBS[job]['required'])}, may have "
                         f"{sorted(JOBS[job]['allowed'])}; missing {sorted(missing)}, unknown {sorted(extra)}")
    for name, spec in params.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise SpaceError(f"{where}: {name}: expected one of {sorted(KINDS)}, got {spec!r}")
        kind, value = next(iter(spec.items()))
        if kind == "ordered" and job != "sweep_lr":
            raise SpaceError(f"{where}: {name}: 'ordered' is the sweep_lr procedure only")
        if value == "all" and not (kind == "grid_search" and name == "layer"):
            raise SpaceError(f"{where}: {name}: 'all' is only for grid_search over layer")
        if value == "all":
            continue
        if not isinstance(value, list) or not value:
            raise SpaceError(f"{where}: {name}: {kind} needs a non-empty list")
        if kind in ("uniform", "loguniform") and (
            len(value) != 2 or not value[0] < value[1] or (kind == "loguniform" and value[0] <= 0)
        ):
            raise SpaceError(f"{where}: {name}: {kind} needs [low, high] with 0 < low < high for loguniform")
        for v in value:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise SpaceError(f"{where}: {name}: values must be numbers, got {v!r}")
            if name in ("lr", "C") and v <= 0:
                raise SpaceError(f"{where}: {name}: must be > 0, got {v}")
            if name == "layer" and (not isinstance(v, int) or v < 0):
                raise SpaceError(f"{where}: layer: must be a non-negative integer, got {v}")


def to_tune(params: dict, n_layer: int | None = None) -> dict:
    """Ray Tune's sampling objects for a validated ``params`` dict (``ordered`` stays a plain list). ``n_layer``:
    the model's blocks L; its feature layers are 0 .. L inclusive."""
    from ray import tune

    out = {}
    for name, spec in params.items():
        kind, value = next(iter(spec.items()))
        if value == "all":
            if n_layer is None:
                raise SpaceError("layer 'all' needs the model's layer count")
            value = list(range(n_layer + 1))
        if name == "layer" and n_layer is not None and max(value) > n_layer:
            raise SpaceError(f"layer {max(value)} out of range [0, {n_layer}] for a {n_layer}-layer model")
        out[name] = {"grid_search": tune.grid_search, "choice": tune.choice, "ordered": list,
                     "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}[kind](value)
    return out
