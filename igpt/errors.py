"""The errors a user can fix. Entry points print them as one ``error: <message>`` line and exit with code 2
(``igpt.cli.main``); every other exception is unexpected and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave: a bad path, a missing split, a bad config value, a missing palette or
    checkpoint. The message says what to change."""


class MissingInput(UserError, FileNotFoundError):
    """A path the user named does not exist."""


class Conflict(UserError, FileExistsError):
    """The named output already holds something this job would overwrite (choose another name)."""
