"""Errors a user can cause. Each message says what went wrong and what to do; the CLI prints it on one line."""

import errno


class TransferkitError(Exception):
    """Base of all user-facing errors."""


class DataError(TransferkitError, ValueError):
    """The data given cannot be used as asked (missing folder, no classes, malformed CSV...)."""


class BackboneError(TransferkitError):
    """The backbone cannot be built: unknown name, weights that cannot be fetched or do not fit."""


class RunError(TransferkitError):
    """A run directory is missing, incomplete, or in the way."""


class DownloadError(TransferkitError):
    """A download or unpack failed: network, checksum, an unsafe archive, or a target folder in the way."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run that kept a checkpoint: `transferkit train --resume RUN` continues it."""

    def __init__(self, run):
        super().__init__(str(run))
        self.run = run


class StorageError(RunError):
    """A file cannot be written: a full disk, a read-only or forbidden folder. What was written before is intact."""


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_ALLOWED = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_problem(err: BaseException) -> str | None:
    """'No space left on device (PATH): free some space...' when `err` is a disk or permission failure, else None."""
    if not isinstance(err, OSError) or err.errno not in _NO_SPACE | _NOT_ALLOWED:
        return None
    where = f" ({err.filename})" if err.filename else ""
    advice = ("free some space (or choose a folder on another disk)" if err.errno in _NO_SPACE
              else "make the folder writable (or choose another one)")
    return f"{err.strerror}{where}: {advice}"
