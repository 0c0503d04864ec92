"""The scaling study: its config (rungs, lengths, refusals) and its report on made-up rungs, fast; the study job
itself on real Ray, DeepSpeed and MLflow is in the slow tests (test_study_job.py)."""

import json
import math

import numpy as np
import pytest

from igpt import cli
from igpt.model import ModelConfig
from igpt.track import study_report
from pipelines import sweep_lr
from pipelines.study import Rung, StudyJobConfig, stage_configs


def test_rungs_are_named_sizes_or_shapes_with_their_own_length():
    cfg = cli.parse(StudyJobConfig, ["--ladder", "debug,4x128,8x256x4@40", "--steps", "12"])
    rungs = cfg.rungs()
    assert [(r.label, r.n_layer, r.d_model, r.n_head) for r in rungs] == \
        [("debug", 2, 64, 2), ("4x128", 4, 128, 2), ("8x256x4@40", 8, 256, 4)]
    assert [cfg.rung_steps(r) for r in rungs] == [12, 12, 40]
    m = cfg.model(rungs[1])
    assert (m.n_layer, m.d_model, m.resolution) == (4, 128, 32)
    for bad in ("debug,debug", "huge", "4x", "4x128@0", ""):
        with pytest.raises(SystemExit):
            cli.parse(StudyJobConfig, ["--ladder", bad])
    with pytest.raises(SystemExit):  # a warm-up as long as a rung would never decay
        cli.parse(StudyJobConfig, ["--ladder", "debug@5", "--optim.warmup_steps", "5"])
    with pytest.raises(SystemExit):  # the name becomes a tag value: key=value,... must stay parseable
        cli.parse(StudyJobConfig, ["--name", "a,b"])


def test_a_compute_budget_gives_each_rung_the_steps_its_flops_per_token_allow():
    budget = 3e13
    cfg = cli.parse(StudyJobConfig, ["--ladder", "debug,tiny,small", "--flops", str(budget)])
    for r in cfg.rungs():
        m = ModelConfig(size=r.size, resolution=32)
        spent = cfg.rung_steps(r) * cfg.optim.global_batch * m.n_ctx * m.train_flops_per_token()
        assert abs(spent / budget - 1) < 0.5 / cfg.rung_steps(r) + 1e-9  # rounding to a whole step only
    steps = [cfg.rung_steps(r) for r in cfg.rungs()]
    assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1]  # larger models: fewer tokens


def test_every_rung_gets_the_papers_stages_tagged_with_the_study(tmp_path):
    cfg = cli.parse(StudyJobConfig, ["--ladder", "debug,4x96", "--output_dir", str(tmp_path), "--name", "lad",
                                     "--random_init"])
    stages = stage_configs(cfg, "p.npy", "RID")
    assert set(stages) == {"palette", "compare"} | {f"{s}/{r}" for s in ("sweep", "extract", "probe",
                                                                      "extract_random", "probe_random")
                                                    for r in ("debug", "4x96")}
    sw = stages["sweep/4x96"]
    assert (sw.pretrain.model.n_layer, sw.pretrain.model.d_model, sw.trial_fraction) == (4, 96, 0.1)
    assert sw.pretrain.tracking.tag_dict() == {"igpt.study": "lad", "igpt.rung": "4x96", "igpt.study_run_id": "RID"}
    assert stages["extract/4x96"].checkpoint == str(tmp_path / "lad" / "sweep" / "4x96" / "refit")
    assert stages["extract_random/4x96"].random_init and not stages["probe_random/4x96"].pixels
    assert stages["compare"].tag == "igpt.study=lad"
    # a trial is tagged a trial at creation (compare leaves it out even while it runs), the refit a refit
    trial = sweep_lr.pretrain_config(sw, 0.01, "SWEEP")
    assert trial.tracking.tag_dict()["sweep.role"] == "trial" and trial.tracking.tag_dict()["igpt.rung"] == "4x96"
    assert sweep_lr.pretrain_config(sw, 0.01, "SWEEP", refit=True).tracking.tag_dict()["sweep.role"] == "refit"
    fixed = stage_configs(cli.parse(StudyJobConfig, ["--lr_space", "", "--ladder", "debug"]), "p.npy")
    assert "pretrain/debug" in fixed and "sweep/debug" not in fixed


