"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


def one_line(message: str) -> str:
    """`message` as one printable line: line breaks and other control characters (which a user's file or flag
    may carry into an error) are shown escaped, as in `\\x1e`, instead of breaking or garbling the line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class TuneloopError(Exception):
    """A problem with the user's input or environment, stated in one line."""

    exit_code = 1

    def __init__(self, message: object = "", *args: object):
        # A name from the user's file (a YAML key '\n', say) must not break the line where it is quoted.
        super().__init__(one_line(str(message)), *args)


class ConfigError(TuneloopError):
    """An unknown key or an invalid value in the configuration."""

    exit_code = 2


class DataError(TuneloopError):
    """Missing, unreadable or inconsistent data."""
