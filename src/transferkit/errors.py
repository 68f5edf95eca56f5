"""Errors a user can cause. Each message says what went wrong and what to do; the CLI prints it on one line."""


class TransferkitError(Exception):
    """Base of all user-facing errors."""


class DataError(TransferkitError, ValueError):
    """The data given cannot be used as asked (missing folder, no classes, malformed CSV...)."""


class BackboneError(TransferkitError):
    """The backbone cannot be built: unknown name, weights that cannot be fetched or do not fit."""


class RunError(TransferkitError):
    """A run directory is missing, incomplete, or in the way."""
