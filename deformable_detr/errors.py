"""The user's mistakes, as one family of exceptions.

Every tool catches exactly ``UserError`` and prints its message as one line (exit status 2):
the message names the file or config key at fault and the fix. Anything else is a bug and
keeps its traceback. The subclasses also derive from the builtin they refine, so callers that
catch ``ValueError`` or ``FileNotFoundError`` keep working.
"""


class UserError(Exception):
    """A mistake in the user's input; the message names the key or file and the fix."""


class ConfigError(UserError, ValueError):
    """A config key that is unknown, missing, or holds a value of the wrong type or range."""


class DataError(UserError, ValueError):
    """A dataset file that cannot be used as it is: unreadable, malformed, inconsistent."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or the layout implies) does not exist."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is unreadable, truncated, of another recipe, or not a checkpoint."""


class DeviceError(UserError, RuntimeError):
    """A device that was asked for but is not available (e.g. device=cuda without a GPU)."""


class ExistingPathError(UserError, FileExistsError):
    """A path that exists but is not what it should be, and is not ours to overwrite."""


class DiskFullError(UserError, OSError):
    """A file that could not be written because its disk (or the user's quota) is full."""


class UnwritableDirectoryError(UserError, PermissionError):
    """A directory a tool must write into that cannot be created or written: read-only, not
    permitted, or a file standing where a directory should be."""
