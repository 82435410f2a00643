"""The built-in ``cnn`` trainer: a small convolutional network on images (scikit-learn's digits, image folders).

Rows are images flattened in C-H-W order (``Dataset.image_shape``); the network reshapes them itself, so the
saved model, like the ONNX and TorchScript exports, takes the same flat float32 rows as every other model.

Architecture: ``depth`` blocks of Conv2d(kernel_size, same padding) -> [BatchNorm2d] -> activation -> [pool 2x2];
the first block has ``channels`` channels and each next block twice as many (the usual VGG-style trade: the
image shrinks, the channels grow). Pooling stops once the image is 1 pixel high or wide. Feature maps larger
than 4x4 are then average-pooled down to at most 4x4, and a linear layer (after dropout) gives the outputs.
Augmentation (training batches only): ``augment_shift`` random shifts of up to that many pixels (edges
replicated), ``augment_flip`` random horizontal flips: separate switches, since a flipped digit is another
symbol (keep flips for photographs).
"""

from __future__ import annotations

import math
from typing import Any

from automl.trainer import Dataset, Report, Trainer, wants_checkpoints
from trainers._torch import (
    MUTABLE,
    TRAINING_DEFAULTS,
    TorchModel,
    check_batch_norm,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_params,
    check_task,
    output_size,
    train,
    warm_up,
)

POOLINGS = ("max", "avg", "none")
DEFAULTS: dict[str, Any] = {
    "channels": 32,
    "kernel_size": 3,
    "depth": 2,
    "pooling": "max",
    "activation": "relu",
    "dropout": 0.0,
    "batch_norm": True,
    "augment_shift": 0,
    "augment_flip": False,
    **TRAINING_DEFAULTS,
    "epochs": 10,
}
MAX_HEAD_SIZE = 4  # feature maps are average-pooled to at most 4x4 before the linear layer
EVAL_ROWS = 1024  # validation images per forward pass: bounds the memory of large validation splits


def _check(params: dict[str, Any]) -> dict[str, Any]:
    p = check_params("cnn", params, DEFAULTS)
    for key, low in (("channels", 1), ("kernel_size", 1), ("depth", 1), ("augment_shift", 0)):
        check_int("cnn", p, key, low)
    if p["kernel_size"] % 2 == 0:
        raise ValueError(f"cnn: kernel_size must be odd (3, 5, 7) so that a convolution keeps the image size "
                         f"(got {p['kernel_size']})")
    check_choice("cnn", p, "pooling", POOLINGS)
    check_float("cnn", p, "dropout", low=0.0, high=1.0, high_open=True)
    check_batch_norm("cnn", p)
    check_bool("cnn", p, "augment_flip")
    return p


def image_shape(data: Dataset) -> tuple[int, int, int]:
    """(channels, height, width): the dataset's own, else a single-channel square image when the number of
    features is a perfect square (a table of pixels such as scikit-learn's digits)."""
    shape = getattr(data, "image_shape", None)
    n = data.n_features
    if shape is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cnn: the data are not images: no image shape is known and its {n} features are not "
                             f"a square number of pixels; use an image folder or sklearn:digits")
        return (1, side, side)
    c, h, w = (int(v) for v in shape)
    if c * h * w != n:
        raise ValueError(f"cnn: image shape {c}x{h}x{w} does not match the {n} features of a row")
    return (c, h, w)


def _divisor_at_most(size: int, limit: int) -> int:
    return max(d for d in range(1, min(size, limit) + 1) if size % d == 0)


