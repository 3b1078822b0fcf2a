"""Errors shared across the library."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the field's dotted name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
