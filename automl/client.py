"""The Python client of the automl service (``automl serve``; the contract is DESIGN.md section 9).

    from automl import Client

    client = Client("http://127.0.0.1:8765")       # token: $AUTOML_TOKEN; url: $AUTOML_SERVER when None
    sweep = client.submit("search_spaces/digits_mlp.yaml", overrides={"budget.trials": 50})
    for event in sweep.events():                    # Server-Sent Events; a dropped connection is resumed
        print(event.id, event.kind, event.data)
    sweep.update(max_concurrent=4)                  # the budget in effect
    final = sweep.wait()                            # the sweep object once FINISHED, FAILED or CANCELLED
    sweep.leaderboard()                             # a pandas DataFrame, best first

An HTTP error becomes a ``ServiceError`` (``status``, ``detail``; ``str()`` is the server's one line); a service
that cannot be reached, an ``AutoMLError`` saying so. The token travels only in the ``Authorization`` header (a
``.netrc`` never replaces it; a redirect to another host drops it) and is never part of a message.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import requests
import urllib3

from automl.errors import AutoMLError, ServiceError, UsageError

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_SERVER = "http://127.0.0.1:8765"
FINAL_STATES = frozenset({"FINISHED", "FAILED", "CANCELLED"})
API = "/api/v1"
RECONNECTS = 5  # consecutive failed attempts to reopen the event stream before the service counts as gone
MAX_LINE = 16 * 1024 * 1024  # one line of the event stream; a stream that never ends a line is refused
_RETRYABLE = frozenset({502, 503, 504})  # a proxy in front of a restarting service
_EOL = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: ``id`` (increasing; -1 if the stream never sent one), ``kind`` (the ``event:``
    field: ``trial_started``, ``trial_reported``, ``trial_finished``, ``best_changed``, ``sweep_state``) and
    ``data`` (the ``data:`` lines as JSON; text that is not a JSON object comes as ``{"text": ...}``)."""

    id: int
    kind: str
    data: dict[str, Any]


class _Unreachable(AutoMLError):
    """The service did not answer at all (refused, unknown host, TLS, timeout): retried where that makes sense."""


class _NoStream(AutoMLError):
    """The events route answered with something other than an event stream (an old server, a proxy)."""


