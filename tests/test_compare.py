"""igpt.track.compare on a real local MLflow store (SQLite): runs written through MlflowClient as the jobs write
them."""

import csv
import re
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from igpt.config import ModelConfig, TrackingConfig
from igpt.model import config as model_config
from igpt.track import compare
from igpt.track.compare import CompareJobConfig
from igpt.track.tracking import default_tracking_uri, ensure_experiment

T0 = 1_700_000_000_000  # ms; runs get explicit start times so "newest" is unambiguous


def _run(client, exp, name, job, t, tags=None, params=None, metrics=None, histories=None, status="FINISHED"):
    tags = {"igpt.job": job, **(tags or {})}
    rid = client.create_run(exp, start_time=T0 + t, run_name=name, tags=tags).info.run_id
    ms = [Metric(k, v, T0 + t, 0) for k, v in (metrics or {}).items()]
    for k, points in (histories or {}).items():  # logged in the given order (val/loss: largest step first)
        ms += [Metric(k, v, T0 + t + i, step) for i, (step, v) in enumerate(points)]
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in (params or {}).items()], metrics=ms)
    if status != "RUNNING":
        client.set_terminated(rid, status)
    return rid


def _pretrain_params(size, objective, steps, batch):
    m = ModelConfig.from_name(size)
    return {"model.size": size, "model.objective": objective, "model.resolution": m.resolution,
            "model.n_layer": m.n_layer, "model.d_model": m.d_model, "model.params": m.param_count(),
            "steps.total": steps, "optim.global_batch": batch, "optim.lr": 0.001}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    uri = default_tracking_uri(root)
    exp = ensure_experiment(uri, "igpt", root / "mlartifacts")
    client = MlflowClient(uri)
    other = client.create_experiment("other", artifact_location=(root / "other").as_uri())
    ids = {}
    # debug: val/loss lowest (2.9) at step 10, final (3.5) at step 20, and step 20 logged before step 10
    ids["debug"] = _run(client, exp, "debug-ar", "pretrain", 0, tags={"team": "a"},
                        params=_pretrain_params("debug", "ar", 20, 16),
                        metrics={"summary/data_wait_share": 0.042, "train/tokens_per_s": 12345.0},
                        histories={"val/loss": [(20, 3.5), (10, 2.9)],
                                   "train/loss": [(s, 6.0 - 0.1 * s) for s in range(1, 21)]})
    ids["tiny"] = _run(client, exp, "tiny-bert", "pretrain", 1000, tags={"team": "b"},
                       params=_pretrain_params("tiny", "bert", 40, 32),
                       histories={"val/loss": [(20, 3.1), (40, 2.7)],
                                  "train/loss": [(s, 5.0 - 0.05 * s) for s in range(1, 41)]})
    sweep = _run(client, exp, "sweep", "sweep_lr", 1500)
    ids["trial"] = _run(client, exp, "debug-ar-trial", "pretrain", 2000, tags={"mlflow.parentRunId": sweep},
                        params=_pretrain_params("debug", "ar", 20, 16), histories={"val/loss": [(20, 1.0)]})
    ids["other"] = _run(client, other, "debug-other", "pretrain", 2500, params=_pretrain_params("small", "ar", 5, 8),
                        histories={"val/loss": [(5, 1.0)]})

    def probe(t, pid, random_init, acc, best, rel, by_layer, exp_=exp, extra=None):
        rel = {} if rel is None else {"best_layer_relative": rel}
        return _run(client, exp_, f"probe-{t}", "probe", t,
                    tags={"igpt.pretrain_run_id": pid, "igpt.random_init": str(random_init), **(extra or {})},
                    metrics={"test/accuracy": acc, "best_layer": best, **rel},
                    histories={"val/accuracy_by_layer": list(enumerate(by_layer))})

    # layers 0..L (L = n_layer: the final norm's output). debug's probe logged the (layer + 1) / L of older
    # probes (1.0), tiny's none: compare recomputes layer / L from best_layer and model.n_layer either way
    probe(3000, ids["debug"], False, 0.30, 0, 0.0, [0.28, 0.27, 0.26])  # older: superseded by the next one
    ids["debug_probe"] = probe(4000, ids["debug"], False, 0.35, 1, 1.0, [0.30, 0.34, 0.33])
    ids["debug_twin"] = probe(5000, ids["debug"], True, 0.20, 0, 0.0, [0.19, 0.18, 0.17])
    ids["tiny_probe"] = probe(6000, ids["tiny"], False, 0.42, 2, None, [0.31, 0.37, 0.41, 0.40, 0.39])
    probe(6500, ids["tiny"], False, 0.99, 3, 1.0, [0.9] * 4, extra={"mlflow.parentRunId": sweep})  # a child
    probe(6600, ids["tiny"], False, 0.98, 3, 1.0, [0.9] * 4, exp_=other)  # another experiment
    # an extract run links to a pretraining run too, but is no probe
    _run(client, exp, "extract", "extract", 6700, tags={"igpt.pretrain_run_id": ids["tiny"]},
         metrics={"test/accuracy": 0.97})
    ft = _run(client, exp, "ft", "finetune", 7000, tags={"igpt.pretrain_run_id": ids["tiny"]},
              metrics={"test/accuracy": 0.55})
    ids["tiny_ft"] = ft
    _run(client, exp, "ft/refit", "finetune", 8000, tags={"igpt.pretrain_run_id": ids["tiny"],
                                                           "mlflow.parentRunId": ft}, metrics={"test/accuracy": 0.96})
    return {"root": root, "uri": uri, "exp": exp, "client": client, "ids": ids}


