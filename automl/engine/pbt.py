"""Population-based training (``method: pbt``): the population's decisions. No Ray, no MLflow, like
``automl.engine.core``: the engine feeds it the same events and it acts through the same ports.

A member is a trial that trains in segments of ``pbt.interval`` steps on the same warm workers as any trial: a
segment starts from the member's last checkpoint and ends PAUSED with a new one (``automl.engine.worker``). The
population moves in synchronous rounds (Ray Tune's ``synch=True``): once every live member has reached the round's
boundary, the bottom ``quantile`` copy the checkpoint and the whole configuration of a random top-``quantile``
member (exploit) and perturb its mutable parameters (explore), then every member trains its next segment.
Synchronous rounds make the decisions a function of the seed and the scores alone (the same seed gives the same
schedules, and a resumed sweep takes the decisions the killed one would have), and compare members at the same
step; with a population that is a multiple of the concurrency no worker waits at the barrier.

What a resume needs is in the sweep's state folder: ``pbt/population.json`` (members, their current parameters,
schedules, exploits) and each live member's last checkpoint, as files the driver writes (the trainer's own bytes,
never unpickled). A member's checkpoint is deleted when the member takes a newer one or ends, and the folder when
the sweep ends: the exported model is the finished member's own, not a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from automl.engine.core import SweepCore, SweepHooks
from automl.engine.executor import Segment
from automl.engine.records import TrialRecord, TrialState
from automl.errors import AutoMLError
from automl.spec import CategoricalParam, FloatParam, IntParam

if TYPE_CHECKING:
    import optuna

    from automl.engine.executor import TrialEnd
    from automl.spec import Parameter, PbtSpec

PAUSED = "PAUSED"
STATE_FILE = "population.json"


class MemberState(StrEnum):
    TRAINING = "TRAINING"  # a segment runs on a worker
    WAITING = "WAITING"  # at the round's boundary, its checkpoint taken
    READY = "READY"  # its next segment may start
    DONE = "DONE"  # trained to the end (or failed, or cut short by the sweep)


@dataclass
class Exploit:
    """One exploit and explore: ``member`` copied ``source``'s checkpoint at ``step`` and changed its parameters
    from ``before`` to ``after`` (``source``'s own, then perturbed)."""

    member: int
    source: int
    step: int
    before: dict[str, Any]
    after: dict[str, Any]
    source_score: float | None = None
    member_score: float | None = None


@dataclass
class Member:
    number: int
    params: dict[str, Any]  # the searched parameters in effect now
    state: MemberState = MemberState.READY
    step: int = 0  # the step of its checkpoint (0: none yet)
    score: float | None = None  # the metric at its last boundary
    checkpoint: str | None = None  # file name in the checkpoint folder
    schedule: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (from step, mutable values)
    exploits: list[dict[str, Any]] = field(default_factory=list)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) as reported on its run

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = str(self.state)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Member:
        return cls(number=int(data["number"]), params=dict(data["params"]), state=MemberState(data["state"]),
                   step=int(data["step"]), score=data.get("score"), checkpoint=data.get("checkpoint"),
                   schedule=[(int(s), dict(v)) for s, v in data.get("schedule", [])],
                   exploits=list(data.get("exploits", [])),
                   history=[(int(s), float(v)) for s, v in data.get("history", [])])


# ---------------------------------------------------------------------------------------------- exploit / explore