class _Bearer(requests.auth.AuthBase):
    """The token as ``Authorization: Bearer``. Set as the session's auth, it also keeps requests from taking
    credentials from ``~/.netrc`` or the URL, and requests drops it on a redirect to another host."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self.token:
            request.headers["Authorization"] = f"Bearer {self.token}"
        return request


class Client:
    """A connection to one automl service.

    ``url`` defaults to ``$AUTOML_SERVER``, else ``http://127.0.0.1:8765``; ``token`` to ``$AUTOML_TOKEN``
    (without one, every route but the health check answers 401). ``timeout`` bounds each connection attempt and
    each wait for bytes, in seconds.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0) -> None:
        if url is None:
            url = os.environ.get("AUTOML_SERVER") or DEFAULT_SERVER
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"The 'url' parameter of Client must be an http:// or https:// URL such as "
                             f"{DEFAULT_SERVER}. Got {url!r} instead.")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise UsageError(f"The 'timeout' parameter of Client must be a number of seconds > 0. Got {timeout!r} "
                             f"instead.")
        if token is None:
            token = os.environ.get("AUTOML_TOKEN") or None
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        from automl import __version__
        from automl.redact import mask_url

        self._shown = mask_url(self.url) or self.url
        self._session = requests.Session()
        self._session.auth = _Bearer(token)
        self._session.headers["User-Agent"] = f"automl-client/{__version__}"

    def __repr__(self) -> str:
        return f"Client({self._shown!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections (a client is usable again afterwards: they reopen)."""
        self._session.close()

    # ------------------------------------------------------------------------------------------ routes

    def submit(self, spec: str | os.PathLike[str] | Mapping[str, Any],
               overrides: Mapping[str, Any] | None = None) -> RemoteSweep:
        """Submit a sweep. ``spec`` is a path to a YAML spec file (its text is sent; a spec without ``name`` is
        named after the file, as ``automl run`` names it) or a mapping (sent as JSON). ``overrides`` maps dotted
        field paths to values (``{"budget.trials": 50}``); ``None`` values are left out. A bad spec is a
        ``ServiceError`` with status 422 whose detail names the field."""
        body: dict[str, Any]
        extra: dict[str, Any] = {}
        if isinstance(spec, Mapping):
            body = {"spec": dict(spec)}
        elif isinstance(spec, str | os.PathLike):
            from automl.spec import _name_from_path, parse_yaml, read_spec_text

            path = Path(spec)
            text = read_spec_text(path)
            if "name" not in parse_yaml(text, path.name):  # the file's own errors, in one line, before sending
                extra["name"] = _name_from_path(path)
            body = {"spec": text}
        else:
            raise UsageError(f"The 'spec' parameter of Client.submit must be a path to a YAML file or a mapping. "
                             f"Got {type(spec).__name__} instead.")
        merged = {**extra, **{str(k): v for k, v in (overrides or {}).items() if v is not None}}
        if merged:
            body["overrides"] = merged
        sweep = self._call("POST", "/sweeps", json_body=body)
        return RemoteSweep(self, _field(sweep, "id", str, "/sweeps"), sweep)

    def sweeps(self, state: str | None = None, owner: str | None = None) -> list[dict[str, Any]]:
        """The sweeps the token may see (newest first), optionally of one state (``RUNNING``) or owner."""
        query = {k: v for k, v in {"state": state, "owner": owner}.items() if v is not None}
        return list(_field(self._call("GET", "/sweeps", params=query), "sweeps", list, "/sweeps"))

    def sweep(self, sweep_id: str) -> RemoteSweep:
        """A handle on an existing sweep (fetched now: an unknown id is a ``ServiceError`` 404 here)."""
        handle = RemoteSweep(self, sweep_id)
        handle.status()
        return handle

    def upload(self, path: str | os.PathLike[str]) -> str:
        """Upload a CSV or Parquet file; returns its ``dataset:<id>`` source for a spec's ``data.source``."""
        from automl.errors import DataError

        file = Path(path)
        if not file.is_file():
            raise DataError(f"{file}: no such file to upload")
        kind = "application/vnd.apache.parquet" if file.suffix.lower() == ".parquet" else "text/csv"
        with file.open("rb") as handle:
            answer = self._call("POST", "/datasets", files={"file": (file.name, handle, kind)})
        return str(_field(answer, "source", str, "/datasets"))

    def health(self) -> dict[str, Any]:
        """``GET /api/v1/healthz`` (no token needed): ``{"status": "ok"}`` from a live service."""
        return dict(self._call("GET", "/healthz"))

    # ------------------------------------------------------------------------------------------ plumbing

    def _call(self, method: str, path: str, *, json_body: Any = None, **kwargs: Any) -> Any:
        """One request under ``/api/v1``; the answer's JSON, or the error this module promises."""
        if json_body is not None:
            try:
                kwargs["data"] = json.dumps(json_body, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"the request to {path} cannot be sent as JSON: {exc}") from None
            kwargs["headers"] = {"Content-Type": "application/json"}
        try:
            response = self._session.request(method, self.url + API + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise self._unreachable(exc) from None
        with closing(response):
            if response.status_code >= 400:
                raise _service_error(response, self._shown)
            try:
                return response.json()
            except ValueError:
                raise AutoMLError(f"the automl service at {self._shown} answered {method} {API}{path} with "
                                  f"something other than JSON (HTTP {response.status_code}, "
                                  f"{response.headers.get('Content-Type') or 'no content type'}); is it an automl "
                                  f"service?") from None

    def _unreachable(self, exc: BaseException) -> AutoMLError:
        if isinstance(exc, requests.Timeout) and not isinstance(exc, requests.ConnectionError):
            reason = f"no answer within {self.timeout:g} s"
        else:
            reason = _reason(exc)
        return _Unreachable(f"cannot reach the automl service at {self._shown}: {reason}; is `automl serve` "
                            f"running?")


class RemoteSweep:
    """A sweep on the service, by id: ``status()``, ``events()``, ``wait()``, ``update()``, ``cancel()``,
    ``resume()``, ``trials()``, ``leaderboard()``. ``last_status`` is the sweep object as last received."""

    poll_interval = 1.0  # seconds between status requests when no event stream can be followed

    def __init__(self, client: Client, sweep_id: str, sweep: dict[str, Any] | None = None) -> None:
        if not isinstance(sweep_id, str) or sweep_id.strip() in ("", ".", ".."):
            raise UsageError(f"The 'sweep_id' parameter must be a sweep's id. Got {sweep_id!r} instead.")
        self.id = sweep_id
        self.last_status = sweep
        self._client = client
        self._path = "/sweeps/" + quote(sweep_id, safe="")

    def __repr__(self) -> str:
        return f"RemoteSweep({self.id!r}, {self._client!r})"

    def status(self) -> dict[str, Any]:
        """The sweep object: id, name, owner, state, timestamps, budget, trial counts, best, mlflow, error."""
        return self._keep(self._client._call("GET", self._path))

    def trials(self) -> list[dict[str, Any]]:
        """Every trial, best first: ``{"number", "state", "value", "params", "metrics", "run_id"}``."""
        path = self._path + "/trials"
        return list(_field(self._client._call("GET", path), "trials", list, path))

    def leaderboard(self) -> pd.DataFrame:
        """The trials as a DataFrame, best first (the service's order): number, state, value, one column per
        parameter, run_id. A parameter named like one of those columns gets the prefix ``params.``."""
        import pandas as pd

        fixed = ("number", "state", "value", "run_id")
        rows, names = [], {}
        for trial in self.trials():
            params = {(f"params.{k}" if k in fixed else str(k)): v for k, v in (trial.get("params") or {}).items()}
            names.update(dict.fromkeys(params))
            rows.append({"number": trial.get("number"), "state": trial.get("state"), "value": trial.get("value"),
                         **params, "run_id": trial.get("run_id")})
        return pd.DataFrame(rows, columns=["number", "state", "value", *names, "run_id"])

    def update(self, trials: int | None = None, max_concurrent: int | None = None,
               time: float | str | None = None) -> dict[str, Any]:
        """Change the running sweep's budget (``time`` in seconds or as ``"10m"``); returns the budget in effect.
        A change that cannot be honoured is a ``ServiceError`` 409 and changes nothing."""
        budget = {k: v for k, v in {"trials": trials, "max_concurrent": max_concurrent, "time": time}.items()
                  if v is not None}
        if not budget:
            raise UsageError("update: give trials, max_concurrent or time")
        sweep = self._keep(self._client._call("PATCH", self._path, json_body={"budget": budget}))
        return dict(_field(sweep, "budget", dict, self._path))

    def cancel(self) -> dict[str, Any]:
        """Cancel the sweep (running trials KILLED; it stays resumable); returns the sweep object."""
        return self._keep(self._client._call("POST", self._path + "/cancel"))

    def resume(self) -> dict[str, Any]:
        """Continue a CANCELLED or FAILED sweep's budget; returns the sweep object."""
        return self._keep(self._client._call("POST", self._path + "/resume"))

    def events(self, last_event_id: int | None = None) -> Iterator[Event]:
        """The sweep's events, from the first (or after ``last_event_id``) to the ``sweep_state`` event of a final
        state, where the iterator ends. A dropped connection is reopened with ``Last-Event-ID``, so no event is
        lost or repeated; ``RECONNECTS`` failed attempts in a row end it with an ``AutoMLError``."""
        return self._follow(last_event_id, deadline=None)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the sweep is FINISHED, FAILED or CANCELLED; return its final sweep object. Follows the
        event stream (reconnecting after drops); polls ``status()`` where no stream can be had. ``TimeoutError``
        after ``timeout`` seconds, as a local handle's ``wait`` raises."""
        deadline = None if timeout is None else _now() + timeout
        sweep = self.status()
        if sweep.get("state") in FINAL_STATES:
            return sweep
        try:
            for _ in self._follow(None, deadline):
                pass
        except (ServiceError, _NoStream):
            pass  # no event stream here (an older service, a proxy): the sweep object tells as well
        while True:
            sweep = self.status()
            state = sweep.get("state")
            if state in FINAL_STATES:
                return sweep
            left = None if deadline is None else deadline - _now()
            if left is not None and left <= 0:
                raise TimeoutError(f"sweep {self.id} is still {state} after {timeout:g} s")
            time.sleep(self.poll_interval if left is None else min(self.poll_interval, left))

    # ------------------------------------------------------------------------------------------ plumbing

    def _keep(self, sweep: Any) -> dict[str, Any]:
        if not isinstance(sweep, dict):
            raise AutoMLError(f"the automl service at {self._client._shown} answered {API}{self._path} with "
                              f"{type(sweep).__name__}, not a sweep object")
        self.last_status = sweep
        return sweep

    def _follow(self, last_id: int | None, deadline: float | None) -> Iterator[Event]:
        failures = 0
        while True:
            _check_deadline(deadline, self.id)
            try:
                response = self._open_events(last_id, deadline)
            except (requests.RequestException, _Unreachable) as exc:
                failures += 1
                if failures > RECONNECTS:
                    raise (exc if isinstance(exc, _Unreachable) else self._client._unreachable(exc)) from None
                _pause(failures, deadline)
                continue
            except ServiceError as exc:
                if exc.status not in _RETRYABLE:
                    raise
                failures += 1
                if failures > RECONNECTS:
                    raise
                _pause(failures, deadline)
                continue
            failures = 0
            seen = False
            with closing(response):
                try:
                    chunks = _chunks(response, deadline, self.id)
                    for event in parse_sse(_lines(chunks), last_event_id=last_id):
                        seen = True
                        if event.id >= 0:
                            last_id = event.id
                        yield event
                        if event.kind == "sweep_state" and event.data.get("state") in FINAL_STATES:
                            return
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
                    pass  # dropped mid-stream (the partial event is discarded): reopen after the last event seen
            # The stream ended before the final state: a drop, a proxy's idle limit, or a service that closes it.
            _check_deadline(deadline, self.id)
            if not seen:
                try:
                    if self.status().get("state") in FINAL_STATES:
                        return  # nothing after last_id, and nothing will come
                except _Unreachable:
                    failures += 1
                    if failures > RECONNECTS:
                        raise
                _pause(max(failures, 1), deadline)

    def _open_events(self, last_id: int | None, deadline: float | None) -> requests.Response:
        client = self._client
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache",
                   "Accept-Encoding": "identity"}  # compression would hold events back in buffers
        if last_id is not None and last_id >= 0:
            headers["Last-Event-ID"] = str(last_id)
        read = client.timeout if deadline is None else max(0.05, min(client.timeout, deadline - _now()))
        try:
            response = client._session.get(client.url + API + self._path + "/events", headers=headers, stream=True,
                                           timeout=(client.timeout, read))
        except requests.ConnectionError as exc:
            raise client._unreachable(exc) from None
        if response.status_code >= 400:
            with closing(response):
                raise _service_error(response, client._shown)
        kind = response.headers.get("Content-Type", "")
        if not kind.startswith("text/event-stream"):
            response.close()
            raise _NoStream(f"the automl service at {client._shown} answered {API}{self._path}/events with "
                            f"{kind or 'no content type'}, not text/event-stream")
        return response


