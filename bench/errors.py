"""The one exception type for bad user input (options, files)."""


class ConfigError(ValueError):
    """Bad input named by option or file. The CLI prints its message as one line and exits 2."""
