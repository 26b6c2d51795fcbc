"""The error types for user mistakes (issue 12, section 3), on the lowest floor so every part can raise them.

Anything a user can get wrong (a config key or value, a data folder, a checkpoint file, a command-line
flag, a machine that lacks what the settings ask for) raises a subclass of `UserError` whose message
names the key or file and says what to do. `fastdino/cli.py` turns every `UserError` into one line on
stderr and exit code 2; anything else escaping is a bug in fastdino and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A user mistake: the message is one line naming the key, flag or file, and what to do."""


class ConfigError(UserError, ValueError):
    """A bad config key or value; the message names the key, and `key` holds it (a tuple for a check across
    keys, None when unknown)."""

    def __init__(self, message: str, key: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.key = key


class MissingDependencyError(UserError, ImportError):
    """A setting needs an optional package that is not installed; the message names the setting and the extra."""


class CheckpointError(UserError, RuntimeError):
    """An unreadable or incompatible checkpoint or model file; the message names the file."""
