"""The jobs' entry points: ``python -m pipelines.<job>``, what ``ray job submit`` runs and the README's commands.

Each module here only parses its job's typed config (flags, ``--config``) and calls the job's one library
function; the config and the logic live in igpt, in the package that owns them (:data:`JOBS`). So what Ray ships
to workers and Tune trials (functions, config classes) is pickled by reference to an igpt module and resolves
there; nothing imports ``pipelines`` but its own tests.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

JOBS = {  # job: (module holding its config and ``run``, config class)
    "fit_palette": ("igpt.data.fit_palette_job", "FitPaletteJobConfig"),
    "quantize": ("igpt.data.quantize_job", "QuantizeJobConfig"),
    "pretrain": ("igpt.train.pretrain_job", "PretrainJobConfig"),
    "sweep_lr": ("igpt.train.sweep_lr_job", "SweepLRJobConfig"),
    "finetune": ("igpt.train.finetune_job", "FinetuneJobConfig"),
    "extract": ("igpt.eval.extract_job", "ExtractJobConfig"),
    "probe": ("igpt.eval.probe_job", "ProbeJobConfig"),
    "study": ("igpt.study.study_job", "StudyJobConfig"),
    "main": ("igpt.study.main_job", "MainJobConfig"),
    "compare": ("igpt.track.compare", "CompareJobConfig"),
}


def entry(job: str) -> Callable[[list[str] | None], object]:
    """The ``main(argv)`` of ``python -m pipelines.<job>``: parse into the job's config, run it; a user's mistake
    is one ``error:`` line and exit status 2 (``igpt.cli.main``)."""
    module_name, config = JOBS[job]

    def main(argv: list[str] | None = None) -> object:
        from igpt import cli

        module = importlib.import_module(module_name)
        return cli.main(module.run, getattr(module, config), argv, prog=f"python -m pipelines.{job}")

    return main
