"""Errors a person can act on, and the exit code each one ends a command with.

Runners and the `regraft` command print these as one message without a traceback; anything else is
an internal error and keeps its traceback.
"""

EXIT_OK = 0
EXIT_CHECK_FAILED = 1   # the run ended with a FAIL or a rejected verdict (or another check said no)
EXIT_BAD_INPUT = 2      # bad input or configuration
EXIT_BUSY = 3           # another run holds the project
EXIT_INTERNAL = 70      # a bug or an unexpected failure (EX_SOFTWARE)


class RegraftError(Exception):
    """A problem with the user's input or configuration, with a message that says what and where."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(RegraftError):
    """params.yaml or an override is invalid."""


class DataError(RegraftError):
    """An input data file cannot be read or does not fit the configuration."""


class CheckFailed(RegraftError):
    """The evidence said no: a gate FAIL, a rejected INCONCLUSIVE verdict, a blocking shift, a failed smoke test."""

    exit_code = EXIT_CHECK_FAILED


class InternalError(RegraftError):
    """Something failed that no input explains (a stage crashed); the message carries its own traceback."""

    exit_code = EXIT_INTERNAL


class ReportError(DataError):
    """A stage's report (reports/*.json, the verdict, the decision) is missing, unreadable or does not fit its
    model; the message names the file and the field."""