def build_network(image_shape: list[int], n_out: int, channels: int, kernel_size: int, depth: int,
                  pooling: str, activation: str, dropout: float, batch_norm: bool, dropout_layers: bool = False
                  ) -> Any:
    """The network on flat rows ``(n, C*H*W)``; see the module docstring for its shape. ``dropout_layers`` keeps
    the dropout layer at a rate of 0 (method: pbt: the rate may change while training)."""
    import torch.nn as nn

    from trainers._torch import activation as make_activation  # the parameter shadows the name

    c, h, w = (int(v) for v in image_shape)
    layers: list[nn.Module] = [_Unflatten(c, h, w)]
    for block in range(depth):
        out = channels * 2**block
        layers.append(nn.Conv2d(c, out, kernel_size, padding=kernel_size // 2, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(make_activation(activation))
        if pooling != "none" and min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2) if pooling == "max" else nn.AvgPool2d(2))
            h, w = h // 2, w // 2
        c = out
    # A plain AvgPool2d whose kernel divides the map exactly (not an adaptive pool): it exports to ONNX as is.
    oh, ow = _divisor_at_most(h, MAX_HEAD_SIZE), _divisor_at_most(w, MAX_HEAD_SIZE)
    if (oh, ow) != (h, w):
        layers.append(nn.AvgPool2d((h // oh, w // ow)))
    layers.append(nn.Flatten())
    if dropout > 0 or dropout_layers:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(c * oh * ow, n_out))
    return nn.Sequential(*layers)


def _unflatten_class() -> Any:
    import torch

    class Unflatten(torch.nn.Module):
        """Flat rows (n, C*H*W) -> images (n, C, H, W); -1 keeps the batch axis dynamic in exports."""

        def __init__(self, c: int, h: int, w: int) -> None:
            super().__init__()
            self.c, self.h, self.w = c, h, w

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1, self.c, self.h, self.w)

    return Unflatten


def _Unflatten(c: int, h: int, w: int) -> Any:  # named as the module it builds
    return _unflatten_class()(c, h, w)


def make_augment(shape: tuple[int, int, int], shift: int, flip: bool) -> Any:
    """A function on a batch of flat rows: random shifts of up to ``shift`` pixels (edges replicated) and
    random horizontal flips, each image its own; None when both are off."""
    if not shift and not flip:
        return None
    import torch
    import torch.nn.functional as F

    c, h, w = shape

    def augment(xb: torch.Tensor) -> torch.Tensor:
        n = len(xb)
        x = xb.reshape(n, c, h, w)
        if shift:
            # Pad, then crop each image at its own random offset: one gather for the whole batch.
            padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
            dy = torch.randint(0, 2 * shift + 1, (n, 1), device=x.device)
            dx = torch.randint(0, 2 * shift + 1, (n, 1), device=x.device)
            rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(n, device=x.device)[:, None, None, None]
            channel = torch.arange(c, device=x.device)[None, :, None, None]
            x = padded[batch, channel, rows, cols]
        if flip:
            x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        return x.reshape(n, c * h * w)

    return augment


class CNNTrainer(Trainer):
    """Trains a small CNN with minibatch gradient descent; one report per epoch; checkpoints for method: pbt."""

    checkpoints = True
    mutable = MUTABLE

    def warmup(self) -> None:
        import torch

        net = build_network([1, 4, 4], 2, channels=2, kernel_size=3, depth=1, pooling="max", activation="relu",
                            dropout=0.0, batch_norm=True)
        warm_up(net, torch.zeros(4, 16))

    def fit(self, params: dict[str, Any], data: Dataset | None, report: Report) -> CNNModel:
        if data is None:
            raise ValueError("cnn: needs data (add a data: section to the spec: an image folder or sklearn:digits)")
        p = _check(params)
        check_task("cnn", p, data)
        shape = image_shape(data)
        config = {"image_shape": list(shape), "n_out": output_size(data), "channels": p["channels"],
                  "kernel_size": p["kernel_size"], "depth": p["depth"], "pooling": p["pooling"],
                  "activation": p["activation"], "dropout": float(p["dropout"]), "batch_norm": p["batch_norm"]}
        if wants_checkpoints(report):
            config["dropout_layers"] = True
        augment = make_augment(shape, p["augment_shift"], p["augment_flip"])
        fitted = train(build_network(**config), data, p, report, augment=augment, eval_rows=EVAL_ROWS)
        return CNNModel(config, fitted.state, task=data.task, y_mean=fitted.y_mean, y_std=fitted.y_std)


class CNNModel(TorchModel):
    """A trained CNN: architecture in JSON (cnn.json), weights in safetensors; it takes flat C-H-W rows."""

    CONFIG_FILE = "cnn.json"

    @staticmethod
    def build(config: dict[str, Any]) -> Any:
        return build_network(**config)
