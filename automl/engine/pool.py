"""The warm worker pool: long-lived Ray actors shared by every sweep of the engine.

Why not Ray Tune's ``Tuner``: on short trials its per-trial bookkeeping (trial directories, experiment checkpoints,
logger callbacks, result processing) costs 45 ms to 1 s per trial on a 2-core machine, more than the trials
themselves (benchmarks/overhead.py measures it side by side). Here a worker is one Ray actor with one trial's
resources (CPUs, fractional GPUs: Ray places and isolates them). It imports a trainer once and keeps it, so a
second sweep with the same trainer starts on warm workers; the engine decides which sweep's trial a free worker
runs next. Workers of a shape no sweep needs now are retired when another shape needs their room.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from automl.engine.executor import Event, Shape, Started, TrialEnd, TrialRequest
from automl.engine.records import TrialKey
from automl.errors import AutoMLError, TrainerError

if TYPE_CHECKING:
    from automl.trainer import TrainerRef

MAX_ACTORS_PER_CPU = 4  # trial actors (processes) per CPU of the cluster, however small resources.cpu is
START_TIMEOUT = 120.0  # seconds a launched trial may wait for its worker to start before it fails
_EPS = 1e-9


def capacity_for(shape: Shape, cluster: dict[str, float]) -> int:
    """How many trials of ``shape`` a cluster of these resources runs at once: its CPUs and GPUs over the shape's,
    and never more than ``MAX_ACTORS_PER_CPU`` workers (processes) per CPU however small ``resources.cpu`` is
    (``cpu: 0.001`` would otherwise ask for thousands)."""
    cpus = cluster.get("CPU", 1.0)
    by_cpu = int((cpus + _EPS) // shape.cpu) if shape.cpu else 10**9
    by_gpu = int((cluster.get("GPU", 0.0) + _EPS) // shape.gpu) if shape.gpu else 10**9
    return max(0, min(by_cpu, by_gpu, MAX_ACTORS_PER_CPU * max(1, math.ceil(cpus))))


@dataclass
class _Worker:
    actor: Any
    shape: Shape
    key: TrialKey | None = None
    stream: Any = None
    launched: float = 0.0
    started: float | None = None
    pending_stop: bool = False
    trainers: set[tuple[str, str | None]] = field(default_factory=set)  # loaded (or being loaded) here
    idle_since: float = field(default_factory=time.monotonic)


class RayPool:
    """An ``automl.engine.executor.Executor`` on a local Ray or a Ray cluster."""

    def __init__(self) -> None:
        import ray

        self._ray = ray
        self._lock = threading.RLock()
        self._classes: dict[Shape, Any] = {}
        self._workers: list[_Worker] = []
        self._by_stream: dict[Any, _Worker] = {}
        self._by_key: dict[TrialKey, _Worker] = {}
        self._total: dict[str, float] = {}
        self._total_at = 0.0

    # ------------------------------------------------------------------ capacity

    def cluster(self) -> dict[str, float]:
        """The cluster's resources (refreshed every few seconds: an autoscaler may add nodes)."""
        now = time.monotonic()
        if now - self._total_at > 5.0:
            self._total = {k: float(v) for k, v in self._ray.cluster_resources().items()}
            self._total_at = now
        return self._total

    def capacity(self, shape: Shape) -> int:
        return capacity_for(shape, self.cluster())

    def _room(self, shape: Shape, leaving: Sequence[_Worker] = ()) -> bool:
        total = self.cluster()
        kept = [w for w in self._workers if w not in leaving]
        cpu = sum(w.shape.cpu for w in kept) + shape.cpu
        gpu = sum(w.shape.gpu for w in kept) + shape.gpu
        count = len(kept) + 1
        return (cpu <= total.get("CPU", 0.0) + _EPS and gpu <= total.get("GPU", 0.0) + _EPS
                and count <= MAX_ACTORS_PER_CPU * max(1, math.ceil(total.get("CPU", 1.0))))

    def _evictable(self, shape: Shape) -> list[_Worker] | None:
        """Idle workers of other shapes whose retirement makes room for one of ``shape`` (None: not enough)."""
        idle = sorted((w for w in self._workers if w.key is None and w.shape != shape), key=lambda w: w.idle_since)
        leaving: list[_Worker] = []
        for worker in idle:
            if self._room(shape, leaving):
                return leaving
            leaving.append(worker)
        return leaving if self._room(shape, leaving) else None

    def can_start(self, shape: Shape) -> bool:
        with self._lock:
            if any(w.key is None and w.shape == shape for w in self._workers):
                return True
            return self._room(shape) or self._evictable(shape) is not None

    # ------------------------------------------------------------------ workers

    def _new_worker(self, shape: Shape) -> _Worker:
        from automl.engine.worker import TrialRunner

        actor_cls = self._classes.get(shape)
        if actor_cls is None:
            # One thread runs the trial, the other receives stop requests. Ray sets OMP_NUM_THREADS to the actor's
            # CPUs; TrialRunner caps torch's threads the same way.
            actor_cls = self._classes[shape] = self._ray.remote(TrialRunner).options(
                num_cpus=shape.cpu, num_gpus=shape.gpu, max_concurrency=2)
        worker = _Worker(actor=actor_cls.remote(max(1, int(shape.cpu))), shape=shape)
        self._workers.append(worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(worker.actor, no_restart=True)
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)

    def _worker_for(self, shape: Shape, trainer: TrainerRef) -> _Worker:
        idle = [w for w in self._workers if w.key is None and w.shape == shape]
        if idle:
            # A worker that already holds the trainer first: its imports are done.
            warm = [w for w in idle if (trainer.target, trainer.search_path) in w.trainers]
            return (warm or idle)[0]
        if not self._room(shape):
            for worker in self._evictable(shape) or []:
                self._retire(worker)
        return self._new_worker(shape)

    def prepare(self, shape: Shape, trainer: TrainerRef, count: int) -> Callable[[], None]:
        """Start workers (up to ``count`` of ``shape`` with the trainer loaded, room permitting) and load the
        trainer in them ahead of the sweep's first trials. Returns a wait for the first of those loads: a trainer
        that fails to import on the workers fails the sweep's start-up, in one line."""
        refs = []
        key = (trainer.target, trainer.search_path)
        with self._lock:
            ready = [w for w in self._workers if w.shape == shape and key in w.trainers]
            for worker in [w for w in self._workers if w.shape == shape and key not in w.trainers and w.key is None]:
                if len(ready) >= count:
                    break
                worker.trainers.add(key)
                refs.append(worker.actor.load.remote(trainer))
                ready.append(worker)
            while len(ready) < count and self._room(shape):
                worker = self._new_worker(shape)
                worker.trainers.add(key)
                refs.append(worker.actor.load.remote(trainer))
                ready.append(worker)

        def wait() -> None:
            if not refs:
                return
            done, _ = self._ray.wait(refs, num_returns=1, timeout=START_TIMEOUT)
            if not done:
                raise AutoMLError(f"no Ray worker started within {START_TIMEOUT:.0f}s; does the cluster have the "
                                  "CPUs/GPUs that resources: asks for?")
            try:
                self._ray.get(done[0])
            except self._ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                raise TrainerError(f"trainer '{trainer.name}' failed to load: {_first_line(cause)}") from None

        return wait

    def imports(self) -> list[dict[str, int]]:
        """Each live worker's import counts (trainer target -> times imported): for tests and benchmarks."""
        with self._lock:
            actors = [w.actor for w in self._workers]
        return list(self._ray.get([a.imports.remote() for a in actors]))

    # ------------------------------------------------------------------ data

    def put_data(self, data: Any) -> Any:
        return self._ray.put(data) if data is not None else None

    def drop_data(self, handle: Any) -> None:
        del handle  # the object store frees it when no trial holds the reference

    # ------------------------------------------------------------------ trials

    def launch(self, request: TrialRequest) -> None:
        with self._lock:
            worker = self._worker_for(request.shape, request.trainer)
            worker.key = request.key
            worker.launched = time.monotonic()
            worker.started = None
            worker.pending_stop = False
            worker.trainers.add((request.trainer.target, request.trainer.search_path))
            worker.stream = worker.actor.run.options(num_returns="streaming").remote(
                request.key, request.trainer, request.params, request.data, request.seed, request.segment,
                request.predictions)
            self._by_stream[worker.stream] = worker
            self._by_key[request.key] = worker

    def running(self) -> list[TrialKey]:
        with self._lock:
            return list(self._by_key)

    def stop(self, key: TrialKey) -> None:
        with self._lock:
            worker = self._by_key.get(key)
            if worker is not None and not worker.pending_stop:
                worker.pending_stop = True
                worker.actor.stop.remote(key)

    def kill(self, key: TrialKey) -> None:
        """Kill a trial that does not stop by itself; its worker goes (its stream then ends the trial FAILED)."""
        with self._lock:
            worker = self._by_key.get(key)
            if worker is not None:
                with contextlib.suppress(Exception):
                    self._ray.kill(worker.actor, no_restart=True)

    def poll(self, timeout: float | None) -> list[Event]:
        with self._lock:
            streams = list(self._by_stream)
        events: list[Event] = self._overdue()
        if not streams:
            if timeout:
                time.sleep(min(timeout, 0.05))
            return events
        ready, _ = self._ray.wait(streams, num_returns=1, timeout=0 if events else timeout)
        if ready:
            more, _ = self._ray.wait(streams, num_returns=len(streams), timeout=0)
            ready = list(dict.fromkeys([*ready, *more]))
        refs: list[tuple[_Worker, Any]] = []
        with self._lock:
            for stream in ready:
                worker = self._by_stream.get(stream)
                if worker is None:
                    continue
                try:
                    refs.append((worker, next(stream)))  # type: ignore[arg-type]
                except StopIteration:
                    continue  # the TrialEnd was already delivered and the worker freed
        try:
            batches = self._ray.get([ref for _, ref in refs])  # one round trip for every ready trial
        except self._ray.exceptions.RayError:
            batches = [self._get_one(worker, ref) for worker, ref in refs]
        now = time.monotonic()
        with self._lock:
            for (worker, _), batch in zip(refs, batches, strict=True):
                for event in batch:
                    if isinstance(event, Started):
                        event.at = now
                        worker.started = now
                events.extend(batch)
                if batch and isinstance(batch[-1], TrialEnd):
                    self._free(worker, dead=batch[-1].worker_died)
        return events

    def _free(self, worker: _Worker, *, dead: bool) -> None:
        self._by_stream.pop(worker.stream, None)
        if worker.key is not None:
            self._by_key.pop(worker.key, None)
        worker.key = worker.stream = None
        worker.pending_stop = False
        worker.idle_since = time.monotonic()
        if dead:
            self._retire(worker)

    def _overdue(self) -> list[Event]:
        """Trials whose worker never started (the cluster lacks what ``resources`` asks for): failed, not hung."""
        now = time.monotonic()
        ended: list[Event] = []
        with self._lock:
            for worker in list(self._by_key.values()):
                if worker.started is None and now - worker.launched > START_TIMEOUT and worker.key is not None:
                    ended.append(TrialEnd(worker.key, "FAILED", 0.0, error=(
                        f"no Ray worker started within {START_TIMEOUT:.0f}s; does the cluster have the CPUs/GPUs "
                        "that resources: asks for?")))
                    self._free(worker, dead=True)
        return ended

    def _get_one(self, worker: _Worker, ref: Any) -> list[Event]:
        """One stream's events; a dead worker or a lost object ends its trial as FAILED."""
        key = worker.key
        assert key is not None  # a stream always belongs to a busy worker
        try:
            batch: list[Event] = self._ray.get(ref)
            return batch
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.WorkerCrashedError) as exc:
            return [TrialEnd(key, "FAILED", self._elapsed(worker), worker_died=True,
                             error=f"the Ray worker running the trial died: {_first_line(exc)}")]
        except self._ray.exceptions.RayError as exc:
            return [TrialEnd(key, "FAILED", self._elapsed(worker), error=_first_line(exc))]

    @staticmethod
    def _elapsed(worker: _Worker) -> float:
        return time.monotonic() - worker.started if worker.started is not None else 0.0

    def retire_idle(self, older_than: float) -> int:
        """Retire the workers idle for more than ``older_than`` seconds; returns how many."""
        now = time.monotonic()
        with self._lock:
            idle = [w for w in self._workers if w.key is None and now - w.idle_since >= older_than]
            for worker in idle:
                self._retire(worker)
        return len(idle)

    def shutdown(self) -> None:
        with self._lock:
            if self._ray.is_initialized():
                for worker in list(self._workers):
                    self._retire(worker)
            self._workers = []
            self._by_stream = {}
            self._by_key = {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
