"""A single-writer Optuna journal: the search state of a sweep, in Optuna's own journal file format.

Optuna's ``JournalFileBackend`` takes a file lock, re-reads the file and fsyncs on every operation so that
many processes can share a study; that costs about 5 ms per trial here. A sweep has exactly one writer (its
driver), so this backend keeps the log in memory and appends each entry with a flush: a killed process loses
nothing the operating system already holds (only a power cut could lose the last lines). The file stays
readable by ``optuna.storages.journal.JournalFileBackend`` (optuna-dashboard, ``optuna.load_study``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from optuna.storages.journal import BaseJournalBackend, JournalStorage

from automl.errors import AutoMLError


class JournalDamaged(AutoMLError):
    """A line other than the last one of a journal does not parse: the search state was damaged."""


def _reason(exc: ValueError) -> str:
    return str(exc).split(":")[0] if str(exc) else type(exc).__name__


class SingleWriterJournal(BaseJournalBackend):
    """Append-only JSON lines; the whole log is kept in memory for reads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._logs: list[dict[str, Any]] = []
        good_bytes = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                data = f.read()
            lines = data.split(b"\n")
            # Only the last line may be cut short (a kill mid-write leaves it without its newline): it is dropped
            # and overwritten below. Anything else that does not parse is damage this code did not make; the file
            # is refused and left exactly as it was, since dropping the rest would silently erase trials.
            for number, line in enumerate(lines[:-1], start=1):
                try:
                    entry = json.loads(line)
                    if not isinstance(entry, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    raise JournalDamaged(
                        f"{self.path}: line {number} of {len(lines) - 1} is damaged ({_reason(exc)}); the file was "
                        "left as it was: restore it from a backup, or delete the lines from there on to keep the "
                        "trials before it") from None
                self._logs.append(entry)
                good_bytes += len(line) + 1
            if good_bytes != len(data):
                os.truncate(self.path, good_bytes)
        self._file = open(self.path, "ab")

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        return self._logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._file.write(b"".join(json.dumps(log, separators=(",", ":")).encode() + b"\n" for log in logs))
        self._file.flush()
        self._logs.extend(logs)

    def close(self) -> None:
        self._file.close()


def open_storage(path: str | Path) -> JournalStorage:
    return JournalStorage(SingleWriterJournal(path))
