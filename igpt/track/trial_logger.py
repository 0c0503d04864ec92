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
from ray.tune.result import AUTO_RESULT_KEYS, DONE, TIMESTEPS_TOTAL, TRAINING_ITERATION, TRIAL_ID

from igpt.track.tracking import STOP_REQUESTED

# Tune's bookkeeping in every result (pid, timestamp, done, iteration counters, ...): not the trial's metrics, and
# in MLflow's table they bury the ones that are
BOOKKEEPING = frozenset(AUTO_RESULT_KEYS) | {DONE, TRIAL_ID, "experiment_tag", "should_checkpoint"}


class TrialRunLogger(MLflowLoggerCallback):
    def log_trial_start(self, trial):
        if STOP_REQUESTED.is_set() and trial not in self._trial_runs:
            return
        super().log_trial_start(trial)
        if STOP_REQUESTED.is_set():
            self.mlflow_util.end_run(run_id=self._trial_runs[trial], status="KILLED")

    def log_trial_result(self, iteration, trial, result):
        if trial in self._trial_runs and not STOP_REQUESTED.is_set():
            # Ray's log_trial_result, less the bookkeeping (its step is still the training iteration)
            kept = {k: v for k, v in result.items() if k not in BOOKKEEPING and not k.startswith("config/")}
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=kept,
                                         step=result.get(TIMESTEPS_TOTAL) or result[TRAINING_ITERATION])

    def log_trial_end(self, trial, failed=False):
        if trial in self._trial_runs and not STOP_REQUESTED.is_set():  # a stopped trial's run stays KILLED
            super().log_trial_end(trial, failed)
