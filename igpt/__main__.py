"""``python -m igpt <command>``: the small commands around the library (igpt/commands.py) and ``compare``; each
command's flags are generated from its typed config, as the jobs' are (``igpt.cli``)."""

from __future__ import annotations

import sys

COMMANDS = {  # command: (function, config class) in igpt.commands; compare's in igpt.track.compare
    "sizes": ("sizes", "SizesConfig"),
    "plan": ("plan", "PlanConfig"),
    "sample": ("sample", "SampleConfig"),
    "import-hf": ("import_hf", "ImportHFConfig"),
    "export-hf": ("export_hf", "ExportHFConfig"),
}


def main(argv: list[str] | None = None) -> None:
    import importlib

    from igpt import cli

    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else ""
    if name == "compare":
        from igpt.track.compare import CompareJobConfig, run

        cli.main(run, CompareJobConfig, argv[1:], prog="python -m igpt compare")
        return
    if name not in COMMANDS:
        known = ", ".join([*COMMANDS, "compare"])
        print(f"usage: python -m igpt {{{known}}} [flags]; python -m igpt <command> --help\n"
              f"error: {'a command is required' if not name else f'unknown command {name!r}'}", file=sys.stderr)
        raise SystemExit(2)
    commands = importlib.import_module("igpt.commands")
    fn, config = (getattr(commands, n) for n in COMMANDS[name])
    cli.main(lambda cfg: print(fn(cfg)), config, argv[1:], prog=f"python -m igpt {name}")


if __name__ == "__main__":
    main()