def test_a_best_rate_at_either_end_of_the_grid_is_a_warning_with_the_next_rates():
    values = [0.01, 0.003, 0.001, 0.0003]
    top = sweep_lr.edge_warning(values, [3.0, 3.2], "rose")
    assert top["edge"] == "largest" and np.allclose(top["next"], [0.01 * 10 / 3, 0.01 * 100 / 9])
    low = sweep_lr.edge_warning(values, [3.4, 3.3, 3.2, 3.1], "exhausted")
    assert low["edge"] == "smallest" and np.allclose(low["next"], [0.0003 * 0.3, 0.0003 * 0.09])
    assert sweep_lr.edge_warning(values, [3.4, 3.1, 3.2], "rose") is None  # an interior best
    assert sweep_lr.edge_warning(values, [math.inf, 3.1, 3.2], "rose") is None  # a diverged top is no edge


def _rungs(alpha=0.3, x0=1e5, l_inf=2.0, swept=True, noise=0.0, n=5, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, N in enumerate(np.geomspace(1e4, 1e7, n)):
        loss = (l_inf + (x0 / N) ** alpha) * math.exp(rng.normal(0, noise))
        out.append(study_report.Rung(label=f"r{i}", non_embedding_params=int(N), compute_flops=6 * N * 1e6,
                                     val_loss=loss, lr=3e-3, lr_swept=swept, probe_test_accuracy=0.3 + 0.05 * i,
                                     best_layer=1, n_layer=2))
    return out


def test_the_report_fits_both_laws_forecasts_the_largest_and_logs_what_it_found(tmp_path):
    out = study_report.build(_rungs(noise=0.01), tmp_path, title="t", n_boot=200)
    fit = out["fits"]["N"]
    assert fit["fitted"] and fit["form"] == "L∞ + (x₀/x)^α" and abs(fit["alpha"] - 0.3) < 0.1
    assert fit["alpha_95"][0] <= fit["alpha"] <= fit["alpha_95"][1]
    assert out["forecast"]["N"]["made"] and out["forecast"]["N"]["inside"]
    assert out["verdict_scale"].startswith("agrees")
    assert out["probe"]["spearman_vs_N"] == pytest.approx(1.0) and out["probe"]["spearman_vs_loss"] == \
        pytest.approx(-1.0)
    md = (tmp_path / "report.md").read_text()
    assert "α = 0." in md and "forecast of the largest rung" in md and "bits/token" in md
    assert json.loads((tmp_path / "fits.json").read_text())["fits"]["C"]["fitted"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(study_report.PLOTS)


def test_three_rungs_fit_the_pure_power_law_and_say_why_and_one_rate_for_all_is_confounded(tmp_path):
    rungs = _rungs(n=3, swept=False)[::-1]
    rungs[1].val_loss = rungs[2].val_loss - 0.01  # the middle rung above the smallest: not monotone
    out = study_report.build(rungs, tmp_path, title="t", n_boot=200)
    assert out["fits"]["N"]["form"] == "(x₀/x)^α" and "L∞ not fitted" in " ".join(out["fits"]["N"]["notes"])
    assert not out["forecast"]["N"]["made"] and "needs at least" in out["forecast"]["N"]["reason"]
    assert out["verdict_scale"].startswith("confounded: one learning rate")
    two = study_report.build(_rungs(n=2), tmp_path / "two", title="t", n_boot=200)
    assert not two["fits"]["N"]["fitted"] and "at least 3 rungs" in two["fits"]["N"]["reason"]
    edge = _rungs(n=3)
    edge[2].edge_warning = "the best lr 0.01 is the grid's largest"
    assert study_report.verdict_scale(edge).startswith("confounded: the best rate of r2")
