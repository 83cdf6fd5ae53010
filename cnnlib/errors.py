"""Exceptions that carry enough context to be the whole explanation.

Every error a user can cause (a bad file, a bad value) is one of these, and the
command-line layer prints its message as one line instead of a traceback.
"""


class CnnlibError(Exception):
    """Base for errors the user can fix; the message names the culprit."""


class DataError(CnnlibError, ValueError):
    """A data file or folder is missing, unreadable or inconsistent."""


class UntrustedPickleError(DataError):
    """A pickle was offered without the explicit trust flag."""


class DivergedError(CnnlibError, FloatingPointError):
    """Training produced a NaN/inf loss; the model is garbage and must not be used."""

    def __init__(self, epoch: int, loss: float):
        super().__init__(f"diverged: training loss became {loss} in epoch {epoch}")
        self.epoch = epoch
        self.loss = loss


class CheckpointError(CnnlibError, ValueError):
    """A checkpoint file is missing, not ours, or for another model shape."""


class OutputError(CnnlibError):
    """An output path holds something a write must not replace (a folder, a device, a named pipe)."""

    def __init__(self, path, message: str):
        super().__init__(message)
        self.path = path
