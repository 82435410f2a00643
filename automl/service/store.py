"""The service's own records: tokens (hashed), page sessions, sweeps, their trials and events, uploaded datasets.

A SQLite file in the state folder by default (``.automl/service.db``), or PostgreSQL (``--storage``) for the
scale-out profile; SQLAlchemy Core, so both are one code path. Records are the service's memory across restarts:
a ``kill -9`` loses nothing the store committed (SQLite in WAL mode, each write its own transaction).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine

from automl.errors import AutoMLError

ROLES = ("admin", "user", "viewer")
TOKEN_PREFIX = "aml_"
SESSION_SECONDS = 12 * 3600

metadata = MetaData()
tokens = Table(
    "automl_tokens", metadata,
    Column("name", String(200), primary_key=True),
    Column("role", String(20), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
    Column("created", Float, nullable=False),
    Column("revoked", Float),
)
sessions = Table(
    "automl_sessions", metadata,
    Column("hash", String(64), primary_key=True),
    Column("token", String(200), nullable=False),
    Column("expires", Float, nullable=False),
)
sweeps = Table(
    "automl_sweeps", metadata,
    Column("id", String(300), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("owner", String(200), nullable=False, index=True),
    Column("state", String(20), nullable=False, index=True),
    Column("created", Float, nullable=False),
    Column("started", Float),
    Column("finished", Float),
    Column("spec", Text, nullable=False),  # the spec as the engine runs it (JSON), paths already resolved
    Column("info", Text, nullable=False, default="{}"),  # method, sampler, metric, goal, budget, best, mlflow, counts
    Column("error", Text),
)
trials = Table(
    "automl_trials", metadata,
    Column("sweep", String(300), primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("state", String(20), nullable=False),
    Column("value", Float),
    Column("params", Text, nullable=False),
    Column("metrics", Text, nullable=False),
    Column("run_id", String(64)),
)
events = Table(
    "automl_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sweep", String(300), nullable=False, index=True),
    Column("kind", String(40), nullable=False),
    Column("data", Text, nullable=False),
    Column("created", Float, nullable=False),
)
datasets = Table(
    "automl_datasets", metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("filename", String(300), nullable=False),
    Column("path", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("created", Float, nullable=False),
)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a token's name and role."""

    name: str
    role: str

    @property
    def can_change(self) -> bool:
        return self.role in ("admin", "user")

    def may_see(self, owner: str) -> bool:
        return self.role in ("admin", "viewer") or owner == self.name

    def may_change(self, owner: str) -> bool:
        return self.role == "admin" or (self.role == "user" and owner == self.name)


def hash_secret(raw: str) -> str:
    """SHA-256 of a token: tokens are 256 random bits, so a fast hash is what GitHub and others use for them (a slow
    password hash buys nothing against a brute force of 2^256)."""
    return hashlib.sha256(raw.encode()).hexdigest()


def default_url(root: Path) -> str:
    return f"sqlite:///{(root / 'service.db').resolve()}"


