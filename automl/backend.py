"""The "where" of a sweep: a pool of long-lived Ray actors that run trials and stream their reports back.

Why not Ray Tune's ``Tuner``: on short trials its per-trial bookkeeping (trial directories, experiment
checkpoints, logger callbacks, result processing) costs 45 ms to 1 s per trial on a 2-core machine, more than
the trials themselves (benchmarks/overhead.py measures it side by side). Here each concurrency slot is one
actor, created once with the trial's resources (CPUs, fractional GPUs: Ray places and isolates them), that
imports the trainer once and then runs trial after trial. Reports stream back through a Ray streaming
generator; a stop request (early stopping, time budget) goes to the actor and takes effect at the trial's next
``report``. The dataset is put in Ray's object store once and passed by reference.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from automl.errors import AutoMLError

if TYPE_CHECKING:
    from automl.bundle import PackedModel
    from automl.trainer import TrainerRef

COMPLETE, STOPPED, FAILED = "COMPLETE", "STOPPED", "FAILED"


@dataclass
class Report:
    number: int
    step: int
    metrics: dict[str, float]


@dataclass
class TrialEnd:
    number: int
    state: str  # COMPLETE | STOPPED | FAILED
    seconds: float = 0.0  # time inside the trainer: the trial's own compute
    error: str | None = None
    traceback: str | None = None
    model: PackedModel | None = None
    model_note: str | None = None
    worker_died: bool = False  # the Ray worker process died under the trial (it may be retried)
    node: str | None = None  # the Ray node that ran it
    gpus: list[str] | None = None  # the GPU ids Ray assigned (fractional GPUs share an id)
    device_note: str | None = None  # set when a GPU was assigned but the trial fell back to the CPU


Event = Report | TrialEnd


# --------------------------------------------------------------------------------------------- worker side


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % (2**32))
    import sys

    if "torch" in sys.modules:  # seed torch only if the trainer uses it; never import it for nothing
        sys.modules["torch"].manual_seed(seed)


class TrialRunner:
    """Runs one trial at a time (the Ray actor class is made from it in ``RayBackend``)."""

    def __init__(self, trainer: TrainerRef, threads: int) -> None:
        self._threads = max(1, threads)
        self._fit = trainer.load()  # import the trainer (and torch) once per actor, not per trial
        self._stop: set[int] = set()
        warmup = getattr(getattr(self._fit, "__self__", None), "warmup", None)
        if callable(warmup):
            warmup()
        self._limit_threads()

    def _limit_threads(self) -> None:
        """Keep torch to the trial's CPUs (Ray sets OMP_NUM_THREADS likewise): no oversubscription."""
        import sys

        torch = sys.modules.get("torch")  # only if the trainer uses it; never import it for nothing
        if torch is not None and torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)

    def ready(self) -> int:
        return os.getpid()

    @staticmethod
    def _where() -> tuple[str | None, list[str] | None, str | None]:
        import ray

        from automl import trainer

        try:
            ctx = ray.get_runtime_context()
            return ctx.get_node_id(), [str(g) for g in ray.get_gpu_ids()], trainer.DEVICE_NOTE
        except Exception:
            return None, None, trainer.DEVICE_NOTE

    def stop(self, number: int) -> None:
        self._stop.add(number)

    def run(self, number: int, params: dict[str, Any], data: Any, seed: int) -> Iterator[list[Event]]:
        """Generator of lists of events: ``Report``s, the last list ending with the trial's ``TrialEnd``."""
        from automl.bundle import pack_model
        from automl.trainer import StopTrial

        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        stop = self._stop

        def report(step: int, metrics: Any) -> None:
            clean = {str(k): float(v) for k, v in dict(metrics).items()}
            events.put(Report(number, int(step), clean))  # the epoch was trained: record it, stop or not
            if number in stop:
                raise StopTrial

        def target() -> None:
            self._limit_threads()
            _seed_everything(seed)
            start = time.perf_counter()
            try:
                if isinstance(data, list):  # k-fold (data.validation.folds): one training per fold
                    model = fit_folds(self._fit, params, data, report, seed, lambda: number in stop)
                else:
                    model = self._fit(dict(params), data, report)
                seconds = time.perf_counter() - start
                end = TrialEnd(number, COMPLETE, seconds)
                try:
                    end.model = pack_model(model)
                    if end.model is None and model is not None:
                        end.model_note = f"{type(model).__name__} has no safe save format; not exportable"
                except Exception as exc:
                    end.model_note = f"saving the model failed: {exc!r}"
            except StopTrial:
                end = TrialEnd(number, STOPPED, time.perf_counter() - start)
            except BaseException as exc:
                end = TrialEnd(
                    number, FAILED, time.perf_counter() - start,
                    error=f"{type(exc).__name__}: {exc}"[:2000], traceback=traceback.format_exc(),
                )
            end.node, end.gpus, end.device_note = self._where()
            events.put(end)

        thread = threading.Thread(target=target, name=f"trial-{number}", daemon=True)
        thread.start()
        yield []  # "started": the trial's clock (budget.trial_time) starts now, not when it was queued
        while True:
            # Whatever the trainer reported since the last item travels as one list: one Ray object, not many.
            batch = [events.get()]
            while not isinstance(batch[-1], TrialEnd):
                try:
                    batch.append(events.get_nowait())
                except queue.Empty:
                    break
            yield batch
            if isinstance(batch[-1], TrialEnd):
                stop.discard(number)
                return


