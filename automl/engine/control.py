"""Live control of a sweep running in another process of the same directory (``automl set``): a request file in the
sweep's state folder, answered by the engine running it with a reply file.

Files rather than a socket: they need no port, work on any file system a state folder lives on, are private to the
folder's owner, and a request left by a dead driver is simply never answered (``automl set`` says so).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automl.errors import AutoMLError

CONTROL_DIR = "control"
ANSWER_TIMEOUT = 10.0


@dataclass
class Request:
    path: Path
    budget: dict[str, Any]


def send(folder: Path, budget: dict[str, Any], timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
    """Ask the engine running the sweep in ``folder`` to change its budget; returns the values in effect."""
    directory = folder / CONTROL_DIR
    directory.mkdir(exist_ok=True)
    name = uuid.uuid4().hex
    tmp = directory / f"{name}.tmp"
    tmp.write_text(json.dumps({"budget": budget}))
    os.replace(tmp, directory / f"{name}.request.json")  # whole, or not at all
    reply = directory / f"{name}.reply.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reply.exists():
            answer = json.loads(reply.read_text())
            reply.unlink(missing_ok=True)
            if not answer.get("ok"):
                raise AutoMLError(str(answer.get("error") or "the sweep refused the change"))
            return dict(answer["budget"])
        time.sleep(0.05)
    (directory / f"{name}.request.json").unlink(missing_ok=True)
    raise AutoMLError(f"the process running sweep {folder.name} did not answer within {timeout:.0f}s")


def pending(folder: Path) -> Iterator[Request]:
    """Requests waiting in a sweep's folder (read and removed)."""
    directory = folder / CONTROL_DIR
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.request.json")):
        try:
            raw = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            continue
        budget = raw.get("budget") if isinstance(raw, dict) else None
        yield Request(path, {k: v for k, v in (budget or {}).items() if k in ("trials", "max_concurrent", "time")})


def answer(request: Request, reply: dict[str, Any]) -> None:
    target = request.path.with_name(request.path.name.replace(".request.json", ".reply.json"))
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(reply))
    os.replace(tmp, target)
