"""`automl serve` as a real process on 127.0.0.1 (a free port), with real Ray and MLflow: sweeps submitted, watched,
resized, cancelled and resumed over HTTP; tokens and roles; the guards (Host, body size, paths, trainers); a
`kill -9` of the service mid-sweep, then a restart that finishes it; SIGTERM stops it in seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import requests
import sklearn.datasets
import yaml
from mlflow import MlflowClient
from servers import free_port, stop_group, wait_until_up

from automl.service.app import SESSION_COOKIE
from automl.service.store import ServiceStore
from automl.state import journal_path

ASSETS = Path(__file__).parent / "assets"
MLFLOW_UI_PORT = free_port()  # the status page links there; the browser test starts an MLflow UI on it
MLFLOW_UI = f"http://127.0.0.1:{MLFLOW_UI_PORT}"
AUTOML = str(Path(sys.executable).with_name("automl"))


@dataclass
class Service:
    url: str
    home: Path
    tokens: dict[str, str]
    proc: subprocess.Popen[bytes]
    port: int
    args: list[str]

    def call(self, method: str, path: str, who: str | None = "alice", **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if who is not None:
            headers.setdefault("Authorization", f"Bearer {self.tokens.get(who, who)}")
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def events(self, sweep_id: str, who: str = "alice", last: int | None = None) -> Iterator[dict[str, Any]]:
        """The SSE stream, parsed: each event as {"id", "event", "data"} until the server ends it."""
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        if last is not None:
            headers["Last-Event-ID"] = str(last)
        with requests.get(f"{self.url}/api/v1/sweeps/{sweep_id}/events", headers=headers, stream=True,
                          timeout=120) as response:
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("text/event-stream")
            event: dict[str, Any] = {}
            for raw in response.iter_lines(decode_unicode=True):
                if raw == "":
                    if "event" in event:
                        yield event
                    event = {}
                elif raw.startswith(":"):
                    continue
                else:
                    field, _, value = raw.partition(": ")
                    event[field] = int(value) if field == "id" else (json.loads(value) if field == "data" else value)

    def wait(self, sweep_id: str, states: tuple[str, ...] = ("FINISHED", "FAILED", "CANCELLED"),
             timeout: float = 120, who: str = "alice") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            sweep = self.call("GET", f"/api/v1/sweeps/{sweep_id}", who=who).json()
            if sweep["state"] in states:
                return sweep
            assert time.monotonic() < deadline, sweep
            time.sleep(0.2)


def start_service(home: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AUTOML_STORAGE")}
    log = (home / "service.log").open("ab")
    return subprocess.Popen([AUTOML, "serve", "--port", str(port), *extra], cwd=home, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def launch(home: Path, *extra: str) -> Service:
    (home / "code").mkdir(exist_ok=True)
    (home / "code" / "toy_trainers.py").write_text((ASSETS / "toy_trainers.py").read_text())
    (home / "data").mkdir(exist_ok=True)
    sklearn.datasets.load_iris(as_frame=True).frame.to_csv(home / "data" / "iris.csv", index=False)
    store = ServiceStore(f"sqlite:///{home / '.automl' / 'service.db'}")
    tokens = {name: store.create_token(name, role)
              for name, role in (("alice", "user"), ("bob", "user"), ("vera", "viewer"), ("root", "admin"))}
    store.close()
    port = free_port()
    args = ["--data-root", str(home / "data"), "--trainers-dir", str(home / "code"), *extra]
    proc = start_service(home, port, *args)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/api/v1/healthz", proc, 120, lambda: (home / "service.log").read_text())
    return Service(url, home, tokens, proc, port, args)


def quadratic(name: str, **budget: Any) -> dict[str, Any]:
    return {"name": name, "trainer": "toy_trainers:quadratic", "metric": {"name": "score", "goal": "maximize"},
            "method": "random", "budget": {"trials": 6, "max_concurrent": 2, **budget},
            "fixed": {"epochs": 3, "sleep": 0.1},
            "parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0}}}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = launch(tmp_path_factory.mktemp("service"), "--max-running", "2", "--mlflow-ui", MLFLOW_UI)
    yield svc
    stop_group(svc.proc)


# First in the file: it runs before the module's service starts, so the two never compete for the cores.
def test_kill_9_mid_sweep_then_restart_finishes_it_and_sigterm_stops_cleanly(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    svc = launch(tmp_path_factory.mktemp("killed"), "--max-running", "1")
    try:
        spec = quadratic("survivor", trials=10, max_concurrent=2)
        spec["fixed"] = {"epochs": 3, "sleep": 0.25}
        running = svc.call("POST", "/api/v1/sweeps", json={"spec": spec}).json()["id"]
        queued = svc.call("POST", "/api/v1/sweeps", json={"spec": quadratic("waiting", trials=2)}).json()["id"]
        finished = 0
        seen = 0
        for event in svc.events(running):
            seen = event["id"]
            finished += event["event"] == "trial_finished"
            if finished >= 3:
                break
        assert svc.call("GET", f"/api/v1/sweeps/{queued}").json()["state"] == "QUEUED"  # --max-running 1
        os.killpg(svc.proc.pid, signal.SIGKILL)
        svc.proc.wait(timeout=30)
        journal = journal_path(svc.home / ".automl" / running)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        before = {t.number: t.params for t in optuna.load_study(study_name=running, storage=storage).trials
                  if t.state == optuna.trial.TrialState.COMPLETE}
        assert len(before) >= 3

        svc.proc = start_service(svc.home, svc.port, *svc.args)
        wait_until_up(f"{svc.url}/api/v1/healthz", svc.proc, 120, lambda: (svc.home / "service.log").read_text())
        done = svc.wait(running)  # resumed by itself, with the same token
        assert done["state"] == "FINISHED", done
        assert done["trials"]["complete"] == 10
        study = optuna.load_study(study_name=running, storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal))))
        complete = {t.number: t.params for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
        assert len(complete) == 10
        assert all(complete[n] == p for n, p in before.items())  # kept, not run again
        assert len({json.dumps(p, sort_keys=True) for p in complete.values()}) == 10
        assert svc.wait(queued)["state"] == "FINISHED"  # the queued sweep stayed queued, then ran
        client = MlflowClient(tracking_uri=f"sqlite:///{svc.home / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
        assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
        history = list(svc.events(running))
        assert [e for e in history if e["id"] <= seen]  # the events before the kill are still there
        assert history[-1]["data"]["state"] == "FINISHED"
        # SIGTERM: a clean stop within seconds.
        stopped_at = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        svc.proc.wait(timeout=30)
        assert time.monotonic() - stopped_at < 20
    finally:
        stop_group(svc.proc)


def test_a_sweep_submitted_over_http_completes_and_its_events_stream_every_trial(service: Service) -> None:
    created = service.call("POST", "/api/v1/sweeps", json={"spec": quadratic("over-http")})
    assert created.status_code == 201, created.text
    sweep = created.json()
    assert sweep["owner"] == "alice"
    assert sweep["state"] in ("QUEUED", "RUNNING")
    assert sweep["budget"] == {"trials": 6, "max_concurrent": 2, "time": None}
    events = list(service.events(sweep["id"]))
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "sweep_state"
    assert events[-1]["data"]["state"] == "FINISHED"
    finished = [e["data"] for e in events if e["event"] == "trial_finished"]
    assert sorted(d["number"] for d in finished) == list(range(6))  # every trial's end
    assert all(d["state"] == "COMPLETE" and isinstance(d["value"], float) for d in finished)
    assert "best_changed" in kinds
    assert kinds.count("trial_started") == 6
    # Last-Event-ID resumes after the given event.
    resumed = list(service.events(sweep["id"], last=ids[2]))
    assert [e["id"] for e in resumed] == ids[3:]

    done = service.call("GET", f"/api/v1/sweeps/{sweep['id']}").json()
    assert done["state"] == "FINISHED"
    assert done["trials"] == {"complete": 6, "stopped": 0, "failed": 0, "running": 0, "total": 6}
    trials = service.call("GET", f"/api/v1/sweeps/{sweep['id']}/trials").json()["trials"]
    values = [t["value"] for t in trials]
    assert values == sorted(values, reverse=True)  # best first
    assert done["best"]["number"] == trials[0]["number"]
    assert done["best"]["value"] == pytest.approx(trials[0]["value"])
    assert all(t["run_id"] for t in trials)
    client = MlflowClient(tracking_uri=f"sqlite:///{service.home / 'mlflow.db'}")
    parent = client.get_run(done["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["automl.trial"]) for r in children) == list(range(6))
    listed = service.call("GET", "/api/v1/sweeps?state=FINISHED").json()["sweeps"]
    assert sweep["id"] in [s["id"] for s in listed]


def test_tokens_roles_and_guards(service: Service) -> None:
    mine = service.call("POST", "/api/v1/sweeps", json={"spec": quadratic("alices", trials=2)}).json()["id"]
    # 401: no token, a bad one, a revoked one.
    assert service.call("GET", "/api/v1/sweeps", who=None).status_code == 401
    assert service.call("GET", "/api/v1/sweeps", who="aml_not-a-token").status_code == 401
    assert service.call("GET", "/api/v1/healthz", who=None).json() == {"status": "ok"}
    # 403 across users; a viewer reads all and changes none; an admin does all.
    assert service.call("GET", f"/api/v1/sweeps/{mine}", who="bob").status_code == 403
    assert mine not in [s["id"] for s in service.call("GET", "/api/v1/sweeps", who="bob").json()["sweeps"]]
    assert service.call("GET", f"/api/v1/sweeps/{mine}", who="vera").status_code == 200
    for method, path in (("PATCH", f"/api/v1/sweeps/{mine}"), ("POST", f"/api/v1/sweeps/{mine}/cancel")):
        refused = service.call(method, path, who="vera", json={"budget": {"trials": 3}})
        assert refused.status_code == 403, refused.text
    assert service.call("POST", "/api/v1/sweeps", who="vera", json={"spec": quadratic("v")}).status_code == 403
    assert service.call("GET", f"/api/v1/sweeps/{mine}", who="root").status_code == 200
    assert service.call("GET", "/api/v1/sweeps/no-such-sweep").status_code == 404
    # A Host header that is not this service (DNS rebinding): 400. A body past the limit: 413.
    rebound = service.call("GET", "/api/v1/sweeps", headers={"Host": "evil.example:80"})
    assert rebound.status_code == 400
    big = service.call("POST", "/api/v1/sweeps", data=b"x" * (3 << 20), headers={"Content-Type": "application/json"})
    assert big.status_code == 413
    assert "larger than" in big.json()["detail"]
    # A bad spec: 422 with the field path, nothing queued.
    before = len(service.call("GET", "/api/v1/sweeps").json()["sweeps"])
    bad = {**quadratic("bad"), "parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}}
    refused = service.call("POST", "/api/v1/sweeps", json={"spec": bad})
    assert refused.status_code == 422
    assert "parameters.x.low" in refused.json()["detail"]
    assert "\n" not in refused.json()["detail"]
    yaml_text = service.call("POST", "/api/v1/sweeps", json={"spec": "name: [unclosed"})
    assert yaml_text.status_code == 422
    # What a remote spec may reach: data under --data-root only, trainers registered or in --trainers-dir.
    outside = service.home / "secret.csv"
    outside.write_text("a,b\n1,2\n")
    (service.home / "data" / "link.csv").symlink_to(outside)
    with_data = {**quadratic("data"), "trainer": "toy_trainers:LogisticFitter",
                 "parameters": {"C": {"type": "float", "low": 0.1, "high": 10.0, "log": True}},
                 "metric": {"name": "val_accuracy"}}
    for source in ("../secret.csv", str(outside), "link.csv"):
        refused = service.call("POST", "/api/v1/sweeps",
                               json={"spec": {**with_data, "data": {"source": source, "target": "b"}}})
        assert refused.status_code == 422, (source, refused.text)
        assert refused.json()["detail"].startswith("spec: data.source:")
    for trainer in ("os:system", "json:loads", "not_there:train"):
        refused = service.call("POST", "/api/v1/sweeps", json={"spec": {**quadratic("t"), "trainer": trainer}})
        assert refused.status_code == 422, (trainer, refused.text)
        assert "trainer" in refused.json()["detail"]
    assert len(service.call("GET", "/api/v1/sweeps").json()["sweeps"]) == before
    # An uploaded dataset is a data.source; a file inside the data root is too.
    with (service.home / "data" / "iris.csv").open("rb") as f:
        uploaded = service.call("POST", "/api/v1/datasets", files={"file": ("iris.csv", f, "text/csv")})
    assert uploaded.status_code == 201, uploaded.text
    source = uploaded.json()["source"]
    assert source.startswith("dataset:")
    ok = service.call("POST", "/api/v1/sweeps", json={"spec": {**with_data, "data": {"source": source,
                                                                                     "target": "target"},
                                                               "budget": {"trials": 2}}})
    assert ok.status_code == 201, ok.text
    assert service.wait(ok.json()["id"])["state"] == "FINISHED"
    # The CLI client, as a user runs it: the token from the environment (never on the command line), a file inside
    # the data root, then the live view until it ends; the id is the first line on stdout.
    spec_file = service.home / "remote.yaml"
    spec_file.write_text(yaml.safe_dump({**with_data, "name": "from-cli",
                                         "data": {"source": "iris.csv", "target": "target"}}))
    env = {**os.environ, "AUTOML_TOKEN": service.tokens["alice"], "AUTOML_SERVER": service.url}
    cli = subprocess.run([AUTOML, "submit", str(spec_file), "--trials", "2", "--watch"], env=env, cwd=service.home,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    remote_id = cli.stdout.splitlines()[0]
    remote = service.call("GET", f"/api/v1/sweeps/{remote_id}").json()
    assert (remote["name"], remote["state"], remote["owner"]) == ("from-cli", "FINISHED", "alice")
    assert remote["budget"]["trials"] == 2
    assert f"{remote['best']['value']:.4f}"[:5] in cli.stdout + cli.stderr  # the leaderboard it printed
    # A revoked token is refused at once.
    store = ServiceStore(f"sqlite:///{service.home / '.automl' / 'service.db'}")
    store.revoke_token("bob")
    assert service.call("GET", "/api/v1/sweeps", who="bob").status_code == 401
    service.wait(mine)


def test_live_concurrency_change_and_cancel_then_resume(service: Service) -> None:
    spec = quadratic("resized", trials=8, max_concurrent=1)
    spec["fixed"] = {"epochs": 3, "sleep": 0.3}
    sweep_id = service.call("POST", "/api/v1/sweeps", json={"spec": spec}).json()["id"]
    stream = service.events(sweep_id)
    order: list[str] = []
    for event in stream:
        order.append(f"{event['event']}:{event['data'].get('number')}")
        if event["event"] == "trial_finished":
            break
    changed = service.call("PATCH", f"/api/v1/sweeps/{sweep_id}", json={"budget": {"max_concurrent": 2}})
    assert changed.status_code == 200, changed.text
    assert changed.json()["budget"]["max_concurrent"] == 2  # the value in effect
    refused = service.call("PATCH", f"/api/v1/sweeps/{sweep_id}", json={"budget": {"trials": 0}})
    assert refused.status_code == 409
    for event in stream:
        order.append(f"{event['event']}:{event['data'].get('number')}")
        if len([o for o in order if o.startswith("trial_finished")]) >= 4:
            break
    # Before the change one trial ran at a time; after it two ran at once.
    first_end = order.index(next(o for o in order if o.startswith("trial_finished")))
    assert [o for o in order[:first_end] if o.startswith("trial_started")] == ["trial_started:0"]
    running, most = 0, 0
    for item in order[first_end + 1:]:
        running += item.startswith("trial_started") - item.startswith("trial_finished")
        most = max(most, running)
    assert most == 2, order
    cancelled = service.call("POST", f"/api/v1/sweeps/{sweep_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "CANCELLED"
    assert service.call("POST", f"/api/v1/sweeps/{sweep_id}/cancel").status_code == 409
    client = MlflowClient(tracking_uri=f"sqlite:///{service.home / 'mlflow.db'}")
    run_id = cancelled.json()["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    resumed = service.call("POST", f"/api/v1/sweeps/{sweep_id}/resume")
    assert resumed.status_code == 200, resumed.text
    done = service.wait(sweep_id)
    assert done["state"] == "FINISHED", done
    assert done["trials"]["complete"] == 8  # the whole budget, the cut trials run again
    study = optuna.load_study(study_name=sweep_id, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal_path(service.home / ".automl" / sweep_id)))))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 8
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 8
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    assert [r for r in runs if r.info.status == "RUNNING"] == []


def chromium() -> Any:
    """Debian's headless chromium through its chromedriver (`make test` installs both when missing)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    missing = "chromium and chromium-driver are missing: `make test` installs them (apt-get)"
    assert browser, missing
    assert driver, missing
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # The flags keep a root, offline machine's chromium from reaching out (and being refused) at every start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=DriverService(executable_path=driver))