class ServiceStore:
    """The records, thread-safe (each call is its own transaction)."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite:"):
            path = url.removeprefix("sqlite:///")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite:"):
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        self._write = threading.Lock()  # SQLite takes one writer at a time; in-process writers queue here
        metadata.create_all(self.engine)

    # ------------------------------------------------------------------------------------------ tokens

    def create_token(self, name: str, role: str) -> str:
        """A new token for ``name``; returns it (shown once: only its hash is kept)."""
        if role not in ROLES:
            raise AutoMLError(f"--role must be one of {', '.join(ROLES)} (got {role!r})")
        if not name or len(name) > 200 or not all(c.isalnum() or c in "-_.@" for c in name):
            raise AutoMLError(f"token name must be 1 to 200 letters, digits, '-', '_', '.' or '@' (got {name!r})")
        raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._write, self.engine.begin() as db:
            row = db.execute(select(tokens.c.revoked).where(tokens.c.name == name)).first()
            if row is not None and row.revoked is None:
                raise AutoMLError(f"token '{name}' exists; revoke it first (`automl token revoke {name}`)")
            db.execute(delete(tokens).where(tokens.c.name == name))
            db.execute(insert(tokens).values(name=name, role=role, hash=hash_secret(raw), created=time.time()))
        return raw

    def revoke_token(self, name: str) -> None:
        with self._write, self.engine.begin() as db:
            done = db.execute(update(tokens).where(and_(tokens.c.name == name, tokens.c.revoked.is_(None)))
                              .values(revoked=time.time())).rowcount
            db.execute(delete(sessions).where(sessions.c.token == name))
        if not done:
            raise AutoMLError(f"no active token named '{name}'")

    def list_tokens(self) -> list[dict[str, Any]]:
        with self.engine.connect() as db:
            rows = db.execute(select(tokens.c.name, tokens.c.role, tokens.c.created, tokens.c.revoked)
                              .order_by(tokens.c.name)).all()
        return [dict(r._mapping) for r in rows]

    def authenticate(self, raw: str) -> Principal | None:
        if not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
            return None
        with self.engine.connect() as db:
            row = db.execute(select(tokens.c.name, tokens.c.role).where(
                and_(tokens.c.hash == hash_secret(raw), tokens.c.revoked.is_(None)))).first()
        return Principal(row.name, row.role) if row else None

    def has_tokens(self) -> bool:
        with self.engine.connect() as db:
            return db.execute(select(tokens.c.name).where(tokens.c.revoked.is_(None)).limit(1)).first() is not None

    # ------------------------------------------------------------------------------------------ page sessions

    def create_session(self, principal: Principal) -> str:
        raw = secrets.token_urlsafe(32)
        now = time.time()
        with self._write, self.engine.begin() as db:
            db.execute(delete(sessions).where(sessions.c.expires < now))
            db.execute(insert(sessions).values(hash=hash_secret(raw), token=principal.name,
                                               expires=now + SESSION_SECONDS))
        return raw

    def session(self, raw: str) -> Principal | None:
        with self.engine.connect() as db:
            row = db.execute(select(tokens.c.name, tokens.c.role).select_from(
                sessions.join(tokens, sessions.c.token == tokens.c.name)).where(and_(
                    sessions.c.hash == hash_secret(raw), sessions.c.expires > time.time(),
                    tokens.c.revoked.is_(None)))).first()
        return Principal(row.name, row.role) if row else None

    def end_session(self, raw: str) -> None:
        with self._write, self.engine.begin() as db:
            db.execute(delete(sessions).where(sessions.c.hash == hash_secret(raw)))

    # ------------------------------------------------------------------------------------------ sweeps

    def add_sweep(self, record: dict[str, Any]) -> None:
        with self._write, self.engine.begin() as db:
            db.execute(insert(sweeps).values(**_dumped(record)))

    def update_sweep(self, sweep_id: str, **fields: Any) -> None:
        """Update columns; ``info`` is merged into the stored info (key by key)."""
        with self._write, self.engine.begin() as db:
            if "info" in fields:
                row = db.execute(select(sweeps.c.info).where(sweeps.c.id == sweep_id)).first()
                merged = {**(json.loads(row.info) if row else {}), **fields["info"]}
                fields = {**fields, "info": merged}
            db.execute(update(sweeps).where(sweeps.c.id == sweep_id).values(**_dumped(fields)))

    def get_sweep(self, sweep_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as db:
            row = db.execute(select(sweeps).where(sweeps.c.id == sweep_id)).first()
        return _loaded(dict(row._mapping)) if row else None

    def list_sweeps(self, *, state: str | None = None, owner: str | None = None,
                    states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        query = select(sweeps)
        if state:
            query = query.where(sweeps.c.state == state)
        if states:
            query = query.where(sweeps.c.state.in_(states))
        if owner:
            query = query.where(sweeps.c.owner == owner)
        with self.engine.connect() as db:
            rows = db.execute(query.order_by(sweeps.c.created.desc(), sweeps.c.id.desc())).all()
        return [_loaded(dict(r._mapping)) for r in rows]

    # ------------------------------------------------------------------------------------------ trials

    def put_trials(self, sweep_id: str, rows: list[dict[str, Any]]) -> None:
        """Insert or replace the trials' rows (number, state, value, params, metrics, run_id)."""
        if not rows:
            return
        with self._write, self.engine.begin() as db:
            numbers = [r["number"] for r in rows]
            db.execute(delete(trials).where(and_(trials.c.sweep == sweep_id, trials.c.number.in_(numbers))))
            db.execute(insert(trials), [{"sweep": sweep_id, "number": r["number"], "state": r["state"],
                                         "value": r.get("value"), "params": json.dumps(r.get("params", {}),
                                                                                       default=str),
                                         "metrics": json.dumps(r.get("metrics", {})), "run_id": r.get("run_id")}
                                        for r in rows])

    def get_trials(self, sweep_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as db:
            rows = db.execute(select(trials).where(trials.c.sweep == sweep_id).order_by(trials.c.number)).all()
        return [{"number": r.number, "state": r.state, "value": r.value, "params": json.loads(r.params),
                 "metrics": json.loads(r.metrics), "run_id": r.run_id} for r in rows]

    # ------------------------------------------------------------------------------------------ events

    def add_events(self, batch: list[tuple[str, str, dict[str, Any]]]) -> None:
        if not batch:
            return
        now = time.time()
        with self._write, self.engine.begin() as db:
            db.execute(insert(events), [{"sweep": s, "kind": k, "data": json.dumps(d, default=str), "created": now}
                                        for s, k, d in batch])

    def events_after(self, sweep_id: str, after: int, limit: int = 500) -> list[tuple[int, str, dict[str, Any]]]:
        with self.engine.connect() as db:
            rows = db.execute(select(events.c.id, events.c.kind, events.c.data).where(
                and_(events.c.sweep == sweep_id, events.c.id > after)).order_by(events.c.id).limit(limit)).all()
        return [(r.id, r.kind, json.loads(r.data)) for r in rows]

    # ------------------------------------------------------------------------------------------ datasets

    def add_dataset(self, record: dict[str, Any]) -> None:
        with self._write, self.engine.begin() as db:
            db.execute(insert(datasets).values(**record))

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as db:
            row = db.execute(select(datasets).where(datasets.c.id == dataset_id)).first()
        return dict(row._mapping) if row else None

    def close(self) -> None:
        self.engine.dispose()


def _dumped(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    for key in ("spec", "info"):
        if key in out and not isinstance(out[key], str):
            out[key] = json.dumps(out[key], default=str)
    return out


def _loaded(row: dict[str, Any]) -> dict[str, Any]:
    row["spec"] = json.loads(row["spec"])
    row["info"] = json.loads(row["info"] or "{}")
    return row
