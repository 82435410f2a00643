"""The torch training pieces the ``mlp`` and ``cnn`` trainers share: their common parameters (optimizer,
learning-rate schedule, loss, regularisation, gradient clipping, class weights, patience), the epoch loop that
reports every metric once per epoch, and the saved-model class.

Features that are off cost nothing per batch: the inner loop is today's plain minibatch loop, and each optional
step (augmentation, L1/L2 penalty, gradient clipping) is one ``if`` on a value fixed before the loop.
"""

from __future__ import annotations

import json
import math
import numbers
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from automl.trainer import (
    CheckpointReport,
    Dataset,
    Report,
    SavableModel,
    device,
    restored_checkpoint,
    wants_checkpoints,
)

# The parameters every torch trainer takes, with their defaults (which keep the original mlp's behaviour).
TRAINING_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "batch_size": 64,
    "optimizer": "adam",
    "momentum": 0.9,        # sgd and rmsprop
    "weight_decay": 0.0,    # the optimizer's own decay, on every parameter (decoupled for adamw)
    "epochs": 20,
    "lr_schedule": "none",  # none | step | cosine | plateau
    "lr_step_size": 0,      # step: epochs between decays; 0 = a third of the epochs
    "lr_gamma": 0.1,        # step and plateau: the factor the learning rate is multiplied by
    "lr_patience": 2,       # plateau: epochs without a lower val_loss before a decay
    "grad_clip": 0.0,       # max gradient norm; 0 = off
    "l1": 0.0,              # penalty l1 * sum|w| on weights (not biases, not batch norm)
    "l2": 0.0,              # penalty l2 * sum w^2 on weights (not biases, not batch norm), for every optimizer
    "loss": "auto",         # auto | cross_entropy | mse | huber
    "label_smoothing": 0.0,  # cross_entropy
    "huber_delta": 1.0,     # huber, in standard deviations of the target (regression trains on a standardised one)
    "class_weight": None,   # None | balanced
    "patience": 0,          # stop after this many epochs without a lower val_loss, keep the best; 0 = off
    "patience_split": 0.0,  # > 0: patience watches this share of the training rows, not the validation rows
}
# What may change between two segments of one training (method: pbt): training settings the loop reads each epoch
# or writes into the optimizer. Not what shapes the network or the optimizer's state (depth, width, optimizer).
MUTABLE = frozenset({"lr", "momentum", "weight_decay", "batch_size", "grad_clip", "l1", "l2", "label_smoothing",
                     "dropout"})
CHECKPOINT_FORMAT = "automl-torch-checkpoint/1"
ACTIVATIONS = ("relu", "gelu", "tanh", "silu", "leaky_relu", "elu")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("none", "step", "cosine", "plateau")
LOSSES = ("auto", "cross_entropy", "mse", "huber")


