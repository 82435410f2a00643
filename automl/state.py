"""The orchestrator's own state folder (``.automl/`` in the working directory by default).

One sub-folder per sweep: ``sweep.json`` (what resume and export need to find the sweep again), the Optuna
study journal (the search state: every trial, its parameters, intermediate values and state) and the best
model bundle so far. MLflow stays the system of record; this folder is what a resume starts from.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_DIR = ".automl"


def state_root(workdir: Path | None = None) -> Path:
    env = os.environ.get("AUTOML_STATE_DIR")
    if env:
        return Path(env)
    return (workdir or Path.cwd()) / STATE_DIR


@dataclass
class SweepState:
    sweep_id: str
    name: str
    spec: dict[str, Any]
    base_dir: str
    tracking_uri: str
    status: str = "RUNNING"  # RUNNING | FINISHED | FAILED | KILLED
    experiment_id: str | None = None
    parent_run_id: str | None = None
    created: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def folder(root: Path, sweep_id: str) -> Path:
        return root / sweep_id

    def save(self, root: Path) -> Path:
        folder = self.folder(root, self.sweep_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "sweep.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2, default=str))
        os.replace(tmp, folder / "sweep.json")  # atomic: a kill never leaves a half-written file
        return folder

    @classmethod
    def load(cls, folder: Path) -> SweepState:
        return cls(**json.loads((folder / "sweep.json").read_text()))


def reserve_sweep_id(root: Path, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``...: the first id whose folder this call could create (atomic)."""
    root.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        sweep_id = base if n == 1 else f"{base}-{n}"
        try:
            (root / sweep_id).mkdir()
            return sweep_id
        except FileExistsError:
            n += 1


def find_unfinished(sweep: str, workdir: Path | None = None) -> SweepState:
    """The sweep with that id, or the latest not-finished sweep with that name."""
    from automl.errors import AutoMLError, SweepNotFoundError

    root = state_root(workdir)
    exact = root / sweep / "sweep.json"
    if exact.is_file():
        state = SweepState.load(exact.parent)
    else:
        candidates = []
        for file in root.glob("*/sweep.json") if root.is_dir() else []:
            try:
                found = SweepState.load(file.parent)
            except (OSError, ValueError, TypeError):
                continue
            if found.name == sweep and found.status != "FINISHED":
                candidates.append(found)
        if not candidates:
            raise SweepNotFoundError(
                f"no unfinished sweep named '{sweep}' in {root}; `automl status` lists the sweeps")
        state = max(candidates, key=lambda st: st.created)
    if state.status == "FINISHED":
        raise AutoMLError(f"sweep {state.sweep_id} already finished; there is nothing to resume")
    folder = SweepState.folder(root, state.sweep_id)
    if SweepLock.held(folder):
        # A live driver holds it: say so (in the lock's words) before judging how far it got.
        SweepLock(folder).acquire(state.sweep_id).release()  # raises while held; released if it just ended
    journal = journal_path(folder)
    if state.parent_run_id is None and not state.extra.get("storage") and (
            not journal.exists() or b'"op_code":4' not in journal.read_bytes()):
        # Killed before its first trial: nothing to resume. (Killed after it, but before its MLflow run's id was
        # saved here, it resumes: the parent run is found by its sweep id, or made again.)
        raise AutoMLError(f"sweep {state.sweep_id} stopped before it started; run it again instead")
    return state


def find_running(sweep: str, workdir: Path | None = None) -> SweepState:
    """The running sweep with that id, or the latest running one with that name (its driver holds its folder)."""
    from automl.errors import AutoMLError, SweepNotFoundError

    root = state_root(workdir)
    states = []
    for file in root.glob("*/sweep.json") if root.is_dir() else []:
        try:
            found = SweepState.load(file.parent)
        except (OSError, ValueError, TypeError):
            continue
        if found.sweep_id == sweep or found.name == sweep:
            states.append(found)
    if not states:
        raise SweepNotFoundError(f"no sweep named '{sweep}' in {root}; `automl status` lists the sweeps")
    running = [st for st in states if SweepLock.held(SweepState.folder(root, st.sweep_id))]
    if not running:
        latest = max(states, key=lambda st: st.created)
        raise AutoMLError(f"sweep {latest.sweep_id} is not running (it is {latest.status}); `automl resume "
                          f"{latest.sweep_id}` continues an interrupted sweep")
    exact = [st for st in running if st.sweep_id == sweep]
    return exact[0] if exact else max(running, key=lambda st: st.created)


