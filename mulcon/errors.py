"""Errors the library raises for bad input; the CLI turns them into a message and exit code 2."""


class MulconError(Exception):
    """Base class: the message names the file, line or key at fault."""


class ConfigError(MulconError):
    """An unknown key, a wrong type or an invalid value in params.yaml or an override."""


class DataError(MulconError):
    """A dataset that is missing, malformed or empty."""


class CheckpointError(MulconError):
    """A checkpoint that cannot be resumed (missing, corrupt or made for another model)."""


class TrainingError(MulconError):
    """Training cannot go on (a NaN or infinite loss)."""
