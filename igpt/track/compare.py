"""Compare pretraining runs from what MLflow holds: one row per pretraining run, printed, written as CSV and
Markdown, with plots, and logged as an MLflow run of its own (tag ``igpt.job=compare``).

Only MLflow's search API is used (``MlflowClient.search_runs`` with filter strings, every page), never the
store's files, so the same command works on a local SQLite store and on a tracking server. What it reads:

* pretraining runs (tag ``igpt.job=pretrain``): params ``model.size``, ``model.objective``, ``model.resolution``,
  ``model.n_layer``, ``model.d_model``, ``model.params``, ``steps.total``, ``optim.global_batch``; the histories of
  ``train/loss`` and ``val/loss``; the run name;
* probe runs (``igpt.job=probe``) linked by the tag ``igpt.pretrain_run_id``, trained or random-init by the tag
  ``igpt.random_init``: ``test/accuracy``, ``best_layer`` (0 .. L for L blocks: layer l is the stream after l
  blocks, layer L the final norm's output), the history ``val/accuracy_by_layer`` (step = layer) and, if there,
  ``baseline/pixels_test_accuracy``. Depth is layer / L, computed here from ``best_layer`` and ``model.n_layer``
  (the probe's ``best_layer_relative`` only where the layer count is unknown: older probes logged (l + 1) / L);
* fine-tuning runs (``igpt.job=finetune``) linked the same way: ``test/accuracy``.

Every pretraining run is a row of the table with its MLflow status (FINISHED, FAILED, KILLED, RUNNING); the plots
show FINISHED runs only, unless ``include_unfinished``: a failed or running run's last loss is no final loss.
Child runs (tag ``mlflow.parentRunId``) are left out, except a sweep's refit (tag ``sweep.role=refit``), the
model the paper's lr procedure produces; the sweep's trials stay out. Where a
pretraining run has several probes (or fine-tunings), the newest one (by start time) that holds
``test/accuracy`` is taken. Probe and fine-tuning runs are looked up in the same experiment.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from igpt.config import TrackingConfig
from igpt.errors import UserError
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.model import config as model_config
from igpt.storage import Loc
from igpt.track.tags import (
    TAG_COMPARED_RUN_IDS,
    TAG_JOB,
    TAG_PARENT,
    TAG_PRETRAIN_RUN_ID,
    TAG_RANDOM_INIT,
    TAG_SWEEP_ROLE,
)


@dataclass
class CompareJobConfig:
    """Compare pretraining runs recorded in MLflow (igpt.track.compare): one row per pretraining run (size, objective,
    IR, parameters, steps, training compute, final validation loss, best probe layer and accuracy, the random-init
    twin's accuracy, fine-tuning accuracy, MLflow status), printed and written as CSV and Markdown with plots
    (of FINISHED runs unless include_unfinished), and logged as an MLflow run with tag igpt.job=compare."""

    name: str = _help("compare run name (MLflow) and folder: <storage_path>/<name>/ gets table.csv, table.md and "
                      "plots/", default="compare")
    storage_path: PathStr = _help("folder for the tables and plots; the default MLflow store is "
                                  "<storage_path>/mlflow.db", default="runs")
    # '%%': the help text goes through argparse's %-formatting
    name_like: str = _help("only pretraining runs whose name matches this SQL LIKE pattern ('%%' any characters, "
                           "'_' one), e.g. 'debug%%'; empty: all", default="")
    tag: str = _help("only pretraining runs with these tags: key=value, several separated by commas (all must "
                     "hold); empty: no tag filter", default="")
    filter: str = _help("a further MLflow search filter on the pretraining runs, ANDed with the others, e.g. "
                        "\"params.`model.objective` = 'ar'\"; empty: none", default="")
    include_unfinished: bool = _help("also plot pretraining runs whose MLflow status is not FINISHED (failed, "
                                     "killed, still running); the table lists every run with its status",
                                     default=False)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        for item in (t.strip() for t in self.tag.split(",")):
            if item and ("=" not in item or not item.split("=", 1)[0].strip()):
                raise ValueError(f"tag: expected key=value (several separated by commas), got {item!r}")
        if not self.name or self.name.startswith("/") or ".." in self.name.split("/"):
            raise ValueError(f"name must be a relative folder name, got {self.name!r}")


PLOTS = ("val_loss_vs_params.png", "val_loss_vs_compute.png", "probe_accuracy_by_depth.png", "loss_curves.png")


@dataclass
class Row:
    """One pretraining run and what was measured of it."""

    name: str
    run_id: str
    status: str | None = None  # MLflow's: FINISHED, FAILED, KILLED, RUNNING, SCHEDULED
    size: str | None = None
    objective: str | None = None
    resolution: int | None = None
    n_layer: int | None = None
    d_model: int | None = None
    params: int | None = None
    non_embedding_params: int | None = None  # N of the scaling laws: blocks and final norm
    steps: int | None = None
    global_batch: int | None = None
    tokens: int | None = None
    compute_flops: float | None = None
    final_val_loss: float | None = None
    final_val_step: int | None = None
    best_layer: int | None = None
    best_layer_relative: float | None = None
    probe_test_accuracy: float | None = None
    probe_run_id: str | None = None
    pixels_test_accuracy: float | None = None
    random_init_test_accuracy: float | None = None
    random_init_run_id: str | None = None
    finetune_test_accuracy: float | None = None
    finetune_run_id: str | None = None
    lr: float | None = None
    lr_swept: bool = False  # the rate is the best of this size's own sweep (a refit), not one given for all sizes
    tokens_per_s: float | None = None  # the last logged train/tokens_per_s
    data_wait_share: float | None = None  # share of step time blocked on data (summary/data_wait_share)

    @property
    def lr_text(self) -> str | None:
        return None if self.lr is None else f"{self.lr:g} ({'swept' if self.lr_swept else 'not swept'})"


@dataclass
class Comparison:
    rows: list[Row]
    filter_string: str
    # run id -> metric -> [(step, value)] sorted by step: val/loss and train/loss of pretraining runs
    losses: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    # pretraining run id -> [(layer, best val accuracy)] of its probe / of its random-init twin probe
    probe_by_layer: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    twin_by_layer: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def non_embedding_params(n_layer: int | None, d_model: int | None) -> int | None:
    """N of the scaling laws (``ModelConfig.non_embedding_params``) from the logged shape."""
    return None if None in (n_layer, d_model) else model_config.non_embedding_params(n_layer, d_model)


# ---------------------------------------------------------------------------------------------- MLflow queries


def _quote(value: str) -> str:
    """A string literal of MLflow's filter language."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(f"a filter value cannot hold both quote characters: {value!r}")


def tag_pairs(tag: str) -> list[tuple[str, str]]:
    """``"team=vision,data=imagenet"`` -> [("team", "vision"), ("data", "imagenet")]; empty -> []."""
    pairs = []
    for item in (t.strip() for t in tag.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"tag: expected key=value (several separated by commas), got {item!r}")
        if "`" in key:
            raise UserError(f"tag: a tag key cannot hold a backtick: {key!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def pretrain_filter(name_like: str = "", tag: str = "", extra: str = "") -> str:
    """The MLflow filter string that selects the pretraining runs: the job tag, the name pattern (SQL LIKE:
    ``%`` any run of characters, ``_`` one), the tags, and any further filter, all ANDed."""
    parts = [f"tags.`{TAG_JOB}` = 'pretrain'"]
    if name_like:
        parts.append(f"attributes.run_name LIKE {_quote(name_like)}")
    parts += [f"tags.`{k}` = {_quote(v)}" for k, v in tag_pairs(tag)]
    if extra.strip():
        parts.append(extra.strip())
    return " and ".join(parts)


def experiment_id(client, name: str) -> str:
    """The id of an active experiment, or a ValueError naming the experiments the store has."""
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments())
        state = "not found" if exp is None else "deleted"
        raise UserError(f"experiment {name!r} {state} in the MLflow store {client.tracking_uri}; "
                         f"its experiments: {', '.join(map(repr, names)) or 'none'}")
    return exp.experiment_id


def search(client, experiment_ids: list[str], filter_string: str, page_size: int = 1000) -> list:
    """Every run (active ones) matching the filter, all pages. A filter MLflow rejects is a ValueError that
    quotes it."""
    from mlflow.exceptions import MlflowException

    runs, token = [], None
    while True:
        try:
            page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=page_size,
                                      order_by=["attributes.start_time ASC"], page_token=token)
        except MlflowException as e:
            if e.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
                raise UserError(f"MLflow rejected the search filter {filter_string!r}: {e.message}") from None
            raise
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _top_level(runs: list) -> list:
    return [r for r in runs if TAG_PARENT not in r.data.tags]


