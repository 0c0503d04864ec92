"""Ray Tune's per-trial MLflow runs, none left RUNNING by a stopped job.

Ray's ``MLflowLoggerCallback`` creates a child run per trial from the Tune loop, which runs in the driver's
background thread (``igpt.track.tracking.interruptible``). A stop (SIGTERM: ``ray job stop``) ends the job's run and
then every run under it (:meth:`igpt.track.tracking.JobRun.end`), while that thread may still be starting trials: a
run it created after that sweep stayed RUNNING for good. Once a stop is requested this logger starts no run, and
one it was creating when the stop came it ends KILLED itself. The stop is requested before the job's sweep of its
children, so every trial run is ended by one or the other.
"""

from __future__ import annotations

from ray.air.integrations.mlflow import MLflowLoggerCallback

from igpt.track.tracking import STOP_REQUESTED


class TrialRunLogger(MLflowLoggerCallback):
    def log_trial_start(self, trial):
        if STOP_REQUESTED.is_set() and trial not in self._trial_runs:
            return
        super().log_trial_start(trial)
        if STOP_REQUESTED.is_set():
            self.mlflow_util.end_run(run_id=self._trial_runs[trial], status="KILLED")

    def log_trial_result(self, iteration, trial, result):
        if trial in self._trial_runs and not STOP_REQUESTED.is_set():
            super().log_trial_result(iteration, trial, result)

    def log_trial_end(self, trial, failed=False):
        if trial in self._trial_runs and not STOP_REQUESTED.is_set():  # a stopped trial's run stays KILLED
            super().log_trial_end(trial, failed)
