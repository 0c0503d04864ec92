"""Config fields that carry their own help: the one helper every config dataclass uses (the model's, the data's,
the jobs'), in a module that imports nothing of igpt, so any package may use it without an upward arrow."""

from __future__ import annotations

import dataclasses
from typing import Any, NewType

PathStr = NewType("PathStr", str)
"""A field holding a local path or a URI (``s3://…``): the CLI shows it as PATH, and ``igpt.cli.absolute_paths``
makes the local ones absolute before a config goes to Ray Tune (each trial runs in its own working directory)."""


def field_help(text: str, **kw) -> Any:
    """A config field whose ``help`` (its meaning and the invariant ``__post_init__`` enforces) is its flag's help."""
    return dataclasses.field(metadata={"help": text}, **kw)
