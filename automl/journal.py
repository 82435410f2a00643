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


class SingleWriterJournal(BaseJournalBackend):
    """Append-only JSON lines; the whole log is kept in memory for reads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._logs: list[dict[str, Any]] = []
        good_bytes = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # a line cut short by a kill mid-write: dropped, and overwritten below
                    try:
                        self._logs.append(json.loads(line))
                    except json.JSONDecodeError:
                        break
                    good_bytes += len(line)
            if good_bytes != self.path.stat().st_size:
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