def journal_path(folder: Path) -> Path:
    return folder / "study.journal"


def best_bundle_path(folder: Path) -> Path:
    return folder / "best_model"


def trial_bundle_path(folder: Path, number: int) -> Path:
    """Where the model of trial ``number`` is kept while it is (or is about to become) the best."""
    return folder / "models" / f"trial-{number:05d}"


def log_path(root: Path) -> Path:
    """What libraries print (Ray's start-up lines, MLflow's migrations, the writer's errors): not the terminal."""
    return root / "automl.log"


LOCK_FILE = "driver.lock"


class SweepLock:
    """An exclusive lock on a sweep's state folder, held by its one driver for the driver's whole life.

    Two drivers on one journal would both hand out the same trial numbers and lose results; the second
    ``run``/``resume`` is refused in one line that names the process holding the sweep. The lock is the
    operating system's (``flock``): it goes with the process, however it dies, so a killed driver never
    leaves a stale lock behind.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None

    def acquire(self, sweep_id: str) -> SweepLock:
        import fcntl
        import socket
        import sys
        import time

        from automl.errors import AutoMLError

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _lock_holder(path)
            raise AutoMLError(
                f"sweep {sweep_id} is already running{holder}; wait for it to end, or stop it "
                "(Ctrl-C in its terminal, or kill -TERM the process) and then resume it") from None
        # The program and its subcommand only: later arguments may hold a password (--tracking-uri).
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:2]]) if sys.argv else "python"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def held(folder: Path) -> bool:
        """Whether a driver holds this sweep's folder now (it is running somewhere on this machine)."""
        import fcntl

        path = folder / LOCK_FILE
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (a new driver rewrites it)
            self._fd = None

    def __enter__(self) -> SweepLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_holder(path: Path) -> str:
    import time

    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return ""
    if not info.get("pid"):
        return ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    return f" in process {info['pid']} on {info.get('host', '?')} (`{info.get('command', 'automl')}`, since {since})"


# --------------------------------------------------------------------------------------------- the best model


def save_best_bundle(folder: Path, number: int, packed: Any, prepared: Any, info: dict[str, Any]) -> Path:
    """Keep the model of trial ``number``, the best so far, on disk: a killed sweep still has it when resumed.

    Each candidate is written whole under ``models/trial-N`` (to a temporary name, then renamed), then the
    ``best_model`` link is swapped to it atomically; the previous best stays until the new one is told to Optuna
    (``drop_other_bundles``). A crash at any point leaves the bundle of every trial the search state may call best.
    """
    import shutil

    from automl.bundle import write_bundle

    target = trial_bundle_path(folder, number)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_bundle(tmp, packed, prepared, info=info)
    shutil.rmtree(target, ignore_errors=True)  # a re-run of a trial cut short after its model was saved
    os.replace(tmp, target)
    link = best_bundle_path(folder)
    new_link = link.with_name(link.name + ".new")
    if new_link.is_symlink() or new_link.exists():
        new_link.unlink()
    new_link.symlink_to(target.relative_to(folder), target_is_directory=True)
    if link.is_dir() and not link.is_symlink():  # the layout of older versions: one plain folder
        shutil.rmtree(link)
    os.replace(new_link, link)
    return target


def drop_other_bundles(folder: Path, keep: int) -> None:
    """Once trial ``keep`` is told to Optuna as the best, the other saved models are no longer needed."""
    import shutil

    kept = trial_bundle_path(folder, keep)
    for path in kept.parent.glob("trial-*"):
        if path != kept:
            shutil.rmtree(path, ignore_errors=True)


def find_best_bundle(folder: Path, number: int) -> Path | None:
    """The saved model of trial ``number``, checked by its manifest: never the bundle of another trial."""
    for path in (trial_bundle_path(folder, number), best_bundle_path(folder)):
        try:
            trial = json.loads((path / "manifest.json").read_text()).get("trial")
        except (OSError, ValueError):
            continue
        if trial == number:
            return path
    return None
