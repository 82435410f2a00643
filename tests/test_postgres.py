"""The scale-out profile on real processes: PostgreSQL (initdb + pg_ctl in a temp dir, a free port), an
`mlflow server` on it bound to 127.0.0.1, and `automl serve` with the search state and its records in PostgreSQL
running a sweep of 2 concurrent trials."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from servers import free_port, stop_group, wait_until_up

from automl.tracking import PARENT_TAG

ASSETS = Path(__file__).parent / "assets"
PG_BIN = next((p.parent for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)),
              Path("/usr/local/bin") if Path("/usr/local/bin/initdb").exists() else None)


def as_postgres(*cmd: str) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    assert PG_BIN is not None, "PostgreSQL server binaries (initdb, pg_ctl) are missing: `make test` installs them"
    assert os.geteuid() != 0 or shutil.which("runuser"), "runuser (util-linux) runs PostgreSQL as `postgres`"
    # Not under pytest's tmp_path: that tree is private to root, and the server runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="automl-pg-"))
    data = base / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(data, "postgres")
    port = free_port()
    subprocess.run(as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "automl", "--auth=trust", "-E", "UTF8"),
                   check=True, capture_output=True)
    subprocess.run(as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                               f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"),
                   check=True, capture_output=True)
    try:
        for db in ("mlflow", "optuna"):
            subprocess.run(as_postgres(str(PG_BIN / "createdb") if (PG_BIN / "createdb").exists() else "createdb",
                                       "-h", "127.0.0.1", "-p", str(port), "-U", "automl", db),
                           check=True, capture_output=True)
        yield f"postgresql://automl@127.0.0.1:{port}"
    finally:
        subprocess.run(as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"),
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    artifacts = tmp_path_factory.mktemp("artifacts")
    port = free_port()
    log = artifacts.parent / "mlflow-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{postgres}/mlflow",
             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, 90, log.read_text)
        yield url
    finally:
        stop_group(proc)


def test_the_service_on_postgresql_and_the_mlflow_server(postgres: str, mlflow_server: str, tmp_path: Path) -> None:
    """The scale-out profile, through `automl serve`: its records and the search state in PostgreSQL, the runs and
    the best model on the MLflow server. Passwords in both URLs (the servers ignore them here: trust
    authentication) reach it through the environment only, and no command line or file it writes holds them."""
    import mlflow.pyfunc
    import requests
    import sklearn.datasets
    import sqlalchemy

    automl = str(Path(sys.executable).with_name("automl"))
    (tmp_path / "code").mkdir()
    shutil.copy(ASSETS / "toy_trainers.py", tmp_path / "code" / "toy_trainers.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["AUTOML_STORAGE"] = f"{postgres}/optuna".replace("automl@", "automl:secret-pg@")
    env["MLFLOW_TRACKING_URI"] = mlflow_server.replace("http://", "http://u:secret-http@")
    made = subprocess.run([automl, "token", "create", "carol", "--role", "user"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=True)
    token = made.stdout.strip().splitlines()[-1]
    port = free_port()
    with (tmp_path / "service.log").open("wb") as log:
        proc = subprocess.Popen([automl, "serve", "--port", str(port), "--trainers-dir", str(tmp_path / "code")],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/api/v1/healthz", proc, 120, (tmp_path / "service.log").read_text)
        headers = {"Authorization": f"Bearer {token}"}
        spec = {"name": "scale-out", "trainer": "toy_trainers:LogisticFitter", "data": {"source": "sklearn:iris"},
                "metric": {"name": "val_accuracy"}, "method": "bayesian", "budget": {"trials": 4, "max_concurrent": 2},
                "parameters": {"C": {"type": "float", "low": 0.1, "high": 10, "log": True}}}
        created = requests.post(f"{url}/api/v1/sweeps", json={"spec": spec}, headers=headers, timeout=60)
        assert created.status_code == 201, created.text
        sweep_id = created.json()["id"]
        command_lines: list[str] = []
        for _ in range(600):
            sweep = requests.get(f"{url}/api/v1/sweeps/{sweep_id}", headers=headers, timeout=60).json()
            if sweep["state"] == "RUNNING" and not command_lines:  # the service's helper processes are up
                for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                    with contextlib.suppress(OSError):
                        command_lines.append(cmdline.read_bytes().decode(errors="replace"))
            if sweep["state"] not in ("QUEUED", "RUNNING"):
                break
            time.sleep(0.2)
        assert sweep["state"] == "FINISHED", sweep
        assert sweep["trials"]["complete"] == 4
        assert command_lines
        assert not [line for line in command_lines if "secret" in line]
        assert sweep["mlflow"]["url"].startswith(f"{mlflow_server}/#/experiments/{sweep['mlflow']['experiment_id']}/")
        # The search state and the service's records are in PostgreSQL, not in files here.
        study = optuna.load_study(study_name=sweep_id, storage=f"{postgres}/optuna")
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
        trials = requests.get(f"{url}/api/v1/sweeps/{sweep_id}/trials", headers=headers, timeout=60).json()["trials"]
        assert {t["number"]: t["params"] for t in trials} == {t.number: t.params for t in study.trials}
        engine = sqlalchemy.create_engine(f"{postgres}/optuna".replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as db:
            owner = db.execute(sqlalchemy.text("select owner from automl_sweeps where id = :id"),
                               {"id": sweep_id}).scalar_one()
        engine.dispose()
        assert owner == "carol"
        assert not (tmp_path / ".automl" / "service.db").exists()
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded store
        written = [p for p in (tmp_path / ".automl").rglob("*") if p.is_file()]
        assert written
        assert not [p for p in written if b"secret" in p.read_bytes()]
        client = MlflowClient(tracking_uri=mlflow_server)
        parent = client.get_run(sweep["mlflow"]["run_id"])
        assert parent.info.status == "FINISHED"
        runs = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
        assert sorted(int(r.data.tags["automl.trial"]) for r in runs) == [0, 1, 2, 3]
        assert all(r.info.status == "FINISHED" for r in runs)
        # The best model went through the server to its artifact store and loads back over HTTP.
        mlflow.set_tracking_uri(mlflow_server)
        model = mlflow.pyfunc.load_model(sweep["best"]["model_uri"])
        frame = sklearn.datasets.load_iris(as_frame=True).frame
        assert (model.predict(frame.drop(columns="target")) == frame["target"].to_numpy()).mean() > 0.8
    finally:
        stop_group(proc)