def _results(runs: list) -> list:
    """The pretraining runs that are results: top-level runs and a sweep's refit (the paper's procedure's model,
    nested under the sweep and tagged ``sweep.role=refit``); a sweep's trials are steps of the search, left out."""
    return [r for r in runs if TAG_PARENT not in r.data.tags or r.data.tags.get(TAG_SWEEP_ROLE) == "refit"]


def _int(params: dict, key: str) -> int | None:
    try:
        return int(float(params[key]))
    except (KeyError, TypeError, ValueError):
        return None


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """A metric's history as (step, value) by step; a step logged more than once keeps its latest value."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(s, latest[s][1]) for s in sorted(latest)]


def depth(layer: int | None, n_layer: int | None, logged: float | None = None) -> float | None:
    """Relative depth of probe layer ``layer`` of an ``n_layer``-block model: layer / L. Feature l is taken after
    l blocks, so layer 0 (the embeddings) is depth 0 and layer L (the final norm's output) depth 1. ``logged``
    (the probe's own ``best_layer_relative``) is the fallback where the layer count is unknown."""
    if layer is None or not n_layer:
        return logged
    return layer / n_layer


def _newest_with(runs: list, metric: str):
    """The newest run (by start time) holding ``metric``, or None."""
    having = [r for r in runs if metric in r.data.metrics]
    return max(having, key=lambda r: (r.info.start_time or 0, r.info.run_id)) if having else None


def collect(client, exp_id: str, name_like: str = "", tag: str = "", extra_filter: str = "") -> Comparison:
    """Query MLflow and build the rows (sorted by parameter count, then name) and the histories to plot."""
    flt = pretrain_filter(name_like, tag, extra_filter)
    pretrain = _results(search(client, [exp_id], flt))
    linked: dict[str, dict[str, list]] = {}  # pretraining run id -> job -> runs
    for job in ("probe", "finetune"):
        for r in _top_level(search(client, [exp_id], f"tags.`{TAG_JOB}` = '{job}'")):
            pid = r.data.tags.get(TAG_PRETRAIN_RUN_ID)
            if pid:
                linked.setdefault(pid, {}).setdefault(job, []).append(r)
    cmp = Comparison(rows=[], filter_string=flt)
    for run in pretrain:
        rid, p = run.info.run_id, run.data.params
        row = Row(name=run.info.run_name or rid, run_id=rid, status=run.info.status, size=p.get("model.size"),
                  objective=p.get("model.objective"), resolution=_int(p, "model.resolution"),
                  n_layer=_int(p, "model.n_layer"), d_model=_int(p, "model.d_model"), params=_int(p, "model.params"),
                  steps=_int(p, "steps.total"), global_batch=_int(p, "optim.global_batch"),
                  lr=float(p["optim.lr"]) if p.get("optim.lr") not in (None, "None") else None,
                  lr_swept=run.data.tags.get(TAG_SWEEP_ROLE) == "refit")
        row.non_embedding_params = non_embedding_params(row.n_layer, row.d_model)
        row.tokens_per_s = run.data.metrics.get("train/tokens_per_s")
        row.data_wait_share = run.data.metrics.get("summary/data_wait_share", run.data.metrics.get(
            "train/data_wait_share"))
        row.tokens, row.compute_flops = model_config.train_compute(row.n_layer, row.d_model, row.resolution, row.steps,
                                                      row.global_batch, _int(p, "model.n_colors"))
        cmp.losses[rid] = {k: _history(client, rid, k) for k in ("val/loss", "train/loss")}
        if cmp.losses[rid]["val/loss"]:
            row.final_val_step, row.final_val_loss = cmp.losses[rid]["val/loss"][-1]  # the largest step's value
        probes = linked.get(rid, {}).get("probe", [])
        twin = _newest_with([r for r in probes if r.data.tags.get(TAG_RANDOM_INIT, "").lower() == "true"],
                            "test/accuracy")
        probe = _newest_with([r for r in probes if r.data.tags.get(TAG_RANDOM_INIT, "").lower() != "true"],
                             "test/accuracy")
        if probe is not None:
            m = probe.data.metrics
            row.probe_run_id, row.probe_test_accuracy = probe.info.run_id, m["test/accuracy"]
            row.best_layer = int(m["best_layer"]) if "best_layer" in m else None
            row.best_layer_relative = depth(row.best_layer, row.n_layer, m.get("best_layer_relative"))
            row.pixels_test_accuracy = m.get("baseline/pixels_test_accuracy")
            cmp.probe_by_layer[rid] = _history(client, probe.info.run_id, "val/accuracy_by_layer")
        if twin is not None:
            row.random_init_run_id, row.random_init_test_accuracy = twin.info.run_id, twin.data.metrics["test/accuracy"]
            cmp.twin_by_layer[rid] = _history(client, twin.info.run_id, "val/accuracy_by_layer")
        ft = _newest_with(linked.get(rid, {}).get("finetune", []), "test/accuracy")
        if ft is not None:
            row.finetune_run_id, row.finetune_test_accuracy = ft.info.run_id, ft.data.metrics["test/accuracy"]
        cmp.rows.append(row)
    cmp.rows.sort(key=lambda r: (r.params is None, r.params or 0, r.name))
    return cmp


# ---------------------------------------------------------------------------------------------------- tables


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:g}"


def _f(fmt: str):
    return lambda x: "-" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


# (header, Row field, formatter, right-aligned) of the printed and Markdown tables
COLUMNS = [
    ("name", "name", str, False),
    ("status", "status", lambda x: x or "-", False),
    ("size", "size", lambda x: x or "-", False),
    ("objective", "objective", lambda x: x or "-", False),
    ("IR", "resolution", _f("d"), True),
    ("params", "params", _si, True),
    ("N (non-emb.)", "non_embedding_params", _si, True),
    ("steps", "steps", _f(",d"), True),
    ("compute (FLOPs)", "compute_flops", _f(".3g"), True),
    ("lr", "lr_text", lambda x: x or "-", True),
    ("final val loss", "final_val_loss", _f(".4f"), True),
    ("tokens/s", "tokens_per_s", _si, True),
    ("data wait", "data_wait_share", _pct, True),
    ("probe layer", "best_layer", _f("d"), True),
    ("probe depth", "best_layer_relative", _f(".2f"), True),
    ("probe acc", "probe_test_accuracy", _pct, True),
    ("random-init acc", "random_init_test_accuracy", _pct, True),
    ("fine-tune acc", "finetune_test_accuracy", _pct, True),
]
NOTES = ("lr: swept = the best of the size's own sweep (its refit), not swept = one rate given (sizes compared "
         "at one rate are confounded); compute = the model's FLOPs per token (attention included, as MFU counts "
         "them) × tokens, tokens = steps × global batch × IR²; N (non-emb.): parameters less the embeddings and "
         "output head; final val loss: `val/loss` at the largest step; tokens/s: the last logged; data wait: the "
         "share of step time the slowest rank waited on its next batch (the run's, past its first logged window); "
         "probe layer: 0 .. L for L blocks (0: the embeddings, L: the final norm's output), depth = layer / L; "
         "accuracies on the test split (probe: the newest trained-weights probe; random-init: its random-init "
         "twin); status: the pretraining run's in MLflow (plots show "
         "FINISHED runs only unless --include_unfinished)")


def _cells(rows: list[Row]) -> list[list[str]]:
    return [[fmt(getattr(r, key)) for _, key, fmt, _ in COLUMNS] for r in rows]


def text_table(rows: list[Row]) -> str:
    """The table aligned for a terminal."""
    cells = _cells(rows)
    heads = [h for h, *_ in COLUMNS]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]

    def line(values):
        return "  ".join(v.rjust(w) if COLUMNS[i][3] else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=False))).rstrip()

    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(c) for c in cells])


