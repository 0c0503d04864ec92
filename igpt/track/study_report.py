"""A scaling study's report: the rungs' table, L(N) and L(C) fitted with intervals, the forecast check, the probe
against size and loss, and the verdicts a known confound qualifies. Plain data in, files out (report.md,
fits.json, plots/): ``pipelines.study`` logs them to the study's MLflow run, and tests call it on made-up rungs.

Units: validation loss in nats per pixel token (one token is one pixel's palette colour); the bits per pixel token
are it / ln 2. Neither is the literature's bits/dim (three 8-bit channels of an unquantized pixel).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from igpt.track import laws

PLOTS = ("loss_vs_N.png", "loss_vs_C.png", "probe_vs_N.png", "probe_vs_loss.png")


@dataclass
class Rung:
    """One finished rung: its model, its compute, the rate it ran at and what it measured."""

    label: str
    non_embedding_params: int  # N of the laws
    compute_flops: float  # C: the model's FLOPs per token x tokens trained (the refit's, for a swept rung)
    val_loss: float  # final validation loss of the rung's model (nats per pixel token)
    lr: float
    lr_swept: bool  # the rate is the best of this rung's own sweep (else one rate was given for every rung)
    probe_test_accuracy: float | None = None
    best_layer: int | None = None
    n_layer: int | None = None
    pixels_test_accuracy: float | None = None
    random_init_test_accuracy: float | None = None
    edge_warning: str | None = None  # the sweep's best rate at an end of its grid

    @property
    def bits_per_token(self) -> float:
        return self.val_loss / math.log(2)


def _fit(x, loss, variable: str, n_boot: int, seed: int) -> tuple[laws.LawFit | None, str]:
    """The floor form where the rungs allow it, else the pure power law, else why not: (fit, what was done)."""
    for floor in (True, False):
        try:
            fit = laws.fit_law(x, loss, variable, floor=floor, n_boot=n_boot, seed=seed)
        except laws.TooFewRungs as e:
            reason = str(e)
            continue
        said = "" if floor else f"L∞ not fitted ({len(set(x))} rungs; the floor form needs {laws.min_rungs(True)})"
        return fit, said
    return None, reason


def _forecast(x, loss, variable: str, n_boot: int, seed: int) -> tuple[laws.Forecast | None, str]:
    for floor in (True, False):
        try:
            return laws.forecast_largest(x, loss, variable, floor=floor, n_boot=n_boot, seed=seed)[1], \
                ("" if floor else "pure power law fitted to the others (too few for L∞)")
        except laws.TooFewRungs as e:
            reason = str(e)
    return None, reason


def _fit_dict(fit: laws.LawFit | None, said: str) -> dict:
    if fit is None:
        return {"fitted": False, "reason": said}
    return {"fitted": True, "form": fit.form, "alpha": fit.alpha, "alpha_95": list(fit.intervals["alpha"]),
            "x0": fit.x0, "x0_95": list(fit.intervals["x0"]), "l_inf": fit.l_inf if fit.l_inf_identified else None,
            "l_inf_text": fit.l_inf_text(), "l_inf_95": list(fit.intervals.get("l_inf", ())),
            "residual_sd_log": fit.residual_sd, "notes": fit.notes + ([said] if said else []), "n": len(fit.x)}


def verdict_scale(rungs: list[Rung]) -> str:
    """Whether loss falls with size across the ladder, and what qualifies it: one rate for all sizes is a known
    confound (the paper sweeps it per size), so a loss that does not fall is "confounded", not "disagrees"."""
    if len(rungs) < 2:
        return "one rung: nothing to compare"
    ordered = sorted(rungs, key=lambda r: r.non_embedding_params)
    falls = all(b.val_loss < a.val_loss for a, b in zip(ordered, ordered[1:], strict=False))
    if not all(r.lr_swept for r in rungs):
        return ("confounded: one learning rate for every size (not swept per size, as the paper does); "
                + ("loss falls with size" if falls else "loss does not fall monotonically with size"))
    edges = [r.label for r in rungs if r.edge_warning]
    if edges:
        return (f"confounded: the best rate of {', '.join(edges)} is at an end of its grid (the optimum may lie "
                "outside); " + ("loss falls with size" if falls else "loss does not fall monotonically with size"))
    return "agrees: loss falls with size at every step" if falls else \
        "disagrees: loss does not fall monotonically with size, each rate swept"


def build(rungs: list[Rung], folder: Path, *, title: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """Write report.md, fits.json and plots/ into ``folder``; returns fits.json's content."""
    folder.mkdir(parents=True, exist_ok=True)
    rungs = sorted(rungs, key=lambda r: r.non_embedding_params)
    n = [float(r.non_embedding_params) for r in rungs]
    c = [float(r.compute_flops) for r in rungs]
    loss = [r.val_loss for r in rungs]
    fit_n, said_n = _fit(n, loss, "N", n_boot, seed)
    fit_c, said_c = _fit(c, loss, "C", n_boot, seed)
    fc_n, why_n = _forecast(n, loss, "N", n_boot, seed)
    fc_c, why_c = _forecast(c, loss, "C", n_boot, seed)
    out = {"title": title, "rungs": [asdict(r) for r in rungs], "unit": "nats per pixel token",
           "fits": {"N": _fit_dict(fit_n, said_n), "C": _fit_dict(fit_c, said_c)},
           "forecast": {"N": _forecast_dict(fc_n, why_n), "C": _forecast_dict(fc_c, why_c)},
           "verdict_scale": verdict_scale(rungs), "probe": _probe_relation(rungs)}
    (folder / "fits.json").write_text(json.dumps(out, indent=2, default=float))
    (folder / "report.md").write_text(markdown(out, (fit_n, said_n), (fit_c, said_c), fc_n, fc_c))
    _plots(rungs, fit_n, fit_c, folder / "plots")
    return out


