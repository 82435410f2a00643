"""``automl serve``: one long-lived engine behind an authenticated HTTP API (DESIGN.md section 9).

- ``store``: the service's records (tokens hashed, sessions, sweeps, trials, events, datasets), SQLite or PostgreSQL;
- ``policy``: what a remote spec may reach (data under ``--data-root``, trainers registered or in ``--trainers-dir``);
- ``manager``: the queue in front of the engine, events, recovery after a restart;
- ``app``: the FastAPI routes and their guards; ``page``: the status page.

The service talks to the engine through the same handle the CLI uses; the engine never imports the service.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8765
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    workdir: Path = field(default_factory=Path.cwd)
    data_root: Path | None = None
    trainers_dir: Path | None = None
    tracking_uri: str | None = None
    storage: str | None = None
    address: str | None = None
    allowed_hosts: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    max_running: int | None = None
    max_running_per_user: int | None = None
    max_upload: int = 200 << 20
    mlflow_ui: str | None = None


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def store_url(workdir: Path, storage: str | None) -> str:
    """Where the service's records live: ``storage`` (PostgreSQL, shared with the search state), else
    ``.automl/service.db``."""
    from automl.service.store import default_url
    from automl.state import state_root

    # $AUTOML_STORAGE as everywhere else: a database password stays off the command line.
    return storage or os.environ.get("AUTOML_STORAGE") or default_url(state_root(workdir))


def open_store(workdir: Path, storage: str | None) -> Any:
    from automl.service.store import ServiceStore

    return ServiceStore(store_url(workdir, storage))


def _say(text: str, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def serve(options: ServeOptions, *, say: Any = _say) -> None:
    """Run the service until SIGTERM or Ctrl-C (a clean stop: running sweeps resume at the next start)."""
    import uvicorn

    from automl.engine import Engine
    from automl.redact import without_credentials
    from automl.service.app import create_app
    from automl.service.manager import Settings, SweepManager
    from automl.state import state_root
    from automl.tracking import resolve_tracking_uri

    workdir = options.workdir.resolve()
    root = state_root(workdir)
    storage = options.storage or os.environ.get("AUTOML_STORAGE") or None
    store = open_store(workdir, storage)
    tracking_uri = resolve_tracking_uri(options.tracking_uri, workdir)
    if tracking_uri.startswith("sqlite:"):
        from automl.tracking import make_client

        make_client(tracking_uri)  # a new store is made now, under automl's lock, not by the first sweep
    engine = Engine(address=options.address, workdir=workdir)
    cpus = int(engine.cluster().get("CPU", os.cpu_count() or 1))
    max_running = options.max_running or max(1, cpus)
    settings = Settings(
        root=workdir, data_root=(options.data_root or workdir).resolve(),
        trainers_dir=options.trainers_dir.resolve() if options.trainers_dir else None, tracking_uri=tracking_uri,
        storage=storage, max_running=max_running,
        max_running_per_user=options.max_running_per_user or max_running,
        # The tracking server is its own UI; its links never carry the password the tracking URI may hold.
        mlflow_ui=without_credentials(options.mlflow_ui or (
            tracking_uri if tracking_uri.startswith(("http://", "https://")) else "")) or None,
    )
    manager = SweepManager(store, engine, settings)
    hosts = sorted({*LOOPBACK, *([] if options.host in ("0.0.0.0", "::") else [options.host]),
                    *options.allowed_hosts})
    app = create_app(manager, store, allowed_hosts=hosts, allowed_origins=options.allowed_origins,
                     max_upload=options.max_upload, datasets_dir=root / "datasets")

    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False,
                            ssl_certfile=str(options.ssl_certfile) if options.ssl_certfile else None,
                            ssl_keyfile=str(options.ssl_keyfile) if options.ssl_keyfile else None,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    scheme = "https" if options.ssl_certfile else "http"
    say(f"automl service on {scheme}://{options.host}:{options.port} (API under /api/v1, OpenAPI at /docs, status "
        f"page at /); records in {_masked(store.url)}, MLflow in {_masked(tracking_uri)}")
    if not is_loopback(options.host) and not options.ssl_certfile:
        say(f"warning: serving on {options.host} without TLS: tokens cross the network in clear text; give "
            "--ssl-certfile and --ssl-keyfile, or put the service behind a TLS proxy", err=True)
    if not store.has_tokens():
        say("no tokens yet: `automl token create NAME --role admin` makes one", err=True)
    try:
        manager.start()  # sweeps a previous service left RUNNING resume; the queue starts moving
        server.run()
    finally:
        manager.stop()
        store.close()


def _masked(url: str) -> str:
    from automl.redact import mask_url

    return mask_url(url) or ""
