"""``automl.Client`` and the client commands (submit, watch, cancel; status, set and resume with --server) against a
small real HTTP server in this process that answers as DESIGN.md section 9 says: canned sweeps, scripted event
streams (chunked like uvicorn's, or ended by closing the connection), connections dropped mid-event. The service
itself is tested on its own; here only what the client sends, and what it makes of the answers."""

from __future__ import annotations

import json
import pickle
import re
import threading
import time
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from servers import free_port
from typer.testing import CliRunner

from automl import AutoMLError, Client, ServiceError
from automl.cli import app
from automl.client import Event, RemoteSweep, _lines, parse_sse

TOKEN = "t0ken-for-tests"
FINAL = ("FINISHED", "FAILED", "CANCELLED")
SPEC = """\
trainer: mlp
data: {source: data.csv, target: y}
metric: val_accuracy
parameters:
  lr: {type: float, low: 0.001, high: 0.1, log: true}
"""


def sweep_object(sweep_id: str, state: str = "QUEUED", **fields: Any) -> dict[str, Any]:
    return {"id": sweep_id, "name": sweep_id.rsplit("-", 1)[0], "owner": "ann", "state": state,
            "created": "2026-11-30T10:00:00Z", "started": "2026-11-30T10:00:01Z", "finished": None,
            "method": "bayesian", "sampler": "TPESampler", "metric": "val_accuracy", "goal": "maximize",
            "budget": {"trials": 4, "max_concurrent": 2, "time": None},
            "trials": {"complete": 0, "stopped": 0, "failed": 0, "running": 0, "total": 0}, "best": None,
            "mlflow": {"experiment_id": "1", "run_id": "parent0", "url": "http://mlflow.test/#/experiments/1"},
            "error": None, **fields}


TRIALS = [  # best first, as the service orders them
    {"number": 2, "state": "COMPLETE", "value": 0.97, "params": {"lr": 0.01, "depth": 3}, "metrics": {},
     "run_id": "run2"},
    {"number": 0, "state": "COMPLETE", "value": 0.91, "params": {"lr": 0.05, "depth": 2}, "metrics": {},
     "run_id": "run0"},
    {"number": 1, "state": "FAILED", "value": None, "params": {"lr": 0.09, "state": "x"}, "metrics": {},
     "run_id": "run1"},
]


