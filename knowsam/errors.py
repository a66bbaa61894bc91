"""One exception type for every expected failure.

The CLI turns a ``KnowsamError`` into one line on stderr and its ``exit_code``;
anything else is a bug and keeps its traceback.
"""

import errno


class KnowsamError(Exception):
    """A failure caused by input, configuration or environment, not by a bug."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(KnowsamError):
    """Invalid parameters: exit status 2, like a usage error."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it was raised from or while handling."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def is_disk_full(exc: BaseException) -> bool:
    """An ``OSError`` ENOSPC/EDQUOT anywhere in the chain (what Python's own writes raise)."""
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _chain(exc))


def environment_failure(exc: BaseException) -> str | None:
    """One line for failures of the machine rather than the code (disk full, out of memory); else None.

    torch reports both in messages of its C++ core (``RuntimeError``), several chained
    tracebacks deep, none of which says what to do.
    """
    if is_disk_full(exc):
        where = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
        return f"no space left on device{f' while writing {where}' if where else ''}; free some space and rerun"
    for e in _chain(exc):
        text = str(e)
        if type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text:
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            return (
                f"out of memory ({first[:160]}); lower train.batch_size or data.image_size, "
                "or free memory and rerun (a resumable run continues from its last checkpoint)"
            )
    return None


def describe_error(exc: BaseException) -> str:
    """Exception class and first message line, for wrapping a library's error in a one-line message."""
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0]}" if text else exc.__class__.__name__