def markdown_table(rows: list[Row]) -> str:
    heads = [h for h, *_ in COLUMNS]
    out = ["| " + " | ".join(heads) + " |",
           "|" + "|".join("---:" if right else "---" for *_, right in COLUMNS) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in _cells(rows)]
    return "\n".join(out) + f"\n\n{NOTES}\n"


def write_csv(rows: list[Row], path: Path) -> None:
    """Every field of every row, unformatted (empty where unknown)."""
    names = list(Row.__dataclass_fields__)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in asdict(r).items()})


# ----------------------------------------------------------------------------------------------------- plots


def _figure(size=(6.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)  # Agg, with no global backend set
    return fig, fig.add_subplot()


def _save(fig, ax, path: Path, empty: str | None) -> None:
    if empty:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="grey")
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _scatter_loss(rows: list[Row], x_field: str, xlabel: str, path: Path) -> None:
    fig, ax = _figure()
    pts = [r for r in rows if getattr(r, x_field) and r.final_val_loss is not None]
    for (objective, ir), sel in groups(pts).items():  # one series per objective and IR: never one curve
        ax.plot([getattr(r, x_field) for r in sel], [r.final_val_loss for r in sel],
                {"ar": "o-", "bert": "s--"}.get(objective, "^:"), label=f"{objective or 'other'} IR {ir or '?'}")
    for r in pts:
        ax.annotate(r.name, (getattr(r, x_field), r.final_val_loss), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    if pts:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels overlap on narrow ranges
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation loss (nats/token)")
    _save(fig, ax, path, None if pts else "no run with both values")


def groups(rows: list[Row]) -> dict[tuple, list[Row]]:
    """Rows by (objective, IR), each sorted by N: a loss is comparable across sizes only within one (an AR and a
    BERT loss are different quantities; IR 32 and IR 64 are different tasks)."""
    out: dict[tuple, list[Row]] = {}
    for r in rows:
        out.setdefault((r.objective, r.resolution), []).append(r)
    return {k: sorted(v, key=lambda r: r.non_embedding_params or 0) for k, v in out.items()}


def fits_text(rows: list[Row], n_boot: int = 1000) -> str:
    """L(N) and L(C) per (objective, IR) over its FINISHED rows with a loss (``igpt.track.study_report``'s fit:
    the floor form where 4+ sizes allow it, else the pure power law, else why not), one line each."""
    from igpt.track.study_report import fit_best, fit_line

    lines = []
    for (objective, ir), sel in groups([r for r in rows if r.final_val_loss and r.status == "FINISHED"]).items():
        swept = all(r.lr_swept for r in sel)
        lines.append(f"{objective or 'other'} IR {ir or '?'} ({len(sel)} runs"
                     + ("" if swept else "; rates not swept per size: confounded") + "):")
        for var, key in (("N", "non_embedding_params"), ("C", "compute_flops")):
            have = [r for r in sel if getattr(r, key)]
            fit, said = fit_best([float(getattr(r, key)) for r in have], [r.final_val_loss for r in have], var,
                             n_boot, 0) if have else (None, "no run with this value")
            lines.append("  " + fit_line(var, fit, said))
    return "\n".join(lines)


def plotted_rows(rows: list[Row], include_unfinished: bool = False) -> list[Row]:
    """The rows the plots show: FINISHED runs, or every row with ``include_unfinished`` (a failed, killed or
    running run's last loss and probe are no final results, so they stay in the table only)."""
    return list(rows) if include_unfinished else [r for r in rows if r.status == "FINISHED"]


def plots(cmp: Comparison, folder: Path, include_unfinished: bool = False) -> list[Path]:
    """The four plots (names in ``PLOTS``) of :func:`plotted_rows`; a plot with nothing to show says so instead
    of being left out."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in PLOTS]
    rows = plotted_rows(cmp.rows, include_unfinished)
    _scatter_loss(rows, "non_embedding_params", "non-embedding parameters N", paths[0])
    _scatter_loss(rows, "compute_flops", "training compute (FLOPs: the model's FLOPs per token × tokens)", paths[1])

    fig, ax = _figure()
    drawn = False
    for i, r in enumerate(rows):
        for curves, style, label in ((cmp.probe_by_layer, "o-", r.name), (cmp.twin_by_layer, "x--",
                                                                           f"{r.name} (random init)")):
            pts = curves.get(r.run_id) or []
            if pts and r.n_layer:
                ax.plot([depth(layer, r.n_layer) for layer, _ in pts], [v for _, v in pts], style, color=f"C{i}",
                        label=label)
                drawn = True
    ax.set_xlabel("relative depth layer / L (0: embeddings, 1: final norm output)")
    ax.set_ylabel("probe validation accuracy")
    _save(fig, ax, paths[2], None if drawn else "no probe runs with per-layer accuracy")

    fig, ax = _figure((7.0, 4.5))
    drawn = False
    for i, r in enumerate(rows):
        train, val = cmp.losses.get(r.run_id, {}).get("train/loss"), cmp.losses.get(r.run_id, {}).get("val/loss")
        if train:
            ax.plot(*zip(*train, strict=False), "-", color=f"C{i}", alpha=0.45, lw=1, label=f"{r.name} train")
        if val:
            ax.plot(*zip(*val, strict=False), "o-", color=f"C{i}", ms=3, label=f"{r.name} val")
        drawn = drawn or bool(train or val)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    _save(fig, ax, paths[3], None if drawn else "no loss histories")
    return paths


# ------------------------------------------------------------------------------------------------------- job


def run(cfg) -> dict:
    """The compare job (``CompareJobConfig``): query, print, write ``<storage_path>/<name>/`` (table.csv, table.md,
    plots/*.png) and log them to a new MLflow run (tag ``igpt.job=compare``) in the same experiment."""
    from mlflow.tracking import MlflowClient

    from igpt import cli
    from igpt.track.tracking import JobRun, default_tracking_uri

    uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.storage_path)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise UserError(f"no MLflow store at {uri[len('sqlite:///'):]} (name one with --tracking.tracking_uri)")
    client = MlflowClient(uri)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    cmp = collect(client, exp_id, cfg.name_like, cfg.tag, cfg.filter)
    if not cmp.rows:
        raise UserError(f"no pretraining runs (top-level) in experiment {cfg.tracking.experiment!r} of {uri} "
                         f"match {cmp.filter_string!r}")
    out = Loc(cfg.storage_path) / cfg.name  # a folder or s3://… / gs://…: the files are staged here, then put
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        write_csv(cmp.rows, stage / "table.csv")
        (stage / "table.md").write_text(markdown_table(cmp.rows))
        fits = fits_text(cmp.rows)
        (stage / "fits.txt").write_text(fits + "\n")
        plot_paths = [(out / "plots" / p.name) for p in plots(cmp, stage / "plots", cfg.include_unfinished)]
        with JobRun.open(replace(cfg.tracking, tracking_uri=uri), cfg.storage_path, cfg.name, "compare",
                         cli.to_dict(cfg)) as job:
            # the runs it compared: ids in a tag, links (the UI's run pages) in the run's description
            job.set_tags({"igpt.track.compare.filter": cmp.filter_string[:5000],
                          TAG_COMPARED_RUN_IDS: ",".join(r.run_id for r in cmp.rows)[:5000],
                          "mlflow.note.content": "Compared runs:\n\n" + "\n".join(
                              f"- [{r.name}](#/experiments/{exp_id}/runs/{r.run_id}) ({r.status})" for r in cmp.rows)})
            job.log_metric("compare/runs", len(cmp.rows))
            for name in ("table.csv", "table.md", "fits.txt"):
                job.log_artifact(stage / name)
            job.log_artifacts(stage / "plots", "plots")
        out.put_files(stage)
        (out / "plots").put_files(stage / "plots")
    plotted = [r.run_id for r in plotted_rows(cmp.rows, cfg.include_unfinished)]
    left_out = ", ".join(f"{r.name} ({r.status})" for r in cmp.rows if r.run_id not in plotted)
    left_out = f"not plotted (not FINISHED; --include_unfinished plots them): {left_out}\n" if left_out else ""
    run_id = job.run_id
    print(f"{len(cmp.rows)} pretraining runs of experiment {cfg.tracking.experiment!r} at {uri}\n"
          f"filter: {cmp.filter_string}\n\n{text_table(cmp.rows)}\n\n{fits}\n\n"
          f"table: {out / 'table.csv'}, {out / 'table.md'}\n"
          f"plots: {', '.join(str(p) for p in plot_paths)}\n"
          f"{left_out}"
          f"MLflow run {run_id} (tag igpt.job=compare) with table.csv, table.md and plots/")
    return {"rows": cmp.rows, "filter": cmp.filter_string, "storage_path": str(out), "csv": str(out / "table.csv"),
            "markdown": str(out / "table.md"), "plots": [str(p) for p in plot_paths], "run_id": run_id,
            "plotted": plotted, "tracking_uri": uri, "experiment_id": exp_id}
