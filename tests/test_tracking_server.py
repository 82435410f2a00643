"""A real MLflow tracking server on 127.0.0.1 with a SQLite backend and a local artifact root, started the way a
user starts one: `automl ui` on the store in the working directory. Sweeps then run over HTTP against it."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import sklearn.datasets
from mlflow import MlflowClient
from servers import free_port, stop_group, wait_until_up

from automl import Sweep
from automl.export import predict
from automl.tracking import PARENT_TAG

ASSETS = Path(__file__).parent / "assets"
pytestmark = pytest.mark.usefixtures("ray_session")


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (IPv4, from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(host_hex)[::-1]))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`automl ui` on a SQLite store in a fresh directory; yields (its URL, the directory)."""
    home = tmp_path_factory.mktemp("server")
    # A stray mlflow.py where the user starts the UI: neither `automl ui` nor MLflow's web workers may import it.
    (home / "mlflow.py").write_text(f"open({str(home / 'imported')!r}, 'w').write('executed')\n")
    port = free_port()
    log = home / "ui.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("automl")), "ui", "--port", str(port),
             "--tracking-uri", f"sqlite:///{home / 'mlflow.db'}"],
            cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, 90, log.read_text)
        yield url, home
    finally:
        stop_group(proc)  # mlflow's server runs its web workers as children


def test_automl_ui_serves_the_store_on_loopback_only(server: tuple[str, Path]) -> None:
    url, home = server
    port = int(url.rsplit(":", 1)[1])
    if Path("/proc/net/tcp").exists():
        assert listening_addresses(port) == {"127.0.0.1"}
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert "MLflow" in response.read().decode()
    assert (home / "mlflow.db").exists()  # the UI's store is the SQLite file it was pointed at
    assert not (home / "imported").exists()  # ./mlflow.py was not imported by any of the UI's processes
    for pid in server_processes(port):  # the store's URI (it may hold a password) is on no command line
        assert "mlflow.db" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")


def server_processes(port: int) -> list[int]:
    """PIDs whose command line names this port: `automl ui`'s own process and MLflow's server processes."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if str(port).encode() in args:
            found.append(int(cmdline.parent.name))
    assert found, f"no process serves port {port}"
    return found


def test_sweep_over_http_records_states_and_artifacts_in_the_servers_store(
    server: tuple[str, Path], bare_workdir: Path
) -> None:
    workdir = bare_workdir
    url, home = server
    spec = {
        "name": "over-http",
        "trainer": "toy_trainers:flaky",  # fails for x > 0.5, NaN for x < 0.1
        "metric": {"name": "score", "goal": "maximize"},
        "method": "random",
        "budget": {"trials": 8, "max_concurrent": 2},
        "seed": 3,
        "parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
    }
    result = Sweep.from_dict(spec, base_dir=ASSETS, workdir=workdir, tracking_uri=url).run()
    result.wait_for_summary(timeout=120)  # its plots go to this server too, before the module stops it
    assert not (workdir / "mlflow.db").exists()  # nothing went to an embedded store
    failed = {t.number for t in result.trials if t.state == "FAILED"}
    assert failed
    assert len(failed) < 8

    assert result.parent_run_id is not None
    http = MlflowClient(tracking_uri=url)
    parent = http.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    runs = {int(r.data.tags["automl.trial"]): r
            for r in http.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'")}
    assert sorted(runs) == list(range(8))
    assert {n for n, r in runs.items() if r.info.status == "FAILED"} == failed
    one_failed = runs[min(failed)]
    assert one_failed.data.tags["automl.error"]
    # Artifacts went through the server to its local artifact root and come back over HTTP.
    traceback = http.download_artifacts(one_failed.info.run_id, "traceback.txt", str(workdir))
    assert "Error" in Path(traceback).read_text()
    board = pd.read_csv(http.download_artifacts(result.parent_run_id, "leaderboard.csv", str(workdir)))
    assert len(board) == 8
    assert (home / "mlartifacts").is_dir()

    # The server wrote to the SQLite file `automl ui` was started on: the same runs, read without the server.
    direct = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    assert direct.get_run(result.parent_run_id).data.tags == parent.data.tags


def test_best_model_exports_and_predicts_from_the_server(server: tuple[str, Path], workdir: Path) -> None:
    url, _ = server
    spec = {
        "name": "over-http-model",
        "trainer": "toy_trainers:LogisticFitter",
        "data": {"source": "sklearn:iris"},
        "metric": {"name": "val_accuracy"},
        "method": "random",
        "budget": {"trials": 2, "max_concurrent": 2},
        "parameters": {"C": {"type": "float", "low": 0.1, "high": 10, "log": True}},
    }
    result = Sweep.from_dict(spec, base_dir=ASSETS, workdir=workdir, tracking_uri=url).run()
    result.wait_for_summary(timeout=120)  # its plots go to this server too, before the module stops it
    # In process: the CLI's export and predict are the same functions, tested as commands elsewhere.
    out = result.export(workdir / "exported", format="mlflow")
    assert (out / "MLmodel").exists()
    frame = sklearn.datasets.load_iris(as_frame=True).frame
    labels = predict(str(out), frame.drop(columns="target"))["prediction"].to_numpy()
    assert (labels == frame["target"].to_numpy()).mean() > 0.8
