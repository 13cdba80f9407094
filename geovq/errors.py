"""User-facing errors.

A `GeovqError` is a mistake in what the user asked for (a bad value, a missing file). The CLI prints its
message on one line and exits with code 2, without a traceback. Anything else is a bug and keeps its
traceback.
"""


class GeovqError(ValueError):
    """A bad input: the message names the bad value and what would be valid."""


class RunFailed(Exception):
    """Units failed during a run (exit code 1): one line per failed unit, each naming its full traceback."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines
