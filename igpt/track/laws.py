"""Scaling laws fitted as the field fits them: L(x) = L∞ + (x₀/x)^α (Henighan et al. 2020), x the non-embedding
parameter count N or the training compute C.

The fit (Hoffmann et al. 2022, approach 3, as Besiroglu et al. 2024 replicated it):

* on log L, with the form written as a log-sum-exp: log L = LSE(e, a − α·u), L∞ = eᵉ, u = log x − mean(log x)
  (centring u only conditions the problem: x₀ = exp(a/α + mean(log x)));
* a Huber loss (δ = 10⁻³) on the residuals of log L, **summed** over the points (Besiroglu et al.: averaging it
  made the published optimiser stop early);
* L-BFGS-B from a grid of starts, the best kept;
* 95% intervals for every parameter and prediction from a bootstrap over the rungs: the rungs are resampled with
  replacement and the law refitted (Besiroglu et al.'s practice), percentiles reported. A resample with too few
  distinct sizes to fit is drawn again: it identifies nothing. Measured on synthetic laws at 5% noise
  (tests/test_laws.py): over 50 seeded replicates the 95% interval of α covered the truth in 100% with 8 rungs,
  but in only 88% with 5 rungs — a case bootstrap of a handful of rungs is optimistic, so read a 4- or 5-rung
  study's intervals as lower bounds on the uncertainty.
* a case bootstrap of very few rungs can draw only a few different resamples that still hold enough sizes to fit
  (4 rungs for the 3-parameter form: one, the rungs themselves, so every interval was zero wide in a 4-rung CIFAR
  study); below 100 different resamples the log-L residuals are resampled about the fit instead (a residual
  bootstrap, residuals scaled by √(n/(n−p))). Measured on the same synthetic laws (50 replicates, 5% noise): α's
  interval covered the truth in 76% with 4 rungs (the case bootstrap: 0%, no width), 90% with 5 (case: 88%), 98%
  with 6 and 96% with 8 (case: 100%, 100%, whose intervals were 40% and 50% wider there, so it stays the default).

What is said plainly instead of a number: fewer rungs than the form has parameters + 1 (:class:`TooFewRungs`);
an L∞ the rungs do not pin down (its bootstrap interval runs into the edge of what it may be: 0, or the lowest
loss measured), reported as unidentified, not as a value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

HUBER_DELTA = 1e-3
# Fewer different case resamples than this and the case bootstrap's percentiles are a few repeated values (4 rungs
# for the floor form: one resample, the rungs themselves): the residual bootstrap is used instead.
MIN_CASE_RESAMPLES = 100
ALPHA_BOUNDS = (1e-4, 5.0)  # the exponent's search range: α > 0 (loss falls with x), and no law is steeper than 5
FLOOR_FORM = "L∞ + (x₀/x)^α"
POWER_FORM = "(x₀/x)^α"


class TooFewRungs(ValueError):
    """A law has more parameters than the rungs can determine with any noise left to estimate."""


def _huber(r: np.ndarray, w: np.ndarray, delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """Σ wᵢ·huber(rᵢ) and wᵢ·huber'(rᵢ). The weights are the bootstrap's resample (how often each rung was drawn),
    so the loss stays a sum over the points fitted; a plain fit weighs every rung 1."""
    a = np.abs(r)
    quad = a <= delta
    value = (w * np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))).sum()
    return float(value), w * np.where(quad, r, delta * np.sign(r))


def _objective_floor(theta: np.ndarray, u: np.ndarray, y: np.ndarray, w: np.ndarray):
    """Huber loss of log L = LSE(e, a − α·u) and its gradient by (a, α, e)."""
    a, alpha, e = theta
    pred = np.logaddexp(e, a - alpha * u)
    value, d = _huber(y - pred, w)
    s_e = np.exp(e - pred)  # ∂pred/∂e; ∂pred/∂a = 1 − s_e, ∂pred/∂α = −u·(1 − s_e)
    s_t = 1.0 - s_e
    return value, -np.array([(d * s_t).sum(), -(d * s_t * u).sum(), (d * s_e).sum()])


def _objective_power(theta: np.ndarray, u: np.ndarray, y: np.ndarray, w: np.ndarray):
    """Huber loss of log L = a − α·u (no L∞) and its gradient by (a, α)."""
    a, alpha = theta
    value, d = _huber(y - (a - alpha * u), w)
    return value, -np.array([d.sum(), -(d * u).sum()])


@dataclass
class _Raw:
    theta: np.ndarray
    loss: float


def _fit_raw(u: np.ndarray, y: np.ndarray, w: np.ndarray, floor: bool, starts: list[np.ndarray]) -> _Raw:
    from scipy.optimize import minimize

    y_min = float(y[w > 0].min())
    if floor:
        fn = _objective_floor
        bounds = [(-50.0, 50.0), ALPHA_BOUNDS, (y_min - 30.0, y_min)]  # L∞ in (0, the lowest loss]
    else:
        fn = _objective_power
        bounds = [(-50.0, 50.0), ALPHA_BOUNDS]
    best: _Raw | None = None
    for x0 in starts:
        res = minimize(fn, x0, args=(u, y, w), jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 500, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or res.fun < best.loss:
            best = _Raw(np.asarray(res.x, float), float(res.fun))
    return best


def _grid(u: np.ndarray, y: np.ndarray, floor: bool) -> list[np.ndarray]:
    """Starts: α over a range of exponents, L∞ over fractions of the lowest loss, a so that each start passes
    through the middle rung (the field's grids are in absolute units fitted to LLM losses; these follow the data)."""
    loss = np.exp(y)
    mid = float(np.median(loss))
    starts = []
    for alpha in (0.05, 0.15, 0.3, 0.6, 1.0, 2.0):
        if not floor:
            starts.append(np.array([math.log(mid), alpha]))
            continue
        for frac in (0.01, 0.3, 0.6, 0.9):
            floor_value = frac * float(loss.min())
            starts.append(np.array([math.log(max(mid - floor_value, 1e-6 * mid)), alpha, math.log(floor_value)]))
    return starts


@dataclass
class LawFit:
    """A fitted law, its 95% bootstrap intervals, and what the rungs could not determine."""

    variable: str  # "N" (non-embedding parameters) or "C" (training FLOPs)
    form: str  # FLOOR_FORM or POWER_FORM
    x: list[float]
    loss: list[float]
    alpha: float
    x0: float
    l_inf: float | None  # None: the form has none (POWER_FORM)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    l_inf_identified: bool = False
    notes: list[str] = field(default_factory=list)
    boot: np.ndarray | None = field(default=None, repr=False)  # (n_boot, 3): α, log x₀, L∞ of each resample
    residual_sd: float = 0.0  # of log L, from the fit's residuals (n − p degrees of freedom)
    log_x0: float | None = None  # log x₀, kept: with α near 0 (losses flat in x) x₀ itself is beyond float range
    bootstrap: str = "case"  # "case" (rungs resampled) or "residual" (too few rungs for a case bootstrap to vary)

    def predict(self, x, params: np.ndarray | None = None) -> np.ndarray:
        if params is None:
            log_x0 = self.log_x0 if self.log_x0 is not None else math.log(self.x0)
            alpha, l_inf = self.alpha, self.l_inf or 0.0
        else:
            alpha, log_x0, l_inf = params
        x = np.asarray(x, float)
        return l_inf + np.exp(alpha * (log_x0 - np.log(x)))

    def predict_interval(self, x: float, observation: bool = False) -> tuple[float, float]:
        """95% interval of the law's value at ``x`` over the bootstrap fits; with ``observation``, of a new
        measurement there (each resample's prediction times a residual drawn from the fit's log-residual spread),
        which is what a held-out rung's measured loss should fall in."""
        preds = np.array([float(self.predict(x, b)) for b in self.boot])
        if observation:
            rng = np.random.default_rng(1)
            preds = preds * np.exp(rng.normal(0.0, self.residual_sd, size=len(preds)))
        lo, hi = np.percentile(preds, [2.5, 97.5])
        return float(lo), float(hi)

    def l_inf_text(self) -> str:
        if self.l_inf is None:
            return "not in the form"
        lo, hi = self.intervals["l_inf"]
        if not self.l_inf_identified:
            return f"unidentified (at or near its bound; 95% interval [{lo:.3g}, {hi:.3g}])"
        return f"{self.l_inf:.4g} [{lo:.4g}, {hi:.4g}]"


def min_rungs(floor: bool) -> int:
    """Distinct sizes a fit needs: its parameters (3 with L∞, 2 without) and one more to leave any noise."""
    return 4 if floor else 3


def fit_law(x, loss, variable: str = "N", floor: bool = True, n_boot: int = 1000, seed: int = 0) -> LawFit:
    """Fit ``loss ≈ L∞ + (x₀/x)^α`` (``floor=False``: ``(x₀/x)^α``) with 95% bootstrap intervals over the rungs.
    Raises :class:`TooFewRungs` with what to do when the rungs cannot determine the form."""
    x, loss, need, distinct = _checked(x, loss, variable, floor)
    logx = np.log(x)
    m = float(logx.mean())
    u, y = logx - m, np.log(loss)
    raw = _fit_raw(u, y, np.ones_like(u), floor, _grid(u, y, floor))
    fit = _from_theta(raw.theta, m, floor)
    x0 = math.exp(fit[1]) if fit[1] < 700 else math.inf  # α near 0 (flat losses): x₀ beyond float range
    out = LawFit(variable, FLOOR_FORM if floor else POWER_FORM, x.tolist(), loss.tolist(), fit[0], x0,
                 fit[2] if floor else None, log_x0=fit[1])
    if math.isinf(x0):
        out.notes.append(f"x₀ is beyond float range (log x₀ = {fit[1]:.3g}, α = {fit[0]:.3g}): the losses barely "
                         "change with x, so the power law's scale is not determined")
    resid = y - np.log(out.predict(x))
    out.residual_sd = float(math.sqrt((resid**2).sum() / max(1, len(x) - (need - 1))))  # n − parameters
    rng = np.random.default_rng(seed)
    if _case_resamples(x, need) < MIN_CASE_RESAMPLES:
        boots = _residual_bootstrap(out, x, u, y, m, raw.theta, floor, need, n_boot, rng)
    else:
        boots = _case_bootstrap(out, x, u, y, m, raw.theta, floor, need, n_boot, rng)
    out.boot = np.array(boots)
    _intervals(out, loss, floor, distinct)
    return out


def _checked(x, loss, variable: str, floor: bool) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The rungs as arrays, refused unless finite, positive and enough distinct for the form: (x, loss, rungs
    needed, distinct x)."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    if x.shape != loss.shape or x.ndim != 1:
        raise ValueError("x and loss must be 1-d and of one length")
    ok = np.isfinite(x) & np.isfinite(loss) & (x > 0) & (loss > 0)
    if not ok.all():
        raise ValueError(f"every x and loss must be finite and > 0; bad at rungs {np.flatnonzero(~ok).tolist()}")
    need = min_rungs(floor)
    distinct = len(np.unique(x))
    if distinct < need:
        form = FLOOR_FORM if floor else POWER_FORM
        raise TooFewRungs(f"{form} has {need - 1} parameters: fitting it needs at least {need} rungs of distinct "
                          f"{variable} ({need - 1} would fit exactly and leave no noise to estimate), got {distinct}"
                          + ("; add rungs, or fit the pure power law (no L∞), which needs 3" if floor else
                             "; add rungs"))
    return x, loss, need, distinct


def _residual_bootstrap(out: LawFit, x, u, y, m: float, theta, floor: bool, need: int, n_boot: int, rng) -> list:
    """A case bootstrap of so few rungs can draw only a handful of different resamples (4 rungs of 4 needed sizes:
    the rungs themselves, every interval zero wide). Resample the residuals of log L about the fit instead, each
    scaled by √(n/(n−p)) (the fit's p parameters shrink them), and refit: the intervals then carry the noise the
    fit left. With n − p = 1 or 2 that noise is estimated from one or two degrees of freedom: a rough interval,
    said so."""
    n, p = len(u), need - 1
    fitted = np.log(out.predict(x))
    r = (y - fitted) * math.sqrt(n / max(1, n - p))
    r = r - r.mean()
    boots = [_from_theta(_fit_raw(u, fitted + rng.choice(r, size=n, replace=True), np.ones_like(u), floor,
                                  [theta]).theta, m, floor) for _ in range(n_boot)]
    k = _case_resamples(x, need)
    out.bootstrap = "residual"
    out.notes.append(f"{n} rungs allow only {k} different case resample{'s' if k != 1 else ''} of {need} or more "
                     f"distinct sizes: the intervals are from a residual bootstrap (log-L residuals resampled "
                     f"about the fit, {n - p} degree{'s' if n - p != 1 else ''} of freedom for the noise), rough")
    return boots


def _case_bootstrap(out: LawFit, x, u, y, m: float, theta, floor: bool, need: int, n_boot: int, rng) -> list:
    """Rungs resampled with replacement (as weights), each resample refitted from the full fit's optimum (a
    resample's optimum is near it; a grid per resample would cost 24 times)."""
    boots, n, tries = [], len(x), 0
    while len(boots) < n_boot and tries < 20 * n_boot:
        tries += 1
        idx = rng.integers(0, n, size=n)
        if len(np.unique(x[idx])) < need:  # a resample of too few sizes determines nothing: draw again
            continue
        boots.append(_from_theta(_fit_raw(u, y, np.bincount(idx, minlength=n).astype(float), floor,
                                          [theta]).theta, m, floor))
    if len(boots) < n_boot:  # few rungs: most resamples repeat a size; the intervals rest on fewer draws
        out.notes.append(f"only {len(boots)} of {n_boot} bootstrap resamples held {need} distinct sizes "
                         f"(in {tries} draws); the intervals rest on those")
    return boots


def _intervals(out: LawFit, loss: np.ndarray, floor: bool, distinct: int) -> None:
    """95% percentile intervals from ``out.boot``, and what the rungs do not determine, said in ``out.notes``."""
    alpha_ci = np.percentile(out.boot[:, 0], [2.5, 97.5])
    with np.errstate(over="ignore"):  # a resample with α near 0 puts x₀ out of float range: inf, said as such
        x0_ci = np.exp(np.percentile(out.boot[:, 1], [2.5, 97.5]))
    out.intervals = {"alpha": tuple(map(float, alpha_ci)), "x0": tuple(map(float, x0_ci))}
    lo_a, hi_a = ALPHA_BOUNDS
    if alpha_ci[0] <= 1.01 * lo_a or alpha_ci[1] >= 0.99 * hi_a:
        out.notes.append(f"α's 95% interval [{alpha_ci[0]:.3g}, {alpha_ci[1]:.3g}] reaches the fit's bounds "
                         f"({lo_a:g} .. {hi_a:g}): these rungs do not determine the exponent")
    if not floor:
        return
    lo, hi = map(float, np.percentile(out.boot[:, 2], [2.5, 97.5]))
    out.intervals["l_inf"] = (lo, hi)
    # identified when its estimate and its interval stay clear of both bounds: 0 (no floor at all) and the lowest
    # loss measured (the whole curve flat: the rungs did not bend). The estimate too: a residual bootstrap's
    # resamples have lower minima than the rungs, so an estimate pinned to the rungs' lowest loss can lie above an
    # interval that looks clear of it (the CIFAR ladder: 3.15, interval [0.384, 3.11])
    floor_lo, floor_hi = 0.01 * float(loss.min()), 0.99 * float(loss.min())
    out.l_inf_identified = floor_lo < lo and hi < floor_hi and floor_lo < out.l_inf < floor_hi
    if not out.l_inf_identified:
        out.notes.append(f"L∞ is not identified by these {distinct} rungs: its estimate {out.l_inf:.4g} or its "
                         f"95% interval [{lo:.3g}, {hi:.3g}] runs into its bounds (0 .. the lowest loss "
                         f"{loss.min():.4g}); the rungs do not bend enough to tell the irreducible loss from the "
                         "power law, so α and x₀ are conditional on it and their intervals are wide")


def _case_resamples(x: np.ndarray, need: int, cap: int = 10**6) -> int:
    """How many different case resamples (multisets of n rungs drawn from the n) hold ``need`` or more distinct
    sizes: what a case bootstrap can tell apart. Counted exactly up to 10 rungs; beyond, far more than needed."""
    from itertools import combinations_with_replacement

    n = len(x)
    if n > 10:
        return cap
    return sum(len(set(x[list(c)])) >= need for c in combinations_with_replacement(range(n), n))


def _from_theta(theta: np.ndarray, m: float, floor: bool) -> tuple[float, float, float]:
    """(α, log x₀, L∞) from the optimiser's (a, α[, e]) on centred u."""
    a, alpha = float(theta[0]), float(theta[1])
    return alpha, a / alpha + m, (math.exp(float(theta[2])) if floor else 0.0)


@dataclass
class Forecast:
    """The largest rung predicted from a fit of the others."""

    x: float
    measured: float
    predicted: float
    interval: tuple[float, float]  # 95% for a new measurement at x

    @property
    def inside(self) -> bool:
        return self.interval[0] <= self.measured <= self.interval[1]

    def line(self, variable: str, unit: str = "nats/token") -> str:
        verdict = "inside" if self.inside else "OUTSIDE"
        return (f"forecast of the largest rung ({variable} = {self.x:.3g}) from the others: predicted "
                f"{self.predicted:.4f} {unit}, 95% interval [{self.interval[0]:.4f}, {self.interval[1]:.4f}]; "
                f"measured {self.measured:.4f}: {verdict} the interval")


def forecast_largest(x, loss, variable: str = "N", floor: bool = True, n_boot: int = 1000, seed: int = 0
                     ) -> tuple[LawFit, Forecast]:
    """Fit every rung but the largest, predict the largest: the check that the law extrapolates one step. Needs one
    rung more than :func:`fit_law` (raises :class:`TooFewRungs` saying so)."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    top = x == x.max()
    if len(np.unique(x[~top])) < min_rungs(floor):
        raise TooFewRungs(f"a forecast check holds the largest rung out and fits the rest: it needs at least "
                          f"{min_rungs(floor) + 1} rungs of distinct {variable}, got {len(np.unique(x))}")
    fit = fit_law(x[~top], loss[~top], variable, floor, n_boot, seed)
    x_top = float(x.max())
    return fit, Forecast(x_top, float(loss[top].mean()), float(fit.predict(x_top)),
                         fit.predict_interval(x_top, observation=True))