def _cfg(store, name="all", **kw):
    return CompareJobConfig(name=name, storage_path=str(store["root"]),
                            tracking=TrackingConfig(tracking_uri=store["uri"]), **kw)


def test_table_files_plots_and_run(store, capsys):
    ids, client = store["ids"], store["client"]
    out = compare.run(_cfg(store))
    rows = out["rows"]
    assert [r.name for r in rows] == ["debug-ar", "tiny-bert"]  # by parameter count; no trial, no other experiment
    debug, tiny = rows
    dparams, tparams = ModelConfig.from_name("debug").param_count(), ModelConfig.from_name("tiny").param_count()
    assert dparams < tparams
    assert (debug.size, debug.objective, debug.resolution, debug.n_layer, debug.params, debug.steps) == \
           ("debug", "ar", 32, 2, dparams, 20)
    assert (tiny.size, tiny.objective, tiny.params, tiny.steps, tiny.global_batch) == ("tiny", "bert", tparams, 40, 32)
    # final val loss: the value at the largest step, not the minimum nor the last logged
    assert (debug.final_val_loss, debug.final_val_step) == (3.5, 20)
    assert (tiny.final_val_loss, tiny.final_val_step) == (2.7, 40)
    assert debug.tokens == 20 * 16 * 32**2 and tiny.tokens == 40 * 32 * 32**2
    # compute = the model's own FLOPs per token (the MFU formula) x tokens, not 6 N D
    debug_cfg, tiny_cfg = ModelConfig.from_name("debug"), ModelConfig.from_name("tiny")
    assert debug.compute_flops == pytest.approx(debug_cfg.train_flops_per_token() * 20 * 16 * 1024)
    assert tiny.compute_flops == pytest.approx(tiny_cfg.train_flops_per_token() * 40 * 32 * 1024)
    assert debug.compute_flops != pytest.approx(6 * dparams * 20 * 16 * 1024, rel=0.05)
    assert debug.non_embedding_params == debug_cfg.non_embedding_params() < dparams
    assert debug.status == tiny.status == "FINISHED"
    # the newest trained probe (0.35, not the older 0.30), its layer and depth layer / L: feature l is taken after
    # l blocks (layer 1 of 2 blocks is depth 0.5, not the (l + 1) / L = 1.0 the probe logged); the random-init twin
    assert (debug.probe_test_accuracy, debug.best_layer, debug.best_layer_relative) == (0.35, 1, 0.5)
    assert debug.probe_run_id == ids["debug_probe"]
    assert (debug.random_init_test_accuracy, debug.random_init_run_id) == (0.20, ids["debug_twin"])
    # tiny: the top-level probe (not the child's 0.99 nor the other experiment's 0.98); no twin; the fine-tuning
    # parent's accuracy (not its refit child's 0.96)
    assert (tiny.probe_test_accuracy, tiny.best_layer, tiny.best_layer_relative) == (0.42, 2, 0.5)  # not 3 / 4
    assert tiny.random_init_test_accuracy is None and tiny.random_init_run_id is None
    assert (tiny.finetune_test_accuracy, tiny.finetune_run_id) == (0.55, ids["tiny_ft"])
    assert debug.finetune_test_accuracy is None

    folder = store["root"] / "all"
    with open(folder / "table.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["name"] for r in table] == ["debug-ar", "tiny-bert"]
    assert table[0]["run_id"] == ids["debug"] and float(table[0]["final_val_loss"]) == 3.5
    assert table[0]["status"] == table[1]["status"] == "FINISHED"
    assert float(table[0]["compute_flops"]) == pytest.approx(debug.compute_flops)
    assert float(table[0]["best_layer_relative"]) == 0.5 and float(table[0]["random_init_test_accuracy"]) == 0.2
    assert table[1]["random_init_test_accuracy"] == "" and float(table[1]["finetune_test_accuracy"]) == 0.55

    md = (folder / "table.md").read_text().splitlines()
    assert md[0].startswith("| name | status | size | objective | IR | params |") and "fine-tune acc" in md[0]
    assert md[1].startswith("|---|---|---|---|---:|")
    cells = [c.strip() for c in md[2].strip("|").split("|")]
    assert cells[:5] == ["debug-ar", "FINISHED", "debug", "ar", "32"]
    assert cells[10:] == ["3.5000", "12.3K", "4.20%", "1", "0.50", "35.00%", "20.00%", "-"]  # its data wait
    cells = [c.strip() for c in md[3].strip("|").split("|")]
    assert cells[0] == "tiny-bert" and cells[10:] == ["2.7000", "-", "-", "2", "0.50", "42.00%", "-", "55.00%"]
    assert float(table[0]["data_wait_share"]) == 0.042 and table[1]["data_wait_share"] == ""
    assert "depth = layer / L" in (folder / "table.md").read_text()

    printed = capsys.readouterr().out
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("name "))
    assert lines[head + 2].startswith("debug-ar ") and lines[head + 3].startswith("tiny-bert")
    assert len({len(line) for line in lines[head:head + 2]}) == 1  # header and rule aligned
    assert re.split(r"\s{2,}", lines[head + 2])[10:] == ["3.5000", "12.3K", "4.20%", "1", "0.50", "35.00%",
                                                          "20.00%", "-"]
    # columns aligned: every row's cells end (right-aligned ones) where the header's do
    assert lines[head].index("final val loss") + len("final val loss") == lines[head + 3].index("2.7000") + 6
    assert str(folder / "table.csv") in printed and str(folder / "plots" / "loss_curves.png") in printed
    assert "not plotted" not in printed and out["plotted"] == [ids["debug"], ids["tiny"]]

    for name in compare.PLOTS:
        png = folder / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    run = client.get_run(out["run_id"])
    assert run.data.tags["igpt.job"] == "compare" and run.info.status == "FINISHED"
    assert run.info.run_name == "all/compare"  # a stage says its stage (igpt.track.tracking.default_run_name)
    assert run.info.experiment_id == store["exp"] and run.data.metrics["compare/runs"] == 2
    # it links the runs it compared: their ids, and the UI's run pages in its description
    assert run.data.tags["igpt.compared_run_ids"].split(",") == [r.run_id for r in out["rows"]]
    assert f"(#/experiments/{store['exp']}/runs/{ids['debug']})" in run.data.tags["mlflow.note.content"]
    assert sorted(a.path for a in client.list_artifacts(out["run_id"])) == ["config.json", "fits.txt", "plots",
                                                                           "table.csv", "table.md"]
    # laws per objective and IR, never across them: here one run each, too few to fit, said so
    fits = (folder / "fits.txt").read_text()
    assert "ar IR 32 (1 runs; rates not swept per size: confounded):" in fits and "bert IR 32 (1 runs" in fits
    assert fits.count("not fitted") == 4 and "at least 3 rungs" in fits and fits in printed
    assert sorted(a.path for a in client.list_artifacts(out["run_id"], "plots")) == \
           sorted(f"plots/{n}" for n in compare.PLOTS)
    local = client.download_artifacts(out["run_id"], "table.csv", str(store["root"]))
    assert Path(local).read_text() == (folder / "table.csv").read_text()
    # the compare run is no pretraining run: a second compare still sees the same two
    assert [r.name for r in compare.run(_cfg(store, name="again"))["rows"]] == ["debug-ar", "tiny-bert"]


