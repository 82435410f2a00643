"""The worker side of the pool: a long-lived process (a Ray actor) that runs one trial at a time, of any sweep.

It keeps what it imported between trials and sweeps: a trainer is imported once per worker (``imports()`` counts
them), however many sweeps use it. What one trial could leave behind for the next is reset before each trial:
the global seeds, the thread limit, the device note. Reports stream back through a Ray streaming generator; a
stop request (early stopping, a budget, a cancel) takes effect at the trial's next ``report``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import statistics
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.engine.executor import Event, Report, Segment, Started, TrialEnd
from automl.engine.records import TrialKey

if TYPE_CHECKING:
    from automl.trainer import TrainerRef

COMPLETE, STOPPED, FAILED, PAUSED = "COMPLETE", "STOPPED", "FAILED", "PAUSED"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % (2**32))
    if "torch" in sys.modules:  # seed torch only if the trainer uses it; never import it for nothing
        sys.modules["torch"].manual_seed(seed)


class TrialRunner:
    """Runs one trial at a time (the Ray actor class is made from it in ``automl.engine.pool``)."""

    def __init__(self, threads: int) -> None:
        self._threads = max(1, threads)
        self._loaded: dict[tuple[str, str | None], tuple[Callable[..., Any], float | None]] = {}
        self._imports: Counter[str] = Counter()
        self._stop: set[TrialKey] = set()
        # One import at a time: a warm-up ``load`` (for a sweep starting) runs in the actor's second thread while a
        # trial of another sweep may start in the first; a trial must never see a half-imported torch.
        self._loading = threading.Lock()

    def ready(self) -> int:
        return os.getpid()

    def imports(self) -> dict[str, int]:
        """How many times this worker imported each trainer (by target): once, however many sweeps ran it."""
        return dict(self._imports)

    def load(self, trainer: TrainerRef) -> bool:
        """Import ``trainer`` (and run its warm-up hook) unless this worker already has it; True if it did now."""
        return self._fit(trainer)[1]

    def _fit(self, trainer: TrainerRef) -> tuple[Callable[..., Any], bool]:
        with self._loading:
            return self._fit_unlocked(trainer)

    def _fit_unlocked(self, trainer: TrainerRef) -> tuple[Callable[..., Any], bool]:
        cache_key = (trainer.target, trainer.search_path)
        mtime = _module_mtime(trainer)
        cached = self._loaded.get(cache_key)
        if cached is not None and cached[1] == mtime:
            return cached[0], False
        forget_other_copy(trainer, edited=cached is not None)
        fit = trainer.load()
        warmup = getattr(getattr(fit, "__self__", None), "warmup", None)
        if callable(warmup):
            warmup()
        self._loaded[cache_key] = (fit, mtime)
        self._imports[trainer.target] += 1
        return fit, True

    def _limit_threads(self) -> None:
        """Keep torch to the trial's CPUs (Ray sets OMP_NUM_THREADS likewise): no oversubscription."""
        torch = sys.modules.get("torch")  # only if the trainer uses it; never import it for nothing
        if torch is not None and torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)

    @staticmethod
    def _where() -> tuple[str | None, list[str] | None, str | None]:
        from automl import trainer

        try:
            import ray

            if not ray.is_initialized():  # the in-process executor: asking Ray would start one (auto-init)
                return None, None, trainer.DEVICE_NOTE
            ctx = ray.get_runtime_context()
            return ctx.get_node_id(), [str(g) for g in ray.get_gpu_ids()], trainer.DEVICE_NOTE
        except Exception:
            return None, None, trainer.DEVICE_NOTE

    def stop(self, key: TrialKey) -> None:
        self._stop.add(key)

    def run(self, key: TrialKey, trainer: TrainerRef, params: dict[str, Any], data: Any, seed: int,
            segment: Segment | None = None, predictions: bool = False) -> Iterator[list[Event]]:
        """Generator of lists of events: ``Started`` first, then ``Report``s, the last list ending with the
        trial's ``TrialEnd``. With a ``segment`` (method: pbt) the trainer starts from its checkpoint and the trial
        ends PAUSED, with the trainer's checkpoint, at the report of step ``segment.until``."""
        from automl import trainer as contract
        from automl.bundle import pack_model
        from automl.trainer import StopTrial

        try:
            fit, imported = self._fit(trainer)
        except BaseException as exc:
            yield [Started(key, 0.0, False), TrialEnd(key, FAILED, 0.0, error=f"trainer '{trainer.name}' failed to "
                                                      f"load: {type(exc).__name__}: {exc}"[:2000],
                                                      traceback=traceback.format_exc())]
            return
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        stop = self._stop

        def plain(step: int, metrics: Any) -> None:
            clean = {str(k): float(v) for k, v in dict(metrics).items()}
            events.put(Report(key, int(step), clean))  # the epoch was trained: record it, stop or not
            if key in stop:
                raise StopTrial

        report: Any = plain if segment is None else SegmentReport(plain, segment)

        def target() -> None:
            start = time.perf_counter()
            try:
                with self._loading:  # never beside a half-done import (a warm-up load in the other thread)
                    # What a previous trial in this worker may have left behind.
                    contract.DEVICE_NOTE = None
                    self._limit_threads()
                    _seed_everything(seed)
                held_out: list[Any] | None = [] if predictions else None
                if isinstance(data, list):  # k-fold (data.validation.folds): one training per fold
                    model = fit_folds(fit, params, data, report, seed, lambda: key in stop, predictions=held_out)
                else:
                    model = fit(dict(params), data, report)
                    if held_out is not None:
                        held_out.append(_held_out_predictions(model, data))
                seconds = time.perf_counter() - start
                end = TrialEnd(key, COMPLETE, seconds)
                if held_out and all(p is not None for p in held_out):
                    import numpy as np

                    end.predictions = np.concatenate(held_out)
                try:
                    end.model = pack_model(model)
                    if end.model is None and model is not None:
                        end.model_note = f"{type(model).__name__} has no safe save format; not exportable"
                except Exception as exc:
                    end.model_note = f"saving the model failed: {exc!r}"
            except SegmentDone as done:
                end = TrialEnd(key, PAUSED, time.perf_counter() - start, checkpoint=done.checkpoint, step=done.step)
            except StopTrial:
                end = TrialEnd(key, STOPPED, time.perf_counter() - start)
            except BaseException as exc:
                end = TrialEnd(
                    key, FAILED, time.perf_counter() - start,
                    error=f"{type(exc).__name__}: {exc}"[:2000], traceback=traceback.format_exc(),
                )
            try:
                end.node, end.gpus, end.device_note = self._where()
            finally:
                events.put(end)  # whatever happens, the trial ends: the driver must never wait on a dead thread

        thread = threading.Thread(target=target, name=f"trial-{key}", daemon=True)
        thread.start()
        yield [Started(key, 0.0, imported)]  # the trial's clock (budget.trial_time) starts now, not when queued
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
                stop.discard(key)
                return


