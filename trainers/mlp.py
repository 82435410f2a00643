"""The built-in ``mlp`` trainer: a multi-layer perceptron on tabular features (classification or regression).

Searchable parameters (all optional, defaults in ``DEFAULTS``): lr, batch_size, depth, width, activation
(relu, gelu, tanh, silu, leaky_relu, elu), dropout, optimizer (adam, adamw, sgd, rmsprop), momentum (sgd,
rmsprop), weight_decay, epochs. Reports every metric of DESIGN.md section 2 after each epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from automl.trainer import Dataset, Report, SavableModel, Trainer, device

DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "batch_size": 64,
    "depth": 2,
    "width": 128,
    "activation": "relu",
    "dropout": 0.0,
    "optimizer": "adam",
    "momentum": 0.9,
    "weight_decay": 0.0,
    "epochs": 20,
}
ACTIVATIONS = ("relu", "gelu", "tanh", "silu", "leaky_relu", "elu")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


def _check(params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"mlp: unknown parameter '{unknown[0]}'; it takes {', '.join(DEFAULTS)}")
    p = {**DEFAULTS, **params}
    if p["activation"] not in ACTIVATIONS:
        raise ValueError(f"mlp: activation must be one of {ACTIVATIONS} (got {p['activation']!r})")
    if p["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"mlp: optimizer must be one of {OPTIMIZERS} (got {p['optimizer']!r})")
    for key in ("depth", "width", "batch_size", "epochs"):
        if int(p[key]) < (0 if key == "depth" else 1):
            raise ValueError(f"mlp: {key} must be positive (got {p[key]})")
    return p


def build_network(n_in: int, n_out: int, depth: int, width: int, activation: str, dropout: float) -> Any:
    import torch.nn as nn

    act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU,
           "leaky_relu": nn.LeakyReLU, "elu": nn.ELU}[activation]
    layers: list[nn.Module] = []
    size = n_in
    for _ in range(depth):
        layers += [nn.Linear(size, width), act()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        size = width
    layers.append(nn.Linear(size, n_out))
    return nn.Sequential(*layers)


def _optimizer(name: str, parameters: Any, p: dict[str, Any]) -> Any:
    import torch

    lr, wd = float(p["lr"]), float(p["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=float(p["momentum"]), weight_decay=wd)
    return torch.optim.RMSprop(parameters, lr=lr, momentum=float(p["momentum"]), weight_decay=wd)


class MLPTrainer(Trainer):
    """Trains an MLP with minibatch gradient descent; one report per epoch."""

    def warmup(self) -> None:
        # torch's first forward/backward/step in a process pays one-off initialisation (about a second);
        # paying it here keeps it out of the first trial's time.
        import torch

        net = build_network(8, 2, depth=1, width=8, activation="relu", dropout=0.0)
        opt = torch.optim.Adam(net.parameters())
        loss = torch.nn.functional.cross_entropy(net(torch.zeros(4, 8)), torch.zeros(4, dtype=torch.long))
        loss.backward()
        opt.step()

    def fit(self, params: dict[str, Any], data: Dataset | None, report: Report) -> MLPModel:
        import torch

        if data is None:
            raise ValueError("mlp: needs data (add a data: section to the spec)")
        p = _check(params)
        dev = device()  # the GPU Ray assigned, else the CPU (with a warning if a GPU was asked for)
        classification = data.task == "classification"
        # Copies: arrays from Ray's object store are read-only, and torch must not write into them.
        X = torch.tensor(data.X_train)
        Xv = torch.tensor(data.X_val)
        if classification:
            y = torch.from_numpy(data.y_train.astype(np.int64))
            yv = torch.from_numpy(data.y_val.astype(np.int64))
            y_mean, y_std = 0.0, 1.0
            n_out = data.n_classes
            loss_fn: Any = torch.nn.CrossEntropyLoss()
        else:
            # Regression trains on a standardised target: one learning rate fits every target scale.
            y_mean = float(data.y_train.mean())
            y_std = float(data.y_train.std()) or 1.0
            y = torch.from_numpy(((data.y_train - y_mean) / y_std).astype(np.float32)).unsqueeze(1)
            yv = torch.from_numpy(((data.y_val - y_mean) / y_std).astype(np.float32)).unsqueeze(1)
            n_out = 1
            loss_fn = torch.nn.MSELoss()

        config = {"n_in": data.n_features, "n_out": n_out, "depth": int(p["depth"]), "width": int(p["width"]),
                  "activation": p["activation"], "dropout": float(p["dropout"])}
        net = build_network(**config).to(dev)
        X, Xv, y, yv = X.to(dev), Xv.to(dev), y.to(dev), yv.to(dev)
        opt = _optimizer(p["optimizer"], net.parameters(), p)
        batch = int(p["batch_size"])
        n = len(X)
        for epoch in range(int(p["epochs"])):
            net.train()
            order = torch.randperm(n)
            total = 0.0
            order = order.to(dev)
            for start in range(0, n, batch):
                idx = order[start:start + batch]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(X[idx]), y[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            net.eval()
            with torch.no_grad():
                out = net(Xv)
                val_loss = float(loss_fn(out, yv))
            out = out.cpu()
            if classification:
                proba = torch.softmax(out, dim=1).numpy()
                metrics = data.evaluate(proba.argmax(axis=1), proba=proba)
            else:
                metrics = data.evaluate(out.squeeze(1).numpy() * y_std + y_mean)
            metrics["train_loss"] = total / n
            metrics["val_loss"] = val_loss
            report(epoch + 1, metrics)
        return MLPModel(config, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                        task=data.task, y_mean=y_mean, y_std=y_std)


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


class MLPModel(SavableModel):
    """A trained MLP: architecture in JSON, weights in safetensors."""

    def __init__(self, config: dict[str, Any], state: dict[str, Any], *, task: str,
                 y_mean: float = 0.0, y_std: float = 1.0) -> None:
        self.config = config
        self.task = task
        self.y_mean = y_mean
        self.y_std = y_std
        self.net = build_network(**config)
        self.net.load_state_dict(state)
        self.net.eval()

    def _forward(self, X: np.ndarray) -> Any:
        import torch

        with torch.no_grad():
            return self.net(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        if self.task != "classification":
            raise NotImplementedError("a regression MLP gives no probabilities")
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
        (path / "mlp.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: Path) -> MLPModel:
        from safetensors.torch import load_file

        meta = json.loads((path / "mlp.json").read_text())
        state = load_file(str(path / "weights.safetensors"))
        return cls(meta["config"], state, task=meta["task"], y_mean=meta["y_mean"], y_std=meta["y_std"])
