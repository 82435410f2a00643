"""The HTTP API of ``automl serve`` (DESIGN.md section 9), on FastAPI: JSON under ``/api/v1`` (OpenAPI at ``/docs``)
and the status page at ``/``.

Guards, outermost first: the Host header must name this service (DNS rebinding: 400), request bodies are capped
(413), CORS only for ``--allowed-origin``; every route but ``/api/v1/healthz`` needs ``Authorization: Bearer
<token>`` (the page: a session cookie from its login form), and a burst of bad tokens from one address is slowed
down. Errors are one line, ``{"detail": "<line>"}``, with the field path for a bad spec.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at runtime, and the token
# dependency (``Who``) is defined inside ``create_app``.
import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from automl.errors import AutoMLError, DataError, SpecError, SweepNotFoundError, TrainerError
from automl.service.manager import FINAL, STATES, Conflict, Forbidden, SweepManager
from automl.service.policy import PathRefused
from automl.service.store import Principal, ServiceStore

SESSION_COOKIE = "automl_session"
MAX_BODY = 2 << 20  # a spec is at most 1 MiB of YAML; JSON around it stays below this
KEEP_ALIVE = 15.0  # seconds between SSE comments while a stream waits
DATA_SUFFIXES = (".csv", ".parquet", ".pq")


class Unauthorized(AutoMLError):
    pass


def create_app(manager: SweepManager, store: ServiceStore, *, allowed_hosts: list[str], allowed_origins: list[str],
               max_upload: int, datasets_dir: Path) -> FastAPI:
    from automl import __version__

    app = FastAPI(title="automl", version=__version__, docs_url="/docs", redoc_url=None)
    failures = _Failures()

    # ------------------------------------------------------------------------------------------ errors

    @app.exception_handler(AutoMLError)
    async def automl_error(request: Request, exc: AutoMLError) -> JSONResponse:
        status = 422
        if isinstance(exc, Unauthorized):
            return JSONResponse({"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if isinstance(exc, _TooLarge):
            status = 413
        elif isinstance(exc, Forbidden):
            status = 403
        elif isinstance(exc, SweepNotFoundError):
            status = 404
        elif isinstance(exc, Conflict):
            status = 409
        elif isinstance(exc, SpecError | DataError | TrainerError | PathRefused):
            status = 422
        return JSONResponse({"detail": _one_line(str(exc))}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"detail": f"request: {where + ': ' if where else ''}{first.get('msg', 'invalid')}"},
                            status_code=422)

    # ------------------------------------------------------------------------------------------ identity

    async def principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
        token = ""
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        found = await run_in_threadpool(store.authenticate, token) if token else None
        if found is None:
            await failures.slow_down(_client(request))
            raise Unauthorized("a valid token is needed: Authorization: Bearer <token> (automl token create)")
        return found

    Who = Annotated[Principal, Depends(principal)]

    # ------------------------------------------------------------------------------------------ API

    @app.get("/api/v1/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/v1/sweeps", status_code=201)
    async def submit(request: Request, who: Who) -> dict[str, Any]:
        body = await _json_body(request)
        return await run_in_threadpool(manager.submit, who, body.get("spec"), body.get("overrides"))

    @app.get("/api/v1/sweeps")
    async def list_sweeps(who: Who, state: Annotated[str | None, Query()] = None,
                          owner: Annotated[str | None, Query()] = None) -> dict[str, Any]:
        if state is not None and state not in STATES:
            raise SpecError(f"state: must be one of {', '.join(STATES)} (got {state!r})", source="query")
        return {"sweeps": await run_in_threadpool(manager.sweeps, who, state, owner)}

    @app.get("/api/v1/sweeps/{sweep_id}")
    async def get_sweep(sweep_id: str, who: Who) -> dict[str, Any]:
        await run_in_threadpool(manager.record, sweep_id, who)
        return await run_in_threadpool(manager.view, sweep_id)

    @app.get("/api/v1/sweeps/{sweep_id}/trials")
    async def get_trials(sweep_id: str, who: Who) -> dict[str, Any]:
        await run_in_threadpool(manager.record, sweep_id, who)
        return {"trials": await run_in_threadpool(manager.trials, sweep_id)}

    @app.patch("/api/v1/sweeps/{sweep_id}")
    async def patch_sweep(sweep_id: str, request: Request, who: Who) -> dict[str, Any]:
        body = await _json_body(request)
        budget = body.get("budget")
        if not isinstance(budget, dict) or not budget:
            raise SpecError('budget: give {"budget": {"trials": N, "max_concurrent": K, "time": "10m"}}',
                            source="request")
        await run_in_threadpool(manager.record, sweep_id, who, change=True)
        return await run_in_threadpool(manager.update, sweep_id, budget)

    @app.post("/api/v1/sweeps/{sweep_id}/cancel")
    async def cancel(sweep_id: str, who: Who) -> dict[str, Any]:
        await run_in_threadpool(manager.record, sweep_id, who, change=True)
        return await run_in_threadpool(manager.cancel, sweep_id)

    @app.post("/api/v1/sweeps/{sweep_id}/resume")
    async def resume(sweep_id: str, who: Who) -> dict[str, Any]:
        await run_in_threadpool(manager.record, sweep_id, who, change=True)
        return await run_in_threadpool(manager.resume, sweep_id)

    @app.get("/api/v1/sweeps/{sweep_id}/events")
    async def sweep_events(sweep_id: str, request: Request, who: Who,
                           last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
        await run_in_threadpool(manager.record, sweep_id, who)
        after = int(last_event_id) if last_event_id and last_event_id.strip().isdigit() else 0
        return StreamingResponse(_stream(store, sweep_id, after, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/v1/datasets", status_code=201)
    async def upload(who: Who, file: Annotated[UploadFile, File()]) -> dict[str, str]:
        if not who.can_change:
            raise Forbidden("a viewer token cannot upload datasets")
        name = Path(file.filename or "data.csv").name
        suffix = Path(name).suffix.lower()
        if suffix not in DATA_SUFFIXES:
            raise SpecError(f"file: {name} is neither CSV nor Parquet; upload a .csv, .parquet or .pq file",
                            source="upload")
        dataset_id = uuid.uuid4().hex[:16]
        datasets_dir.mkdir(parents=True, exist_ok=True)
        path = datasets_dir / f"{dataset_id}{suffix}"
        size = await _save(file, path, max_upload)
        try:
            await run_in_threadpool(_check_table, path)
        except AutoMLError:
            path.unlink(missing_ok=True)
            raise
        await run_in_threadpool(store.add_dataset, {"id": dataset_id, "owner": who.name, "filename": name,
                                                    "path": str(path), "size": size, "created": time.time()})
        return {"source": f"dataset:{dataset_id}"}

    # ------------------------------------------------------------------------------------------ the page

    from automl.service import page

    async def viewer(request: Request) -> Principal | None:
        raw = request.cookies.get(SESSION_COOKIE)
        return await run_in_threadpool(store.session, raw) if raw else None

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        who = await viewer(request)
        if who is None:
            return HTMLResponse(page.login(error=None))
        records = await run_in_threadpool(manager.sweeps, who, None, None)
        return HTMLResponse(page.index(records, who))

    @app.post("/login", response_model=None)
    async def login(request: Request, token: Annotated[str, Form()]) -> HTMLResponse | RedirectResponse:
        who = await run_in_threadpool(store.authenticate, token.strip())
        if who is None:
            await failures.slow_down(_client(request))
            return HTMLResponse(page.login(error="That token is not valid."), status_code=401)
        session = await run_in_threadpool(store.create_session, who)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", max_age=12 * 3600)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> RedirectResponse:
        raw = request.cookies.get(SESSION_COOKIE)
        if raw:
            await run_in_threadpool(store.end_session, raw)
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # ------------------------------------------------------------------------------------------ guards

    app.add_middleware(_BodyLimit, limit=MAX_BODY, upload_limit=max_upload)
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "PATCH"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID"])
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    return app


# ---------------------------------------------------------------------------------------------- helpers


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "error"


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        reason = exc.args[0] if exc.args else exc
        raise SpecError(f"the request body is not JSON ({reason})", source="request") from None
    if not isinstance(body, dict):
        raise SpecError("the request body must be a JSON object", source="request")
    return body


async def _stream(store: ServiceStore, sweep_id: str, after: int, request: Request) -> AsyncIterator[bytes]:
    """Server-Sent Events from the store: history after ``after``, then new events as they come; the stream ends
    after the sweep's final ``sweep_state``."""
    last = after
    quiet = 0.0
    yield b": automl events\n\n"
    while True:
        rows = await run_in_threadpool(store.events_after, sweep_id, last)
        for event_id, kind, data in rows:
            last = event_id
            yield f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data, default=str)}\n\n".encode()
            if kind == "sweep_state" and data.get("state") in FINAL:
                return
        if rows:
            quiet = 0.0
            continue
        if await request.is_disconnected():
            return
        record = await run_in_threadpool(store.get_sweep, sweep_id)
        if record is None:
            return
        await asyncio.sleep(0.2)
        quiet += 0.2
        if quiet >= KEEP_ALIVE:
            quiet = 0.0
            yield b": keep-alive\n\n"


