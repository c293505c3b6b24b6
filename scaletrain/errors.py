"""Errors that are the user's to fix.

Anything raised as a :class:`UserError` ends the CLI with exit code 2 and one line naming
the field or file and what is wrong (DESIGN.md §3). Everything else is an internal error
(exit code 1, with a traceback).
"""


class UserError(Exception):
    """A mistake in the user's config, data or checkpoint; the message is one line."""


class ConfigError(UserError):
    """An unknown, mistyped, out-of-range or inconsistent configuration value."""


class DataError(UserError):
    """Missing, empty, binary or malformed input data."""


class CheckpointError(UserError):
    """A missing, corrupt, truncated or foreign checkpoint."""
