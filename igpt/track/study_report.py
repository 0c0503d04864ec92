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
    features: str | None = None  # its feature set: the test split's per-image losses (paired loss differences)
    predictions: str | None = None  # its probe's test_predictions.npz: each test image right or wrong (McNemar)

    @property
    def bits_per_token(self) -> float:
        return self.val_loss / math.log(2)


def fit_best(x, loss, variable: str, n_boot: int, seed: int) -> tuple[laws.LawFit | None, str]:
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
            "residual_sd_log": fit.residual_sd, "bootstrap": fit.bootstrap,
            "notes": fit.notes + ([said] if said else []), "n": len(fit.x)}


def verdict_scale(rungs: list[Rung], pairs: list[dict] | None = None) -> str:
    """Does the loss fall with size across the ladder? From the paired tests of each step where they exist
    (:func:`_pairs`); one rate for all sizes, or a best rate at the edge of its grid, is a known confound, so a
    loss that does not fall is then "confounded", not "disagrees". Without per-image losses, the means only, and
    the verdict says it rests on no noise estimate."""
    if len(rungs) < 2:
        return "one rung: nothing to compare"
    ordered = sorted(rungs, key=lambda r: r.non_embedding_params)
    edges = [r.label for r in rungs if r.edge_warning]
    confound = ("one learning rate for every size (not swept per size, as the paper does)"
                if not all(r.lr_swept for r in rungs) else
                f"the best rate of {', '.join(edges)} is at an end of its grid (the optimum may lie outside)"
                if edges else None)
    tested = [p["loss"] for p in pairs or [] if "found" in p.get("loss", {})]
    if len(tested) == len(ordered) - 1:
        found = [t["found"] for t in tested]
        what = ("the larger model's loss is lower at every step (paired 95% intervals below 0)"
                if all(f == "lower" for f in found) else
                f"steps: {', '.join(found)} (paired 95% intervals of the per-image loss difference)")
        if all(f == "lower" for f in found):
            return f"agrees: {what}" + (f" (though {confound})" if confound else "")
        if confound:
            return f"confounded: {confound}; {what}"
        return f"disagrees: {what}" if "higher" in found else f"inconclusive: {what}"
    falls = all(b.val_loss < a.val_loss for a, b in zip(ordered, ordered[1:], strict=False))
    what = ("mean loss falls with size" if falls else "mean loss does not fall monotonically with size") + \
        " (no paired test: per-image losses missing; no noise estimate)"
    return f"confounded: {confound}; {what}" if confound else ("agrees: " if falls else "inconclusive: ") + what


def build(rungs: list[Rung], folder: Path, *, title: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """Write report.md, fits.json and plots/ into ``folder``; returns fits.json's content."""
    folder.mkdir(parents=True, exist_ok=True)
    rungs = sorted(rungs, key=lambda r: r.non_embedding_params)
    n = [float(r.non_embedding_params) for r in rungs]
    c = [float(r.compute_flops) for r in rungs]
    loss = [r.val_loss for r in rungs]
    fit_n, said_n = fit_best(n, loss, "N", n_boot, seed)
    fit_c, said_c = fit_best(c, loss, "C", n_boot, seed)
    fc_n, why_n = _forecast(n, loss, "N", n_boot, seed)
    fc_c, why_c = _forecast(c, loss, "C", n_boot, seed)
    out = {"title": title, "rungs": [asdict(r) for r in rungs], "unit": "nats per pixel token",
           "fits": {"N": _fit_dict(fit_n, said_n), "C": _fit_dict(fit_c, said_c)},
           "forecast": {"N": _forecast_dict(fc_n, why_n), "C": _forecast_dict(fc_c, why_c)},
           "probe": _probe_relation(rungs), "pairs": _pairs(rungs, seed)}
    out["verdict_scale"] = verdict_scale(rungs, out["pairs"])
    (folder / "fits.json").write_text(json.dumps(out, indent=2, default=float))
    (folder / "report.md").write_text(markdown(out, (fit_n, said_n), (fit_c, said_c), fc_n, fc_c))
    _plots(rungs, fit_n, fit_c, folder / "plots")
    return out


def paired_loss(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], n_boot: int = 2000,
                seed: int = 0) -> dict:
    """Mean per-image loss difference b − a over the images both were scored on (``(losses, keys)`` each), with a
    95% paired bootstrap interval (images resampled, the pairs kept together)."""
    da, db = dict(zip(a[1].tolist(), a[0].tolist(), strict=True)), dict(zip(b[1].tolist(), b[0].tolist(), strict=True))
    common = sorted(set(da) & set(db))
    if len(common) < 2:
        raise ValueError(f"the two models share {len(common)} scored images: no paired comparison")
    d = np.array([db[k] - da[k] for k in common])
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"images": len(common), "diff": float(d.mean()), "diff_95": [float(lo), float(hi)],
            "unshared": len(set(da) ^ set(db))}


