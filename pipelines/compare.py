"""Compare pretraining runs recorded in MLflow: a table (printed, ``table.csv``, ``table.md``) and plots, logged
as an MLflow run with tag ``igpt.job=compare``. The logic is ``igpt.track.compare``; ``python -m igpt compare`` is the
same command.

    python -m pipelines.compare --name sizes --name_like 'cifar-%' --tracking.tracking_uri sqlite:///$PWD/runs/mlflow.db
    ray job submit --working-dir . -- python -m pipelines.compare --name sizes --output_dir /mnt/igpt/compare \\
        --tag team=vision --tracking.tracking_uri http://mlflow:5000

It only reads MLflow (its search API) and draws: no Ray inside, so it runs as a job or on a laptop alike.
"""

from __future__ import annotations

import sys

from igpt.track import compare


def main(argv: list[str] | None = None) -> dict:
    return compare.main(argv, prog="python -m pipelines.compare")


if __name__ == "__main__":
    # run as the importable module, not as __main__: what Ray ships to workers and Tune trials (functions, the
    # config class) is then pickled by reference and resolves there, type hints included
    import importlib

    importlib.import_module("pipelines.compare").main(sys.argv[1:])
