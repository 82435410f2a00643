"""The scale-out profile on real processes: PostgreSQL (initdb + pg_ctl in a temp dir, a free port), an
`mlflow server` on it bound to 127.0.0.1, the search state in PostgreSQL, a sweep of 2 concurrent trials."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from servers import free_port, stop_group, wait_until_up

from automl import Sweep
from automl.tracking import PARENT_TAG

ASSETS = Path(__file__).parent / "assets"
PG_BIN = next((Path(p) for p in ("/usr/lib/postgresql/15/bin", "/usr/local/bin") if (Path(p) / "initdb").exists()),
              None)


def as_postgres(*cmd: str) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    if PG_BIN is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
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


@pytest.mark.usefixtures("ray_session")
def test_sweep_against_mlflow_server_and_postgres_search_state(
    bare_workdir: Path, postgres: str, mlflow_server: str
) -> None:
    workdir = bare_workdir
    spec = {
        "name": "scale-out",
        "trainer": "toy_trainers:LogisticFitter",
        "data": {"source": "sklearn:iris"},
        "metric": {"name": "val_accuracy"},
        "method": "bayesian",
        "budget": {"trials": 4, "max_concurrent": 2},
        "parameters": {"C": {"type": "float", "low": 0.1, "high": 10, "log": True}},
    }
    # Passwords in both URLs (the server and PostgreSQL ignore them here: trust authentication): they reach the
    # helper processes through the environment and are masked in every file the sweep writes.
    storage = f"{postgres}/optuna".replace("automl@", "automl:secret-pg@")
    tracking = mlflow_server.replace("http://", "http://u:secret-http@")
    seen: list[str] = []

    def command_lines(kind: str, record: object) -> None:
        if kind == "started" and not seen:  # while the sweep runs: its writer process is up
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    seen.append(cmdline.read_bytes().decode(errors="replace"))
                except OSError:
                    continue

    result = Sweep.from_dict(spec, base_dir=ASSETS, workdir=workdir, tracking_uri=tracking,
                             storage=storage).run(on_event=command_lines)
    assert [t.state for t in result.trials] == ["COMPLETE"] * 4
    assert not (workdir / "mlflow.db").exists()  # nothing went to the embedded store
    assert seen
    assert not [line for line in seen if "secret" in line]
    state_files = [p for p in (workdir / ".automl").rglob("*") if p.is_file()]
    assert state_files
    assert not [p for p in state_files if b"secret" in p.read_bytes()]
    storage = f"{postgres}/optuna"

    study = optuna.load_study(study_name=result.sweep_id, storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert {t.number: t.params for t in study.trials} == {t.number: t.params for t in result.trials}

    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'")
    assert sorted(int(r.data.tags["automl.trial"]) for r in runs) == [0, 1, 2, 3]
    assert all(r.info.status == "FINISHED" for r in runs)
    # The best model went through the server to its artifact store and loads back over HTTP.
    import mlflow.pyfunc
    import sklearn.datasets

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(result.best.model_uri)
    frame = sklearn.datasets.load_iris(as_frame=True).frame
    assert (model.predict(frame.drop(columns="target")) == frame["target"].to_numpy()).mean() > 0.8
