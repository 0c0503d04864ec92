"""Reproduce the paper's findings at CPU scale on real CIFAR-10, as two studies (``pipelines.study``: one
orchestrator for the main job, this and a cluster study) and a findings table read from their records.

    .venv/bin/python benchmarks/reproduce.py              # ~50 min on 2 cores; real CIFAR-10 from ../shared
    .venv/bin/python benchmarks/reproduce.py --dry_run    # the two studies' commands, nothing run
    .venv/bin/python benchmarks/reproduce.py --report_only  # the findings again from the studies' records

1. **The AR ladder** (``benchmarks/scaling_study.py``'s study, with ``--random_init``): per rung the ordered lr
   sweep with shortened trials, the refit, every layer's features, the probe sweep with refit and test, the raw
   pixels and the random-init twin; the scaling laws and the forecast in its own report.
2. **The BERT ladder** (``--bert_ladder``, rungs of the AR ladder): the same procedure and data, the AR study's
   palette, BERT's objective; its own rate sweep per rung (BERT is not compared at AR's rate).
3. **The findings**, each a paired test on the same test images where two models are compared (McNemar's exact
   test of the probes' per-image results), "confounded" where a known confound holds (a best rate at an end of
   its sweep's grid): pretrained vs its random-init twin and raw pixels; accuracy by depth; the size question
   (the AR study's own verdict, laws and forecast); AR vs BERT per rung; lower validation loss with better probe
   across the AR rungs (the paper's Figure 3 relation; an exact permutation test of Spearman's rho).

The paper's other axis of that relation, the checkpoints of one run, is not measured here: a study probes each
rung's final model only (one more feature set and probe sweep per checkpoint would double the probes' time).

Outputs under ``--storage_path``: ``ar/`` and ``bert/`` (each a study's folder), ``mlflow.db`` + ``mlartifacts/``
(one store for both studies), ``findings.json`` and ``reproduce.md`` (also logged to the AR study's MLflow run,
``reproduce/``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaling_study  # noqa: E402  (the AR ladder's command: one definition)

ROOT = Path(__file__).resolve().parents[1]

# The paper's findings this script checks (Chen et al. 2020, "Generative Pretraining from Pixels").
PAPER = {
    "pretrain": "pretrained features far above a random-init model and raw pixels",
    "depth": "AR: probe accuracy rises then falls with depth; best layer in the middle, the last one worse",
    "scale": "larger model: lower validation loss and better probe accuracy",
    "bert": "AR probes better than BERT on CIFAR-10, by more than 1 point",
    "relation": "better generative models learn better features: lower validation loss, higher probe accuracy",
}
ALPHA = 0.05  # a paired test's level


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage_path", default="/tmp/igpt-reproduce")
    ap.add_argument("--data", default=str(scaling_study.DATA))
    ap.add_argument("--ladder", default=scaling_study.LADDER, help="the AR rungs")
    ap.add_argument("--bert_ladder", default="2x48,4x96", help="the BERT rungs: rungs of --ladder")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--trial_fraction", type=float, default=0.2)
    ap.add_argument("--train_images", type=int, default=6000)
    ap.add_argument("--test_images", type=int, default=2000)
    ap.add_argument("--dry_run", action="store_true")
    ap.add_argument("--report_only", action="store_true")
    a = ap.parse_args(argv)
    extra = set(a.bert_ladder.split(",")) - set(a.ladder.split(","))
    if extra:
        ap.error(f"--bert_ladder: {', '.join(sorted(extra))} not in --ladder (AR vs BERT is judged per rung)")
    return a


def study_argv(a: argparse.Namespace, objective: str) -> list[str]:
    ns = argparse.Namespace(**{**vars(a), "name": objective, "ladder": a.ladder if objective == "ar" else
                               a.bert_ladder})
    argv = scaling_study.study_argv(ns) + ["--tracking.tracking_uri", f"sqlite:///{Path(a.storage_path) / 'mlflow.db'}"]
    if objective == "ar":
        return argv + ["--random_init"]
    # BERT: the AR study's palette (the same tokens); the raw pixels are the AR study's already
    return argv + ["--objective", "bert", "--no-pixels", "--palette.path", palette_of(a)]


def palette_of(a: argparse.Namespace) -> str:
    kept = Path(a.storage_path) / "ar" / "palette" / "summary.json"
    return json.loads(kept.read_text())["palette"] if kept.exists() else "<the AR study's palette>"


# ------------------------------------------------------------------------------------------------ records
def records(a: argparse.Namespace, name: str) -> dict:
    """A study's rungs as its records hold them: the rung's summary, its probe's result, the twin's."""
    root = Path(a.storage_path) / name
    out = {}
    for label in (a.ladder if name == "ar" else a.bert_ladder).split(","):
        s = json.loads((root / "rungs" / label / "summary.json").read_text())
        s["probe"] = json.loads((root / "probe" / label / "result.json").read_text())
        twin = root / "probe" / f"{label}-random-init" / "result.json"
        s["twin"] = json.loads(twin.read_text()) if twin.exists() else None
        out[label] = s
    out["_fits"] = json.loads((root / "report" / "fits.json").read_text())
    return out


def paired(za: str, zb: str) -> dict:
    """McNemar's exact test of probe b against probe a on the test images both scored (the study's own test)."""
    from igpt.track.study_report import load_predictions, mcnemar

    a, b = load_predictions(za), load_predictions(zb)
    m = mcnemar((a["correct"], a["keys"]), (b["correct"], b["keys"]))
    return {**m, "acc_a": float(a["correct"].mean()), "acc_b": float(b["correct"].mean())}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def pts(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def found(m: dict) -> int:
    """+1: b better than a at the level, -1: worse, 0: no difference detected."""
    return 0 if m["p"] >= ALPHA else (1 if m["acc_diff"] > 0 else -1)


def edge(s: dict) -> str | None:
    return ((s.get("sweep") or {}).get("edge_warning") or {}).get("detail")


# ------------------------------------------------------------------------------------------------ findings
def finding_pretrain(ar: dict, largest: str) -> tuple:
    s = ar[largest]
    tests = {"the random-init twin": paired(s["twin"]["test_predictions"], s["probe"]["test_predictions"]),
             "raw pixels": paired(s["probe"]["pixels"]["test_predictions"], s["probe"]["test_predictions"])}
    sides = {k: found(m) for k, m in tests.items()}
    numbers = (f"{largest} best layer {pct(s['probe_test_accuracy'])} vs random-init twin "
               f"{pct(tests['the random-init twin']['acc_a'])} vs raw pixels {pct(tests['raw pixels']['acc_a'])}; "
               + "; ".join(f"vs {k}: {pts(m['acc_diff'])}, McNemar p {m['p']:.3g}" for k, m in tests.items())
               + f"; {tests['raw pixels']['images']:,} test images")
    verdict = "agrees" if min(sides.values()) == 1 else "disagrees" if min(sides.values()) == -1 else "within noise"
    detail = "; ".join(f"{'above' if v == 1 else 'below' if v == -1 else 'no difference detected from'} {k}"
                       for k, v in sides.items())
    return "Does generative pretraining beat the random-init twin and raw pixels?", numbers, PAPER["pretrain"], \
        f"{verdict}: {detail}"


def finding_depth(ar: dict, a: argparse.Namespace) -> tuple:
    """The deepest rung's validation accuracy by layer: the best interior layer (0 < l < L) above layer 0 and
    layer L, each beyond a 95% interval. Unpaired (the sweep keeps accuracies, not each image's result), so
    conservative for the same validation images."""
    from igpt.eval import features

    label = max((k for k in ar if not k.startswith("_")), key=lambda k: ar[k]["n_layer"])
    s = ar[label]
    by = {int(k): v for k, v in s["probe"]["val_accuracy_by_layer"].items()}
    L, nv = s["n_layer"], features.manifest(s["features"])["splits"]["val"]["images"]
    ci = lambda p, q: 1.96 * math.sqrt((p * (1 - p) + q * (1 - q)) / nv)  # noqa: E731
    numbers = (f"{label}: validation accuracy by layer 0..{L}: " + " / ".join(pct(by[l]) for l in sorted(by))
               + f"; best layer {s['probe']['best']['layer']} of 0..{L}; {nv:,} validation images")
    q = "Does probe accuracy rise then fall with depth (best layer in the middle, the last worse)?"
    interior = {l: v for l, v in by.items() if 0 < l < L}
    if not interior:
        return q, numbers, PAPER["depth"], "within noise: no interior layer (1 block)"
    li = max(interior, key=interior.get)
    rise, fall = by[li] - by[0], by[li] - by[L]
    s_rise = 0 if abs(rise) < ci(by[li], by[0]) else int(math.copysign(1, rise))
    s_fall = 0 if abs(fall) < ci(by[li], by[L]) else int(math.copysign(1, fall))
    verdict = "agrees" if s_rise == s_fall == 1 else "disagrees" if min(s_rise, s_fall) == -1 else "within noise"
    return q, numbers, PAPER["depth"], (
        f"{verdict}: the best interior layer {li} is {pts(rise)} over layer 0 and {pts(fall)} over layer {L} "
        f"(unpaired 95% intervals ±{100 * ci(by[li], by[0]):.1f} / ±{100 * ci(by[li], by[L]):.1f} pts)")


def finding_scale(ar: dict) -> tuple:
    f = ar["_fits"]
    fc = f["forecast"]["N"]
    pairs = "; ".join(f"{p['smaller']} → {p['larger']}: loss {p['loss']['diff']:+.4f} [{p['loss']['diff_95'][0]:+.4f}, "
                      f"{p['loss']['diff_95'][1]:+.4f}], probe {pts(p['probe']['acc_diff'])} (p {p['probe']['p']:.3g})"
                      for p in f["pairs"] if "diff" in p.get("loss", {}) and "probe" in p)
    fit = f["fits"]["N"]
    law = (f"L(N): α {fit['alpha']:.3f} [{fit['alpha_95'][0]:.3f}, {fit['alpha_95'][1]:.3f}], L∞ {fit['l_inf_text']}"
           if fit["fitted"] else f"L(N) not fitted: {fit['reason']}")
    fore = (f"forecast of the largest rung {fc['predicted']:.4f} [{fc['interval_95'][0]:.4f}, "
            f"{fc['interval_95'][1]:.4f}], measured {fc['measured']:.4f}: "
            f"{'inside' if fc['inside'] else 'OUTSIDE'}" if fc["made"] else f"no forecast: {fc['reason']}")
    return "Does the larger model reach lower validation loss and a better probe?", \
        f"{pairs}. {law}; {fore}", PAPER["scale"], f["verdict_scale"]


def finding_bert(ar: dict, bert: dict) -> tuple:
    rows, verdicts = [], []
    for label in (k for k in bert if not k.startswith("_")):
        m = paired(bert[label]["test_predictions"], ar[label]["test_predictions"])  # b = AR: + when AR is better
        confound = edge(ar[label]) or edge(bert[label])
        f = found(m)
        v = ("agrees" if m["acc_diff"] > 0.01 else "disagrees (AR ahead by <= 1 pt)") if f == 1 else \
            f"confounded ({confound})" if confound and f == -1 else "disagrees (BERT ahead)" if f == -1 else \
            "within noise"
        verdicts.append(v)
        rows.append(f"{label}: AR {pct(m['acc_b'])} vs BERT {pct(m['acc_a'])} (lr {ar[label]['lr']:g} / "
                    f"{bert[label]['lr']:g}): {pts(m['acc_diff'])}, McNemar p {m['p']:.3g}, {m['images']:,} images"
                    f" → {v}")
    overall = verdicts[0] if len(set(verdicts)) == 1 else "mixed: " + ", ".join(verdicts)
    return "Does AR probe better than BERT (paper: by >1 point on CIFAR-10)?", "; ".join(rows), PAPER["bert"], \
        overall


def spearman_exact(x: list[float], y: list[float]) -> tuple[float, float]:
    """Spearman's rho and its exact two-sided permutation p (every ordering of y; the rungs are few)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    rho = lambda r: float(np.corrcoef(rx, r)[0, 1])  # noqa: E731
    obs = rho(ry)
    perms = [rho(np.array(p)) for p in itertools.permutations(ry)]
    return obs, float(np.mean([abs(r) >= abs(obs) - 1e-12 for r in perms]))


def finding_relation(ar: dict) -> tuple:
    labels = [k for k in ar if not k.startswith("_")]
    loss, acc = [ar[k]["val_loss"] for k in labels], [ar[k]["probe_test_accuracy"] for k in labels]
    rho, p = spearman_exact(loss, acc)
    least = 2 / math.factorial(len(labels))
    verdict = ("agrees" if rho < 0 else "disagrees") if p < ALPHA else \
        f"within noise (p {p:.2f}; {len(labels)} rungs: the smallest p possible is {least:.3f})"
    numbers = "; ".join(f"{k} {ar[k]['val_loss']:.4f} nats/token, {pct(ar[k]['probe_test_accuracy'])}" for k in labels)
    return "Across the AR rungs: does lower validation loss go with better probe accuracy?", \
        f"{numbers}; Spearman ρ (accuracy vs loss) {rho:+.2f}, exact permutation p {p:.3f}", PAPER["relation"], verdict


def findings(a: argparse.Namespace) -> dict:
    ar, bert = records(a, "ar"), records(a, "bert")
    labels = [k for k in ar if not k.startswith("_")]
    largest = max(labels, key=lambda k: ar[k]["non_embedding_params"])
    rows = [finding_pretrain(ar, largest), finding_depth(ar, a), finding_scale(ar), finding_bert(ar, bert),
            finding_relation(ar)]
    rungs = [[k, f"{ar[k]['non_embedding_params']:,}", f"{ar[k]['lr']:g}" + (" (edge)" if edge(ar[k]) else ""),
              f"{ar[k]['val_loss']:.4f}", pct(ar[k]["probe_test_accuracy"]),
              f"{ar[k]['best_layer']}/{ar[k]['n_layer']}", pct(ar[k]["random_init_test_accuracy"]),
              pct(ar[k]["pixels_test_accuracy"]),
              (f"{bert[k]['lr']:g}" + (" (edge)" if edge(bert[k]) else "") + f", {bert[k]['val_loss']:.4f}, "
               f"{pct(bert[k]['probe_test_accuracy'])}, {bert[k]['best_layer']}/{bert[k]['n_layer']}")
              if k in bert else "-"] for k in labels]
    return {"findings": rows, "rungs": rungs}


def markdown(f: dict, a: argparse.Namespace, seconds: dict) -> str:
    def table(header, rows):
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows])

    return "\n\n".join([
        f"## Reproduction: AR ladder {a.ladder}, BERT {a.bert_ladder}, real CIFAR-10 at 16x16",
        table(["rung", "N (non-emb.)", "AR lr", "AR val loss", "AR probe", "best layer", "random-init", "pixels",
               "BERT: lr, masked val loss, probe, best layer"], f["rungs"]),
        table(["question", "this run", "paper", "verdict"], f["findings"]),
        "Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()) + "."])


def run_study(a: argparse.Namespace, objective: str) -> float:
    argv = [sys.executable, "-m", "pipelines.study", *study_argv(a, objective)]
    print(shlex.join(argv), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(DS_ACCELERATOR="cpu")
    t0 = time.time()
    if subprocess.run(argv, cwd=ROOT, env=env).returncode:
        raise SystemExit(f"the {objective} study failed; re-run this script to resume it")
    return time.time() - t0


def log_to_mlflow(a: argparse.Namespace, files: list[Path]) -> None:
    from mlflow.tracking import MlflowClient

    run_id = (Path(a.storage_path) / "ar" / "mlflow_run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{Path(a.storage_path) / 'mlflow.db'}")
    for p in files:
        client.log_artifact(run_id, str(p), "reproduce")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    out = Path(a.storage_path)
    if a.dry_run:
        for objective in ("ar", "bert"):
            print(shlex.join([sys.executable, "-m", "pipelines.study", *study_argv(a, objective)]))
        return
    seconds: dict = {}
    t0 = time.time()
    if not a.report_only:
        out.mkdir(parents=True, exist_ok=True)
        seconds["AR study"] = run_study(a, "ar")
        seconds["BERT study"] = run_study(a, "bert")
    f = findings(a)
    seconds["in all"] = time.time() - t0
    md = markdown(f, a, seconds)
    (out / "findings.json").write_text(json.dumps(f, indent=2))
    (out / "reproduce.md").write_text(md + "\n")
    log_to_mlflow(a, [out / "findings.json", out / "reproduce.md"])
    print("\n" + md)


if __name__ == "__main__":
    main()
