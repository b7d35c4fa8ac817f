"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


class TuneloopError(Exception):
    """A problem with the user's input or environment, stated in one line."""

    exit_code = 1


class ConfigError(TuneloopError):
    """An unknown key or an invalid value in the configuration."""

    exit_code = 2


class DataError(TuneloopError):
    """Missing, unreadable or inconsistent data."""