class SegmentDone(BaseException):
    """A PBT segment reached its last step: the trainer is stopped there (as by ``StopTrial``: a trainer's
    ``except Exception`` does not catch it) and its checkpoint goes back to the driver."""

    def __init__(self, step: int, checkpoint: bytes) -> None:
        super().__init__(step)
        self.step = step
        self.checkpoint = checkpoint


class SegmentReport:
    """``report`` for one PBT segment: what ``automl.trainer.wants_checkpoints`` and ``restored_checkpoint``
    read, and the cut at ``segment.until``."""

    checkpoints = True

    def __init__(self, plain: Callable[[int, Any], None], segment: Segment) -> None:
        self._plain = plain
        self._until = segment.until
        self.restored = segment.checkpoint

    def __call__(self, step: int, metrics: Any, checkpoint: Callable[[], bytes] | None = None) -> None:
        self._plain(step, metrics)  # a stop request (StopTrial) wins over the segment's end
        if self._until is not None and int(step) >= self._until:
            if checkpoint is None:
                raise RuntimeError("the trainer reported without checkpoint=, which method: pbt needs at every "
                                   "report (see automl.trainer)")
            data = checkpoint()
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"checkpoint() must return bytes (got {type(data).__name__})")
            raise SegmentDone(int(step), bytes(data))


def _module_file(trainer: TrainerRef) -> Path | None:
    """The file of a ``module:function`` trainer next to a spec (None for installed trainers)."""
    if not trainer.search_path:
        return None
    module = trainer.target.partition(":")[0]
    base = Path(trainer.search_path, *module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_mtime(trainer: TrainerRef) -> float | None:
    file = _module_file(trainer)
    try:
        return file.stat().st_mtime if file is not None else None
    except OSError:
        return None


def forget_other_copy(trainer: TrainerRef, *, edited: bool = False) -> None:
    """A worker serves many sweeps: two may have a ``my_trainers.py`` in different folders, or the file changed
    since this worker imported it. Python caches one module per name, so another copy is forgotten first, and the
    trainer's folder goes first on the import path."""
    file = _module_file(trainer)
    if file is None or trainer.search_path is None:
        return
    module = trainer.target.partition(":")[0]
    top = module.split(".")[0]
    loaded = sys.modules.get(module)
    same = loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == file.resolve()
    if loaded is not None and (edited or not same):
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]
    with contextlib.suppress(ValueError):
        sys.path.remove(trainer.search_path)  # TrainerRef.load puts it back, first


def _held_out_predictions(model: Any, data: Any) -> Any:
    """The model's predictions on the validation rows, or None for a model that cannot give them (a user's trainer
    returning None or an object without predict_proba): such a trial is simply no ensemble candidate."""
    import warnings

    from automl.ensemble import validation_predictions

    try:
        with warnings.catch_warnings():
            # The folds come read-only from Ray's object store; torch warns on wrapping them, and only reads them.
            warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
            return validation_predictions(model, data)
    except Exception:
        return None


def fit_folds(
    fit: Any, params: dict[str, Any], folds: list[Any], report: Any, seed: int, stop_requested: Callable[[], bool],
    *, predictions: list[Any] | None = None,
) -> Any:
    """Train once per fold, one fold after another, and report the mean over folds; return fold 1's model.

    ``predictions``: a list that receives each fold's model's predictions on that fold's validation rows (the
    out-of-fold predictions, in fold order), for ensemble selection.

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
        if predictions is not None:
            predictions.append(_held_out_predictions(model, fold))
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
