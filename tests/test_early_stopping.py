"""Every early-stopping method stops trials that fall behind, with epochs as the resource."""

from __future__ import annotations

from pathlib import Path

import pytest

from automl import Sweep

ASSETS = Path(__file__).parent / "assets"


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("method", ["asha", "hyperband", "median"])
def test_method_stops_trials_that_fall_behind(workdir: Path, method: str) -> None:
    spec = {
        "name": f"es-{method}",
        "trainer": "toy_trainers:quadratic",
        "metric": {"name": "score", "goal": "maximize"},
        "method": "random",
        "budget": {"trials": 14, "max_concurrent": 2},
        "early_stopping": {"method": method, "min_epochs": 1, "reduction_factor": 2},
        "fixed": {"epochs": 6, "sleep": 0.04},
        "parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
    }
    result = Sweep.from_dict(spec, base_dir=ASSETS, workdir=workdir).run()
    stopped = [t for t in result.trials if t.state == "STOPPED"]
    complete = [t for t in result.trials if t.state == "COMPLETE"]
    assert stopped, f"{method} stopped no trial"
    assert complete
    # A stop takes effect at the trial's next report: on a busy machine one may land after the last epoch.
    assert min(t.epochs for t in stopped) < 6
    assert all(t.epochs <= 6 for t in stopped)
    assert all(t.epochs == 6 for t in complete)
    # What is stopped is what falls behind: the best trial ran to the end.
    assert result.best is not None
    assert result.best.number in {t.number for t in complete}