def check_params(trainer: str, params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``params`` over ``defaults``, checked; a bad value raises ``ValueError`` naming the parameter."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"{trainer}: unknown parameter '{unknown[0]}'; it takes {', '.join(defaults)}")
    p = {**defaults, **params}
    for key, choices in (("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES), ("loss", LOSSES)):
        check_choice(trainer, p, key, choices)
    if "activation" in p:
        check_choice(trainer, p, "activation", ACTIVATIONS)
    if p["class_weight"] == "none":
        p["class_weight"] = None
    if p["class_weight"] not in (None, "balanced"):
        raise ValueError(f"{trainer}: class_weight must be null or balanced (got {p['class_weight']!r})")
    for key, low in (("batch_size", 1), ("epochs", 1), ("patience", 0), ("lr_step_size", 0), ("lr_patience", 0)):
        check_int(trainer, p, key, low)
    for key in ("lr", "huber_delta"):
        check_float(trainer, p, key, low=0.0, low_open=True)
    for key in ("momentum", "weight_decay", "grad_clip", "l1", "l2"):
        check_float(trainer, p, key, low=0.0)
    check_float(trainer, p, "label_smoothing", low=0.0, high=1.0, high_open=True)
    check_float(trainer, p, "patience_split", low=0.0, high=0.5, high_open=True)
    check_float(trainer, p, "lr_gamma", low=0.0, high=1.0, low_open=True)
    return p


def check_choice(trainer: str, p: dict[str, Any], key: str, choices: tuple[str, ...]) -> None:
    if p[key] not in choices:
        raise ValueError(f"{trainer}: {key} must be one of {', '.join(choices)} (got {p[key]!r})")


def check_int(trainer: str, p: dict[str, Any], key: str, low: int) -> None:
    """``p[key]`` an integer >= ``low`` (a float such as 3.0 is taken as 3); stored as an int."""
    value = p[key]
    whole = isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer()
    if not whole or float(value) < low:
        raise ValueError(f"{trainer}: {key} must be an integer >= {low} (got {value!r})")
    p[key] = int(float(value))


def check_float(trainer: str, p: dict[str, Any], key: str, *, low: float, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> None:
    """``p[key]`` a number in the range (open or closed at each end); stored as a float."""
    value = p[key]
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    inside = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not inside:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        rule = f"> {low:g}" if math.isinf(high) and low_open else f">= {low:g}" if math.isinf(high) else \
            f"in {lo}{low:g}, {high:g}{hi}"
        raise ValueError(f"{trainer}: {key} must be a number {rule} (got {value!r})")
    p[key] = number


def check_bool(trainer: str, p: dict[str, Any], key: str) -> None:
    if not isinstance(p[key], bool):
        raise ValueError(f"{trainer}: {key} must be true or false (got {p[key]!r})")


def check_batch_norm(trainer: str, p: dict[str, Any]) -> None:
    check_bool(trainer, p, "batch_norm")
    if p["batch_norm"] and p["batch_size"] < 2:  # batch norm cannot normalise a single row
        raise ValueError(f"{trainer}: batch_norm needs batch_size >= 2 (got {p['batch_size']})")


def check_task(trainer: str, p: dict[str, Any], data: Dataset) -> None:
    """The options that depend on the task: losses, label smoothing and class weights."""
    classification = data.task == "classification"
    loss = p["loss"]
    if classification and loss in ("mse", "huber"):
        raise ValueError(f"{trainer}: loss {loss} is for regression; classification takes cross_entropy (or auto)")
    if not classification and loss == "cross_entropy":
        raise ValueError(f"{trainer}: loss cross_entropy is for classification; regression takes mse or huber")
    if not classification and p["class_weight"] is not None:
        raise ValueError(f"{trainer}: class_weight balanced needs a classification task (this one is regression)")
    if not classification and float(p["label_smoothing"]) > 0:
        raise ValueError(f"{trainer}: label_smoothing needs a classification task (this one is regression)")


def activation(name: str) -> Any:
    import torch.nn as nn

    return {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU,
            "leaky_relu": nn.LeakyReLU, "elu": nn.ELU}[name]()


def make_optimizer(p: dict[str, Any], parameters: Any) -> Any:
    import torch

    name, lr, wd = p["optimizer"], float(p["lr"]), float(p["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=float(p["momentum"]), weight_decay=wd)
    return torch.optim.RMSprop(parameters, lr=lr, momentum=float(p["momentum"]), weight_decay=wd)


def make_schedule(p: dict[str, Any], opt: Any) -> Any:
    """The learning-rate scheduler, stepped once per epoch (``plateau`` with the epoch's val_loss), or None."""
    import torch

    name, epochs, gamma = p["lr_schedule"], int(p["epochs"]), float(p["lr_gamma"])
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=p["lr_step_size"] or max(1, epochs // 3), gamma=gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=gamma, patience=p["lr_patience"])
    return None


def make_loss(p: dict[str, Any], data: Dataset, dev: Any) -> Any:
    import torch

    if data.task == "classification":
        weight = torch.from_numpy(data.class_weights()).to(dev) if p["class_weight"] == "balanced" else None
        return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=float(p["label_smoothing"]))
    if p["loss"] == "huber":
        return torch.nn.HuberLoss(delta=float(p["huber_delta"]))
    return torch.nn.MSELoss()


def output_size(data: Dataset) -> int:
    return data.n_classes if data.task == "classification" else 1


def warm_up(net: Any, x: Any) -> None:
    """One forward, backward and optimizer step: torch's one-off initialisation (about a second per process)
    is paid in the trainer's ``warmup``, not in the first trial."""
    import torch

    opt = torch.optim.Adam(net.parameters())
    loss = torch.nn.functional.cross_entropy(net(x), torch.zeros(len(x), dtype=torch.long))
    loss.backward()
    opt.step()


@dataclass
class Fitted:
    state: dict[str, Any]  # the returned weights (CPU tensors): the best epoch's with patience, else the last's
    y_mean: float
    y_std: float
    best_epoch: int


def train(net: Any, data: Dataset, p: dict[str, Any], report: Report, *,
          augment: Callable[[Any], Any] | None = None, eval_rows: int | None = None) -> Fitted:
    """Train ``net`` (outputs: class logits, or one standardised target) with minibatches; report each epoch.

    Every report has the metrics of ``Dataset.evaluate`` plus ``train_loss`` (the mean training loss of the
    epoch, penalties excluded) and ``val_loss`` (the same loss function, class weights and label smoothing
    included, on the validation split). With ``patience`` the loop stops after ``patience`` epochs without a
    lower val_loss, every report carries ``best_epoch``, and when the best epoch was not the last one a final
    report (step: last epoch + 1) repeats the best epoch's metrics: the sweep takes a trial's last report as
    its value, so the trial's value, its metrics and the returned weights all come from the best epoch.
    With ``patience_split`` > 0, that share of the training rows (drawn from numpy's seeded generator) is held
    out of training and decides the best epoch instead of the validation rows, so the validation metrics (and
    out-of-fold predictions) of the returned weights are not chosen on the very rows they are measured on.
    ``augment`` transforms each training batch; ``eval_rows`` bounds the rows per validation forward pass.
    """
    import torch

    dev = device()  # the GPU Ray assigned, else the CPU (with a warning if a GPU was asked for)
    classification = data.task == "classification"
    # Copies: arrays from Ray's object store are read-only, and torch must not write into them.
    X = torch.tensor(data.X_train)
    Xv = torch.tensor(data.X_val)
    if classification:
        y = torch.from_numpy(data.y_train.astype(np.int64))
        yv = torch.from_numpy(data.y_val.astype(np.int64))
        y_mean, y_std = 0.0, 1.0
    else:
        # Regression trains on a standardised target: one learning rate fits every target scale.
        y_mean = float(data.y_train.mean())
        y_std = float(data.y_train.std()) or 1.0
        y = torch.from_numpy(((data.y_train - y_mean) / y_std).astype(np.float32)).unsqueeze(1)
        yv = torch.from_numpy(((data.y_val - y_mean) / y_std).astype(np.float32)).unsqueeze(1)
    batch, epochs, patience = int(p["batch_size"]), int(p["epochs"]), int(p["patience"])
    stop_X = stop_y = None  # the rows patience watches (None: the validation rows)
    held = round(float(p["patience_split"]) * len(X)) if patience else 0
    if 0 < held < len(X):
        order = torch.from_numpy(np.random.permutation(len(X)))
        stop_X, stop_y = X[order[:held]].to(dev), y[order[:held]].to(dev)
        X, y = X[order[held:]], y[order[held:]]
    net = net.to(dev)
    X, Xv, y, yv = X.to(dev), Xv.to(dev), y.to(dev), yv.to(dev)
    loss_fn = make_loss(p, data, dev)
    opt = make_optimizer(p, net.parameters())
    schedule = make_schedule(p, opt)
    plateau = isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau)
    # method: pbt trains in segments: each continues from the checkpoint the last one (or its source) reported.
    segments = wants_checkpoints(report)
    first = 1
    restored = restored_checkpoint(report) if segments else None
    if restored is not None:
        first = load_checkpoint(restored, net, opt, schedule, p, dev) + 1
    if segments:
        set_dropout(net, float(p.get("dropout", 0.0)))
    l1, l2, clip = float(p["l1"]), float(p["l2"]), float(p["grad_clip"])
    penalised = [w for w in net.parameters() if w.ndim > 1]  # weight matrices and kernels
    n = len(X)
    # Batch norm cannot normalise a batch of one row: such a last batch is left out of the epoch.
    has_bn = any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in net.modules())
    end = n - 1 if has_bn and n % batch == 1 and n > 1 else n
    seen = sum(min(batch, end - s) for s in range(0, end, batch))

    best_loss, best_epoch = float("inf"), 0
    best_metrics: dict[str, float] = {}
    best_state: dict[str, Any] | None = None
    epoch = first - 1
    for epoch in range(first, epochs + 1):
        net.train()
        order = torch.randperm(n).to(dev)
        total = 0.0
        for start in range(0, end, batch):
            idx = order[start:start + batch]
            xb = X[idx]
            if augment is not None:
                xb = augment(xb)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), y[idx])
            total += loss.item() * len(idx)
            if l1 or l2:
                loss = loss + _penalty(penalised, l1, l2)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
        net.eval()
        with torch.no_grad():
            if eval_rows is None or len(Xv) <= eval_rows:
                out = net(Xv)
            else:
                out = torch.cat([net(Xv[s:s + eval_rows]) for s in range(0, len(Xv), eval_rows)])
            val_loss = float(loss_fn(out, yv))
        out = out.float().cpu()
        if classification:
            proba = torch.softmax(out, dim=1).numpy()
            metrics = data.evaluate(proba.argmax(axis=1), proba=proba)
        else:
            metrics = data.evaluate(out.squeeze(1).numpy() * y_std + y_mean)
        metrics["train_loss"] = total / max(seen, 1)
        metrics["val_loss"] = val_loss
        if plateau:
            schedule.step(val_loss)
        elif schedule is not None:
            schedule.step()
        if patience:
            watched = val_loss
            if stop_X is not None:
                with torch.no_grad():
                    watched = float(loss_fn(net(stop_X), stop_y))
            if watched < best_loss:
                best_loss, best_epoch, best_metrics = watched, epoch, metrics
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            metrics["best_epoch"] = float(best_epoch)
        if segments:
            def save(epoch: int = epoch) -> bytes:
                return save_checkpoint(net, opt, schedule, epoch)

            checkpointing: CheckpointReport = report  # type: ignore[assignment]
            checkpointing(epoch, metrics, checkpoint=save)
        else:
            report(epoch, metrics)
        if patience and epoch - best_epoch >= patience:
            break
    if best_state is not None:
        if best_epoch != epoch:
            report(epoch + 1, best_metrics)
        net.load_state_dict(best_state)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return Fitted(state=state, y_mean=y_mean, y_std=y_std, best_epoch=best_epoch or epoch)


# --------------------------------------------------------------------------------------------- checkpoints


def set_dropout(net: Any, rate: float) -> None:
    """A mutable dropout takes effect in the network's dropout layers (they hold no weights)."""
    import torch

    for module in net.modules():
        if isinstance(module, (torch.nn.Dropout, torch.nn.Dropout2d)):
            module.p = rate


def save_checkpoint(net: Any, opt: Any, schedule: Any, epoch: int) -> bytes:
    """Weights, optimizer state, scheduler state and the epoch as one safetensors blob: tensors as tensors, the
    rest in a JSON header tensor (safetensors holds no Python objects, so loading runs no code)."""
    import torch
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    schedule_state = None
    if schedule is not None:
        try:
            schedule_state = json.loads(json.dumps(schedule.state_dict()))
        except (TypeError, ValueError):  # a schedule holding objects JSON cannot: it restarts on restore
            schedule_state = None
    header = {"format": CHECKPOINT_FORMAT, "epoch": int(epoch), "param_groups": state["param_groups"],
              "scalars": scalars, "schedule": schedule_state}
    tensors["__header__"] = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
    return bytes(save(tensors))


def load_checkpoint(data: bytes, net: Any, opt: Any, schedule: Any, p: dict[str, Any], dev: Any) -> int:
    """Restore what ``save_checkpoint`` wrote into ``net``, ``opt`` and ``schedule``, then apply the current
    ``params`` (a mutable learning rate, momentum or weight decay may have changed since); returns its epoch."""
    from safetensors.torch import load

    tensors = load(data)
    header = json.loads(bytes(tensors.pop("__header__").numpy()).decode())
    if header.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a checkpoint of automl's torch trainers (format {header.get('format')!r})")
    net.load_state_dict({k[len("model."):]: v.to(dev) for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value.to(dev) if value.ndim else value
    for index, extra in header["scalars"].items():
        slots.setdefault(int(index), {}).update(extra)
    groups = header["param_groups"]
    for group in groups:  # JSON turned Adam's betas tuple into a list
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    opt.load_state_dict({"state": slots, "param_groups": groups})
    lr = float(p["lr"])
    for group in opt.param_groups:
        scale = 1.0
        if schedule is not None and header["schedule"] is not None and "base_lrs" in header["schedule"]:
            base = header["schedule"]["base_lrs"][0] or 1.0
            scale = group["lr"] / base  # the schedule's progress so far, carried over to the new rate
        group["lr"] = lr * scale
        group["weight_decay"] = float(p["weight_decay"])
        if "momentum" in group and p["optimizer"] in ("sgd", "rmsprop"):
            group["momentum"] = float(p["momentum"])
    if schedule is not None and header["schedule"] is not None:
        schedule.load_state_dict(header["schedule"])
        if hasattr(schedule, "base_lrs"):
            schedule.base_lrs = [lr for _ in schedule.base_lrs]
    return int(header["epoch"])


def _penalty(weights: list[Any], l1: float, l2: float) -> Any:
    total: Any = 0.0
    for w in weights:
        if l1:
            total = total + l1 * w.abs().sum()
        if l2:
            total = total + l2 * w.pow(2).sum()
    return total


# --------------------------------------------------------------------------------------------- saved models


def _export_head_class() -> Any:
    import torch

    class ExportHead(torch.nn.Module):
        """The network plus its output transform (softmax, or the target's scale): what ONNX and TorchScript
        exports compute, so they need nothing but the preprocessing besides."""

        def __init__(self, net: Any, task: str, y_mean: float, y_std: float) -> None:
            super().__init__()
            self.net = net
            self.classification = task == "classification"
            self.y_mean = float(y_mean)
            self.y_std = float(y_std)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.net(x)
            if self.classification:
                return torch.softmax(out, dim=1)
            return out[:, 0] * self.y_std + self.y_mean

    return ExportHead


def export_head(net: Any, task: str, y_mean: float, y_std: float) -> Any:
    return _export_head_class()(net, task, y_mean, y_std)


_M = TypeVar("_M", bound="TorchModel")


class TorchModel(SavableModel):
    """A trained torch network on flat float32 rows: architecture in JSON, weights in safetensors."""

    CONFIG_FILE: ClassVar[str]

    def __init__(self, config: dict[str, Any], state: dict[str, Any], *, task: str,
                 y_mean: float = 0.0, y_std: float = 1.0) -> None:
        self.config = config
        self.task = task
        self.y_mean = y_mean
        self.y_std = y_std
        self.net = self.build(config)
        self.net.load_state_dict(state)
        self.net.eval()

    @staticmethod
    @abstractmethod
    def build(config: dict[str, Any]) -> Any:
        """The untrained network that ``config`` describes."""

    def _forward(self, X: np.ndarray) -> Any:
        import torch

        with torch.no_grad():
            return self.net(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        if self.task != "classification":
            raise NotImplementedError(f"a regression {type(self).__name__} gives no probabilities")
        return torch.softmax(self._forward(X), dim=1).numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        out = self._forward(X).numpy()
        if self.task == "classification":
            return out.argmax(axis=1)
        return out[:, 0] * self.y_std + self.y_mean

    def torch_module(self) -> Any:
        return export_head(self.net, self.task, self.y_mean, self.y_std).eval()

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path / "weights.safetensors"))
        meta = {"config": self.config, "task": self.task, "y_mean": self.y_mean, "y_std": self.y_std}
        (path / self.CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls: type[_M], path: Path) -> _M:
        from safetensors.torch import load_file

        meta = json.loads((path / cls.CONFIG_FILE).read_text())
        state = load_file(str(path / "weights.safetensors"))
        return cls(meta["config"], state, task=meta["task"], y_mean=meta["y_mean"], y_std=meta["y_std"])