# ---------------------------------------------------------------------------------------------- Server-Sent Events


def parse_sse(lines: Iterable[str], last_event_id: int | None = None) -> Iterator[Event]:
    """Events from the lines of a ``text/event-stream`` (the WHATWG rules): ``field: value`` lines, ``data``
    lines joined with newlines, a blank line ends an event, lines starting with ``:`` are comments, an event
    without ``data`` is not dispatched, and ``id`` carries over to later events that have none. An event cut off
    by the end of the stream (no blank line yet) is discarded, so a resume after its id repeats nothing."""
    kind, event_id = "", last_event_id
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield Event(id=-1 if event_id is None else event_id, kind=kind or "message",
                            data=_payload("\n".join(data)))
            kind, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            try:
                event_id = int(value)
            except ValueError:
                pass  # not one of ours; ids here are integers
        # "retry" and unknown fields are ignored (the reconnection delay here is RECONNECTS' backoff)


def _payload(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"text": text}
    return value if isinstance(value, dict) else {"value": value}


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Lines (without their ending: CRLF, LF or CR) from UTF-8 chunks as they arrive. A CR that ends a chunk waits
    for the next one (it may be half of a CRLF: counted alone it would be a blank line, ending an event early)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer, first = "", True
    for chunk in chunks:
        buffer += decoder.decode(chunk)
        if first and buffer:
            buffer, first = buffer.removeprefix("\ufeff"), False
        start = 0
        for match in _EOL.finditer(buffer):
            if match.group() == "\r" and match.end() == len(buffer):
                break
            yield buffer[start:match.start()]
            start = match.end()
        buffer = buffer[start:]
        if len(buffer) > MAX_LINE:
            raise AutoMLError(f"the event stream sent a line longer than {MAX_LINE} bytes; refused")
    buffer += decoder.decode(b"", final=True)
    if buffer.endswith("\r"):
        yield buffer[:-1]
    # A last line without its ending belongs to an event that was cut off: dropped.


