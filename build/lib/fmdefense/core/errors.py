"""Exceptions raised at the public boundary, each with a message that says what to do."""


class FMDefenseError(Exception):
    """Base class for every error fmdefense raises on purpose."""


class InputError(FMDefenseError, ValueError):
    """An input tensor or argument is not what the API expects."""


class DataError(FMDefenseError):
    """A dataset source or cache file is missing, truncated or corrupt."""


class ArtifactError(FMDefenseError):
    """A saved artifact (weights, config, metrics) is missing, corrupt or of the wrong kind."""


class NotFittedError(FMDefenseError, RuntimeError):
    """A method that needs calibrated state was called before `fit`."""