def fit_folds(
    fit: Any, params: dict[str, Any], folds: list[Any], report: Any, seed: int, stop_requested: Callable[[], bool]
) -> Any:
    """Train once per fold, one fold after another, and report the mean over folds; return fold 1's model.

    Each fold's reports are buffered (the trial's ``report`` is called only after the last fold): for every
    step that all folds reached, the mean over folds of every metric they all reported; on the last such step
    also each fold's own value, as ``<metric>_fold<i>``. A stop request still ends the trial between or during
    folds: the buffering ``report`` raises ``StopTrial`` as the trial's own does, and nothing is reported.
    """
    from automl.trainer import StopTrial

    buffers: list[dict[int, dict[str, float]]] = []
    first: Any = None
    for i, fold in enumerate(folds):
        buffer: dict[int, dict[str, float]] = {}
        buffers.append(buffer)

        def buffered(step: int, metrics: Any, buffer: dict[int, dict[str, float]] = buffer) -> None:
            buffer.setdefault(int(step), {}).update({str(k): float(v) for k, v in dict(metrics).items()})
            if stop_requested():
                raise StopTrial

        if i:
            if stop_requested():  # a trainer that never reports is still stopped between folds
                raise StopTrial
            _seed_everything(seed)  # every fold starts from the same seed: folds differ by their data only
        model = fit(dict(params), fold, buffered)
        if i == 0:
            first = model
    steps = sorted(set.intersection(*(set(b) for b in buffers)))
    for n, step in enumerate(steps):
        per_fold = [b[step] for b in buffers]
        names = [k for k in per_fold[0] if all(k in m for m in per_fold)]
        metrics = {k: statistics.fmean(m[k] for m in per_fold) for k in names}
        if n == len(steps) - 1:
            metrics.update({f"{k}_fold{j}": m[k] for k in names for j, m in enumerate(per_fold, start=1)})
        report(step, metrics)
    return first


# --------------------------------------------------------------------------------------------- driver side


