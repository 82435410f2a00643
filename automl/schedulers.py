"""``early_stopping`` -> the "when" of a sweep: which running trial to stop.

Implemented with Optuna's pruners rather than Ray Tune's schedulers: they are the same algorithms (ASHA is
Optuna's ``SuccessiveHalvingPruner``, Hyperband its ``HyperbandPruner``, the median rule its ``MedianPruner``),
but their state is the study itself, which automl persists and resumes; a Ray Tune scheduler's state lives in
the driver and is lost with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from automl.spec import EarlyStoppingSpec


def make_pruner(spec: EarlyStoppingSpec, fixed: dict[str, Any]) -> optuna.pruners.BasePruner:
    import optuna

    if spec.method == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.min_epochs, reduction_factor=spec.reduction_factor
        )
    if spec.method == "hyperband":
        max_epochs = fixed.get("epochs")
        return optuna.pruners.HyperbandPruner(
            min_resource=spec.min_epochs,
            max_resource=int(max_epochs) if isinstance(max_epochs, int) else "auto",
            reduction_factor=spec.reduction_factor,
        )
    if spec.method == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=spec.min_epochs)
    return optuna.pruners.NopPruner()
