"""Library output belongs in the state folder's log file (``.automl/automl.log``), not on the user's terminal.

Ray's start-up lines (the token-authentication notice), MLflow's migration notices and the MLflow writer's errors
go there. The file is written only once the sweep has a state folder: a start-up refused for bad input leaves
nothing behind, and what was logged before that moment is kept in memory and written first.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


class DeferredFileHandler(logging.Handler):
    """Holds records in memory until ``activate(path)``, then appends them and every later record to ``path``."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(_FORMAT)
        self._buffer: list[logging.LogRecord] = []
        self._limit = limit
        self._file: logging.FileHandler | None = None
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            if self._file is not None:
                self._file.emit(record)
            elif len(self._buffer) < self._limit:
                self._buffer.append(record)

    def activate(self, path: Path) -> None:
        with self._guard:
            if self._file is not None and self._file.baseFilename == str(path.resolve()):
                return
            if self._file is not None:
                self._file.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = logging.FileHandler(path)
            self._file.setFormatter(_FORMAT)
            for record in self._buffer:
                self._file.emit(record)
            self._buffer.clear()

    def close(self) -> None:
        with self._guard:
            if self._file is not None:
                self._file.close()
        super().close()


_HANDLER = DeferredFileHandler()


def capture(*names: str, level: int = logging.WARNING) -> DeferredFileHandler:
    """Route the named loggers (``ray``, ...) to the process's deferred log file, and off the terminal."""
    for name in names:
        logger = logging.getLogger(name)
        # The library's own console handlers go (Ray adds one to its logger when imported): only the file remains.
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)
        logger.setLevel(level)
        logger.propagate = False
    return _HANDLER


def activate(path: Path) -> None:
    """The state folder exists: from now on captured records are written to ``path``."""
    _HANDLER.activate(path)
