"""The built-in ``mlp`` trainer: a multi-layer perceptron on tabular features (classification or regression).

Searchable parameters (all optional, defaults in ``DEFAULTS``): the network's depth, width, activation (relu,
gelu, tanh, silu, leaky_relu, elu), dropout and batch_norm, plus the training parameters every torch trainer
takes (``trainers/_torch.py``: lr, batch_size, optimizer, momentum, weight_decay, epochs, lr_schedule and its
lr_step_size / lr_gamma / lr_patience, grad_clip, l1, l2, loss, label_smoothing, huber_delta, class_weight,
patience). Reports every metric of DESIGN.md section 2 after each epoch.
"""

from __future__ import annotations

from typing import Any

from automl.trainer import Dataset, Report, Trainer, wants_checkpoints
from trainers._torch import (
    ACTIVATIONS,
    MUTABLE,
    OPTIMIZERS,
    TRAINING_DEFAULTS,
    TorchModel,
    check_batch_norm,
    check_float,
    check_int,
    check_params,
    check_task,
    export_head,
    output_size,
    train,
    warm_up,
)

__all__ = ["ACTIVATIONS", "DEFAULTS", "OPTIMIZERS", "MLPModel", "MLPTrainer", "build_network", "export_head"]

DEFAULTS: dict[str, Any] = {
    "depth": 2,
    "width": 128,
    "activation": "relu",
    "dropout": 0.0,
    "batch_norm": False,
    **TRAINING_DEFAULTS,
}


def _check(params: dict[str, Any]) -> dict[str, Any]:
    p = check_params("mlp", params, DEFAULTS)
    check_int("mlp", p, "depth", 0)
    check_int("mlp", p, "width", 1)
    check_float("mlp", p, "dropout", low=0.0, high=1.0, high_open=True)
    check_batch_norm("mlp", p)
    return p


def build_network(n_in: int, n_out: int, depth: int, width: int, activation: str, dropout: float,
                  batch_norm: bool = False, dropout_layers: bool = False) -> Any:
    """Linear -> [BatchNorm1d] -> activation -> [Dropout], ``depth`` times, then a linear output layer.

    ``dropout_layers`` keeps the dropout layers even at a rate of 0 (method: pbt, where the rate may change
    while training and every member's checkpoint must fit every other member's network)."""
    import torch.nn as nn

    from trainers._torch import activation as make_activation  # the parameter shadows the name

    layers: list[nn.Module] = []
    size = n_in
    for _ in range(depth):
        layers.append(nn.Linear(size, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(make_activation(activation))
        if dropout > 0 or dropout_layers:
            layers.append(nn.Dropout(dropout))
        size = width
    layers.append(nn.Linear(size, n_out))
    return nn.Sequential(*layers)


class MLPTrainer(Trainer):
    """Trains an MLP with minibatch gradient descent; one report per epoch; checkpoints for method: pbt."""

    checkpoints = True
    mutable = MUTABLE

    @classmethod
    def search_space(cls, task: str, n_rows: int) -> dict[str, Any] | None:
        # Patience ends a trial once val_loss stops improving, so a generous epoch cap costs little.
        return {
            "parameters": {
                "lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
                "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
                "depth": {"type": "int", "low": 1, "high": 3},
                "width": {"type": "int", "low": 32, "high": 256, "log": True},
                "dropout": {"type": "float", "low": 0.0, "high": 0.4, "step": 0.1},
                "weight_decay": {"type": "float", "low": 0.0, "high": 1e-3},
            },
            # Patience watches 15% of the training rows: choosing the epoch on the validation rows would flatter
            # the trial's score, and its out-of-fold predictions, on exactly the rows that rank it.
            "fixed": {"epochs": 60, "patience": 8, "patience_split": 0.15},
            "start": {"lr": 1e-3, "batch_size": 64, "depth": 2, "width": 128, "dropout": 0.0, "weight_decay": 0.0},
        }

    def warmup(self) -> None:
        import torch

        warm_up(build_network(8, 2, depth=1, width=8, activation="relu", dropout=0.0), torch.zeros(4, 8))

    def fit(self, params: dict[str, Any], data: Dataset | None, report: Report) -> MLPModel:
        if data is None:
            raise ValueError("mlp: needs data (add a data: section to the spec)")
        p = _check(params)
        check_task("mlp", p, data)
        config = {"n_in": data.n_features, "n_out": output_size(data), "depth": int(p["depth"]),
                  "width": int(p["width"]), "activation": p["activation"], "dropout": float(p["dropout"]),
                  "batch_norm": bool(p["batch_norm"])}
        if wants_checkpoints(report):
            config["dropout_layers"] = True
        fitted = train(build_network(**config), data, p, report)
        return MLPModel(config, fitted.state, task=data.task, y_mean=fitted.y_mean, y_std=fitted.y_std)


class MLPModel(TorchModel):
    """A trained MLP: architecture in JSON (mlp.json), weights in safetensors."""

    CONFIG_FILE = "mlp.json"

    @staticmethod
    def build(config: dict[str, Any]) -> Any:
        return build_network(**config)
