"""Errors shared across the library."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the field's dotted name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):
        # rebuild from (field, message): exceptions cross process boundaries (Ray tasks, Tune trials) pickled
        return type(self), (self.field, self.message)


class StorageError(OSError):
    """A file could not be written (disk full, quota, permissions); the message names the file and says
    that the previous version of it, if any, is unchanged."""
