"""The package's one exception base, and the kinds of expected failure built on it.

Every failure a user can fix (bad input, a missing file, a refused option, a check that did not pass) raises a
subclass of `LlamaEncoderError` with a message that names the problem and the fix. The CLI prints those in one line;
anything else is a bug and keeps its traceback.

Each kind also derives from the built-in exception a Python caller would expect (`ValueError`, `FileNotFoundError`,
...), so `except ValueError` keeps working.
"""


class LlamaEncoderError(Exception):
    """An expected failure with a message meant for the user (what is wrong and how to fix it)."""


class InputError(LlamaEncoderError, ValueError):
    """An argument, option, data record or file content that cannot be used as given."""


class MissingInputError(LlamaEncoderError, FileNotFoundError):
    """A file, folder, weight or repo that the input names is not there."""


class NotAFolderError(LlamaEncoderError, NotADirectoryError):
    """A path that must be a folder is a file."""


class IsAFolderError(LlamaEncoderError, IsADirectoryError):
    """A path that must be a file is a folder."""


class OutputExistsError(LlamaEncoderError, FileExistsError):
    """The destination exists and the caller did not ask to overwrite it."""


class AccessDeniedError(LlamaEncoderError, PermissionError):
    """A folder cannot be written, or a gated repo was not granted."""


class DiskFullError(LlamaEncoderError, OSError):
    """The device ran out of space while an output was written (nothing was left in place)."""


class MissingDependencyError(LlamaEncoderError, ImportError):
    """An optional package that this input needs is not installed."""


class DownloadError(LlamaEncoderError, RuntimeError):
    """A download failed, or what was downloaded is not the published file."""


class InputChangedError(LlamaEncoderError, RuntimeError):
    """An input file changed while it was being read."""


class VerificationError(LlamaEncoderError, RuntimeError):
    """A written checkpoint does not load, or does not embed and hold the weights it was written from."""


class UnverifiedFolderError(InputError):
    """A folder cannot be pushed: its verification failed, is malformed or stale, or it holds files never pushed."""


class PushError(LlamaEncoderError, RuntimeError):
    """The push could not be done: no token, or the Hub refused or could not be reached."""


__all__ = [
    "AccessDeniedError",
    "DiskFullError",
    "DownloadError",
    "InputChangedError",
    "InputError",
    "IsAFolderError",
    "LlamaEncoderError",
    "MissingDependencyError",
    "MissingInputError",
    "NotAFolderError",
    "OutputExistsError",
    "PushError",
    "UnverifiedFolderError",
    "VerificationError",
]
