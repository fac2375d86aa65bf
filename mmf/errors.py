"""User-facing errors.

Everything a user can get wrong (a missing file, a bad config key, a corrupt checkpoint) raises
`MMFError` with one line that names the problem and the fix. The CLI prints that line on stderr
and exits non-zero; `--debug` shows the traceback instead.
"""


class MMFError(Exception):
    """An error caused by user input; its message is one line, shown without a traceback."""

    exit_code = 2


class ConfigError(MMFError):
    """A config file or override is invalid."""


class CheckpointError(MMFError):
    """A checkpoint directory or file is missing, corrupt or inconsistent."""
