"""method: pbt: the population's schedules as a figure on the sweep's parent run (``plots/pbt_schedules.png``):
one panel per mutable hyperparameter, every member's own schedule in grey and the best member's effective
schedule (its lineage: what its weights were trained under) in colour. Drawn after the result, like the other
summary plots; never raises."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


def steps_and_values(schedule: list[Any], name: str, end: int) -> tuple[list[int], list[float]]:
    """A step function: each (from step, values) holds until the next entry, the last one until ``end``."""
    xs: list[int] = []
    ys: list[float] = []
    for i, (step, values) in enumerate(schedule):
        if name not in values or isinstance(values[name], bool) or not isinstance(values[name], int | float):
            continue
        stop = schedule[i + 1][0] if i + 1 < len(schedule) else end
        xs += [int(step), int(stop)]
        ys += [float(values[name])] * 2
    return xs, ys


def log_schedules(client: MlflowClient, run_id: str, lineage: dict[str, Any]) -> str | None:
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        end = int(lineage["epochs"])
        names = sorted({k for m in lineage["members"].values() for _, v in m["schedule"] for k in v})
        if not names:
            return None
        with matplotlib.rc_context():
            figure, axes = plt.subplots(len(names), 1, figsize=(9, 2.8 * len(names)), squeeze=False)
            for ax, name in zip(axes[:, 0], names, strict=True):
                for number, member in lineage["members"].items():
                    xs, ys = steps_and_values(member["schedule"], name, end)
                    ax.plot(xs, ys, color="0.75", linewidth=1, label="members" if number == "0" else None)
                xs, ys = steps_and_values(lineage.get("best_schedule") or [], name, end)
                if xs:
                    ax.plot(xs, ys, color="tab:red", linewidth=2.2, label=f"best (member {lineage['best']})")
                ax.set_ylabel(name)
                if all(y > 0 for m in lineage["members"].values()
                       for y in steps_and_values(m["schedule"], name, end)[1]) and name in ("lr", "weight_decay"):
                    ax.set_yscale("log")
                ax.legend(loc="best", fontsize=8)
            axes[-1, 0].set_xlabel("step")
            figure.suptitle(f"PBT schedules ({lineage['metric']}, {lineage['goal']})")
            figure.tight_layout()
            path = "plots/pbt_schedules.png"
            client.log_figure(run_id, figure, path)
            plt.close(figure)
        return path
    except Exception as exc:  # a plot is a convenience; the sweep's record must not depend on it
        log.info("the PBT schedule plot was skipped: %s", exc)
        return None
