"""A trainer for conditional spaces: it refuses any parameter its own choices do not call for."""

from __future__ import annotations

from typing import Any

FIXED = {"epochs", "label"}


def expected_names(params: dict[str, Any]) -> set[str]:
    """The names a trial must receive, given its own choices of optimizer and depth."""
    names = {"lr", "optimizer", "depth", "width1"} | FIXED
    if params.get("optimizer") == "sgd":
        names.add("momentum")
    if params.get("depth") == 2:
        names.add("width2")
    return names


def conditional(params: dict[str, Any], data: Any, report: Any) -> None:
    """Checks it got exactly the parameters it should (and of the right kinds), then reports a score."""
    if data is not None:
        raise ValueError("this trainer takes no data")
    expected = expected_names(params)
    if set(params) != expected:
        raise ValueError(f"got {sorted(params)}; expected exactly {sorted(expected)} "
                         f"(unexpected {sorted(set(params) - expected)}, missing {sorted(expected - set(params))})")
    if params["optimizer"] not in ("adam", "sgd"):
        raise ValueError(f"optimizer {params['optimizer']!r}")
    if type(params["depth"]) is not int or params["depth"] not in (1, 2):
        raise ValueError(f"depth {params['depth']!r} is not the int 1 or 2")
    for name in ("width1", "width2"):
        if name in params and (type(params[name]) is not int or not 4 <= params[name] <= 64):
            raise ValueError(f"{name} {params[name]!r} is not an int in [4, 64]")
    if "momentum" in params and not 0.0 <= params["momentum"] <= 0.99:
        raise ValueError(f"momentum {params['momentum']!r} is outside [0, 0.99]")
    if not 1e-3 <= params["lr"] <= 1e-1:
        raise ValueError(f"lr {params['lr']!r} is outside [1e-3, 1e-1]")
    width = params["width1"] + params.get("width2", 0)
    base = 0.5 * params.get("momentum", 0.0) + width / 128 - abs(params["lr"] - 0.01)
    for step in range(1, int(params["epochs"]) + 1):
        report(step, {"score": base + 0.01 * step})
