"""MLflow set-up shared by the jobs: one store, one experiment, artifacts next to the store."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from igpt.errors import UserError
from igpt.storage import Loc, is_remote
from igpt.track.tags import (
    TAG_ERROR,
    TAG_JOB,
    TAG_OBJECTIVE,
    TAG_PARAMS,
    TAG_PARENT,
    TAG_PRETRAIN_RUN,
    TAG_PRETRAIN_RUN_ID,
    TAG_RESOLUTION,
    TAG_SIZE,
    TAG_STUDY_RUN_ID,
    TAG_TRACEBACK,
)

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


def default_tracking_uri(storage_path: str | Path) -> str:
    # MLflow 3.17's file store is in maintenance mode and refuses writes; SQLite is its local default.
    if is_remote(storage_path):
        raise UserError(f"runs kept on object storage ({storage_path}) need an MLflow tracking server: give "
                        "--tracking.tracking_uri http://<host>:5000 (or sqlite:///<local path> on one machine); "
                        "SQLite cannot live in an object store")
    return f"sqlite:///{Path(storage_path).resolve() / 'mlflow.db'}"


class TrackingUnreachable(UserError, RuntimeError):
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
            if exp.tags.get("mlflow.experimentKind") is None:  # made before igpt set it, or by hand
                for k, v in EXPERIMENT_KIND.items():
                    mlflow.MlflowClient(tracking_uri).set_experiment_tag(exp.experiment_id, k, v)
            return exp.experiment_id
        # a tracking server keeps artifacts where it was told to (proxied over HTTP); a local store beside its files
        remote = tracking_uri.startswith(("http://", "https://", "databricks"))
        location = Path(artifact_root).resolve().as_uri() if artifact_root is not None and not remote else None
        try:
            return mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:  # another job created it between our look-up and our create
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on runs, not GenAI traces


def lineage_tags(model: dict | None, pretrain_run_id: str | None = None, client=None) -> dict:
    """The tags that let one ``tags.`` filter find every run of a model in any stage: its size, objective,
    resolution and parameter count (``igpt.params``, exact), and the pretraining run it came from (id and, through
    ``client``, the submitter's name)."""
    named = (("size", TAG_SIZE), ("objective", TAG_OBJECTIVE), ("resolution", TAG_RESOLUTION))
    tags = {t: str(model[k]) for k, t in named if model and model.get(k) is not None}
    if model:
        import contextlib
        import dataclasses

        from igpt.model.config import ModelConfig

        known = {f.name for f in dataclasses.fields(ModelConfig)}
        with contextlib.suppress(TypeError, ValueError):  # a partial dict (a test's): the other tags still hold
            tags[TAG_PARAMS] = str(ModelConfig(**{k: v for k, v in model.items() if k in known}).param_count())
    if pretrain_run_id:
        tags[TAG_PRETRAIN_RUN_ID] = pretrain_run_id
        if client is not None:
            import contextlib

            with contextlib.suppress(Exception):  # a store that no longer has it: the id is still there
                tags[TAG_PRETRAIN_RUN] = client.get_run(pretrain_run_id).info.run_name
    return tags


CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def log_splits(client, run_id: str, splits: dict) -> None:
    """Each split a run read as an MLflow dataset input (the UI's Datasets column): ``{"train": (spec, records)}``
    with its source (the dataset's path or URI), a digest of what selects its records (path, format, split,
    key_prefix, max_images, holdout, part: the same selection, the same digest) and its record count."""
    import hashlib
    import json
    from dataclasses import asdict

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    class Split(MetaDataset):
        def __init__(self, source, name, digest, records):
            self.records = records
            super().__init__(source, name=name, digest=digest)

        @property
        def profile(self):
            return {"num_rows": self.records}

        def to_dict(self) -> dict:  # MetaDataset's leaves the profile out; the entity takes it from here
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    inputs = []
    for role, (spec, records) in splits.items():
        chosen = json.dumps(asdict(spec), sort_keys=True)
        ds = Split(resolve_dataset_source(spec.path), f"{role}: {spec.split}" + (f"/{spec.part}" if spec.part !=
                   "all" else ""), hashlib.sha256(chosen.encode()).hexdigest()[:10], int(records))
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", CONTEXTS[role])]))
    client.log_inputs(run_id, datasets=inputs)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config dict -> {"a.b.c": value}, the form MLflow params take."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


STAGE_LABELS = {"fit_palette": "palette", "quantize": "quantize", "extract": "extract", "probe": "probe",
                "finetune": "finetune", "sweep_lr": "sweep_lr", "compare": "compare"}


def default_run_name(name: str, job: str, tags: dict) -> str:
    """A run's name when the submitter gives none (``--tracking.run_name``): a pretraining run is the job's name,
    the model every later stage refers to; any other top-level run says its stage, ``<name>/<stage>``
    (``s-cifar/extract``, ``s-cifar/probe``), so the runs of one model do not share a name in the runs table; a
    name that already ends with its stage, and a run nested under another (a trial), keep the name given."""
    label = STAGE_LABELS.get(job)
    if label is None or TAG_PARENT in tags or name == label or name.endswith(f"/{label}"):
        return name
    return f"{name}/{label}"


def _up(tags: dict) -> str | None:
    """The run a run belongs to: its parent (``mlflow.parentRunId``), or the study it is a rung's stage of
    (``igpt.study_run_id``: a study's stage runs stay top-level, as results ``compare`` reads, yet end with it)."""
    return tags.get(TAG_PARENT) or tags.get(TAG_STUDY_RUN_ID)


class JobRun:
    """The one lifecycle of a job's MLflow run; every driver uses it as ``with JobRun.open(...) as job:``.

    - **open**: the store and the experiment (created race-free, before any worker or trial touches them), then
      the run: continued when ``id_file`` names one (a re-submission of the same name), else created under the
      submitter's name with the job's tags, its params and ``config.json``, logged once.
    - **exit**: FINISHED on success; FAILED with the error (tag ``igpt.error``); KILLED when stopped (SIGTERM:
      ``ray job stop``; SIGINT). Runs under it still RUNNING (a trial whose process the stop killed) end with it.
    - **wait(fn)**: a blocking call (``TorchTrainer.fit``, ``Tuner.fit``) that a stop interrupts at once.
    - **log_*, set_tag(s)**: the one way a driver logs to its run (MLflow's client with this run's id; MLflow's
      fluent, process-global active run is not used: a driver may hold several runs, a trial's and its parent's).
    """

    def __init__(self, client, uri: str, run_id: str, experiment_id: str, resumed: bool):
        self.client, self.uri, self.run_id, self.experiment_id = client, uri, run_id, experiment_id
        self.resumed = resumed

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = list(params.items())
        for i in range(0, len(items), 90):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in items[i:i + 90]])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def set_tag(self, key: str, value) -> None:
        self.client.set_tag(self.run_id, key, str(value))

    def log_dict(self, d: dict, name: str) -> None:
        self.client.log_dict(self.run_id, d, name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_artifacts(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), folder)

    @classmethod
    def open(cls, tracking, store_dir: str | Path, name: str, kind: str, config: dict | None, *,
             params: dict | None = None, tags: dict | None = None, id_file: str | Path | Loc | None = None
             ) -> JobRun:
        """``tracking``: a TrackingConfig (store, experiment, run name, parent); ``store_dir``: where a local
        store and its artifacts live when none is given; ``config``: logged as params (flattened) and
        ``config.json``; ``params``: more params, or values that replace the config's."""
        from mlflow.tracking import MlflowClient

        uri = tracking.tracking_uri or default_tracking_uri(store_dir)
        # artifacts beside a local store; with runs on object storage, where the tracking server keeps them
        exp_id = ensure_experiment(uri, tracking.experiment,
                                   None if is_remote(store_dir) else Path(store_dir) / "mlartifacts")
        client = MlflowClient(uri)
        id_file = Loc(id_file) if id_file is not None else None
        resumed = id_file is not None and id_file.exists()
        if resumed:
            run_id = id_file.read_text().strip()
            client.update_run(run_id, status="RUNNING")
        else:
            extra = tracking.tag_dict() if hasattr(tracking, "tag_dict") else {}
            all_tags = {TAG_JOB: kind, **lineage_tags((config or {}).get("model")), **extra, **(tags or {})}
            if getattr(tracking, "parent_run_id", None):  # e.g. a sweep's trial: nested under the sweep's run
                all_tags[TAG_PARENT] = tracking.parent_run_id
            from mlflow.tracking.context.registry import resolve_tags

            # MLflow's own context tags (user, source script, git commit), as its fluent API adds them: the UI's
            # Source and Created-by columns
            run_id = client.create_run(exp_id, run_name=tracking.run_name or default_run_name(name, kind, all_tags),
                                       tags=resolve_tags(all_tags)).info.run_id
            if id_file is not None:
                id_file.write_text(run_id)
        out = cls(client, uri, run_id, exp_id, resumed)
        if not resumed:
            out.log_params({**(flatten(config) if config else {}), **(params or {})})
            if config is not None:
                out.log_dict(config, "config.json")
        return out

    def wait(self, fn, *args, **kwargs):
        return interruptible(fn, *args, **kwargs)

    def __enter__(self) -> JobRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.end(end_status(exc), exc)
        return False

    def _stopped_from_above(self) -> bool:
        """This run, or one above it, already ended KILLED: a stop reached the job first. A Tune trial's process is
        not in the job's process group: ``ray job stop`` signals the driver, which ends its run and every run under
        it KILLED, and only then does Ray tear the trial down. The trial sees its workers die as an error, and
        ending its run FAILED then would overwrite the KILLED the stop wrote (seen in CI under load)."""
        rid, seen = self.run_id, set()
        while rid and rid not in seen:
            seen.add(rid)
            try:
                run = self.client.get_run(rid)
            except Exception:
                return False
            if run.info.status == "KILLED":
                return True
            rid = _up(run.data.tags)
        return False

    def end(self, status: str, exc: BaseException | None = None) -> None:
        if status == "FAILED" and self._stopped_from_above():
            status = "KILLED"
        if status == "FAILED" and exc is not None:  # the reason where the UI shows it: a tag and the description
            import traceback

            error = f"{type(exc).__name__}: {exc}"
            tail = "".join(traceback.format_exception(exc))[-4000:]
            self.set_tag(TAG_ERROR, error[:5000])
            self.set_tag(TAG_TRACEBACK, tail)
            self.set_tag("mlflow.note.content", f"**FAILED**: {error[:2000]}\n\n```\n{tail}\n```")
        # this run first: on `ray job stop` the SIGKILL follows the SIGTERM within seconds, and the job's own run is
        # the record that must not stay RUNNING; then the runs under it (one search, then their calls at once)
        self.client.set_terminated(self.run_id, status)
        self._end_children(self.run_id, status)

    def _end_children(self, run_id: str, status: str) -> None:
        """Runs under ``run_id`` still RUNNING, at any depth, end KILLED (or with the parent's failure): their
        process is gone with the job's. A parent that finished leaves none running unless one was abandoned.

        One search for the experiment's RUNNING runs, then a call per run under this one, all at once: on ``ray job
        stop`` this races the SIGKILL that follows the SIGTERM (after 3 s by Ray's default, 30 s with
        cluster/runtime_env.yaml), where a search per child (18 probe trials) lost under load."""
        child_status = "KILLED" if status == "FINISHED" else status
        running = {r.info.run_id: _up(r.data.tags) for r in self.client.search_runs(
            [self.experiment_id], "attributes.status = 'RUNNING'", max_results=10000)}
        parents: dict[str, str | None] = {}

        def parent(rid: str) -> str | None:  # a finished run between two running ones is looked up once
            if rid in running:
                return running[rid]
            if rid not in parents:
                try:
                    parents[rid] = _up(self.client.get_run(rid).data.tags)
                except Exception:
                    parents[rid] = None
            return parents[rid]

        under = []
        for rid in running:
            seen, up = {rid}, parent(rid)
            while up and up not in seen and up != run_id:
                seen.add(up)
                up = parent(up)
            if up == run_id and rid != run_id:
                under.append(rid)
        if under:  # the calls at once (each is a round trip to the store), not one after another
            import sys
            import time
            from concurrent.futures import ThreadPoolExecutor

            t0 = time.perf_counter()
            with ThreadPoolExecutor(min(16, len(under))) as pool:
                list(pool.map(lambda rid: self.client.set_terminated(rid, child_status), under))
            print(f"ended {len(under)} MLflow run(s) under run {run_id} {child_status} in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