def test_the_status_page_in_a_real_browser(service: Service) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # The MLflow UI on the service's store, started now so that it comes up while the sweep runs.
    ui_log = (service.home / "mlflow-ui.log").open("wb")
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                           f"sqlite:///{service.home / 'mlflow.db'}", "--host", "127.0.0.1", "--port",
                           str(MLFLOW_UI_PORT), "--workers", "1"], cwd=service.home, stdout=ui_log,
                          stderr=subprocess.STDOUT, start_new_session=True)
    theirs = None
    browser = chromium()
    try:
        browser.get(service.url + "/")
        browser.find_element(By.ID, "token").send_keys("aml_wrong")
        browser.find_element(By.ID, "sign-in").click()
        assert "not valid" in WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "error")).text
        browser.find_element(By.ID, "token").send_keys(service.tokens["alice"])
        browser.find_element(By.ID, "sign-in").click()
        WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "sweeps"))
        # The session cookie is out of the page's scripts' reach and never sent by another site.
        cookie = browser.get_cookie(SESSION_COOKIE)
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert service.tokens["alice"] not in cookie["value"]

        spec = quadratic("on-the-page", trials=2, max_concurrent=1)
        spec["fixed"] = {"epochs": 3, "sleep": 0.8}  # long enough to be seen running
        sweep_id = service.call("POST", "/api/v1/sweeps", json={"spec": spec}).json()["id"]
        theirs = service.call("POST", "/api/v1/sweeps", who="root",  # an admin's: not alice's to see
                              json={"spec": quadratic("admins", trials=1)}).json()["id"]
        browser.refresh()  # the user reloads once; from then on the page follows the sweep by itself
        seen: list[tuple[str, str]] = []

        def row_state(b: Any) -> bool:
            try:
                row = b.find_element(By.ID, f"sweep-{sweep_id}")
                seen.append((row.find_element(By.CSS_SELECTOR, ".state").text,
                             row.find_element(By.CSS_SELECTOR, ".count").text))
            except (NoSuchElementException, StaleElementReferenceException):
                return False  # not on the page yet, or the page is reloading
            return seen[-1][0] == "FINISHED"

        WebDriverWait(browser, 90, poll_frequency=0.25).until(row_state)
        assert [st for st, _ in seen if st in ("QUEUED", "RUNNING")], seen
        assert seen[-1] == ("FINISHED", "2 / 2")
        row = browser.find_element(By.ID, f"sweep-{sweep_id}")
        assert "on-the-page" in row.text
        done = service.call("GET", f"/api/v1/sweeps/{sweep_id}").json()
        assert f"trial {done['best']['number']}" in row.text
        link = row.find_element(By.CSS_SELECTOR, "a.mlflow").get_attribute("href")
        assert link == (f"{MLFLOW_UI}/#/experiments/{done['mlflow']['experiment_id']}/runs/"
                        f"{done['mlflow']['run_id']}?workflowType=machine_learning")
        # Only what this token may see: not another user's sweep.
        assert not browser.find_elements(By.ID, f"sweep-{theirs}")
        browser.find_element(By.CSS_SELECTOR, "form.inline button").click()
        WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.ID, "token"))  # signed out: the form again
        browser.get(service.url + "/")
        assert browser.find_elements(By.ID, "token")  # and the session is over on the server too
        # The link opens the parent run in the MLflow UI, with the sweep's trials as its child runs.
        wait_until_up(f"{MLFLOW_UI}/health", ui, 90, lambda: (service.home / "mlflow-ui.log").read_text())
        browser.get(link)
        names = [f"trial-{n:04d}" for n in range(2)]
        WebDriverWait(browser, 60, poll_frequency=0.5).until(
            lambda b: "Child runs" in (text := b.find_element(By.TAG_NAME, "body").text)
            and all(name in text for name in names))
        assert "on-the-page" in browser.find_element(By.TAG_NAME, "body").text  # the parent run's name
    finally:
        browser.quit()
        stop_group(ui)
        ui_log.close()
    assert theirs is not None
    assert service.wait(theirs, timeout=60, who="root")["state"] == "FINISHED"
