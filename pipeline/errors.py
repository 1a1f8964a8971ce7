"""Errors a user can act on.

The command line prints a :class:`PipelineError` as one message, without a traceback,
and exits non-zero; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A problem with the user's data, params or environment, with what to fix."""


class ConfigError(PipelineError):
    """params.yaml is missing a key, has an unknown one, or a value of the wrong type."""


class DataError(PipelineError):
    """The data source or the images in it cannot be used as they are."""
