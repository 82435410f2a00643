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
    if state.parent_run_id is None:
        raise AutoMLError(f"sweep {state.sweep_id} stopped before it started; run it again instead")
    return state


def journal_path(folder: Path) -> Path:
    return folder / "study.journal"


def best_bundle_path(folder: Path) -> Path:
    return folder / "best_model"
