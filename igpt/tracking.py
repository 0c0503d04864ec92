"""MLflow set-up shared by the jobs: one store, one experiment, artifacts next to the store."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path


STOP_REQUESTED = threading.Event()


class Stopped(BaseException):
    """The job was asked to stop (SIGTERM: ``ray job stop``, a preempted node, Ctrl-C's cousin)."""


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Stopped` so the job's MLflow run ends KILLED, not RUNNING. ``ray job stop``
    sends SIGTERM and a SIGKILL a few seconds later: ending the run is one quick call to the store."""
    def _raise(signum, frame):
        STOP_REQUESTED.set()
        raise Stopped(f"stopped by signal {signum}")

    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, _raise)


def interruptible(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a worker thread while the main thread waits in short slices, so a SIGTERM's
    Python handler runs at once. (A blocking call such as ``TorchTrainer.fit`` waits in C++; the handler would
    only run once it returned, after ``ray job stop``'s SIGKILL, leaving the MLflow run RUNNING.)"""
    out: dict = {}

    def target():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            out["error"] = e

    t = threading.Thread(target=target, name=f"interruptible-{getattr(fn, '__name__', 'fn')}", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.25)
    if "error" in out:
        raise out["error"]
    return out["value"]


def end_status(exc: BaseException | None) -> str:
    """The MLflow status a run ends with: FINISHED, KILLED (stopped) or FAILED (anything else). A stop request
    wins over whatever error it caused: ``ray job stop`` signals the whole process group, so Ray Train's workers
    may die first and surface as a training failure in the driver before (or instead of) the driver's signal."""
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, (Stopped, KeyboardInterrupt)) or STOP_REQUESTED.is_set() else "FAILED"


class JobRun:
    """The MLflow run of a job, used as ``with``: it ends FINISHED, FAILED or KILLED as the job does."""

    def __init__(self, active):
        self.active = active
        self.info = active.info

    def __enter__(self) -> "JobRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        import mlflow

        mlflow.end_run(end_status(exc))
        return False


def default_tracking_uri(output_dir: str | Path) -> str:
    # MLflow 3.17's file store is in maintenance mode and refuses writes; SQLite is its local default.
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking server does not answer."""


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds when a tracking server does not answer, before Ray and the data start (MLflow's own client
    retries for minutes first). A local store only needs a folder it can write."""
    import urllib.error
    import urllib.request

    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                r.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise TrackingUnreachable(f"MLflow tracking server {tracking_uri} did not answer {url} within "
                                      f"{timeout:g} s ({e}): start it, or fix --tracking.tracking_uri") from None
    elif tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///"):]).parent
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise TrackingUnreachable(f"cannot write the MLflow store's folder {folder}")


def _store_lock(tracking_uri: str):
    """An exclusive lock beside a local SQLite store while it is first touched: two jobs opening a fresh store at
    once race on its schema (one dies in an alembic migration). Other stores need none."""
    import contextlib
    import fcntl

    if not tracking_uri.startswith("sqlite:///"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def locked():
        db = Path(tracking_uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    return locked()


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | Path | None = None) -> str:
    """Create (once) and return the experiment id, race-free: created here, in the driver, before any worker or
    trial touches the store, under a lock for a local store's schema, and a job that loses the race to create the
    experiment takes the winner's."""
    import mlflow
    from mlflow.exceptions import MlflowException

    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    with _store_lock(tracking_uri):
        exp = mlflow.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # a tracking server keeps artifacts where it was told to (proxied over HTTP); a local store beside its files
        remote = tracking_uri.startswith(("http://", "https://", "databricks"))
        location = Path(artifact_root).resolve().as_uri() if artifact_root is not None and not remote else None
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except MlflowException:  # another job created it between our look-up and our create
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


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
    by the submitter, the flattened config as params and the whole config as ``config.json``. Use the returned
    :class:`JobRun` in a ``with`` block so the run ends with the job's status."""
    import mlflow

    uri = tracking_cfg.tracking_uri or default_tracking_uri(output_dir)
    exp_id = ensure_experiment(uri, tracking_cfg.experiment, Path(output_dir) / "mlartifacts")
    run = mlflow.start_run(experiment_id=exp_id, run_name=tracking_cfg.run_name or run_name)
    mlflow.set_tag("igpt.job", job)
    if getattr(tracking_cfg, "parent_run_id", None):
        mlflow.set_tag("mlflow.parentRunId", tracking_cfg.parent_run_id)
    params = flatten(config)
    for i in range(0, len(params), 90):  # MLflow takes at most 100 params per call
        mlflow.log_params(dict(list(params.items())[i : i + 90]))
    mlflow.log_dict(config, "config.json")
    return JobRun(run), uri
