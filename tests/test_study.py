"""The scaling study: its config (rungs, lengths, refusals) and its report on made-up rungs, fast; the study job
itself on real Ray, DeepSpeed and MLflow is in the slow tests (test_study_job.py)."""

import json
import math

import numpy as np
import pytest

from igpt import cli
from igpt.model import ModelConfig
from igpt.study.study_job import StudyJobConfig, stage_configs
from igpt.track import study_report
from igpt.train import sweep_lr_job as sweep_lr


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
    cfg = cli.parse(StudyJobConfig, ["--ladder", "debug,4x96", "--storage_path", str(tmp_path), "--name", "lad",
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
    # the ends are the grid's by value, whatever the list's order: 0.003 before a diverging 1e12 is interior
    assert sweep_lr.edge_warning([0.003, 1e12, 0.001], [3.0, math.inf], "rose") is None
    assert sweep_lr.edge_warning([0.001, 0.01, 0.003], [3.2, 3.0, 3.1], "exhausted")["edge"] == "largest"


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


def test_paired_loss_interval_and_mcnemar_on_the_same_images():
    rng = np.random.default_rng(0)
    keys = np.array([f"test/{i}" for i in range(400)])
    a = rng.normal(3.0, 0.3, 400)
    shift = study_report.paired_loss((a, keys), (a - 0.02 + rng.normal(0, 0.01, 400), keys))
    assert shift["diff_95"][1] < 0 and abs(shift["diff"] + 0.02) < 0.005 and shift["images"] == 400
    # the same shift under noise as large as the images' own spread: an unpaired view would see nothing either,
    # but paired differences of pure noise must straddle 0
    noise = study_report.paired_loss((a, keys), (a + rng.normal(0, 0.3, 400), keys[::-1][::-1]))
    assert noise["diff_95"][0] < 0 < noise["diff_95"][1]
    # keys matched, not positions: the second model's images in another order give the same answer
    order = rng.permutation(400)
    assert study_report.paired_loss((a, keys), ((a - 0.02)[order], keys[order]))["diff"] == pytest.approx(-0.02)
    right_a = rng.random(400) < 0.5
    right_b = right_a.copy()
    right_b[np.flatnonzero(~right_a)[:40]] = True  # b gets 40 more right, loses none
    mc = study_report.mcnemar((right_a, keys), (right_b, keys))
    assert (mc["only_larger_right"], mc["only_smaller_right"]) == (40, 0) and mc["p"] < 1e-9
    assert study_report.mcnemar((right_a, keys), (right_a, keys))["p"] == 1.0


def test_per_image_losses_average_to_the_models_own_loss():
    import torch

    from igpt.eval.ensemble import eval_masks
    from igpt.eval.features import image_losses
    from igpt.model.gpt import IGPT

    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (3, 64))
    keys = ["a", "b", "c"]
    for objective in ("ar", "bert"):
        model = IGPT(ModelConfig("debug", resolution=8, objective=objective)).eval()
        per = image_losses(model, tokens, keys)
        with torch.no_grad():
            if objective == "ar":
                want = [float(model.loss(tokens[i:i + 1])) for i in range(3)]
            else:
                masks = eval_masks(keys, 64, model.cfg.bert_mask_prob)
                want = [np.mean([float(model.loss(tokens[i:i + 1], mask=m[i:i + 1])) for m in masks])
                        for i in range(3)]
        assert np.allclose(per, want, atol=1e-5), objective


def test_the_report_pairs_each_rung_with_the_next_on_per_image_losses_and_predictions(tmp_path):
    rng = np.random.default_rng(1)
    keys = np.array([f"test/{i}" for i in range(300)])
    rungs = _rungs(n=3)
    base = rng.normal(3.0, 0.2, 300)
    correct = rng.random(300) < 0.3
    for i, r in enumerate(rungs):  # each rung 0.05 lower per image, and 30 more test images right
        fs = tmp_path / f"f{i}" / "test"
        fs.mkdir(parents=True)
        np.savez(fs / "shard-00000.npz", keys=keys, labels=np.zeros(300), loss=(base - 0.05 * i)[:, None, None])
        c = correct.copy()
        c[np.flatnonzero(~correct)[:30 * i]] = True
        np.savez(tmp_path / f"p{i}.npz", keys=keys, correct=c)
        r.features, r.predictions = str(tmp_path / f"f{i}"), str(tmp_path / f"p{i}.npz")
    out = study_report.build(rungs, tmp_path / "rep", title="t", n_boot=200)
    assert [(p["smaller"], p["larger"], p["loss"]["verdict"], p["probe"]["verdict"]) for p in out["pairs"]] == \
        [("r0", "r1", "agrees", "agrees"), ("r1", "r2", "agrees", "agrees")]
    assert out["pairs"][0]["loss"]["diff"] == pytest.approx(-0.05)
    assert out["verdict_scale"].startswith("agrees: the larger model's loss is lower at every step")
    for r in rungs:
        r.lr_swept = False
    again = study_report.build(rungs, tmp_path / "rep2", title="t", n_boot=200)
    assert again["pairs"][0]["loss"]["verdict"] == "agrees"  # lower despite the confound: said plainly
    assert "(though one learning rate" in again["verdict_scale"]
    flat = _rungs(n=3, swept=False)
    for i, r in enumerate(flat):  # no difference between rungs, one rate for all: confounded, not "disagrees"
        fs = tmp_path / f"g{i}" / "test"
        fs.mkdir(parents=True)
        np.savez(fs / "shard-00000.npz", keys=keys, labels=np.zeros(300),
                 loss=(base + rng.normal(0, 0.2, 300))[:, None, None])
        r.features = str(tmp_path / f"g{i}")
    flat_out = study_report.build(flat, tmp_path / "rep3", title="t", n_boot=200)
    assert {p["loss"]["verdict"] for p in flat_out["pairs"]} == {"confounded (one learning rate for both (not swept "
                                                                 "per size))"}
    assert flat_out["verdict_scale"].startswith("confounded: one learning rate")
    assert "McNemar p" in (tmp_path / "rep" / "report.md").read_text()


def _report_own(config, which, then=None):
    """Reports which sweep it belongs to; with ``then`` = (name, trainable), registers that trainable as another
    sweep starting meanwhile would (Tune's Experiment does exactly this at its start)."""
    from ray import tune
    from ray.tune.registry import register_trainable

    if then is not None:
        register_trainable(*then)
    tune.report({"which": which, "x": config["x"]})


def _sweep(trainable, name: str, storage: str) -> list:
    from ray import tune

    grid = tune.Tuner(tune.with_resources(trainable, {"CPU": 0.01}), param_space={"x": tune.grid_search([1, 2])},
                      tune_config=tune.TuneConfig(max_concurrent_trials=1),  # one after another, as sweep_lr
                      run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0)).fit()
    return [r.metrics["which"] for r in sorted(grid, key=lambda r: r.metrics["x"])]