def _forecast_dict(fc: laws.Forecast | None, why: str) -> dict:
    if fc is None:
        return {"made": False, "reason": why}
    return {"made": True, "x": fc.x, "predicted": fc.predicted, "interval_95": list(fc.interval),
            "measured": fc.measured, "inside": fc.inside, "note": why}


def _probe_relation(rungs: list[Rung]) -> dict:
    """Best-layer probe accuracy against N and against validation loss: Spearman's rank correlation over the rungs
    (with 3 rungs only ±1 or ±0.5 can come out: read it as a direction, not a strength)."""
    have = [r for r in rungs if r.probe_test_accuracy is not None]
    if len(have) < 3:
        return {"rungs": len(have), "note": "fewer than 3 probed rungs: no rank correlation"}
    from scipy.stats import spearmanr

    acc = [r.probe_test_accuracy for r in have]
    return {"rungs": len(have),
            "spearman_vs_N": float(spearmanr([r.non_embedding_params for r in have], acc).statistic),
            "spearman_vs_loss": float(spearmanr([r.val_loss for r in have], acc).statistic)}


def _si(x: float) -> str:
    for div, unit in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def fit_line(variable: str, fit: laws.LawFit | None, said: str) -> str:
    if fit is None:
        return f"L({variable}): not fitted: {said}"
    lo, hi = fit.intervals["alpha"]
    return (f"L({variable}) = {fit.form}: α = {fit.alpha:.3f} [{lo:.3f}, {hi:.3f}], x₀ = {fit.x0:.3g}, "
            f"L∞ {fit.l_inf_text()}" + (f" ({'; '.join(fit.notes + ([said] if said else []))})"
                                       if fit.notes or said else ""))


def markdown(out: dict, law_n: tuple, law_c: tuple, fc_n, fc_c) -> str:
    head = ["rung", "N (non-emb.)", "C (FLOPs)", "lr", "lr swept", "val loss (nats/token)", "bits/token",
            "best layer", "probe test acc", "random-init acc", "pixels acc"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = [f"# {out['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in out["rungs"]:
        lines.append("| " + " | ".join([
            r["label"], _si(r["non_embedding_params"]), _si(r["compute_flops"]), f"{r['lr']:g}",
            "yes" + (" (edge)" if r["edge_warning"] else "") if r["lr_swept"] else "no (one rate for all)",
            f"{r['val_loss']:.4f}", f"{r['val_loss'] / math.log(2):.4f}",
            "-" if r["best_layer"] is None else f"{r['best_layer']}/{r['n_layer']}", pct(r["probe_test_accuracy"]),
            pct(r["random_init_test_accuracy"]), pct(r["pixels_test_accuracy"])]) + " |")
    lines += ["", "## Scaling laws (95% bootstrap intervals over rungs)", "",
              "- " + fit_line("N", *law_n), "- " + fit_line("C", *law_c),
              "", "## Forecast check (largest rung held out)", ""]
    for var, fc in (("N", fc_n), ("C", fc_c)):
        lines.append("- " + (fc.line(var) if fc is not None else f"{var}: not made: {out['forecast'][var]['reason']}"))
    p = out["probe"]
    lines += ["", "## Verdicts", "", f"- size: {out['verdict_scale']}",
              "- probe: " + (f"Spearman ρ of best-layer test accuracy with N {p['spearman_vs_N']:+.2f}, with "
                             f"validation loss {p['spearman_vs_loss']:+.2f} over {p['rungs']} rungs (a direction, "
                             "not a test)" if "spearman_vs_N" in p else p["note"]), ""]
    return "\n".join(lines)


def _plots(rungs: list[Rung], fit_n, fit_c, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for name, xs, fit, label in (("loss_vs_N.png", [r.non_embedding_params for r in rungs], fit_n,
                                  "non-embedding parameters N"),
                                 ("loss_vs_C.png", [r.compute_flops for r in rungs], fit_c,
                                  "training compute C (FLOPs)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, [r.val_loss for r in rungs], "o", label="rungs")
        for x, r in zip(xs, rungs, strict=False):
            ax.annotate(r.label, (x, r.val_loss), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if fit is not None:
            grid = np.geomspace(min(xs) / 1.5, max(xs) * 4, 60)
            band = np.array([fit.predict_interval(g) for g in grid])
            ax.plot(grid, fit.predict(grid), "-", label=f"{fit.form}, α={fit.alpha:.3f}")
            ax.fill_between(grid, band[:, 0], band[:, 1], alpha=0.25, label="95% (bootstrap over rungs)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("final validation loss (nats per pixel token)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
    probed = [r for r in rungs if r.probe_test_accuracy is not None]
    for name, key, label in (("probe_vs_N.png", "non_embedding_params", "non-embedding parameters N"),
                             ("probe_vs_loss.png", "val_loss", "final validation loss (nats per pixel token)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([getattr(r, key) for r in probed], [r.probe_test_accuracy for r in probed], "o-")
        for r in probed:
            ax.annotate(r.label, (getattr(r, key), r.probe_test_accuracy), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        if key == "non_embedding_params":
            ax.set_xscale("log")
        if not probed:
            ax.text(0.5, 0.5, "no probed rung", ha="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("best-layer linear probe test accuracy")
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
