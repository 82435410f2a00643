"""Resources per trial: fractional GPUs pack several trials on one device; no CUDA means a CPU fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from automl import Sweep
from automl.tracking import PARENT_TAG

ASSETS = Path(__file__).parent / "assets"


@pytest.mark.usefixtures("ray_session")
def test_four_quarter_gpu_trials_run_at_once_on_one_gpu(workdir: Path) -> None:
    spec = {
        "name": "gpu-pack",
        "trainer": "toy_trainers:gpu_probe",
        "metric": {"name": "score", "goal": "maximize"},
        "method": "random",
        "budget": {"trials": 4},  # max_concurrent defaults to what the declared GPU allows: 1 / 0.25 = 4
        "resources": {"cpu": 0.5, "gpu": 0.25},
        "fixed": {"hold": 2.0},
        "parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
    }
    result = Sweep.from_dict(spec, base_dir=ASSETS, workdir=workdir).run()
    assert [t.state for t in result.trials] == ["COMPLETE"] * 4
    starts = [t.metrics["start"] for t in result.trials]
    ends = [t.metrics["end"] for t in result.trials]
    assert max(starts) < min(ends), "the four trials did not all run at the same time"
    assert all(t.gpus == ["0"] for t in result.trials)  # all four share GPU 0
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'")
    assert {r.data.tags["automl.gpus"] for r in runs} == {"0"}
    if not torch.cuda.is_available():
        assert all(t.metrics["cuda"] == 0.0 for t in result.trials)
        assert all("CUDA unavailable" in r.data.tags["automl.device"] for r in runs)