def test_two_sweeps_of_one_trial_function_keep_their_own_parameters(ray_local, tmp_path):
    """Ray Tune registers a function trainable under its ``__name__`` in the Ray job's registry, and its driver
    looks it up by that name each time it starts a trial: two sweeps of the same trial function in one job (a
    study's rungs, each a Ray task) overwrote each other, and a rung's later trials ran another rung's
    configuration (seen in the study's slow test). Here sweep a's first trial registers sweep b's trainable, as b's
    start would; ``named_trainable`` gives each sweep its own name."""
    from ray import tune

    from igpt.raysetup import named_trainable

    b = tune.with_parameters(_report_own, which="rung_b")
    a = tune.with_parameters(_report_own, which="rung_a", then=("_report_own", b))
    assert _sweep(a, "plain", str(tmp_path)) == ["rung_a", "rung_b"]  # Ray's keying, which a study must not meet
    b = tune.with_parameters(named_trainable(_report_own, "rung_b"), which="rung_b")
    a = tune.with_parameters(named_trainable(_report_own, "rung_a"), which="rung_a", then=("_report_own_rung_b", b))
    assert _sweep(a, "named", str(tmp_path)) == ["rung_a", "rung_a"]


def test_rungs_run_at_once_only_as_far_as_the_cluster_holds_them_whole():
    from igpt.study.study_job import concurrent_rungs, rung_cpus

    cfg = cli.parse(StudyJobConfig, ["--scaling.workers", "2", "--scaling.cpus_per_worker", "0.5"])
    assert rung_cpus(cfg) == pytest.approx(0.1 + 0.1 + 1.0 + 1)  # task, trial, workers, Ray Data
    assert concurrent_rungs(cfg, {"CPU": 3})[0] == 1  # three at once deadlocked a 3-CPU head
    assert concurrent_rungs(cfg, {"CPU": 9})[0] == 4
    assert concurrent_rungs(cfg, {"CPU": 1})[0] == 1  # at least one: a small cluster runs them in turn
    gpu = cli.parse(StudyJobConfig, ["--scaling.workers", "8", "--scaling.use_gpu"])
    n, why = concurrent_rungs(gpu, {"CPU": 400, "GPU": 16})
    assert n == 2 and "16 GPUs / 8 per rung" in why
    fixed = cli.parse(StudyJobConfig, ["--max_concurrent_rungs", "3"])
    assert concurrent_rungs(fixed, {"CPU": 1})[0] == 3


def test_each_sweep_has_a_tune_experiment_name_of_its_own_and_keeps_it():
    """Tune stages an experiment in <session>/artifacts/<start second>/<name>/: two sweeps of one name that start
    in the same second shared it (seen: a rung's resumed sweep restored another rung's trials)."""
    from igpt.storage import Loc

    a, b = Loc("/runs/study/sweep") / "debug", Loc("/runs/study/sweep") / "tiny"
    assert sweep_lr.tune_name(a) != sweep_lr.tune_name(b)
    assert sweep_lr.tune_name(a) == sweep_lr.tune_name(Loc("/runs/study/sweep/debug")) and \
        sweep_lr.tune_name(a).startswith("tune-")
