"""Messages about the work go through ``logging`` (logger ``knowsam`` and its children); results go
to stdout. ``-q`` shows warnings only, the default adds notes (info), ``-v`` adds detail (debug).

On a terminal a rich handler draws each message (warnings in colour); elsewhere - pipes, CI, the
publication runner's log files - each is one plain line (``warning: ...`` for a warning), never
wrapped, so logs stay greppable. Both write to the current ``sys.stderr``, so a message logged
under a rich progress bar is printed above it.
"""

from __future__ import annotations

import logging
import sys

ROOT = "knowsam"
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


class _PlainHandler(logging.StreamHandler):
    """One line per message on whatever ``sys.stderr`` is at the time (a progress bar redirects it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_PlainFormatter())

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; sys.stderr is read at each message
        pass


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"{record.levelname.lower()}: {message}" if record.levelno >= logging.WARNING else message


def configure(verbosity: int = 0) -> None:
    """Route the ``knowsam`` loggers to stderr at the level ``verbosity`` (-1, 0, 1) asks for."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=Console(stderr=True), show_time=False, show_path=False, markup=False
        )
    else:
        handler = _PlainHandler()
    logger.addHandler(handler)
    logger.setLevel(LEVELS[verbosity])
    logger.propagate = False