@dataclass
class _Slot:
    actor: Any
    number: int | None = None
    stream: Any = None
    pending_stop: bool = False
    started: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RayBackend:
    """A fixed pool of trial actors on a local or remote Ray cluster."""

    def __init__(
        self,
        trainer: TrainerRef,
        *,
        slots: int,
        cpu: float = 1.0,
        gpu: float = 0.0,
        data: Any = None,
    ) -> None:
        import ray

        if slots < 1:
            raise AutoMLError(f"budget.max_concurrent must be >= 1 (got {slots})")
        self._ray = ray
        self._trainer = trainer
        threads = max(1, int(cpu))
        actor_cls = ray.remote(TrialRunner).options(
            num_cpus=cpu,
            num_gpus=gpu,
            max_concurrency=2,  # one thread runs the trial, the other receives stop requests
        )  # Ray sets OMP_NUM_THREADS to the actor's CPUs; TrialRunner caps torch's threads the same way.
        self._actor_cls = actor_cls
        self._threads = threads
        self._data_ref = ray.put(data) if data is not None else None
        self._slots = [_Slot(actor=self._new_actor()) for _ in range(slots)]
        self._by_stream: dict[Any, _Slot] = {}  # ObjectRefGenerator -> slot

    def _new_actor(self) -> Any:
        return self._actor_cls.remote(self._trainer, self._threads)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every actor has imported the trainer; a trainer that cannot load fails here."""
        try:
            self._ray.get([s.actor.ready.remote() for s in self._slots], timeout=timeout)
        except self._ray.exceptions.RayActorError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise AutoMLError(f"trainer '{self._trainer.name}' failed to load: {_first_line(cause)}") from None
        except self._ray.exceptions.GetTimeoutError:
            raise AutoMLError(
                f"no Ray worker started within {timeout:.0f}s; does the cluster have the CPUs/GPUs that "
                "resources: asks for?"
            ) from None

    @property
    def capacity(self) -> int:
        return len(self._slots)

    def free_slots(self) -> int:
        return sum(1 for s in self._slots if s.number is None)

    def running(self) -> list[int]:
        return [s.number for s in self._slots if s.number is not None]

    def started_at(self, number: int) -> float | None:
        for s in self._slots:
            if s.number == number:
                return s.started
        return None

    def launch(self, number: int, params: dict[str, Any], seed: int) -> None:
        slot = next(s for s in self._slots if s.number is None)
        slot.number = number
        slot.started = None  # set when the worker actually starts the trial (its first, empty, item)
        slot.stream = slot.actor.run.options(num_returns="streaming").remote(
            number, params, self._data_ref, seed
        )
        self._by_stream[slot.stream] = slot

    def stop(self, number: int) -> None:
        for s in self._slots:
            if s.number == number and not s.pending_stop:
                s.pending_stop = True
                s.actor.stop.remote(number)

    def kill(self, number: int) -> None:
        """Kill a trial that does not stop by itself (no report for too long); its slot gets a new actor."""
        for s in self._slots:
            if s.number == number:
                self._ray.kill(s.actor, no_restart=True)

    def poll(self, timeout: float | None) -> list[Event]:
        """Events from running trials: waits up to ``timeout`` seconds for the first, then takes all ready."""
        if not self._by_stream:
            return []
        streams = list(self._by_stream)
        ready, _ = self._ray.wait(streams, num_returns=1, timeout=timeout)
        if ready:
            more, _ = self._ray.wait(streams, num_returns=len(streams), timeout=0)
            ready = list(dict.fromkeys([*ready, *more]))
        refs: list[tuple[_Slot, Any]] = []
        for stream in ready:
            try:
                refs.append((self._by_stream[stream], next(stream)))  # type: ignore[arg-type]
            except StopIteration:
                continue  # the TrialEnd was already delivered and the slot freed
        events: list[Event] = []
        try:
            batches = self._ray.get([ref for _, ref in refs])  # one round trip for every ready trial
        except self._ray.exceptions.RayError:
            batches = [self._get_one(slot, ref) for slot, ref in refs]
        for (slot, _), batch in zip(refs, batches, strict=True):
            if not batch:
                slot.started = time.monotonic()
                continue
            events.extend(batch)
            if isinstance(batch[-1], TrialEnd):
                del self._by_stream[slot.stream]
                slot.number = None
                slot.stream = None
                slot.pending_stop = False
        return events

    def _get_one(self, slot: _Slot, ref: Any) -> list[Event]:
        """One stream's events; a dead worker or a lost object ends its trial as FAILED."""
        number = slot.number
        assert number is not None  # a stream always belongs to a busy slot
        try:
            batch: list[Event] = self._ray.get(ref)
            return batch
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.WorkerCrashedError) as exc:
            slot.actor = self._new_actor()
            return [TrialEnd(number, FAILED, self._elapsed(slot), worker_died=True,
                             error=f"the Ray worker running the trial died: {_first_line(exc)}")]
        except self._ray.exceptions.RayError as exc:
            return [TrialEnd(number, FAILED, self._elapsed(slot), error=_first_line(exc))]

    @staticmethod
    def _elapsed(slot: _Slot) -> float:
        return time.monotonic() - slot.started if slot.started is not None else 0.0

    def shutdown(self) -> None:
        for s in self._slots:
            with contextlib.suppress(Exception):
                self._ray.kill(s.actor, no_restart=True)
        self._slots = []
        self._by_stream = {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