def _chunks(response: requests.Response, deadline: float | None, sweep_id: str) -> Iterator[bytes]:
    """The body as it arrives: each read returns what the socket has (an event is seen the moment it comes), in
    chunked and in connection-close bodies alike (``iter_content`` would wait for a full buffer on the latter).
    ``TimeoutError`` past the deadline, even while keep-alive comments keep the socket busy."""
    raw = response.raw
    reads = (response.iter_content(chunk_size=None) if not hasattr(raw, "read1")  # urllib3 1.x
             else iter(lambda: raw.read1(65536, decode_content=True), b""))
    for data in reads:
        yield data
        _check_deadline(deadline, sweep_id)


# ---------------------------------------------------------------------------------------------- helpers


def _now() -> float:
    return time.monotonic()


def _check_deadline(deadline: float | None, sweep_id: str) -> None:
    if deadline is not None and _now() >= deadline:
        raise TimeoutError(f"sweep {sweep_id} did not reach a final state in time")


def _pause(failures: int, deadline: float | None) -> None:
    """Back off before reconnecting: 0.25 s, 0.5 s, 1 s, ... at most 4 s, never past the deadline."""
    delay = min(4.0, 0.25 * 2 ** (failures - 1))
    if deadline is not None:
        delay = max(0.0, min(delay, deadline - _now()))
    time.sleep(delay)


