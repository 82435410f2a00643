"""The search state's journal: a line cut short by a kill is dropped; damage anywhere else is refused, and the
file is left exactly as it was (dropping everything after a bad line would erase finished trials)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from automl.journal import JournalDamaged, SingleWriterJournal, open_storage


def journal_with_trials(path: Path, n: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=open_storage(path), study_name="s")
    for i in range(n):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        study.tell(trial, float(i))


def test_a_line_cut_short_at_the_end_is_dropped_and_the_trials_before_it_kept(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    journal_with_trials(path, 3)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code": 4, "worker_id": "w", "study_id"')  # a kill in the middle of a write
    study = optuna.load_study(study_name="s", storage=open_storage(path))
    assert [t.value for t in study.trials] == [0.0, 1.0, 2.0]
    assert path.read_bytes() == whole  # the partial line is gone; the next append starts on a clean line


@pytest.mark.parametrize("damage", [b"not json at all", b"[1, 2, 3]", b'{"op_code": 4,'])
def test_damage_before_the_last_line_is_refused_in_one_line_and_the_file_is_left_as_it_was(
    tmp_path: Path, damage: bytes
) -> None:
    path = tmp_path / "study.journal"
    journal_with_trials(path, 3)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = damage + b"\n"
    path.write_bytes(b"".join(lines))
    before = path.read_bytes()
    with pytest.raises(JournalDamaged) as info:
        SingleWriterJournal(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"line 3 of {len(lines)} is damaged" in message
    assert "left as it was" in message
    assert path.read_bytes() == before  # nothing truncated, nothing rewritten


def test_a_complete_last_line_that_does_not_parse_is_damage_too(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    journal_with_trials(path, 1)
    path.write_bytes(path.read_bytes() + b"garbage\n")
    before = path.read_bytes()
    with pytest.raises(JournalDamaged):
        SingleWriterJournal(path)
    assert path.read_bytes() == before
