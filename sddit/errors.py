"""Errors shared across the library."""


class UserError(Exception):
    """Something wrong with the user's input or machine (a bad field, file, asset, a full disk). Every such
    error derives from this and its message names what is wrong and, where there is one, the fix: the command
    line tools print it as one line instead of a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message starts with the field's dotted name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):
        # rebuild from (field, message): exceptions cross process boundaries (Ray tasks, Tune trials) pickled
        return type(self), (self.field, self.message)


class StorageError(UserError, OSError):
    """A file could not be written (disk full, quota, permissions); the message names the file and says
    that the previous version of it, if any, is unchanged."""