def _field(body: Any, key: str, kind: type, where: str) -> Any:
    value = body.get(key) if isinstance(body, dict) else None
    if not isinstance(value, kind):
        raise AutoMLError(f"the automl service answered {API}{where} without '{key}' ({kind.__name__}); is it an "
                          f"automl service of this version?")
    return value


def _service_error(response: requests.Response, shown_url: str) -> ServiceError:
    """The service's ``{"detail": "<one line>"}`` as a ``ServiceError``; FastAPI's own validation errors (a list)
    as their first field path and message; anything else (a proxy's HTML page) as the status line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        where = ".".join(str(p) for p in first.get("loc") or () if p not in ("body", "query", "path"))
        detail = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    if not isinstance(detail, str) or not detail.strip():
        detail = f"HTTP {response.status_code} {response.reason or ''}".rstrip() + f" from {shown_url}"
    return ServiceError(response.status_code, " ".join(part.strip() for part in detail.splitlines() if part.strip()))


def _reason(exc: BaseException) -> str:
    """The cause of a failed connection in a few words ("Connection refused"), not requests' nested reprs."""
    todo, seen = [exc], set()
    while todo:
        error = todo.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and not isinstance(error, requests.RequestException) and \
                isinstance(error.strerror, str) and error.strerror:
            return _sentence_case(error.strerror)
        todo += [e for e in (getattr(error, "reason", None), error.__cause__, error.__context__, *error.args)
                 if isinstance(e, BaseException)]
    text = str(exc).rstrip("')\"").rsplit(": ", 1)[-1].strip() or type(exc).__name__
    return _sentence_case(text.splitlines()[0])


def _sentence_case(text: str) -> str:
    """"Connection refused" -> "connection refused" (it follows a colon); "SSL: ..." stays as it is."""
    return text[0].lower() + text[1:] if len(text) > 1 and text[0].isupper() and text[1].islower() else text
