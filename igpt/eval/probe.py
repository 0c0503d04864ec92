"""Linear probes on frozen features, the paper's two protocols.

- ``lbfgs``: L2-regularised multinomial logistic regression by L-BFGS (scikit-learn's ``LogisticRegression``),
  the protocol the paper uses for CIFAR-10/100 and STL-10.
- ``sgd``: one linear layer trained by SGD with momentum 0.9 and a cosine-decayed learning rate from the high
  values the paper sweeps for ImageNet (30, 10, 3, ...), on standardised features.

Features are (N, M, d): M = 1 for AR models; M = 5 evaluation masks for BERT models, where a probe trains on every
mask's features and predicts by the modal class over the 5 masks (igpt/eval/ensemble.py).
Features are standardised with the training set's mean and standard deviation first: the pooled activations of
different layers differ in scale by orders of magnitude, and one regularisation grid should fit every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from igpt.eval.ensemble import modal


@dataclass
class Standardizer:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
        return cls(flat.mean(0).astype(np.float32), (flat.std(0) + 1e-6).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


class LinearProbe:
    """A fitted probe: ``scores(x)`` -> (M, N, C); ``predict(x)`` -> (N,) (the modal class over masks)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, standardize: Standardizer):
        self.weight, self.bias, self.standardize = weight, bias, standardize

    def scores(self, x: np.ndarray) -> np.ndarray:
        z = self.standardize(x)  # (N, M, d)
        return np.einsum("nmd,cd->mnc", z, self.weight) + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        s = self.scores(x)
        if s.shape[0] == 1:
            return s[0].argmax(-1)
        return modal(torch.from_numpy(s.argmax(-1)), torch.from_numpy(s)).numpy()

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == y).mean())


def _rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, M, d), (N,) -> (N*M, d), (N*M,): every mask's features is a training row with the image's label."""
    n, m, d = x.shape
    return x.reshape(n * m, d), np.repeat(y, m)


def fit_lbfgs(x: np.ndarray, y: np.ndarray, C: float, max_iter: int = 1000) -> LinearProbe:
    from sklearn.linear_model import LogisticRegression

    st = Standardizer.fit(x)
    xr, yr = _rows(st(x), y)
    clf = LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs").fit(xr, yr)
    n_classes = int(y.max()) + 1
    w = np.zeros((n_classes, x.shape[-1]), np.float32)
    b = np.full(n_classes, -1e9, np.float32)  # classes absent from the training labels are never predicted
    coef, icpt = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # scikit-learn's binary case keeps one row: class 1 against class 0
        coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-icpt / 2, icpt / 2])
    w[clf.classes_], b[clf.classes_] = coef, icpt
    return LinearProbe(w, b, st)


def fit_sgd(x: np.ndarray, y: np.ndarray, lr: float, epochs: int = 30, batch_size: int = 256,
            seed: int = 0) -> LinearProbe:
    st = Standardizer.fit(x)
    xr, yr = _rows(st(x), y)
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(xr)), torch.from_numpy(yr)
    n_classes = int(y.max()) + 1
    layer = torch.nn.Linear(xt.shape[1], n_classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
    steps = epochs * max(1, -(-len(xt) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(batch_size):
            loss = torch.nn.functional.cross_entropy(layer(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    if not torch.isfinite(layer.weight).all():
        raise FloatingPointError(f"SGD probe diverged at lr {lr}")
    return LinearProbe(layer.weight.detach().numpy(), layer.bias.detach().numpy(), st)


def balanced_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` examples, ``n / classes`` of each class (the low-data protocol's labelled set)."""
    classes = np.unique(y)
    if n % len(classes):
        raise ValueError(f"{n} labels cannot be balanced over {len(classes)} classes")
    rng = np.random.default_rng(seed)
    per = n // len(classes)
    out = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        if len(idx) < per:
            raise ValueError(f"class {c} has {len(idx)} examples, fewer than the {per} needed")
        out.append(rng.choice(idx, per, replace=False))
    return np.sort(np.concatenate(out))


# ---- warnings: conditions under which a probe's numbers mean less than they seem ----------------------------


def unseen_classes(train_labels: np.ndarray, held: dict[str, np.ndarray]) -> str | None:
    """Classes of a held-out split (name -> labels) with no training example: the probe never predicts them
    (``fit_lbfgs`` gives them a -1e9 bias), so their images count as errors whatever the features hold."""
    seen = set(np.unique(train_labels).tolist())
    missing = {s: sorted(set(np.unique(y).tolist()) - seen) for s, y in held.items()}
    parts = [f"{s} has class(es) {m} with no training example" for s, m in missing.items() if m]
    return "; ".join(parts) + " (the probe cannot predict them)" if parts else None


def tied_trials(val_accuracies) -> str | None:
    """Every trial of a sweep (two or more) with the same validation accuracy: the "best" setting is then an
    arbitrary pick (Tune's first), not a choice the data made."""
    acc = np.asarray(list(val_accuracies), np.float64)
    if len(acc) < 2 or not np.all(acc == acc[0]):
        return None
    return f"all {len(acc)} trials tie at validation accuracy {acc[0]:.4f}: the best setting is arbitrary"


def leaked_keys(test_keys: np.ndarray, seen_keys: np.ndarray, show: int = 3) -> str | None:
    """Test images whose keys are also among the training/validation keys: the probe (refit on train+val) has
    seen them, so the test accuracy is not held out."""
    common = np.intersect1d(np.asarray(test_keys).astype(str), np.asarray(seen_keys).astype(str))
    if not len(common):
        return None
    return (f"{len(common)} of {len(test_keys)} test key(s) are also train/val keys (e.g. "
            f"{', '.join(map(str, common[:show]))}): the test accuracy is not held out")