class FakeService:
    """What the handler answers from: sweeps, their trials and event logs; every request it received."""

    def __init__(self) -> None:
        self.sweeps: dict[str, dict[str, Any]] = {}
        self.trials: dict[str, list[dict[str, Any]]] = {}
        self.events: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.submitted: list[dict[str, Any]] = []
        self.datasets: dict[str, tuple[str, str, bytes]] = {}
        self.connections: list[int] = []  # Last-Event-ID of each events request (0 without one)
        self.cond = threading.Condition()
        self.chunked = True  # like uvicorn; False: the body ends when the connection closes (HTTP/1.0 style)
        self.drop_after: int | None = None  # first events connection: cut mid-event after this many events
        self.no_stream = False  # the events route answers JSON (an old service, a proxy)
        self.upload_limit = 1 << 20
        self.closing = False

    def add(self, sweep_id: str, state: str = "RUNNING", trials: list[dict[str, Any]] | None = None,
            **fields: Any) -> dict[str, Any]:
        self.sweeps[sweep_id] = sweep_object(sweep_id, state, **fields)
        self.trials[sweep_id] = list(trials or [])
        self.events[sweep_id] = []
        return self.sweeps[sweep_id]

    def emit(self, sweep_id: str, kind: str, **data: Any) -> None:
        with self.cond:
            log = self.events[sweep_id]
            log.append((len(log) + 1, kind, data))
            if kind == "sweep_state":
                self.sweeps[sweep_id]["state"] = data["state"]
            self.cond.notify_all()

    def history(self, sweep_id: str, final: str = "FINISHED", error: str | None = None) -> None:
        """A whole sweep's events: two trials (one failed), the best, the final state."""
        self.emit(sweep_id, "sweep_state", state="RUNNING", error=None)
        self.emit(sweep_id, "trial_started", number=0, params={"lr": 0.05})
        self.emit(sweep_id, "trial_reported", number=0, step=1, metrics={"val_accuracy": 0.8})
        self.emit(sweep_id, "trial_reported", number=0, step=2, metrics={"val_accuracy": 0.91})
        self.emit(sweep_id, "trial_finished", number=0, state="COMPLETE", value=0.91, error=None)
        self.emit(sweep_id, "best_changed", number=0, value=0.91, params={"lr": 0.05})
        self.emit(sweep_id, "trial_started", number=1, params={"lr": 0.09})
        self.emit(sweep_id, "trial_finished", number=1, state="FAILED", value=None, error="ValueError: nan loss")
        self.emit(sweep_id, "sweep_state", state=final, error=error)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def do_PATCH(self) -> None:
        self.route("PATCH")

    def reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def route(self, method: str) -> None:
        fake: FakeService = self.server.fake
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fake.requests.append((method, self.path, dict(self.headers), body))
        if url.path == "/api/v1/healthz":
            return self.reply(200, {"status": "ok"})
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.reply(401, {"detail": "no token, or a token this service does not know"})
        parts = url.path.removeprefix("/api/v1/").split("/")
        if parts == ["sweeps"] and method == "POST":
            return self.submit(fake, json.loads(body))
        if parts == ["sweeps"]:
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            found = [s for s in reversed(fake.sweeps.values())
                     if all(s.get(k) == v for k, v in query.items())]
            return self.reply(200, {"sweeps": found})
        if parts == ["datasets"] and method == "POST":
            return self.upload(fake, body)
        if parts[0] != "sweeps" or len(parts) not in (2, 3):
            return self.reply(404, {"detail": f"no route {url.path}"})
        sweep_id = parts[1]
        if sweep_id == "theirs":
            return self.reply(403, {"detail": "sweep theirs belongs to bob"})
        sweep = fake.sweeps.get(sweep_id)
        if sweep is None:
            return self.reply(404, {"detail": f"no sweep '{sweep_id}'"})
        action = (method, parts[2] if len(parts) == 3 else "")
        if action == ("GET", ""):
            return self.reply(200, sweep)
        if action == ("GET", "trials"):
            return self.reply(200, {"trials": fake.trials[sweep_id]})
        if action == ("GET", "events"):
            return self.stream(fake, sweep_id)
        if action == ("PATCH", ""):
            budget = json.loads(body)["budget"]
            if budget.get("trials", 99) < 2:
                return self.reply(409, {"detail": f"budget.trials: {budget['trials']} is fewer than the 2 trials "
                                                  f"already done in sweep {sweep_id}"})
            from automl.spec import parse_duration

            sweep["budget"].update({k: parse_duration(v) if k == "time" else v for k, v in budget.items()})
            return self.reply(200, sweep)
        if action == ("POST", "cancel"):
            if sweep["state"] in FINAL:
                return self.reply(409, {"detail": f"sweep {sweep_id} is {sweep['state']}; nothing to cancel"})
            sweep["state"] = "CANCELLED"
            return self.reply(200, sweep)
        if action == ("POST", "resume"):
            if sweep["state"] not in ("CANCELLED", "FAILED"):
                return self.reply(409, {"detail": f"sweep {sweep_id} is {sweep['state']}; only a CANCELLED or "
                                                  f"FAILED sweep resumes"})
            sweep["state"] = "QUEUED"
            return self.reply(200, sweep)
        return self.reply(404, {"detail": f"no route {method} {url.path}"})

    def submit(self, fake: FakeService, body: dict[str, Any]) -> None:
        fake.submitted.append(body)
        spec = body["spec"] if isinstance(body["spec"], dict) else yaml.safe_load(body["spec"])
        spec.update(body.get("overrides") or {})
        if "parameters" not in spec:
            return self.reply(422, {"detail": "spec: parameters: Field required"})
        sweep = fake.add(f"{spec.get('name', 'sweep')}-{len(fake.sweeps) + 1}", "QUEUED")
        sweep["name"] = spec.get("name", "sweep")
        return self.reply(201, sweep)

    def upload(self, fake: FakeService, body: bytes) -> None:
        if len(body) > fake.upload_limit:
            return self.reply(413, {"detail": f"the upload is more than {fake.upload_limit} bytes"})
        kind = self.headers["Content-Type"]
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {kind}\r\n\r\n".encode() + body)
        for part in message.iter_parts():  # type: ignore[attr-defined]
            if part.get_param("name", header="content-disposition") == "file":
                dataset = f"ds{len(fake.datasets) + 1}"
                fake.datasets[dataset] = (part.get_filename(), part.get_content_type(), part.get_payload(decode=True))
                return self.reply(201, {"source": f"dataset:{dataset}"})
        return self.reply(422, {"detail": "file: Field required"})

    def stream(self, fake: FakeService, sweep_id: str) -> None:
        if fake.no_stream:
            return self.reply(200, {"detail": "no events here"})
        after = int(self.headers.get("Last-Event-ID") or 0)
        fake.connections.append(after)
        first = len(fake.connections) == 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if fake.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

        def send(text: str) -> None:
            data = text.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" if fake.chunked else data)
            self.wfile.flush()

        send(": automl events\n\n")
        sent = 0
        while not fake.closing:
            with fake.cond:
                pending = [e for e in fake.events[sweep_id] if e[0] > after]
                if not pending:
                    fake.cond.wait(0.05)
                    send(": keep-alive\n\n")
                    continue
            for event_id, kind, data in pending:
                lines = json.dumps(data, indent=1).splitlines()  # multi-line data: one JSON value, several lines
                text = f"id: {event_id}\nevent: {kind}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"
                if first and fake.drop_after is not None and sent == fake.drop_after:
                    send(text[: len(text) // 2])  # cut mid-event: the client must drop the half it got
                    self.close_connection = True
                    return  # no last chunk: the connection just closes
                send(text)
                after, sent = event_id, sent + 1
                if kind == "sweep_state" and data["state"] in FINAL:
                    if fake.chunked:
                        self.wfile.write(b"0\r\n\r\n")
                    return


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeService]:
    monkeypatch.delenv("AUTOML_SERVER", raising=False)
    monkeypatch.setenv("AUTOML_TOKEN", TOKEN)
    service = FakeService()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.fake = service  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    service.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield service
    service.closing = True
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(fake: FakeService) -> Client:
    return Client(fake.url, timeout=5)  # type: ignore[attr-defined]


def write_spec(folder: Path, text: str = SPEC, name: str = "my spec.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- the client


def test_submit_sends_the_yaml_text_and_the_overrides(fake: FakeService, client: Client, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    sweep = client.submit(spec, overrides={"budget.trials": 50, "seed": None})
    body = fake.submitted[-1]
    assert body == {"spec": SPEC, "overrides": {"name": "my-spec", "budget.trials": 50}}  # named as `automl run` would
    assert sweep.id == "my-spec-1"
    assert sweep.last_status is not None
    assert sweep.last_status["state"] == "QUEUED"
    assert sweep.status()["id"] == sweep.id
    method, path, headers, _ = fake.requests[-1]
    assert (method, path, headers["Authorization"]) == ("GET", "/api/v1/sweeps/my-spec-1", f"Bearer {TOKEN}")
    assert TOKEN not in repr(client) + repr(sweep)

    named = client.submit({"name": "named", **yaml.safe_load(SPEC)})  # a mapping goes as JSON, nothing added
    assert fake.submitted[-1] == {"spec": {"name": "named", **yaml.safe_load(SPEC)}}
    assert named.id == "named-2"
    assert fake.requests[-1][2]["Content-Type"] == "application/json"
    assert [s["id"] for s in client.sweeps()] == ["named-2", "my-spec-1"]  # newest first
    assert [s["id"] for s in client.sweeps(state="QUEUED", owner="ann")] == ["named-2", "my-spec-1"]
    assert fake.requests[-1][1] == "/api/v1/sweeps?state=QUEUED&owner=ann"
    assert client.health() == {"status": "ok"}


def test_http_errors_are_service_errors_with_the_servers_line(fake: FakeService, client: Client,
                                                              tmp_path: Path) -> None:
    fake.add("s-1", "RUNNING")
    big = tmp_path / "big.csv"
    big.write_bytes(b"x\n" * 2000)
    fake.upload_limit = 1000
    cases = {
        401: lambda: Client(fake.url, "wrong").sweeps(),  # type: ignore[attr-defined]
        403: lambda: client.sweep("theirs"),
        404: lambda: client.sweep("nope"),
        409: lambda: client.sweep("s-1").update(trials=1),
        413: lambda: client.upload(big),
        422: lambda: client.submit({"trainer": "mlp"}),
    }
    for status, call in cases.items():
        with pytest.raises(ServiceError) as caught:
            call()
        error = caught.value
        assert error.status == status
        assert str(error) == error.detail
        assert "\n" not in error.detail
        assert error.detail
    assert str(caught.value) == "spec: parameters: Field required"
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.status, copy.detail) == (422, "spec: parameters: Field required")


def test_an_unreachable_service_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOML_TOKEN", TOKEN)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AutoMLError) as caught:
        Client(url).sweeps()
    assert not isinstance(caught.value, ServiceError)
    assert re.fullmatch(rf"cannot reach the automl service at {url}: connection refused; is `automl serve` "
                        rf"running\?", str(caught.value)), str(caught.value)
    with pytest.raises(AutoMLError, match="must be an http:// or https:// URL"):
        Client("127.0.0.1:8765")
    monkeypatch.setenv("AUTOML_SERVER", "http://user:secret@127.0.0.1:9")
    assert "secret" not in repr(Client())


def test_the_sse_parser() -> None:
    lines = [": a comment", "", "id: 7", "event: trial_finished", 'data: {"number": 1,', 'data:  "value": 0.5}', "",
             "event: best_changed", "data:" + json.dumps({"number": 1}), "",  # no space; no id: the last one holds
             "id: 8", "event: nothing", "",  # no data: not dispatched, but its id counts
             "data: plain text", "retry: 10", "unknown: field", "",
             "id: x", "event: sweep_state", 'data: {"state": "FINISHED"}']  # cut off: no blank line, dropped
    assert list(parse_sse(lines)) == [
        Event(7, "trial_finished", {"number": 1, "value": 0.5}),
        Event(7, "best_changed", {"number": 1}),
        Event(8, "message", {"text": "plain text"}),
    ]
    assert list(parse_sse(["data: [1]", ""])) == [Event(-1, "message", {"value": [1]})]
    # Line endings across chunk boundaries: a CR that ends a chunk may be half of a CRLF, never a blank line.
    chunks = [b"\xef\xbb\xbfid: 1\r", b"\nevent: a\r\ndata: {\"k\": \"\xc3", b"\xa9\"}\r", b"\r", b"\n", b"id: 2\rdata",
              b": 3\n\n", b"data: cut"]
    assert list(_lines(chunks)) == ["id: 1", "event: a", 'data: {"k": "\u00e9"}', "", "id: 2", "data: 3", ""]
    assert list(parse_sse(_lines(chunks))) == [Event(1, "a", {"k": "\u00e9"}), Event(2, "message", {"value": 3})]


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "connection-close"])
def test_events_resume_after_a_dropped_connection(fake: FakeService, client: Client, chunked: bool) -> None:
    fake.add("s-1", "RUNNING")
    fake.history("s-1")
    fake.chunked, fake.drop_after = chunked, 3
    events = list(client.sweep("s-1").events())
    assert [e.id for e in events] == list(range(1, 10))  # each once, in order: the half event was dropped
    assert fake.connections == [0, 3]  # reopened with Last-Event-ID: 3
    assert events[4] == Event(5, "trial_finished", {"number": 0, "state": "COMPLETE", "value": 0.91, "error": None})
    assert events[-1].kind == "sweep_state"
    assert events[-1].data["state"] == "FINISHED"
    assert [e.id for e in client.sweep("s-1").events(last_event_id=7)] == [8, 9]