def test_the_tables_and_plots_go_to_object_storage(store, s3):
    """--storage_path on the S3 test server: the table (CSV, markdown), the fits and the four plots are put there
    whole, and the markdown is the table of the rows compared."""
    from dataclasses import replace

    from igpt.storage import Loc

    out = compare.run(replace(_cfg(store, name="bucket"), storage_path=f"{s3}/compare"))
    folder = Loc(out["storage_path"])
    assert folder.uri == f"{s3}/compare/bucket"
    assert set(folder.files()) == {"table.csv", "table.md", "fits.txt", *(f"plots/{p}" for p in compare.PLOTS)}
    assert Loc(out["markdown"]).read_text() == compare.markdown_table(out["rows"])
    assert (folder / "plots" / compare.PLOTS[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(Loc(out["csv"]).read_text().splitlines()))
    assert [r["name"] for r in rows] == ["debug-ar", "tiny-bert"]


def test_filters_select_runs(store, capsys):
    client, exp, ids = store["client"], store["exp"], store["ids"]

    def names(**kw):
        return [r.name for r in compare.collect(client, exp, **kw).rows]

    assert names() == ["debug-ar", "tiny-bert"]
    assert names(name_like="debug%") == ["debug-ar"]
    assert names(name_like="%-bert") == ["tiny-bert"]
    assert names(tag="team=b") == ["tiny-bert"]
    assert names(tag="team=a, igpt.job=pretrain") == ["debug-ar"]
    assert names(extra_filter="params.`model.objective` = 'ar'") == ["debug-ar"]
    assert names(name_like="debug%", tag="team=b") == []
    assert names(name_like="debug-ar-trial") == []  # the child run matches the name but is a trial
    # pagination: one run per page gives every run, once
    flt = compare.pretrain_filter()
    paged = compare.search(client, [exp], flt, page_size=1)
    assert len(paged) == 3 and sorted(r.info.run_id for r in paged) == \
           sorted([ids["debug"], ids["tiny"], ids["trial"]])
    # the command line: python -m igpt compare, and the job entry point
    from igpt.__main__ import main as igpt_main
    from pipelines.compare import main as job_main

    igpt_main(["compare", "--name", "cli", "--storage_path", str(store["root"]), "--name_like", "tiny%",
               "--tracking.tracking_uri", store["uri"]])
    printed = capsys.readouterr().out
    assert "tiny-bert" in printed and "debug-ar" not in printed
    assert "attributes.run_name LIKE 'tiny%'" in printed
    with open(store["root"] / "cli" / "table.csv") as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == ["tiny-bert"]
    out = job_main(["--name", "job", "--storage_path", str(store["root"]), "--tag", "team=a",
                    "--tracking.tracking_uri", store["uri"]])
    assert [r.name for r in out["rows"]] == ["debug-ar"]
    assert client.get_run(out["run_id"]).data.params["tag"] == "team=a"


def test_clear_errors(store, tmp_path, capsys):
    client, exp = store["client"], store["exp"]
    with pytest.raises(ValueError, match=r"experiment 'nope' not found .*'igpt'.*'other'"):
        compare.run(CompareJobConfig(name="x", storage_path=str(store["root"]),
                                     tracking=TrackingConfig(tracking_uri=store["uri"], experiment="nope")))
    with pytest.raises(ValueError, match=r"MLflow rejected the search filter .*params.x ~ 1"):
        compare.collect(client, exp, extra_filter="params.x ~ 1")
    with pytest.raises(ValueError, match=r"no pretraining runs .* match .*LIKE 'zzz%'"):
        compare.run(_cfg(store, name="none", name_like="zzz%"))
    assert not (store["root"] / "none").exists()
    with pytest.raises(ValueError, match="no MLflow store at"):
        compare.run(CompareJobConfig(storage_path=str(tmp_path)))
    assert not (tmp_path / "mlflow.db").exists()
    with pytest.raises(ValueError, match="tag: expected key=value"):
        CompareJobConfig(tag="team")
    # on the command line: a usage error for the flag, a one-line message (exit status 2) for the rest
    from pipelines.compare import main as job_main

    with pytest.raises(SystemExit) as e:
        job_main(["--help"])
    assert e.value.code == 0 and "e.g. 'debug%'" in capsys.readouterr().out  # help text with % renders
    with pytest.raises(SystemExit) as e:
        job_main(["--tag", "team", "--tracking.tracking_uri", store["uri"]])
    assert e.value.code == 2 and "tag: expected key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        job_main(["--storage_path", str(store["root"]), "--filter", "metrics.x = 'a'",
                  "--tracking.tracking_uri", store["uri"]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: MLflow rejected the search filter")
    assert "Traceback" not in err and "metrics.x = 'a'" in err


def test_depth_is_layer_over_blocks():
    # feature l is taken after l blocks: layer 0 (the embeddings) is depth 0, layer L (ln_f's output) depth 1
    assert [compare.depth(l, 4) for l in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert compare.depth(2, None, 0.7) == 0.7 and compare.depth(None, 4) is None


def test_unfinished_runs_are_listed_with_their_status_and_left_out_of_the_plots(tmp_path, monkeypatch, capsys):
    uri = default_tracking_uri(tmp_path)
    exp = ensure_experiment(uri, "igpt", tmp_path / "mlartifacts")
    client = MlflowClient(uri)
    ids = {}
    for t, (name, status) in enumerate([("done", "FINISHED"), ("broken", "FAILED"), ("going", "RUNNING")]):
        ids[name] = _run(client, exp, name, "pretrain", 1000 * t, params=_pretrain_params("debug", "ar", 20, 16),
                         histories={"val/loss": [(10, 3.0 + t)], "train/loss": [(10, 4.0 + t)]}, status=status)
        _run(client, exp, f"probe-{name}", "probe", 1000 * t + 500, tags={"igpt.pretrain_run_id": ids[name]},
             metrics={"test/accuracy": 0.3, "best_layer": 2}, histories={"val/accuracy_by_layer": [(0, 0.2), (2, 0.3)]})
    plotted = []  # the rows the two loss scatters draw (the depth and loss-curve plots draw the same rows)
    real = compare._scatter_loss
    monkeypatch.setattr(compare, "_scatter_loss", lambda rows, *a: (plotted.append([r.name for r in rows]),
                                                                    real(rows, *a)))

    cfg = CompareJobConfig(name="st", storage_path=str(tmp_path), tracking=TrackingConfig(tracking_uri=uri))
    out = compare.run(cfg)
    assert {r.name: r.status for r in out["rows"]} == {"done": "FINISHED", "broken": "FAILED", "going": "RUNNING"}
    assert out["plotted"] == [ids["done"]] and plotted == [["done"], ["done"]]
    assert [r.name for r in compare.plotted_rows(out["rows"])] == ["done"]
    with open(tmp_path / "st" / "table.csv") as fh:
        assert {r["name"]: r["status"] for r in csv.DictReader(fh)} == \
               {"done": "FINISHED", "broken": "FAILED", "going": "RUNNING"}
    md = (tmp_path / "st" / "table.md").read_text()
    assert "| broken | FAILED |" in md and "| going | RUNNING |" in md and "| done | FINISHED |" in md
    printed = capsys.readouterr().out
    assert re.search(r"^broken\s+FAILED\s", printed, re.M) and \
           "not plotted (not FINISHED; --include_unfinished plots them): broken (FAILED), going (RUNNING)" in printed
    assert next(r for r in out["rows"] if r.name == "broken").best_layer_relative == 1.0  # layer 2 of 2 blocks

    # asked for: every run is plotted, from the command line too
    plotted.clear()
    from pipelines.compare import main as job_main

    out = job_main(["--name", "all", "--storage_path", str(tmp_path), "--include_unfinished",
                    "--tracking.tracking_uri", uri])
    assert sorted(out["plotted"]) == sorted(ids.values())
    assert [sorted(p) for p in plotted] == [["broken", "done", "going"]] * 2
    assert "not plotted" not in capsys.readouterr().out


def test_a_sweeps_refit_is_compared_and_its_trials_are_not(tmp_path):
    """The paper's procedure makes its model as a child run (the sweep's refit): compare counts it, not the trials."""
    uri = default_tracking_uri(tmp_path)
    exp = ensure_experiment(uri, "igpt", tmp_path / "mlartifacts")
    client = MlflowClient(uri)
    sweep = _run(client, exp, "lr-s", "sweep_lr", 0)
    for i, lr in enumerate((0.01, 0.003)):
        _run(client, exp, f"lr-s/lr_{lr:g}", "pretrain", 10 + i, tags={"mlflow.parentRunId": sweep},
             params=_pretrain_params("debug", "ar", 2, 16), histories={"val/loss": [(2, 4.0 + i)]})
    refit = _run(client, exp, "lr-s/refit", "pretrain", 20, tags={"mlflow.parentRunId": sweep, "sweep.role": "refit"},
                 params=_pretrain_params("debug", "ar", 20, 16), histories={"val/loss": [(20, 3.0)]})
    cmp = compare.collect(client, exp)
    assert [(r.name, r.run_id, r.final_val_loss) for r in cmp.rows] == [("lr-s/refit", refit, 3.0)]


def test_compute_is_flops_per_token_times_tokens_for_every_size():
    from igpt.model.config import MODEL_SIZES

    for size in MODEL_SIZES:
        cfg = ModelConfig.from_name(size)
        tokens, flops = model_config.train_compute(cfg.n_layer, cfg.d_model, cfg.resolution, 100, 64, cfg.n_colors)
        assert tokens == 100 * 64 * cfg.resolution**2
        assert flops == cfg.train_flops_per_token() * tokens
        assert compare.non_embedding_params(cfg.n_layer, cfg.d_model) == cfg.non_embedding_params()
        # what is left out of N is exactly the vocabulary and position matrices
        assert cfg.param_count() - cfg.non_embedding_params() == (cfg.vocab_size + cfg.n_ctx + cfg.n_colors) * \
            cfg.d_model
    assert model_config.train_compute(None, 64, 32, 1, 1) == (None, None)
