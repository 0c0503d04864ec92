"""MLflow set-up shared by the jobs: one store, one experiment, artifacts next to the store."""

from __future__ import annotations

from pathlib import Path


def default_tracking_uri(output_dir: str | Path) -> str:
    # MLflow 3.17's file store is in maintenance mode and refuses writes; SQLite is its local default.
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | Path | None = None) -> str:
    """Create (once) and return the experiment id. Created here, in the driver, before any worker or trial
    touches the store: concurrent first use of a fresh SQLite store races on its schema."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root is not None else None
    return mlflow.create_experiment(name, artifact_location=location)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config dict -> {"a.b.c": value}, the form MLflow params take."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def start_run(tracking_cfg, output_dir: str | Path, run_name: str, job: str, config: dict):
    """Open an MLflow run for a job: the store (default: SQLite in ``output_dir``), the experiment, the run named
    by the submitter, the flattened config as params and the whole config as ``config.json``."""
    import mlflow

    uri = tracking_cfg.tracking_uri or default_tracking_uri(output_dir)
    exp_id = ensure_experiment(uri, tracking_cfg.experiment, Path(output_dir) / "mlartifacts")
    run = mlflow.start_run(experiment_id=exp_id, run_name=tracking_cfg.run_name or run_name)
    mlflow.set_tag("igpt.job", job)
    params = flatten(config)
    for i in range(0, len(params), 90):  # MLflow takes at most 100 params per call
        mlflow.log_params(dict(list(params.items())[i : i + 90]))
    mlflow.log_dict(config, "config.json")
    return run, uri
