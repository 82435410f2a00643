"""The sweep's summary on its MLflow parent run: the leaderboard as CSV and the plots a user would otherwise
make by hand (Optuna's own visualisations, rendered with matplotlib as images the MLflow UI shows)."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"


def log_summary(client: MlflowClient, run_id: str, study: optuna.Study, board: pd.DataFrame,
                objectives: list[tuple[str, str]], *, plots: bool = True) -> list[str]:
    """Log ``leaderboard.csv`` and (``plots``) the plots; returns the artifact paths written. Never raises: a plot
    that cannot be drawn (too few trials, a conditional space) is skipped with a log line."""
    written = []
    try:
        client.log_text(run_id, board.to_csv(index=False), "leaderboard.csv")
        written.append("leaderboard.csv")
    except Exception as exc:
        log.warning("leaderboard.csv not logged: %s", exc)
    if plots:
        written += log_plots(client, run_id, study, objectives)
    return written


def log_plots(client: MlflowClient, run_id: str, study: optuna.Study, objectives: list[tuple[str, str]]) -> list[str]:
    """Optuna's plots as images on the run; returns the artifact paths written. Never raises."""
    written: list[str] = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        return written
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # files only, never a window; a notebook's own backend is left as it is
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    names = [name for name, _ in objectives]
    drawings: dict[str, Any] = {}
    if len(objectives) == 1:
        drawings = {
            "optimization_history": lambda: vis.plot_optimization_history(study, target_name=names[0]),
            "parallel_coordinate": lambda: vis.plot_parallel_coordinate(study, target_name=names[0]),
            "param_importances": lambda: vis.plot_param_importances(study, target_name=names[0]),
            "intermediate_values": lambda: vis.plot_intermediate_values(study),
        }
        if not any(t.intermediate_values for t in complete):
            # No trial reported to Optuna (method: pbt members): Optuna would only warn that there is nothing.
            del drawings["intermediate_values"]
    else:
        drawings = {"pareto_front": lambda: vis.plot_pareto_front(study, target_names=names)}
    for name, draw in drawings.items():
        try:
            # rc_context undoes the plt.style.use("ggplot") that Optuna's plot functions apply globally.
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = draw()
                figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                figure.set_size_inches(9, 5.5)
                figure.tight_layout()
                client.log_figure(run_id, figure, f"{PLOTS_DIR}/{name}.png")
                plt.close(figure)
            written.append(f"{PLOTS_DIR}/{name}.png")
        except Exception as exc:  # a plot is a convenience; the sweep's record must not depend on it
            log.info("plot %s skipped: %s", name, exc)
    return written
