"""The one exception hierarchy of automl.

Every error a user can cause (a bad spec, bad data, an unknown trainer, a sweep that does not exist) is an
``AutoMLError``. The CLI prints it as one line and exits with status 2; the Python API lets it propagate.
"""

from __future__ import annotations


class AutoMLError(Exception):
    """Base class of every error automl raises on purpose."""

    exit_code = 2


class SpecError(AutoMLError):
    """The spec file is malformed or asks for something the chosen method cannot honour.

    ``source`` names the file (or ``spec`` for an in-memory mapping), ``path`` the field, e.g.
    ``parameters.lr.low``; ``str(error)`` is the one line the CLI prints.
    """

    def __init__(self, message: str, *, path: str = "", source: str = "spec") -> None:
        self.message = message
        self.path = path
        self.source = source
        where = f"{source}: {path}: " if path else f"{source}: "
        super().__init__(where + message)


class DataError(AutoMLError):
    """The data cannot be loaded or does not fit the task (missing file, missing target, one class...)."""


class TrainerError(AutoMLError):
    """A trainer cannot be found or does not fulfil the trainer contract."""


class SweepNotFoundError(AutoMLError):
    """No sweep (or model) with that name or id exists in the store."""


class ExportError(AutoMLError):
    """A model cannot be exported, loaded or used for prediction."""


class UsageError(AutoMLError):
    """A command's arguments do not fit together (e.g. neither a spec file nor --data given to ``run``)."""


class ServiceError(AutoMLError):
    """The automl service answered a request with an error (``automl.Client``).

    ``status`` is the HTTP status (401 no or bad token, 403 another user's sweep, 404 unknown id, 409 a change
    that cannot be honoured, 413 body too large, 422 bad spec or path); ``detail`` the service's one line, which
    is also ``str(error)``, with nothing added.
    """

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(detail)

    def __reduce__(self) -> tuple[type[ServiceError], tuple[int, str]]:
        return type(self), (self.status, self.detail)  # pickles (across processes) with both attributes
