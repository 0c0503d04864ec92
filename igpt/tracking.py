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