def mcnemar(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> dict:
    """McNemar's exact test of two classifiers on the same test images (``(correct, keys)`` each): of the images
    exactly one gets right, is the split further from even than chance allows (two-sided binomial p)?"""
    from scipy.stats import binomtest

    ca, cb = dict(zip(a[1].tolist(), a[0].tolist(), strict=True)), dict(zip(b[1].tolist(), b[0].tolist(), strict=True))
    common = sorted(set(ca) & set(cb))
    only_b = sum(1 for k in common if cb[k] and not ca[k])
    only_a = sum(1 for k in common if ca[k] and not cb[k])
    p = binomtest(only_b, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"images": len(common), "acc_diff": (only_b - only_a) / len(common) if common else 0.0,
            "only_larger_right": only_b, "only_smaller_right": only_a, "p": float(p)}


def _pairs(rungs: list[Rung], seed: int) -> list[dict]:
    """Each rung against the next larger one, on the same test images: the loss difference with its paired
    interval, the probe's with McNemar's p, and a verdict that names a known confound instead of disagreeing."""
    from igpt.eval import features as feats

    out = []
    for a, b in zip(rungs, rungs[1:], strict=False):
        row: dict = {"smaller": a.label, "larger": b.label}
        confound = None if a.lr_swept and b.lr_swept else "one learning rate for both (not swept per size)"
        if confound is None and (a.edge_warning or b.edge_warning):
            confound = "a best rate at an end of its sweep's grid"
        if a.features and b.features:
            try:
                pl = paired_loss(feats.load_losses(a.features), feats.load_losses(b.features), seed=seed)
                lo, hi = pl["diff_95"]
                found = "lower" if hi < 0 else "higher" if lo > 0 else "no difference detected"
                row["loss"] = {**pl, "found": found,
                               "verdict": "agrees" if found == "lower" else f"confounded ({confound})" if confound
                               else "disagrees" if found == "higher" else "inconclusive"}
            except (KeyError, ValueError, OSError) as e:  # an older feature set without losses: said, not guessed
                row["loss"] = {"error": str(e)}
        if a.predictions and b.predictions:
            za, zb = load_predictions(a.predictions), load_predictions(b.predictions)
            mc = mcnemar((za["correct"], za["keys"]), (zb["correct"], zb["keys"]))
            found = ("better" if mc["acc_diff"] > 0 else "worse") if mc["p"] < 0.05 else "no difference detected"
            row["probe"] = {**mc, "found": found,
                            "verdict": "agrees" if found == "better" else f"confounded ({confound})" if confound
                            else "disagrees" if found == "worse" else "inconclusive"}
        out.append(row)
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
    lines += ["", "## Scaling laws (95% bootstrap intervals: rungs resampled, or residuals where too few rungs)", "",
              "- " + fit_line("N", *law_n), "- " + fit_line("C", *law_c),
              "", "## Forecast check (largest rung held out)", ""]
    for var, fc in (("N", fc_n), ("C", fc_c)):
        lines.append("- " + (fc.line(var) if fc is not None else f"{var}: not made: {out['forecast'][var]['reason']}"))
    lines += ["", "## Each rung against the next larger (paired, on the same test images)", "",
              "| smaller → larger | test images | loss diff (nats/token) [95% paired bootstrap] | verdict | probe acc "
              "diff | McNemar p | verdict |", "|---|---:|---|---|---:|---:|---|"]
    for pr in out["pairs"]:
        loss, probe = pr.get("loss", {}), pr.get("probe", {})
        lines.append("| " + " | ".join([
            f"{pr['smaller']} → {pr['larger']}", str(loss.get("images", probe.get("images", "-"))),
            f"{loss['diff']:+.4f} [{loss['diff_95'][0]:+.4f}, {loss['diff_95'][1]:+.4f}]" if "diff" in loss
            else loss.get("error", "-"), loss.get("verdict", "-"),
            f"{100 * probe['acc_diff']:+.1f} pts" if probe else "-", f"{probe['p']:.3g}" if probe else "-",
            probe.get("verdict", "-")]) + " |")
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


def load_predictions(path: str) -> dict:
    """A probe's ``test_predictions.npz`` (keys, each test image right or wrong), local or on object storage."""
    import io

    from igpt.storage import Loc

    with np.load(io.BytesIO(Loc(path).read_bytes())) as z:
        return {k: z[k] for k in z.files}