async def _save(file: UploadFile, path: Path, limit: int) -> int:
    size = 0
    with path.open("wb") as out:
        while chunk := await file.read(1 << 20):
            size += len(chunk)
            if size > limit:
                out.close()
                path.unlink(missing_ok=True)
                raise _TooLarge(limit)
            out.write(chunk)
    return size


def _check_table(path: Path) -> None:
    """An uploaded table must be readable as what its name says (its header, at least)."""
    from automl.preflight import check_data
    from automl.spec import DataSpec

    header = DataSpec(source=str(path), target="__automl_check__")
    try:
        check_data(header, None)
    except DataError as exc:
        if "__automl_check__" in str(exc):
            return  # readable: only our made-up target column is missing
        raise DataError(str(exc).replace(str(path), path.name)) from None


class _TooLarge(AutoMLError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")


class _Failures:
    """Failed logins per client address: past a handful a minute, each answer waits longer (to 2 s)."""

    def __init__(self, free: int = 5, window: float = 60.0) -> None:
        self.free = free
        self.window = window
        self.seen: dict[str, deque[float]] = {}

    async def slow_down(self, client: str) -> None:
        now = time.monotonic()
        times = self.seen.setdefault(client, deque())
        while times and now - times[0] > self.window:
            times.popleft()
        times.append(now)
        if len(self.seen) > 10_000:  # bounded memory: forget the quietest addresses
            for key in [k for k, v in self.seen.items() if not v][:5000]:
                self.seen.pop(key, None)
        excess = len(times) - self.free
        if excess > 0:
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(excess, 6)))


class _BodyLimit:
    """413 for a body past the limit: by its Content-Length at once, or while it streams in."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # An upload carries its file plus a little multipart framing.
        limit = self.upload_limit + (1 << 16) if scope["path"] == "/api/v1/datasets" else self.limit
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _reply(send, 413, f"the request body is larger than {limit} bytes")
            return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except _TooLarge as exc:
            if not started:
                await _reply(send, 413, str(exc))


async def _reply(send: Callable[..., Any], status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
