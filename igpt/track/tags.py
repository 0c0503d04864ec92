"""The MLflow tag names igpt writes and reads, one constant each: a filter in ``igpt compare``, the study's
lineage and a run's own tags spell them from here, so a rename is one edit and a typo an ImportError."""

# every run
TAG_JOB = "igpt.job"  # the stage: pretrain, sweep_lr, extract, probe, finetune, study, compare, sample, ...
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: a trial or refit under its sweep's run
TAG_ERROR = "igpt.error"  # a FAILED run's message
TAG_TRACEBACK = "igpt.traceback"  # ... and the end of its traceback
TAG_WARNING = "igpt.warning."  # prefix: igpt.warning.<kind>, a probe's warnings on its parent run

# what a run is of: one filter finds every stage's run of a model (igpt.track.tracking.lineage_tags)
TAG_SIZE = "igpt.size"
TAG_OBJECTIVE = "igpt.objective"
TAG_RESOLUTION = "igpt.resolution"
TAG_PARAMS = "igpt.params"  # the exact parameter count
TAG_PRETRAIN_RUN_ID = "igpt.pretrain_run_id"  # the pretraining run a later stage's model came from
TAG_PRETRAIN_RUN = "igpt.pretrain_run"  # ... and its name
TAG_CHECKPOINT = "igpt.checkpoint"  # the weights file a stage read
TAG_RANDOM_INIT = "igpt.random_init"  # "True": the random-init twin's features or probe
TAG_FEATURES_AT = "igpt.features_at"  # where an extraction wrote its feature set
TAG_FEATURES_RUN_ID = "igpt.features_run_id"  # the extraction run a probe read

# sweeps (igpt.job=sweep_lr and the probe's trials)
TAG_SWEEP = "igpt.sweep"  # on a trial or refit: its sweep's run id (a probe trial: the sweep's name)
TAG_SWEEP_ROLE = "sweep.role"  # trial | refit: compare counts the refit, never a trial
TAG_SWEEP_INDEX = "sweep.index"
TAG_SWEEP_REFIT_RUN_ID = "sweep.refit_run_id"
TAG_SWEEP_STOP_REASON = "sweep.stop_reason"
TAG_SWEEP_STOP_DETAIL = "sweep.stop_detail"
TAG_SWEEP_EDGE_WARNING = "sweep.warning.edge"  # the best rate is at an end of the grid
TAG_SWEEP_NEXT_RATES = "sweep.next_rates"  # ... and the rates to try next
TAG_SWEEP_BEST_LR = "sweep.best_lr"

# studies (igpt.job=study): each rung's stage runs carry the first three
TAG_STUDY = "igpt.study"
TAG_RUNG = "igpt.rung"
TAG_STUDY_RUN_ID = "igpt.study_run_id"
TAG_STUDY_CONCURRENT_RUNGS = "study.concurrent_rungs"
TAG_STUDY_VERDICT_SCALE = "study.verdict_scale"

# a compare run
TAG_COMPARED_RUN_IDS = "igpt.compared_run_ids"
