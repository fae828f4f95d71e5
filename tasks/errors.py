"""Errors a person can act on. Runners print them without a traceback and exit non-zero."""


class RegraftError(Exception):
    """A problem with the user's input or configuration, with a message that says what and where."""


class ConfigError(RegraftError):
    """params.yaml or an override is invalid."""


class DataError(RegraftError):
    """An input data file cannot be read or does not fit the configuration."""


class ValidationFailed(RegraftError):
    """Great Expectations found data that breaks the suite."""
