"""Errors the project raises on bad input: a config key, a file, a folder that is not what a stage needs.

Each is a :class:`hydra.errors.CompactHydraException`, so an entry point prints it as its message alone (what,
where, what was expected, what to do) rather than a traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback too.
Each also derives from the builtin a caller would catch (``ValueError``, ``FileNotFoundError``…), so code
written against the builtins keeps working. A failure that is not on this list (a bug, an error inside a
library) still prints its traceback: that is the report a maintainer needs.
"""

from __future__ import annotations

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """Bad input, explained in the message; printed without a traceback."""


class ConfigError(UserError, ValueError):
    """A config value of the wrong type, size or range; the message names the key."""


class InputError(UserError, ValueError):
    """A file or folder whose contents are not what was expected; the message names it."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder that should exist and does not; the message says what to pass instead."""


class OutputExistsError(UserError, FileExistsError):
    """An output location that holds something this run must not overwrite or mix with."""


class NonFiniteError(UserError, FloatingPointError):
    """NaN or inf where training or caching needs finite numbers; the message names the step and the data."""


class DiskFullError(UserError, OSError):
    """No space left while writing; the message names what was being written and what is intact."""
