"""One exception type for every expected failure.

The CLI turns a ``KnowsamError`` into one line on stderr and its ``exit_code``;
anything else is a bug and keeps its traceback.
"""


class KnowsamError(Exception):
    """A failure caused by input, configuration or environment, not by a bug."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(KnowsamError):
    """Invalid parameters: exit status 2, like a usage error."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


def describe_error(exc: BaseException) -> str:
    """Exception class and first message line, for wrapping a library's error in a one-line message."""
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0]}" if text else exc.__class__.__name__