def test_wait_follows_the_events_to_the_final_state(fake: FakeService, client: Client) -> None:
    fake.add("s-1", "RUNNING")
    fake.emit("s-1", "sweep_state", state="RUNNING", error=None)
    handle = client.sweep("s-1")
    threading.Timer(0.3, fake.history, ("s-1", "CANCELLED", "cancelled by ann")).start()
    start = time.monotonic()
    final = handle.wait(timeout=10)
    assert final["state"] == "CANCELLED"
    assert final["id"] == "s-1"
    assert time.monotonic() - start < 3
    assert fake.connections == [0]  # one stream, no polling
    assert handle.wait() == final  # already final: the sweep object at once
    fake.add("s-2", "RUNNING")
    with pytest.raises(TimeoutError):
        client.sweep("s-2").wait(timeout=0.3)


def test_wait_polls_where_there_is_no_event_stream(fake: FakeService, client: Client,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RemoteSweep, "poll_interval", 0.05)
    fake.no_stream = True
    sweep = fake.add("s-1", "RUNNING")
    threading.Timer(0.2, sweep.update, kwargs={"state": "FINISHED"}).start()
    assert client.sweep("s-1").wait(timeout=10)["state"] == "FINISHED"
    assert fake.connections == []


def test_control_leaderboard_and_upload(fake: FakeService, client: Client, tmp_path: Path) -> None:
    fake.add("s-1", "RUNNING", trials=TRIALS)
    handle = client.sweep("s-1")
    assert handle.update(trials=10, time="10m") == {"trials": 10, "max_concurrent": 2, "time": 600.0}
    assert json.loads(fake.requests[-1][3]) == {"budget": {"trials": 10, "time": "10m"}}
    with pytest.raises(AutoMLError, match="give trials, max_concurrent or time"):
        handle.update()
    assert handle.cancel()["state"] == "CANCELLED"
    assert handle.resume()["state"] == "QUEUED"

    board = handle.leaderboard()
    assert list(board.columns) == ["number", "state", "value", "lr", "depth", "params.state", "run_id"]
    assert list(board["number"]) == [2, 0, 1]  # the service's order: best first
    assert board.loc[2, "params.state"] == "x"
    assert board["value"].isna().tolist() == [False, False, True]
    assert handle.trials() == TRIALS

    data = tmp_path / "rows.csv"
    data.write_bytes(b"a,y\n1,0\n2,1\n")
    assert client.upload(data) == "dataset:ds1"
    assert fake.datasets["ds1"] == ("rows.csv", "text/csv", b"a,y\n1,0\n2,1\n")
    assert fake.requests[-1][2]["Content-Type"].startswith("multipart/form-data; boundary=")
    with pytest.raises(AutoMLError, match="no such file"):
        client.upload(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------------------------- the commands


def cli(fake: FakeService, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--server", fake.url])  # type: ignore[attr-defined]


def test_submit_prints_the_id_first_and_uploads_the_data(fake: FakeService, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, name="iris.yaml")
    (tmp_path / "data.csv").write_text("a,y\n1,0\n")
    out = cli(fake, "submit", str(spec), "--trials", "7", "--time", "5m", "--upload")
    assert out.exit_code == 0, (out.stdout, out.stderr)
    assert out.stdout.splitlines()[0] == "iris-1"
    assert "submitted iris (QUEUED)" in out.stderr
    assert "automl watch iris-1" in out.stderr
    assert fake.submitted[-1]["overrides"] == {"name": "iris", "budget.trials": 7, "budget.time": "5m",
                                               "data.source": "dataset:ds1"}
    assert fake.datasets["ds1"][0] == "data.csv"

    (tmp_path / "data.csv").unlink()  # nothing to upload: the spec goes as it is, with a note
    out = cli(fake, "submit", str(spec), "--upload")
    assert out.exit_code == 0
    assert out.stdout.splitlines()[0] == "iris-2"
    assert "not a file next to iris.yaml" in out.stderr
    assert "data.source" not in fake.submitted[-1]["overrides"]


@pytest.mark.parametrize(("final", "code"), [("FINISHED", 0), ("FAILED", 1), ("CANCELLED", 1)])
def test_watch_shows_progress_and_exits_by_the_final_state(fake: FakeService, final: str, code: int) -> None:
    best = {"number": 2, "value": 0.97, "params": {"lr": 0.01, "depth": 3}, "run_id": "run2",
            "model_uri": "runs:/run2/model"}
    fake.add("s-1", "RUNNING", trials=TRIALS, best=best, finished="2026-11-30T10:00:31Z",
             error=None if final == "FINISHED" else "ValueError: every trial failed")
    fake.history("s-1", final, error=fake.sweeps["s-1"]["error"])
    out = cli(fake, "watch", "s-1")
    assert out.exit_code == code, (out.stdout, out.stderr)
    assert "s-1): 4 trials, method bayesian (Optuna TPESampler), optimising val_accuracy" in out.stdout
    assert re.search(r"trial +0 +COMPLETE +val_accuracy=0\.9100 +epochs=2 ", out.stdout), out.stdout
    assert re.search(r"trial +1 +FAILED +val_accuracy=- .*ValueError: nan loss", out.stdout)
    assert "leaderboard: s-1 (top 3 of 3)" in out.stdout
    assert "in 30.0s" in out.stdout
    assert "best trial 2: val_accuracy = 0.9700" in out.stdout
    assert "runs:/run2/model" in out.stdout
    if code:
        assert out.stderr.strip() == f"{final}: ValueError: every trial failed"


def test_cancel_status_set_and_resume_with_server(fake: FakeService, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake.add("s-1", "RUNNING", trials=TRIALS)
    fake.add("s-2", "FINISHED")
    out = cli(fake, "status")
    assert out.exit_code == 0, out.stderr
    assert re.search(r"s-2 .*ann .*FINISHED", out.stdout)
    assert re.search(r"s-1 .*RUNNING .*0/4 .*val_accuracy",
                                                                         out.stdout)
    out = cli(fake, "status", "s-1")
    assert out.exit_code == 0
    assert "s-1: RUNNING" in out.stdout
    assert re.search(r"0 +│ COMPLETE +│ 0\.9100 +│ lr=0\.05, depth=2 +│ run0", out.stdout), out.stdout

    out = cli(fake, "set", "s-1", "--max-concurrent", "3", "--time", "90s")
    assert (out.exit_code, out.stdout.strip()) == (0, "s-1: trials 4, max_concurrent 3, time 90s")
    out = cli(fake, "set", "s-1", "--trials", "1")
    assert out.exit_code == 2
    assert out.stderr.strip() == ("error: budget.trials: 1 is fewer than the 2 trials "
                                                         "already done in sweep s-1")
    out = cli(fake, "cancel", "s-1")
    assert (out.exit_code, out.stdout.strip()) == (0, "s-1: CANCELLED")
    out = cli(fake, "resume", "s-1")
    assert out.exit_code == 0
    assert out.stdout.startswith("s-1: QUEUED")
    out = cli(fake, "resume", "s-2")
    assert out.exit_code == 2
    assert "only a CANCELLED or FAILED sweep resumes" in out.stderr
    out = cli(fake, "resume", "s-2", "--storage", "postgresql://db/x")
    assert out.exit_code == 2
    assert "--storage: with --server" in out.stderr

    # Without --server: the local commands, which never ask the service.
    monkeypatch.chdir(tmp_path)
    seen = len(fake.requests)
    out = CliRunner().invoke(app, ["set", "s-1", "--trials", "5"])
    assert out.exit_code == 2
    assert len(fake.requests) == seen


def test_the_commands_errors_are_one_line(fake: FakeService, monkeypatch: pytest.MonkeyPatch) -> None:
    out = cli(fake, "watch", "nope")
    assert (out.exit_code, out.stderr.strip()) == (2, "error: no sweep 'nope'")
    monkeypatch.setenv("AUTOML_TOKEN", "wrong")
    out = cli(fake, "cancel", "s-1")
    assert (out.exit_code, out.stderr.strip()) == (2, "error: no token, or a token this service does not know")
    url = f"http://127.0.0.1:{free_port()}"
    out = CliRunner().invoke(app, ["watch", "s-1", "--server", url])
    assert out.exit_code == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"error: cannot reach the automl service at {url}: connection refused")