def quantiles(scores: dict[int, float], quantile: float, goal: str) -> tuple[list[int], list[int]]:
    """(bottom, top) member numbers: ``ceil(n * quantile)`` each, at most half the members (Ray Tune's rule);
    ties are broken by member number so that the decision depends on nothing else."""
    ranked = sorted(scores, key=lambda n: (-scores[n] if goal == "maximize" else scores[n], n))
    count = min(math.ceil(len(ranked) * quantile), len(ranked) // 2)
    if count == 0:
        return [], []
    return ranked[-count:], ranked[:count]


def explore(params: dict[str, Any], space: dict[str, Parameter], mutable: list[str], rng: random.Random,
            factors: list[float], resample_probability: float) -> dict[str, Any]:
    """Ray Tune's explore: each mutable parameter is resampled with ``resample_probability``, else a number is
    multiplied by a random factor (clipped to its bounds, rounded to its step) and a categorical moves to a
    neighbouring choice."""
    new = dict(params)
    for name in mutable:
        param = space[name]
        value = params[name]
        resample = rng.random() < resample_probability
        if isinstance(param, CategoricalParam):
            choices = param.choices
            if resample or value not in choices:
                new[name] = rng.choice(choices)
            else:
                index = choices.index(value) + rng.choice((-1, 1))
                new[name] = choices[min(max(index, 0), len(choices) - 1)]
            continue
        assert isinstance(param, FloatParam | IntParam)  # the spec's parameter types
        if resample:
            if param.log:
                x = math.exp(rng.uniform(math.log(param.low), math.log(param.high)))
            else:
                x = rng.uniform(param.low, param.high)
        else:
            x = float(value) * rng.choice(factors)
        new[name] = _fit(param, x)
    return new


def _fit(param: FloatParam | IntParam, x: float) -> float | int:
    """``x`` clipped to the parameter's bounds and rounded to its step (ints: to a whole number)."""
    x = min(max(x, param.low), param.high)
    if param.step:
        x = param.low + round((x - param.low) / param.step) * param.step
        x = min(max(x, param.low), param.high)
    if isinstance(param, IntParam):
        return round(x)
    return float(x)


def round_rng(seed: int, round_number: int) -> random.Random:
    """The random stream of one round's decisions: a function of the seed and the round only (a resumed sweep
    takes the decisions the killed one would have)."""
    return random.Random(f"automl-pbt-{seed}-{round_number}")


def plan_round(members: list[Member], goal: str, spec: PbtSpec, space: dict[str, Parameter], mutable: list[str],
               rng: random.Random) -> list[Exploit]:
    """Who exploits whom at this boundary, and the explored configurations. Members without a score (their
    metric was never reported) rank last."""
    worst = -math.inf if goal == "maximize" else math.inf
    scores = {m.number: (m.score if m.score is not None and math.isfinite(m.score) else worst) for m in members}
    bottom, top = quantiles(scores, spec.quantile, goal)
    by_number = {m.number: m for m in members}
    plans = []
    for number in sorted(bottom):
        source = by_number[rng.choice(top)]
        target = by_number[number]
        after = explore(source.params, space, mutable, rng, list(spec.factors), spec.resample_probability)
        plans.append(Exploit(member=number, source=source.number, step=source.step, before=dict(target.params),
                             after=after, source_score=source.score, member_score=target.score))
    return plans


def mutable_names(space: dict[str, Parameter]) -> list[str]:
    return [name for name, param in space.items() if param.mutable]


def hp_metrics(params: dict[str, Any], mutable: list[str], space: dict[str, Parameter]) -> dict[str, float]:
    """``hp.<name>`` for each mutable parameter: MLflow plots the schedule. A categorical that is not a number is
    logged as the index of its choice."""
    found = {}
    for name in mutable:
        value = params.get(name)
        param = space[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            if isinstance(param, CategoricalParam) and value in param.choices:
                found[f"hp.{name}"] = float(param.choices.index(value))
            continue
        found[f"hp.{name}"] = float(value)
    return found


# ---------------------------------------------------------------------------------------------- the state folder


class CheckpointStore:
    """The population's state and its members' last checkpoints, as files in ``folder`` (each replaced whole: a
    kill at any moment leaves the previous file or the new one)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def put(self, number: int, step: int, data: bytes) -> str:
        name = f"member-{number:04d}-step-{step:06d}.ckpt"
        self._write(name, data)
        return name

    def get(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def drop(self, name: str | None) -> None:
        if name:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()

    def save_state(self, state: dict[str, Any]) -> None:
        self._write(STATE_FILE, json.dumps(state, indent=1, default=str).encode())

    def load_state(self) -> dict[str, Any] | None:
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def clear(self) -> None:
        """The sweep has ended: no member will continue, and the best model is the finished member's own."""
        for path in self.folder.glob("*.ckpt"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _write(self, name: str, data: bytes) -> None:
        # Written whole, then renamed over the old file: a killed driver leaves one or the other. No fsync (as the
        # search-state journal, automl.journal): what a killed process wrote, the operating system still holds;
        # only a power cut could lose the last state, and the population then continues from the one before.
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.folder / name)


# ---------------------------------------------------------------------------------------------- the core


class PbtHooks(SweepHooks, Protocol):
    def member_exploited(self, record: TrialRecord, exploit: dict[str, Any], history: list[dict[str, Any]]
                         ) -> None:
        """An exploit of ``record``'s member: recorded on its run (``history``: all of its exploits so far)."""
        ...


class PbtCore(SweepCore):
    """A sweep's decisions for ``method: pbt``: ``SweepCore``'s budget, reports, ends and records, with members
    trained in segments. ``self.trials`` holds every live member's Optuna trial (told once, when the member ends);
    ``self.active`` those with a segment on a worker."""

    hooks: PbtHooks

    def __init__(self, *, store: CheckpointStore, restored: dict[str, Any] | None = None,
                 live_trials: dict[int, optuna.trial.Trial] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store = store
        self.pbt = self.spec.pbt
        self.space_params: dict[str, Parameter] = dict(self.spec.parameters)
        self.mutable = mutable_names(self.space_params)
        self.epochs = int(self.spec.fixed["epochs"])
        self.members: dict[int, Member] = {}
        self.active: set[int] = set()
        self.round = 1  # the round whose boundary the members train towards
        self._ready: list[int] = []
        self._checkpoints: dict[int, bytes] = {}  # in memory too: no disk read to launch a segment
        self._seconds: dict[int, float] = {}
        # Checkpoints no member needs any more, deleted once the state that no longer names them is saved: a kill
        # in between never leaves population.json naming a deleted file.
        self._garbage: list[str] = []
        if restored is not None:
            self._restore(restored, live_trials or {})

    # ------------------------------------------------------------------------------------------ state

    def _restore(self, state: dict[str, Any], live_trials: dict[int, optuna.trial.Trial]) -> None:
        self.round = int(state["round"])
        for data in state["members"]:
            member = Member.from_json(data)
            self.members[member.number] = member
            record = self.records.get(member.number)
            if member.state == MemberState.DONE or (record is not None and record.state.finished):
                member.state = MemberState.DONE
                if record is not None:
                    record.params = dict(member.params)
                continue
            trial = live_trials.get(member.number)
            if trial is None:  # its Optuna trial was told (it ended) but the state file did not say so yet
                member.state = MemberState.DONE
                continue
            if member.state == MemberState.TRAINING:
                member.state = MemberState.READY  # cut short by the kill: it trains its segment again
            member.history = [(s, v) for s, v in member.history if s <= member.step]  # past it: reported again
            self.trials[member.number] = trial
            self.records[member.number] = TrialRecord(number=member.number, params=dict(member.params),
                                                      epochs=member.step, metrics={})
            if member.state == MemberState.READY:
                self._ready.append(member.number)
        self._ready.sort()
        self._advance()  # every live member may already be at the boundary

    def _save(self) -> None:
        self.store.save_state({"round": self.round, "interval": self.pbt.interval, "epochs": self.epochs,
                               "members": [self.members[n].as_json() for n in sorted(self.members)]})
        named = {m.checkpoint for m in self.members.values()}
        for name in self._garbage:
            if name not in named:
                self.store.drop(name)
        self._garbage.clear()

    def boundary(self, round_number: int) -> int | None:
        """The step where round ``round_number``'s segments end (None: the last segment trains to the end)."""
        step = round_number * self.pbt.interval
        return step if step < self.epochs else None

    # ------------------------------------------------------------------------------------------ launching

    def update(self, *, trials: int | None = None, max_concurrent: int | None = None,
               time: float | None = None) -> Any:
        if trials is not None and trials != self.planned:
            raise AutoMLError(f"budget.trials: a PBT sweep's population ({self.planned}) is fixed; it cannot "
                              f"become {trials}")
        return super().update(max_concurrent=max_concurrent, time=time)

    def wanted(self) -> int:
        if self.cancelled or self.failure_stop or self.out_of_time():
            return 0
        waiting = self.planned - len(self.members) + len(self._ready)
        return max(0, min(self.concurrency - len(self.active), waiting))

    def launch_next(self) -> int:
        if len(self.members) < self.planned:
            trial = self.study.ask()
            params = self.space.suggest(trial)
            number = trial.number - self.offset
            self.trials[number] = trial
            member = self.members[number] = Member(number=number, params=params,
                                                   schedule=[(0, self._mutable_values(params))])
            record = self.records[number] = TrialRecord(number=number, params=dict(params))
            self.hooks.trial_started(record)
        else:
            number = self._ready.pop(0)
            member = self.members[number]
        self._launch(member)
        self._save()
        return number

    def _launch(self, member: Member) -> None:
        checkpoint = None
        if member.checkpoint is not None:
            checkpoint = self._checkpoints.get(member.number)
            if checkpoint is None:
                checkpoint = self._checkpoints[member.number] = self.store.get(member.checkpoint)
        member.state = MemberState.TRAINING
        self.active.add(member.number)
        record = self.records[member.number]
        # A new seed per segment: a member's batches after a restore are not the ones it trained on before.
        seed = self.spec.seed + member.number + 10_007 * (member.step // self.pbt.interval)
        self.ops.launch(member.number, {**member.params, **self.spec.fixed}, seed,
                        segment=Segment(checkpoint=checkpoint, until=self.boundary(self.round)))
        record.epochs = member.step

    def _mutable_values(self, params: dict[str, Any]) -> dict[str, Any]:
        return {name: params[name] for name in self.mutable if name in params}

    # ------------------------------------------------------------------------------------------ reports

    def on_report(self, number: int, step: int, metrics: dict[str, float]) -> None:
        if number not in self.active:
            return  # a segment already ended by the sweep: its late reports are dropped
        record, value = self._note_report(number, step, metrics)
        if value is not None:
            # A member that diverged (NaN, inf) trains on to its boundary and ranks last there, so that it copies
            # a good member (its mutable values made it diverge, not its configuration); in the last segment it
            # ends FAILED, as any trial whose metric is not finite.
            self.members[number].history.append((step, value))
        hp = hp_metrics(self.members[number].params, self.mutable, self.space_params)
        self.hooks.trial_reported(record, step, {**metrics, **hp})

    # ------------------------------------------------------------------------------------------ ends

    def on_end(self, end: TrialEnd) -> None:
        number = end.key.number
        if number not in self.active:
            return  # ended by the sweep already (cancel)
        self.active.discard(number)
        member = self.members[number]
        record = self.records[number]
        self._seconds[number] = self._seconds.get(number, 0.0) + end.seconds
        end.seconds = self._seconds[number]  # the member's whole training, every segment
        record.seconds = end.seconds
        if end.state == PAUSED and end.checkpoint is not None and end.step is not None:
            self._paused(member, record, end.checkpoint, end.step)
        elif end.worker_died and record.stop_reason is None and record.attempts <= self.spec.resources.retries:
            # The worker died under the member: it trains its segment again from its last checkpoint, not from
            # scratch (its metric history goes on from that step).
            record.attempts += 1
            record.epochs = member.step
            self._started_at.pop(number, None)
            member.state = MemberState.READY
            self._ready.insert(0, number)
        else:
            if end.state == PAUSED:  # a PAUSED end without a checkpoint cannot go on
                end.state, end.error = "FAILED", end.error or "the segment ended without a checkpoint"
            member.state = MemberState.DONE
            self._drop_checkpoint(member)
            super().on_end(end)
        self._save()
        self._advance()

    def _paused(self, member: Member, record: TrialRecord, data: bytes, step: int) -> None:
        if member.checkpoint is not None:
            self._garbage.append(member.checkpoint)
        member.checkpoint = self.store.put(member.number, step, data)
        self._checkpoints[member.number] = data
        member.step = step
        member.score = record.value
        member.state = MemberState.WAITING
        self._started_at.pop(member.number, None)

    def _drop_checkpoint(self, member: Member) -> None:
        if member.checkpoint is not None:
            self._garbage.append(member.checkpoint)
        member.checkpoint = None
        self._checkpoints.pop(member.number, None)

    def _advance(self) -> None:
        """Once every live member waits at the boundary, decide the round's exploits and start the next one."""
        live = [m for m in self.members.values() if m.state != MemberState.DONE]
        if len(self.members) < self.planned or not live or any(m.state != MemberState.WAITING for m in live):
            return
        if self.cancelled or self.failure_stop or self.out_of_time():
            return
        rng = round_rng(self.spec.seed, self.round)
        for plan in plan_round(live, self.goal, self.pbt, self.space_params, self.mutable, rng):
            self._exploit(plan)
        self.round += 1
        for member in sorted(live, key=lambda m: m.number):
            member.state = MemberState.READY
            self._ready.append(member.number)
        self._save()

    def _exploit(self, plan: Exploit) -> None:
        member, source = self.members[plan.member], self.members[plan.source]
        assert source.checkpoint is not None  # every live member waits with its checkpoint
        data = self._checkpoints.get(source.number) or self.store.get(source.checkpoint)
        if member.checkpoint is not None:
            self._garbage.append(member.checkpoint)
        # A copy of its own: each member's checkpoint is deleted when that member moves on. (Its own file of the
        # same step is overwritten; a kill before the state is saved repeats the round's same decisions.)
        member.checkpoint = self.store.put(member.number, source.step, data)
        self._checkpoints[member.number] = data
        member.step, member.params, member.score = source.step, dict(plan.after), source.score
        member.schedule.append((source.step, self._mutable_values(plan.after)))
        entry = {"step": plan.step, "source": plan.source, "before": plan.before, "after": plan.after,
                 "source_score": plan.source_score, "score": plan.member_score}
        member.exploits.append(entry)
        record = self.records[member.number]
        record.params = dict(plan.after)
        self.hooks.member_exploited(record, entry, list(member.exploits))

    def tick(self) -> None:
        super().tick()
        if (self.out_of_time() or self.failure_stop) and not self.active:
            # Nothing will train again: members waiting at a boundary end now (KILLED), so the sweep can finish.
            self._retire_idle(self.failure_stop or "budget.time reached")

    def _retire_idle(self, reason: str) -> None:
        from optuna.trial import TrialState as OptunaState

        for number in [n for n in self.trials if n not in self.active]:
            member, record = self.members[number], self.records[number]
            trial = self.trials.pop(number)
            member.state = MemberState.DONE
            self._drop_checkpoint(member)
            record.state, record.error = TrialState.KILLED, reason
            trial.set_user_attr("automl", {"state": "KILLED", "metrics": record.metrics, "epochs": record.epochs,
                                           "error": reason, "attempts": record.attempts, "interrupted": False})
            self.study.tell(trial, state=OptunaState.FAIL)
            self.hooks.trial_finished(record, {"automl.state": "KILLED", "automl.error": reason,
                                               "automl.epochs": str(record.epochs)}, [])
        self._ready.clear()
        self._save()

    # ------------------------------------------------------------------------------------------ the end

    def cancel(self, reason: str) -> list[int]:
        """End the sweep now, resumable: running segments stop, and every live member's MLflow run is closed
        KILLED; their Optuna trials stay open and their checkpoints stay, so that a resume continues each member
        from its last checkpoint."""
        self.cancelled = reason
        cut = sorted(self.active)
        for number in list(self.trials):
            member, record = self.members[number], self.records[number]
            if member.state == MemberState.TRAINING:
                member.state = MemberState.READY
            record.state, record.error, record.stop_reason = TrialState.KILLED, reason, reason
            self.hooks.trial_finished(record, {"automl.state": "KILLED", "automl.error": reason}, [])
        for number in cut:
            self.ops.stop(number)
        self._save()
        self.trials.clear()
        self.active.clear()
        self._ready.clear()
        return cut

    def finished(self) -> None:
        """The sweep has ended for good: the checkpoints go (the best model was saved from its member's end)."""
        if not self.cancelled and not self.trials:
            self.store.clear()

    def effective_schedule(self, number: int, until: int | None = None) -> list[tuple[int, dict[str, Any]]]:
        """The hyperparameters member ``number``'s weights were trained under, step by step: its own schedule
        back to its last exploit, and before that the schedule of the member it copied (and so on)."""
        member = self.members[number]
        exploits = [e for e in member.exploits if until is None or e["step"] < until]
        own = [(s, v) for s, v in member.schedule if until is None or s < until]
        if not exploits:
            return own
        last = exploits[-1]
        before = self.effective_schedule(int(last["source"]), until=int(last["step"]))
        return before + [(s, v) for s, v in own if s >= last["step"]]

    def lineage(self) -> dict[str, Any]:
        """Every member's schedule (step -> mutable values), exploits and final value: the parent run's record."""
        return {"metric": self.metric, "goal": self.goal, "interval": self.pbt.interval, "epochs": self.epochs,
                "best": self.best.number if self.best is not None else None,
                "best_schedule": ([[s, v] for s, v in self.effective_schedule(self.best.number)]
                                  if self.best is not None and self.best.number in self.members else []),
                "members": {str(n): {"schedule": [[s, v] for s, v in m.schedule], "exploits": m.exploits,
                                     "value": self.records[n].value if n in self.records else None,
                                     "state": str(self.records[n].state) if n in self.records else None}
                            for n, m in sorted(self.members.items())}}
