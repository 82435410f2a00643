"""Greedy ensemble selection (Caruana et al., "Ensemble selection from libraries of models", ICML 2004), as
auto-sklearn and AutoGluon build their final ensembles, and the weighted-average model it yields.

Pure: arrays of validation (or out-of-fold) predictions in, weights out. A prediction is a probability matrix
``(rows, classes)`` for classification and a vector ``(rows,)`` for regression; the ensemble's prediction is the
weighted mean of its members' predictions. Selection adds, with replacement, the candidate that most improves
the ensemble's score, ``rounds`` times, and keeps the best round (so it never scores below the best single
candidate on the rows it was selected on, and ties keep the smaller ensemble).

Selecting on the same rows it is scored on flatters an ensemble. ``choose`` therefore scores the two procedures
("the best single candidate" and "greedy selection") on held-out row groups: for each group, each procedure
chooses on the other groups' rows and is scored on the group's rows. The ensemble is used only when its held-out
score beats the single best's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from automl.trainer import Dataset, SavableModel

# (targets, prediction) -> score, higher is better (a minimised metric is negated by the caller).
Scorer = Callable[[np.ndarray, np.ndarray], float]
# Caruana et al. and auto-sklearn use 50 rounds with replacement; on a few hundred rows 25 reach the same
# ensembles in half the time (each round scores every candidate).
ROUNDS = 25
# The row groups used to score the procedures when the predictions are from one validation split (k-fold
# predictions use their own folds).
HOLDOUT_GROUPS = 5


def greedy_weights(predictions: Sequence[np.ndarray], y: np.ndarray, score: Scorer, *, rounds: int = ROUNDS
                   ) -> np.ndarray:
    """The weights (summing to 1, one per candidate) greedy selection with replacement gives on these rows."""
    if not predictions:
        raise ValueError("greedy_weights: needs at least one candidate")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in predictions])
    total = np.zeros_like(stack[0])
    counts = np.zeros(len(stack))
    best_counts = counts
    best_score = -np.inf
    for size in range(1, rounds + 1):
        scores = [score(y, (total + candidate) / size) for candidate in stack]
        pick = int(np.argmax(scores))  # the first of equals: candidates come best first
        total += stack[pick]
        counts = counts.copy()
        counts[pick] += 1
        if scores[pick] > best_score + 1e-12:  # strictly better: a tie keeps the smaller ensemble
            best_score, best_counts = scores[pick], counts
    return best_counts / best_counts.sum()


def blend(predictions: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The weighted mean of the candidates' predictions."""
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in predictions])
    return np.tensordot(np.asarray(weights, dtype=np.float64), stack, axes=1)


@dataclass(frozen=True)
class Choice:
    """What ``choose`` decided, and the held-out scores it decided on."""

    weights: np.ndarray  # over the candidates; one 1.0 (the best candidate) when the ensemble did not win
    ensemble: bool
    single_held_out: float  # "the best single candidate", each group scored by a choice made on the others
    ensemble_held_out: float  # greedy selection, the same way

    @property
    def held_out(self) -> float:
        """The held-out score of the procedure chosen."""
        return self.ensemble_held_out if self.ensemble else self.single_held_out


def choose(predictions: Sequence[np.ndarray], y: np.ndarray, groups: np.ndarray, score: Scorer, *,
           rounds: int = ROUNDS) -> Choice:
    """Greedy ensemble or best single candidate, whichever scores higher on held-out row groups.

    ``predictions`` are the candidates' predictions for the same rows, best candidate first; ``groups`` gives each
    row's group (its fold). Returns the weights chosen on all rows.
    """
    y = np.asarray(y)
    groups = np.asarray(groups)
    single = np.empty_like(np.asarray(predictions[0], dtype=np.float64))
    ensemble = np.empty_like(single)
    for group in np.unique(groups):
        held, rest = groups == group, groups != group
        if not rest.any():
            raise ValueError("choose: needs at least two row groups")
        on_rest = [np.asarray(p)[rest] for p in predictions]
        best = int(np.argmax([score(y[rest], p) for p in on_rest]))
        single[held] = np.asarray(predictions[best])[held]
        weights = greedy_weights(on_rest, y[rest], score, rounds=rounds)
        ensemble[held] = blend([np.asarray(p)[held] for p in predictions], weights)
    single_score, ensemble_score = score(y, single), score(y, ensemble)
    if ensemble_score > single_score:
        return Choice(greedy_weights(predictions, y, score, rounds=rounds), True, single_score, ensemble_score)
    one = np.zeros(len(predictions))
    one[0] = 1.0
    return Choice(one, False, single_score, ensemble_score)


def holdout_groups(rows: int, seed: int, groups: int = HOLDOUT_GROUPS) -> np.ndarray:
    """Row groups for predictions from a single validation split: a seeded, balanced random assignment."""
    return np.random.default_rng(seed).permutation(np.arange(rows) % max(2, min(groups, rows)))


def validation_predictions(model: Any, data: Dataset) -> np.ndarray:
    """What greedy selection averages: ``model``'s probabilities (one column per class of the dataset, also for
    classes absent from its training rows) or values on ``data``'s validation rows, as float32."""
    if data.task != "classification":
        return np.asarray(model.predict(data.X_val), dtype=np.float32).reshape(-1)
    raw = np.asarray(model.predict_proba(data.X_val), dtype=np.float64)
    if raw.shape[1] != data.n_classes:
        classes = getattr(model, "classes_", None)
        if classes is None:
            raise ValueError(f"{type(model).__name__}: {raw.shape[1]} probability columns for {data.n_classes} "
                             "classes")
        full = np.zeros((len(raw), data.n_classes))
        full[:, np.asarray(classes, dtype=np.int64)] = raw
        raw = full
    return (raw / np.maximum(raw.sum(axis=1, keepdims=True), 1e-12)).astype(np.float32)


class EnsembleModel(SavableModel):
    """The weighted mean of fitted models' probabilities (classification) or predictions (regression).

    Saved by ``automl.bundle`` as one subfolder per member, each in the member's own safe format, plus the
    weights; loading checks every member as a model of its own is checked.
    """

    def __init__(self, members: Sequence[Any], weights: Sequence[float], *, task: str, n_classes: int = 0,
                 names: Sequence[str] = ()) -> None:
        if len(members) != len(weights) or not members:
            raise ValueError("EnsembleModel: needs one weight per member, at least one member")
        self.members = list(members)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.task = task
        self.n_classes = n_classes
        self.names = list(names) or [type(m).__name__ for m in members]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self.task != "classification":
            raise NotImplementedError("EnsembleModel: a regression ensemble gives no probabilities")
        probas = []
        for member in self.members:
            raw = np.asarray(member.predict_proba(X), dtype=np.float64)
            if raw.shape[1] != self.n_classes:  # a member that never saw a class in training
                full = np.zeros((len(raw), self.n_classes))
                full[:, np.asarray(member.classes_, dtype=np.int64)] = raw
                raw = full
            probas.append(raw / np.maximum(raw.sum(axis=1, keepdims=True), 1e-12))
        return blend(probas, self.weights)

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.task == "classification":
            return np.argmax(self.predict_proba(X), axis=1)
        return blend([np.asarray(m.predict(X), dtype=np.float64).reshape(-1) for m in self.members], self.weights)

    def save(self, path: Path) -> None:
        raise NotImplementedError("EnsembleModel is saved by automl.bundle.pack_model, member by member")

    @classmethod
    def load(cls, path: Path) -> EnsembleModel:
        raise NotImplementedError("EnsembleModel is loaded by automl.bundle, member by member")
