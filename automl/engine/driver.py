"""The engine: one loop that drives every sweep of the process on one warm executor.

``Engine.submit(sweep)`` starts a sweep (its start-up in a thread of its own) and returns a ``SweepHandle``:
``result()`` waits for it, ``cancel()`` stops it (running trials KILLED, resumable), ``update(trials=,
max_concurrent=, time=)`` changes its budget live, ``status()`` says where it stands. The loop thread alone calls
the sweeps' decisions (``SweepCore``) and the executor's launches; handles talk to it through a queue. Free
workers go to the sweep with the fewest running trials, then the least trial time had, then the oldest: two
sweeps that each want more than the cluster holds get about half each, and twenty sweeps on two workers all move
at once. A sweep's finishing step (model, plots, registry) runs in a thread of its own, so
it never holds up the others. The CLI runs its one sweep on the same engine.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.engine.executor import Executor, Report, Started, TrialEnd
from automl.engine.records import SweepResult, TrialKey
from automl.engine.run import EventCallback, NoteCallback, Phase, SweepRun
from automl.errors import AutoMLError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from automl.orchestrator import Sweep
    from automl.state import SweepLock, SweepState

log = logging.getLogger(__name__)

POLL = 0.05  # seconds the loop waits on running trials before it looks at its queue again
CUT_GRACE = 5.0  # seconds a cancelled trial has to stop at its next report before its worker is killed
CONTROL_EVERY = 0.5  # seconds between looks for `automl set` requests in running sweeps' state folders
# Workers idle this long while no sweep runs go back to the cluster (other drivers may need them); the next sweep
# starts new ones, cold.
PLOTS_GRACE = 60.0  # seconds shutdown() waits for summary plots still being drawn
IDLE_TIMEOUT = 600.0


class Engine:
    """Runs sweeps on one warm executor (a Ray actor pool by default) and one MLflow writer process."""

    def __init__(self, *, address: str | None = None, executor: Executor | None = None, recorder: Any = None,
                 workdir: Path | None = None, idle_timeout: float = IDLE_TIMEOUT) -> None:
        from automl.engine.startup import DataCache
        from automl.state import log_path, state_root

        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.workdir = (workdir or Path.cwd()).resolve()
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._running: dict[str, SweepRun] = {}
        self._starting = 0
        self._zombies: dict[TrialKey, float] = {}
        self._closed = False
        self._clients: dict[str, MlflowClient] = {}
        self._control_at = 0.0
        self._idle_at = 0.0
        self.idle_timeout = idle_timeout
        self.data_cache = DataCache()
        if recorder is None:
            from automl.tracking import MlflowRecorder

            # The writer process imports MLflow (its slowest start) while Ray starts here.
            recorder = MlflowRecorder(log_file=log_path(state_root(self.workdir)))
        self.recorder = recorder
        # Ray starts in a thread of its own (3 to 5 s on 2 cores): the first sweep's data loads meanwhile, and its
        # start-up waits for Ray only when it needs workers.
        self._executor: Future[Executor] = Future()
        if executor is None:
            threading.Thread(target=self._connect, name="automl-ray-start", daemon=True).start()
        else:
            self._executor.set_result(executor)
        self._starter = ThreadPoolExecutor(max_workers=4, thread_name_prefix="automl-start")
        self._finisher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="automl-finish")
        # Summary plots: one daemon thread at a lower CPU priority, so that drawing the last sweep's figures takes
        # what the next sweep's trials leave (Linux: a thread's own nice value). A daemon, and waited for at most
        # PLOTS_GRACE at shutdown: plots bound for a tracking server that has gone away (MLflow retries for
        # minutes) must not hold a process's exit.
        self._plots: queue.SimpleQueue[SweepRun | None] = queue.SimpleQueue()
        self._plotter = threading.Thread(target=self._plot_loop, name="automl-plots", daemon=True)
        self._plotter.start()
        self._thread = threading.Thread(target=self._loop, name="automl-engine", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        from automl.engine.pool import RayPool
        from automl.orchestrator import connect_ray

        try:
            connect_ray(self.address, capture_logs=True)
            self._executor.set_result(RayPool())
        except BaseException as exc:
            self._executor.set_exception(exc)
            return
        # This thread stays: Ray starts its local processes (GCS, raylet) with PR_SET_PDEATHSIG, which Linux fires
        # when the *thread* that started them ends, not the process; a local Ray lives as long as this thread.
        threading.Event().wait()

    @property
    def executor(self) -> Executor:
        """Where trials run (waits for Ray to have started; raises if it could not)."""
        return self._executor.result()

    # ------------------------------------------------------------------------------------------ the public side

    def submit(self, plan: Sweep, *, on_event: EventCallback | None = None, on_note: NoteCallback | None = None,
               resume: SweepState | None = None, lock: SweepLock | None = None,
               sweep_id: str | None = None) -> SweepHandle:
        """Start ``plan`` (or resume the sweep ``resume``); its bad input is refused here, in one line, before
        anything starts. ``sweep_id`` names the new sweep (default: its name and the time)."""
        if self._closed:
            raise AutoMLError("the engine is shut down; start a new one")
        plan.check()
        run = SweepRun(plan=plan, on_event=_safe(on_event), on_note=_safe(on_note), resume=resume, lock=lock,
                       requested_id=sweep_id)
        if resume is not None:
            run.sweep_id = resume.sweep_id
        with self._lock_starting():
            self._starting += 1
        self._starter.submit(self._start, run)
        return SweepHandle(self, run)

    def run(self, plan: Sweep, **kwargs: Any) -> SweepResult:
        """``submit`` and wait; Ctrl-C cancels the sweep (resumable) and is raised again once it has stopped."""
        return self.submit(plan, **kwargs).result()

    def cluster(self) -> dict[str, float]:
        cluster = getattr(self.executor, "cluster", None)
        return cluster() if callable(cluster) else {"CPU": float(os.cpu_count() or 1)}

    def client_for(self, uri: str) -> MlflowClient:
        from automl.tracking import make_client

        if uri not in self._clients:
            self._clients[uri] = make_client(uri)
        return self._clients[uri]

    def call(self, fn: Any, timeout: float | None = 30.0) -> Any:
        """Run ``fn()`` on the loop thread (where the sweeps' state lives) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[Any] = Future()
        self._commands.put(("call", fn, future))
        return future.result(timeout=timeout)

    def release_idle_workers(self) -> int:
        """Give the cluster back the workers no trial uses now (a shared cluster's other drivers may need them);
        the next sweep starts new ones. Returns how many were retired."""
        retire = getattr(self.executor, "retire_idle", None)
        return int(self.call(lambda: retire(0.0))) if callable(retire) else 0

    def shutdown(self) -> None:
        """Cancel what still runs, wait for every sweep's record to be closed, then stop the workers and the
        MLflow writer."""
        if self._closed:
            return
        for run in list(self._running.values()):
            self._commands.put(("cancel", run, "the engine shut down", None))
        self._closed = True
        self._commands.put(("wake",))
        self._thread.join(timeout=120)
        self._starter.shutdown(wait=True)
        self._finisher.shutdown(wait=True)
        self._plots.put(None)
        self._plotter.join(timeout=PLOTS_GRACE)
        if self._plotter.is_alive():
            log.warning("summary plots still being drawn after %s s at shutdown; left undone", PLOTS_GRACE)
        with contextlib.suppress(Exception):
            if self._executor.done():
                self.executor.shutdown()
        with contextlib.suppress(Exception):
            self.recorder.shutdown()

    # ------------------------------------------------------------------------------------------ start-up

    _starting_lock = threading.Lock()

    def _lock_starting(self) -> threading.Lock:
        return self._starting_lock

    def _start(self, run: SweepRun) -> None:
        from automl.engine.startup import after_start, prewarm_finish, start_sweep

        try:
            start_sweep(self, run)
        except BaseException as exc:
            self._abandon(run, exc)
            return
        finally:
            with self._lock_starting():
                self._starting -= 1
        self._commands.put(("started", run))
        try:
            after_start(run)
        except BaseException as exc:
            run.error = exc
        finally:
            run.started_event.set()
        # After the event: a short sweep (a few seconds of --time) must not wait for it to finish.
        prewarm_finish(run)

    def _abandon(self, run: SweepRun, exc: BaseException) -> None:
        """A start-up that failed: nothing of it runs on; what it wrote is closed (never left RUNNING)."""
        if run.log is not None and getattr(run.log, "open_sent", False):
            with contextlib.suppress(Exception):
                run.log.ready(timeout=30)
                run.log.finish("FAILED", tags={"automl.error": str(exc).splitlines()[0][:5000] if str(exc) else
                                               type(exc).__name__})
        elif run.log is not None:
            run.log.abandon()
        if run.state is not None and run.folder is not None:
            with contextlib.suppress(Exception):
                run.state.status = "FAILED"
                run.state.save(run.folder.parent)
        if run.lock is not None and run.resume is None:
            run.lock.release()
        run.phase = Phase.DONE
        run.started_event.set()
        run.future.set_exception(exc)

    # ------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            self.executor  # noqa: B018 - no trial runs before Ray has started
        except BaseException:
            log.exception("the engine could not start Ray")
        while True:
            self._drain(block=not self._running and not self._zombies)
            if self._closed and not self._running and not self._starting:
                break
            self._schedule()
            try:
                events = self.executor.poll(self._timeout())
            except Exception:
                log.exception("polling the executor failed")
                events = []
            for event in events:
                self._dispatch(event)
            for run in list(self._running.values()):
                self._guard(run, lambda r=run: r.core.tick())
                if run.core is not None and run.core.done and run.phase == Phase.RUNNING:
                    self._finish(run)
            self._reap()
            self._control_files()
            self._retire_idle()

    def _timeout(self) -> float:
        deadlines = [d for r in self._running.values() if r.core is not None and (d := r.core.next_deadline())]
        if not deadlines:
            return POLL
        return max(0.0, min(POLL, min(deadlines) - time.monotonic()))

    def _drain(self, *, block: bool) -> None:
        try:
            command = self._commands.get(timeout=CONTROL_EVERY) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "started":
            run: SweepRun = command[1]
            run.phase = Phase.RUNNING
            # Fair share counts trial time from here on: a sweep that arrives late starts level with the running
            # ones (not with the time they have had), as a fair-share scheduler places a new task.
            run.attained = min((r.attained for r in self._running.values()), default=0.0)
            self._running[run.sweep_id] = run
            if run.cancel_requested:
                self._cancel(run, run.cancel_requested)
        elif kind == "cancel":
            run, reason, reply = command[1], command[2], command[3]
            if run.phase == Phase.STARTING:
                run.cancel_requested = reason
            elif run.phase == Phase.RUNNING:
                self._cancel(run, reason)
            if reply is not None:
                reply.set_result(None)
        elif kind == "call":
            fn, reply = command[1], command[2]
            try:
                reply.set_result(fn())
            except BaseException as exc:
                reply.set_exception(exc)

    def _schedule(self) -> None:
        """Launch trials while workers are free: to the sweep with the fewest running trials, then the one that has
        had the least trial time (so that twenty sweeps on two workers all move, rather than the oldest first),
        then the oldest."""
        while True:
            wanting = [r for r in self._running.values()
                       if r.phase == Phase.RUNNING and r.core is not None and r.core.wanted() > 0]
            if not wanting:
                return
            wanting.sort(key=lambda r: (len(r.core.trials) if r.core else 0, r.attained, r.submitted))
            for run in wanting:
                if self.executor.can_start(run.shape):
                    self._guard(run, lambda r=run: r.core.launch_next())
                    break
            else:
                return

    def _dispatch(self, event: Started | Report | TrialEnd) -> None:
        key = event.key
        if isinstance(event, TrialEnd):
            self._zombies.pop(key, None)
        run = self._running.get(key.sweep_id)
        if run is not None and isinstance(event, TrialEnd):
            run.attained += max(0.0, event.seconds)
        if run is None or run.core is None or run.phase != Phase.RUNNING:
            return  # a trial of a sweep that was cancelled or finished: its late events are dropped
        core = run.core
        if isinstance(event, Started):
            self._guard(run, lambda: core.on_started(key.number, event.at))
        elif isinstance(event, Report):
            self._guard(run, lambda: core.on_report(key.number, event.step, event.metrics))
        else:
            self._guard(run, lambda: core.on_end(event))

    def _guard(self, run: SweepRun, step: Any) -> None:
        """A sweep whose decisions raise (a full disk under its journal, a sampler's bug) fails alone; the
        loop and the other sweeps go on."""
        try:
            step()
        except Exception as exc:
            log.exception("sweep %s failed", run.sweep_id)
            run.error = exc
            self._cancel(run, f"{type(exc).__name__}: {exc}".splitlines()[0][:500])

    def _cancel(self, run: SweepRun, reason: str) -> None:
        if run.core is None or run.phase != Phase.RUNNING:
            return
        now = time.monotonic()
        try:
            cut = run.core.cancel(reason)
        except Exception as exc:  # the journal itself failed: the trials are cut all the same
            log.exception("sweep %s: cancel", run.sweep_id)
            run.error = run.error or exc
            cut = list(run.core.trials)
            run.core.trials.clear()
            run.core.cancelled = reason
        for number in cut:
            key = run.key(number)
            self.executor.stop(key)
            self._zombies[key] = now
        self._finish(run)

    def _reap(self) -> None:
        """Cancelled trials that did not stop at a report within the grace period: their workers are killed."""
        if not self._zombies:
            return
        now = time.monotonic()
        running = set(self.executor.running())
        for key, cut in list(self._zombies.items()):
            if key not in running:
                del self._zombies[key]
            elif now - cut > CUT_GRACE:
                self.executor.kill(key)
                del self._zombies[key]

    def _finish(self, run: SweepRun) -> None:
        run.phase = Phase.FINISHING
        self._running.pop(run.sweep_id, None)
        self._finisher.submit(self._finish_in_thread, run)

    def _finish_in_thread(self, run: SweepRun) -> None:
        from automl.engine.finish import finish_sweep

        try:
            run.started_event.wait()
            if run.error is not None and run.core is None:
                raise run.error
            result = finish_sweep(run)
            if run.error is not None:
                raise run.error
        except BaseException as exc:
            run.future.set_exception(exc)
        else:
            run.future.set_result(result)
        finally:
            if run.lock is not None and run.resume is None:
                run.lock.release()
            run.phase = Phase.DONE
            # After the result: whoever waits on the sweep has it a second sooner. shutdown() waits for the plots.
            self._plots.put(run)

    def _plot_loop(self) -> None:
        from automl.engine.finish import draw_plots

        _lower_thread_priority()
        while (run := self._plots.get()) is not None:
            try:
                draw_plots(run)
            except Exception:
                log.warning("the summary plots of %s were not drawn", run.sweep_id, exc_info=True)
            finally:
                run.summary.set_result(None)

    # ------------------------------------------------------------------------------------------ live control

    def update(self, run: SweepRun, **budget: Any) -> dict[str, Any]:
        def apply() -> dict[str, Any]:
            if run.phase != Phase.RUNNING or run.core is None:
                raise AutoMLError(f"sweep {run.sweep_id or run.spec.name} is not running; its budget cannot change")
            changes = {k: v for k, v in budget.items() if v is not None}
            effect = run.core.update(**changes)
            metrics = {f"budget.{k}": v for k, v in effect.as_dict().items() if k in changes and v is not None}
            run.log.log_parent(metrics=metrics)
            run.note("budget changed: " + ", ".join(f"{k} {v}" for k, v in effect.as_dict().items() if k in changes))
            return effect.as_dict()

        return dict(self.call(apply))

    def status(self, run: SweepRun) -> dict[str, Any]:
        def snapshot() -> dict[str, Any]:
            core = run.core
            found: dict[str, Any] = {"sweep_id": run.sweep_id, "phase": run.phase}
            if core is not None:
                found.update(counts=core.counts(), running=sorted(core.trials), budget=core.budget().as_dict(),
                             best=None if core.best is None else {"number": core.best.number,
                                                                  "value": core.best.value,
                                                                  "params": dict(core.best.params)})
            return found

        return dict(self.call(snapshot))

    def _retire_idle(self) -> None:
        now = time.monotonic()
        if self._running or self._starting or now - self._idle_at < CONTROL_EVERY:
            return
        self._idle_at = now
        retire = getattr(self.executor, "retire_idle", None)
        if callable(retire):
            retire(self.idle_timeout)

    def _control_files(self) -> None:
        """`automl set` from another terminal: a request file in the sweep's state folder, a reply file back."""
        now = time.monotonic()
        if now - self._control_at < CONTROL_EVERY:
            return
        self._control_at = now
        from automl.engine import control

        for run in list(self._running.values()):
            if run.folder is None:
                continue
            for request in control.pending(run.folder):
                try:
                    answer: dict[str, Any] = {"ok": True, "budget": self.update(run, **request.budget)}
                except AutoMLError as exc:
                    answer = {"ok": False, "error": str(exc)}
                control.answer(request, answer)


class SweepHandle:
    """A submitted sweep: wait for it, change its budget, cancel it."""

    def __init__(self, engine: Engine, run: SweepRun) -> None:
        self._engine = engine
        self._run = run

    @property
    def sweep_id(self) -> str:
        """The sweep's id (its state folder, its MLflow run's name); waits for the start-up to choose it."""
        self._run.started_event.wait()
        return self._run.sweep_id

    @property
    def notes(self) -> list[str]:
        return list(self._run.notes)

    @property
    def mlflow(self) -> dict[str, str | None]:
        """The sweep's MLflow experiment and parent run ids (None until the writer has created the run)."""
        log = self._run.log
        return {"experiment_id": getattr(log, "experiment_id", None) or None,
                "run_id": getattr(log, "parent_run_id", None) or None}

    @property
    def future(self) -> Future[SweepResult]:
        """Done when the sweep's record is closed: its result, or the error that ended it."""
        return self._run.future

    def result(self, timeout: float | None = None) -> SweepResult:
        """Wait for the sweep's result (``SweepFailed`` past ``budget.max_failures``; the start-up's error)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # short waits: Ctrl-C reaches a main thread waiting here
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return self._run.future.result(timeout=0.25 if left is None else min(0.25, left))
            except TimeoutError:
                if left is not None and left <= 0:
                    raise

    wait = result

    def done(self) -> bool:
        return self._run.future.done()

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Stop the sweep: running trials are KILLED and it stays resumable (``automl resume``)."""
        reply: Future[None] = Future()
        self._engine._commands.put(("cancel", self._run, reason, reply))
        reply.result(timeout=30)

    def update(self, *, trials: int | None = None, max_concurrent: int | None = None,
               time: float | str | None = None) -> dict[str, Any]:
        """Change the running sweep's budget; returns the values in effect. ``AutoMLError`` (one line, nothing
        changed) where it cannot be honoured: fewer trials than are done, a time already past."""
        from automl.spec import parse_duration

        self._run.started_event.wait()
        try:
            seconds = parse_duration(time) if time is not None else None
        except ValueError as exc:
            raise AutoMLError(f"budget.time {exc}") from None
        return self._engine.update(self._run, trials=trials, max_concurrent=max_concurrent, time=seconds)

    def status(self) -> dict[str, Any]:
        return self._engine.status(self._run)


def _safe(callback: Any) -> Any:
    """A user's callback that raises must not take a sweep down with it."""
    if callback is None:
        return lambda *args: None

    def call(*args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("an event callback raised")

    return call


# ---------------------------------------------------------------------------------------------- the default engine

_DEFAULT: Engine | None = None
_DEFAULT_LOCK = threading.Lock()


def default_engine(address: str | None = None) -> Engine:
    """This process's engine, started on first use and kept warm for the next sweep (its workers keep their
    imports); ``shutdown()`` stops it (also at exit)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        wanted = address or os.environ.get("RAY_ADDRESS") or None
        if _DEFAULT is not None and not _DEFAULT._closed:
            if wanted and _DEFAULT.address != wanted:
                raise AutoMLError(f"this process's engine runs on the Ray at {_DEFAULT.address or 'local'}; a "
                                  f"sweep on {wanted} needs a process of its own")
            return _DEFAULT
        _DEFAULT = Engine(address=wanted)
        # Registered after Ray started (atexit runs handlers last-in first-out): the engine stops its loop, workers
        # and writer while Ray still runs, never after Ray's own exit handler shut it down.
        atexit.register(shutdown)
        return _DEFAULT


def _lower_thread_priority() -> None:
    """Nice this thread (only it: on Linux a thread has its own nice value) by 10."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))


def release_idle_workers() -> int:
    """Retire the idle workers of this process's engine, if it started one (see ``Engine.release_idle_workers``)."""
    engine = _DEFAULT
    return engine.release_idle_workers() if engine is not None and not engine._closed else 0


def shutdown() -> None:
    """Stop this process's default engine (its workers and its MLflow writer)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        engine, _DEFAULT = _DEFAULT, None
    if engine is not None:
        engine.shutdown()



# ---------------------------------------------------------------------------------------------- a test hook

_PAUSES: dict[str, int] = {}


def debug_pause(point: str, state_root: Path) -> None:
    """A test hook for crash-consistency tests: with ``AUTOML_DEBUG_PAUSE_AT=<point>#<n>`` the engine stops at the
    n-th pass through ``point`` (writes ``<point>.paused`` in the state folder and sleeps) so that a test can kill
    it exactly there. Unset, it costs one dictionary update."""
    _PAUSES[point] = _PAUSES.get(point, 0) + 1
    wanted = os.environ.get("AUTOML_DEBUG_PAUSE_AT")
    if wanted and wanted == f"{point}#{_PAUSES[point]}":
        (state_root / f"{point}.paused").write_text(json.dumps({"pid": os.getpid()}))
        time.sleep(3600)
