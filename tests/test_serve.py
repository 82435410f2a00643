"""`mlflow models serve -m models:/NAME@champion`: the registered champion served over HTTP (a real server on
127.0.0.1) answers as the same model loaded with ``mlflow.pyfunc`` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from servers import free_port, stop_group, wait_until_up

from automl import Sweep
from automl.data import prepare
from automl.spec import spec_from_dict

NAME = "iris-served"
CHAMPION = f"models:/{NAME}@champion"
SPEC: dict[str, Any] = {
    "name": "iris-serve",
    "trainer": "mlp",
    "data": {"source": "sklearn:iris"},
    "metric": {"name": "val_accuracy"},
    "method": "random",
    "budget": {"trials": 1, "max_concurrent": 1},  # one trial: what is served matters here, not the search
    "fixed": {"epochs": 5, "width": 16, "depth": 1},
    "parameters": {"lr": {"type": "float", "low": 1e-2, "high": 3e-2, "log": True}},
    "tracking": {"register_as": NAME},
}
READY_TIMEOUT = 120.0  # seconds for the server to import MLflow, fetch the model and answer /ping


@pytest.fixture(autouse=True)
def _keep_mlflow_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests set MLflow's process-wide tracking URI (as a user's script does); later tests must not
    inherit it."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> str:
    """A store whose registry holds ``NAME`` with a champion, from a real sweep; returns its tracking URI."""
    workdir = tmp_path_factory.mktemp("serve")
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        Sweep.from_dict(SPEC, workdir=workdir).run()
    return tracking_uri


@pytest.fixture(scope="module")
def server(store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow models serve`` in its own process group (it runs uvicorn as a child), killed at the end."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    # --env-manager local runs `uvicorn` found on PATH: that of this interpreter's environment.
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", proc, READY_TIMEOUT, log.read_text)
        yield url
    finally:
        stop_group(proc)


def invoke(url: str, payload: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def validation_rows() -> pd.DataFrame:
    spec = spec_from_dict(SPEC)
    assert spec.data is not None
    return prepare(spec.data, seed=spec.seed).raw_val


def split(rows: pd.DataFrame) -> dict[str, Any]:
    return {"columns": list(rows.columns), "data": rows.to_numpy().tolist()}


def test_served_champion_predicts_as_pyfunc(store: str, server: str) -> None:
    champion = MlflowClient(tracking_uri=store).get_model_version_by_alias(NAME, "champion")
    assert (champion.tags["automl.metric"], champion.tags["automl.goal"]) == ("val_accuracy", "maximize")
    rows = validation_rows()
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(CHAMPION)

    status, body = invoke(server, {"dataframe_split": split(rows)})
    assert status == 200, body
    assert body["predictions"] == np.asarray(model.predict(rows)).tolist()
    assert len(body["predictions"]) == len(rows)

    # The probabilities too, through the signature's inference parameter.
    status, body = invoke(server, {"dataframe_split": split(rows), "params": {"predict_method": "predict_proba"}})
    assert status == 200, body
    expected = model.predict(rows, params={"predict_method": "predict_proba"})
    served = pd.DataFrame(body["predictions"])
    assert list(served.columns) == list(expected.columns)
    np.testing.assert_allclose(served.to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-6)


def test_served_champion_refuses_rows_without_the_signatures_columns(server: str) -> None:
    rows = validation_rows().head(3)
    missing = rows.columns[0]
    status, body = invoke(server, {"dataframe_split": split(rows.drop(columns=[missing]))})
    assert status == 400
    assert missing in body.get("message", "")
