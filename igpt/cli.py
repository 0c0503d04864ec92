"""Command lines generated from the config dataclasses: every field becomes ``--section.field``.

Nested dataclasses become dotted prefixes (``--model.size S --train.steps 100``); a field's ``help`` metadata is
its help text; ``bool`` fields take ``--x`` / ``--no-x``; ``Literal`` fields list their choices. Values are
checked by the dataclasses' own ``__post_init__``, so the CLI and the Python API enforce the same invariants.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from igpt.fields import PathStr

T = TypeVar("T")


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; leaves other types alone."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_fields(parser: argparse.ArgumentParser, cls: type, prefix: str, defaults: Any) -> None:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        name = f"{prefix}{f.name}"
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            _add_fields(parser, tp, f"{name}.", default)
            continue
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        kw["help"] += f" (default: {default!r})"
        if tp is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **kw)
        elif get_origin(tp) is Literal:
            parser.add_argument(f"--{name}", choices=list(get_args(tp)), **kw)
        elif tp is PathStr:
            parser.add_argument(f"--{name}", type=str, metavar="PATH", **kw)
        elif tp in (int, float, str):
            parser.add_argument(f"--{name}", type=tp, metavar=tp.__name__.upper(), **kw)
        else:
            raise TypeError(f"no command-line form for field {name} of type {tp}")


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description or cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # '--model.si S' must be an error, not silently --model.size
    )
    parser.add_argument("--config", help="JSON file with (part of) the config tree; flags override it")
    _add_fields(parser, cls, "", cls())
    return parser


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type[T], data: dict[str, Any], base: Any = None) -> T:
    """Build a config tree from nested dicts; unknown keys are an error, not silently dropped.

    Keys not given keep the value of ``base`` (default: ``cls()``, so a nested config keeps the default its
    parent gave it), except fields a class lists in ``DERIVED``: those are recomputed by its ``__post_init__``
    (``model.n_layer`` follows the ``model.size`` actually chosen)."""
    hints = get_type_hints(cls)
    base = cls() if base is None else base
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        current = getattr(base, f.name)
        if f.name in data:
            v, tp = data[f.name], _base_type(hints[f.name])
            nested = dataclasses.is_dataclass(tp) and isinstance(v, dict)
            kwargs[f.name] = from_dict(tp, v, current if dataclasses.is_dataclass(current) else None) if nested else v
        elif f.name not in getattr(cls, "DERIVED", ()):
            kwargs[f.name] = current
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse(cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    parser = build_parser(cls, prog=prog)
    ns = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    base: dict[str, Any] = {}
    config_file = ns.pop("config", None)
    if config_file:
        with open(config_file) as fh:
            base = json.load(fh)
    try:
        return from_dict(cls, _merge(base, _nest(ns)))
    except (ValueError, TypeError, FileNotFoundError) as e:  # a bad value: one line, not the whole usage
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def absolute_path(path: str) -> str:
    """A local path made absolute (URIs and empty strings kept): drivers do this before handing configs to Ray
    Tune, which runs each trial in its own working directory."""
    from igpt.storage import is_remote, local_path

    return path if not path or is_remote(path) else local_path(path)


def main(run: Any, cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> Any:
    """Every entry point: parse ``argv`` into ``cls`` and call ``run`` with it. ``ray job stop`` (SIGTERM) ends
    the job's MLflow runs KILLED (``igpt.track.tracking.JobRun``); a mistake the user can fix
    (``igpt.errors.UserError``: a bad path, a missing split, a bad config value, a missing palette or checkpoint) is
    one ``error: <message>`` line on stderr and exit code 2; any other exception is unexpected and keeps its
    traceback."""
    from igpt.errors import UserError
    from igpt.track.tracking import stop_on_sigterm

    stop_on_sigterm()
    cfg = parse(cls, argv, prog=prog)
    try:
        return run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def absolute_paths(cfg: T) -> T:
    """The config tree with every local path (each field typed :data:`igpt.fields.PathStr`) made absolute: drivers
    do this before handing a config to Ray Tune, which runs each trial in its own working directory."""

    def walk(node: Any, d: dict[str, Any]) -> None:
        hints = get_type_hints(type(node))
        for f in dataclasses.fields(node):
            v = getattr(node, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, d[f.name])
            elif _base_type(hints[f.name]) is PathStr and isinstance(v, str):
                d[f.name] = absolute_path(v)

    d = to_dict(cfg)
    walk(cfg, d)
    return from_dict(type(cfg), d)
