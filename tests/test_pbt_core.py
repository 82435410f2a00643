"""Population-based training's decisions without Ray or MLflow: the exploit/explore rules (pure functions), the
spec's refusals, and whole populations under the real engine loop with ``automl.testing``'s in-process executor and
a toy trainer whose checkpoint is a few bytes of JSON. Fast: no process is started, no torch."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from automl import Sweep
from automl.engine import Engine
from automl.engine.pbt import Member, explore, plan_round, quantiles, round_rng
from automl.engine.records import TrialState
from automl.errors import SpecError
from automl.spec import CategoricalParam, FloatParam, IntParam, PbtSpec, spec_from_dict
from automl.testing import InProcessExecutor, MemoryRecorder

TRAINERS = '''
import json
import time

from automl.trainer import restored_checkpoint


def climb(params, data, report):
    """w grows by lr each step from its checkpoint; the score is w. Its checkpoint: {"w", "step"} as JSON."""
    state = restored_checkpoint(report)
    w, start = (0.0, 0) if state is None else (json.loads(state)["w"], json.loads(state)["step"])
    for step in range(start + 1, int(params["epochs"]) + 1):
        time.sleep(float(params.get("sleep", 0.0)))
        w += float(params["lr"]) * (1.0 if params.get("kind", "a") == "a" else 0.5)
        report(step, {"score": w}, checkpoint=lambda w=w, step=step: json.dumps({"w": w, "step": step}).encode())


climb.checkpoints = True
'''


@pytest.fixture
def trainers(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "pbt_trainers.py").write_text(TRAINERS)
    return folder


def pbt_spec(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "pbt", "trainer": "pbt_trainers:climb", "metric": {"name": "score", "goal": "maximize"},
        "method": "pbt", "seed": 1,
        "pbt": {"population": 4, "interval": 2, "quantile": 0.25, "resample_probability": 0.25},
        "budget": {"max_concurrent": 2}, "fixed": {"epochs": 6, "sleep": 0.0},
        "parameters": {"lr": {"type": "float", "low": 0.01, "high": 1.0, "log": True, "mutable": True},
                       "kind": {"type": "categorical", "choices": ["a", "b"], "mutable": True}},
    }
    raw.update(overrides)
    return raw


# ---------------------------------------------------------------------------------------------- the rules


def test_quantiles_take_a_quarter_each_side_and_never_more_than_half() -> None:
    scores = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.7}
    assert quantiles(scores, 0.25, "maximize") == ([0], [1])
    assert quantiles(scores, 0.25, "minimize") == ([1], [0])
    assert quantiles(scores, 0.5, "maximize") == ([2, 0], [1, 3])
    assert quantiles({0: 1.0, 1: 2.0, 2: 3.0}, 0.5, "maximize") == ([0], [2])  # ceil(1.5)=2 capped to half
    assert quantiles({0: 1.0}, 0.25, "maximize") == ([], [])


def test_explore_perturbs_by_a_factor_within_bounds_and_moves_categoricals_to_a_neighbour() -> None:
    space = {"lr": FloatParam(type="float", low=0.01, high=1.0, log=True, mutable=True),
             "units": IntParam(type="int", low=1, high=10, mutable=True),
             "frac": FloatParam(type="float", low=0.0, high=0.5, step=0.1, mutable=True),
             "size": CategoricalParam(type="categorical", choices=[16, 32, 64, 128], mutable=True),
             "fixed": FloatParam(type="float", low=0.0, high=1.0)}
    params = {"lr": 0.9, "units": 9, "frac": 0.2, "size": 32, "fixed": 0.5}
    rng = random.Random(0)
    for _ in range(200):
        new = explore(params, space, ["lr", "units", "frac", "size"], rng, [0.8, 1.2], 0.0)
        assert new["lr"] in (pytest.approx(0.72), 1.0)  # 0.9 * 1.2 is clipped to the bound
        assert new["units"] in (7, 10)
        assert isinstance(new["units"], int)
        assert new["frac"] in (pytest.approx(0.2), pytest.approx(0.2))  # 0.16 and 0.24 round to the step 0.1
        assert new["size"] in (16, 64)  # a neighbouring choice
        assert new["fixed"] == 0.5  # not mutable: untouched
    for _ in range(200):  # resampled every time: anywhere within the bounds
        new = explore(params, space, ["lr", "units", "size"], rng, [0.8, 1.2], 1.0)
        assert 0.01 <= new["lr"] <= 1.0
        assert 1 <= new["units"] <= 10
        assert new["size"] in (16, 32, 64, 128)


def test_a_round_is_decided_by_the_seed_and_the_scores_alone() -> None:
    space = {"lr": FloatParam(type="float", low=0.01, high=1.0, mutable=True)}
    members = [Member(number=n, params={"lr": 0.1 * (n + 1)}, step=2, score=s, checkpoint=f"m{n}")
               for n, s in enumerate([0.3, 0.9, 0.1, 0.5, 0.6, 0.2, 0.8, 0.4])]
    spec = PbtSpec(population=8, quantile=0.25)
    first = plan_round(members, "maximize", spec, space, ["lr"], round_rng(3, 1))
    again = plan_round(members, "maximize", spec, space, ["lr"], round_rng(3, 1))
    assert [(p.member, p.source, p.after) for p in first] == [(p.member, p.source, p.after) for p in again]
    assert sorted(p.member for p in first) == [2, 5]  # the two worst
    assert {p.source for p in first} <= {1, 6}  # copied from the two best
    # A member that diverged (NaN) ranks last: it copies a good member rather than being dropped.
    members[1].score = float("nan")
    diverged = plan_round(members, "maximize", spec, space, ["lr"], round_rng(3, 1))
    assert 1 in {p.member for p in diverged}
    members[1].score = 0.9
    for p in first:
        assert p.before == members[p.member].params
        assert p.step == 2


# ---------------------------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(("change", "message"), [
    ({"method": "random", "pbt": None}, "parameters.lr.mutable: only method: pbt"),
    ({"budget": {"trials": 5}}, "budget.trials: must equal pbt.population (4)"),
    ({"metric": [{"name": "score", "goal": "maximize"}, {"name": "loss", "goal": "minimize"}]}, "a single metric"),
    ({"fixed": {}}, "method: pbt needs fixed.epochs"),
    ({"pbt": {"interval": 6}}, "pbt.interval: must be less than fixed.epochs (6)"),
    ({"early_stopping": "asha"}, "early_stopping: method: pbt selects members itself"),
    ({"parameters": {"lr": {"type": "float", "low": 0.01, "high": 1.0}}}, "at least one parameter with mutable"),
    ({"pbt": {"quantile": 0.75}}, "pbt.quantile"),
])
def test_what_pbt_cannot_honour_is_refused_in_one_line(change: dict[str, Any], message: str) -> None:
    raw = pbt_spec(**change)
    if raw.get("pbt") is None:
        raw.pop("pbt")
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        spec_from_dict(raw)
    assert "\n" not in str(info.value)
    plain = pbt_spec(method="random", parameters={"lr": {"type": "float", "low": 0.01, "high": 1.0}})
    with pytest.raises(SpecError, match="pbt: is read only with method: pbt"):
        spec_from_dict(plain)
    # A resolved spec (a sweep's saved spec, automl validate's output) carries the default section: accepted.
    resolved = spec_from_dict({k: v for k, v in plain.items() if k != "pbt"}).model_dump(mode="json")
    assert spec_from_dict(resolved).method == "random"


# ---------------------------------------------------------------------------------------------- whole populations


def test_a_population_exploits_records_each_exploit_and_continues_from_the_copied_checkpoint(
    engine: tuple[Engine, InProcessExecutor, MemoryRecorder], trainers: Path, tmp_path: Path
) -> None:
    eng, executor, recorder = engine
    result = eng.run(Sweep.from_dict(pbt_spec(), base_dir=trainers, workdir=tmp_path))
    assert [t.state for t in result.trials] == [TrialState.COMPLETE] * 4
    assert all(t.epochs == 6 for t in result.trials)
    # Three segments per member (steps 1-2, 3-4, 5-6), each after the first from a checkpoint.
    segments = [r.segment for r in executor.launched]
    assert len(segments) == 12
    assert Counter(s.until for s in segments if s is not None) == {2: 4, 4: 4, None: 4}
    assert sum(s is not None and s.checkpoint is None for s in segments) == 4
    log = recorder.logs[0]
    exploited = {n: t for n, t in log.trials.items() if "automl.pbt.exploits" in t["tags"]}
    assert sum(int(t["tags"]["automl.pbt.exploits"]) for t in exploited.values()) == 2  # one per boundary
    for number, trial in exploited.items():
        history = json.loads(trial["artifacts"]["exploits.json"])
        for entry in history:
            assert entry["source"] != number
            assert entry["step"] in (2, 4)
            assert set(entry["before"]) == set(entry["after"]) == {"lr", "kind"}
            assert 0.01 <= entry["after"]["lr"] <= 1.0
        # Its metric history goes on from the copied checkpoint: steps 1..6 once each, never back to step 1, and
        # the score right after the exploit continues from the source's score at that step.
        steps = [s for s, m in trial["reports"] if "score" in m]
        assert steps == [1, 2, 3, 4, 5, 6]
        first = history[0]
        after = next(m["score"] for s, m in trial["reports"] if s == first["step"] + 1)
        assert after > first["source_score"]
        # The mutable values are metrics at every step: the schedule.
        lrs = {s: m["hp.lr"] for s, m in trial["reports"]}
        assert sorted(lrs) == steps
        assert lrs[first["step"] + 1] == pytest.approx(first["after"]["lr"])
    # The record's parameters are those in effect at the end; the checkpoints are gone, the population's state kept.
    folder = result.state_dir
    assert not list((folder / "pbt").glob("*.ckpt"))
    state = json.loads((folder / "pbt" / "population.json").read_text())
    assert [m["state"] for m in state["members"]] == ["DONE"] * 4


def test_a_member_whose_worker_dies_restarts_its_segment_from_its_last_checkpoint(
    engine: tuple[Engine, InProcessExecutor, MemoryRecorder], trainers: Path, tmp_path: Path
) -> None:
    eng, executor, _ = engine
    raw = pbt_spec(fixed={"epochs": 6, "sleep": 0.05})
    killed: list[Any] = []

    def kill_a_restored_segment() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            for request in list(executor.launched):
                if request.segment and request.segment.checkpoint and request.key in executor.running():
                    time.sleep(0.03)  # inside its first step
                    executor.kill(request.key)
                    killed.append(request)
                    return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_a_restored_segment, daemon=True)
    watcher.start()
    result = eng.run(Sweep.from_dict(raw, base_dir=trainers, workdir=tmp_path))
    watcher.join()
    assert killed
    victim = killed[0]
    record = next(t for t in result.trials if t.number == victim.key.number)
    assert record.state == TrialState.COMPLETE
    assert record.attempts == 2
    assert record.epochs == 6
    again = [r for r in executor.launched if r.key == victim.key and r.segment == victim.segment]
    assert len(again) == 2  # the same segment, from the same checkpoint: not from scratch


def test_the_json_schema_covers_pbt_and_mutable() -> None:
    from automl.spec import Spec

    schema = Spec.model_json_schema()
    assert "pbt" in schema["properties"]["method"]["enum"]
    assert set(schema["$defs"]["PbtSpec"]["properties"]) == {"population", "interval", "quantile",
                                                             "resample_probability", "factors"}
    for kind in ("FloatParam", "IntParam", "CategoricalParam"):
        assert schema["$defs"][kind]["properties"]["mutable"]["default"] is False
