"""A user's mistake (a wrong path, a missing palette, checkpoint or feature set, a bad search space) is one
``error: <message>`` line on stderr and exit code 2, from every entry point, before any Ray work starts."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "igpt" / "data" / "cifar10_sample.parquet"


def test_a_wrong_data_path_of_the_main_job_is_one_error_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pipelines.main", "--data.path", str(tmp_path / "nope"),
                        "--storage_path", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines == [f"error: data.path does not exist: {tmp_path / 'nope'}"], p.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # nothing started


def _cases(tmp: Path) -> dict:
    nope = str(tmp / "nope")
    return {
        "pretrain": (["--train.path", nope, "--palette_path", nope], "dataset path not found"),
        "fit_palette": (["--data.path", nope, "--storage_path", str(tmp)], "dataset path not found"),
        "quantize": (["--palette_path", nope, "--data.path", str(SAMPLE), "--storage_path", str(tmp)],
                     "palette file not found"),
        "extract": (["--checkpoint", nope, "--storage_path", str(tmp)], "no checkpoint at"),
        "finetune": (["--checkpoint", nope, "--storage_path", str(tmp)], "no checkpoint at"),
        "probe": (["--features", nope, "--storage_path", str(tmp)], "is not a feature set"),
        "sweep_lr": (["--space", nope, "--storage_path", str(tmp), "--pretrain.palette_path", nope], nope),
        "compare": (["--storage_path", str(tmp), "--tracking.tracking_uri", f"sqlite:///{tmp}/none.db"],
                    "no MLflow store"),
    }


@pytest.mark.parametrize("job", ["pretrain", "fit_palette", "quantize", "extract", "finetune", "probe", "sweep_lr",
                                 "compare"])
def test_every_entry_point_turns_a_user_error_into_one_line_and_exit_2(job, tmp_path, capsys):
    import importlib

    module = importlib.import_module(f"pipelines.{job}")
    argv, message = _cases(tmp_path)[job]
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_an_unexpected_error_keeps_its_traceback(tmp_path, capsys):
    """Only the user's mistakes are shortened: anything else is a bug to report, with its traceback."""
    from igpt import cli
    from igpt.track.compare import CompareJobConfig

    def broken(cfg):
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        cli.main(broken, CompareJobConfig, [])
