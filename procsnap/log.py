"""The part of `logging` the pipelines use (getLogger, info, warning),
without importing `logging` in a CLI run: it costs about as much as
argparse and json together (it brings threading, traceback, string, weakref
along), and a dump logs a dozen lines at most. Modules say
`from .. import log as logging`.

The CLI calls configure(): then messages at that level and above go
straight to stderr as "procsnap: message". Otherwise (procsnap used as a
library) each message goes to the standard module's logger of that name,
so a program's own logging configuration sees them as before.
"""

from __future__ import annotations

import sys

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

_level: int | None = None  # set by configure(): the CLI's own output


def configure(level: int) -> None:
    """Messages at `level` and above to stderr, one line each."""
    global _level
    _level = level


class Logger:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def isEnabledFor(self, level: int) -> bool:
        if _level is not None:
            return level >= _level
        import logging

        return logging.getLogger(self.name).isEnabledFor(level)

    def log(self, level: int, msg: str, *args) -> None:
        if _level is None:
            import logging

            logging.getLogger(self.name).log(level, msg, *args)
        elif level >= _level:
            sys.stderr.write(f"procsnap: {msg % args if args else msg}\n")
            sys.stderr.flush()

    def debug(self, msg: str, *args) -> None:
        self.log(DEBUG, msg, *args)

    def info(self, msg: str, *args) -> None:
        self.log(INFO, msg, *args)

    def warning(self, msg: str, *args) -> None:
        self.log(WARNING, msg, *args)

    def error(self, msg: str, *args) -> None:
        self.log(ERROR, msg, *args)


def getLogger(name: str) -> Logger:  # noqa: N802: the name logging gives it
    return Logger(name)
