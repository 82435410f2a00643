"""Method name -> Optuna sampler. Every proposal automl makes comes from one of Optuna's samplers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from automl.spec import FieldError

if TYPE_CHECKING:
    import optuna

    from automl.space import SearchSpace


# `bayesian` picks Optuna's GP sampler for small, all-numeric, single-objective spaces with a modest budget,
# where a Gaussian process models the response best; TPE everywhere else (categoricals, `when`, many
# parameters, many trials, several objectives), where it is both better suited and far cheaper per trial.
GP_MAX_PARAMS = 8
GP_MAX_TRIALS = 100
MULTI_OBJECTIVE_METHODS = ("grid", "random", "bayesian", "tpe", "qmc", "nsga2")


def sampler_name(method: str, space: SearchSpace, *, objectives: int = 1, trials: int | None = None) -> str:
    """The Optuna sampler class a method resolves to (``bayesian`` picks one for the space)."""
    if method == "bayesian":
        small_numeric = (
            not space.has_categorical and not space.is_conditional and len(space.all_names()) <= GP_MAX_PARAMS
        )
        if objectives == 1 and small_numeric and (trials or 0) <= GP_MAX_TRIALS:
            return "GPSampler"
        return "TPESampler"
    return {
        "grid": "GridSampler",
        "random": "RandomSampler",
        "tpe": "TPESampler",
        "gp": "GPSampler",
        "cmaes": "CmaEsSampler",
        "qmc": "QMCSampler",
        "nsga2": "NSGAIISampler",
        "pbt": "RandomSampler",  # the initial population; exploit and explore do the rest (automl.engine.pbt)
    }[method]


# How each sampler proposes a trial while others are still running (the run header and `automl validate` say it):
# a model-based sampler that ignored them would propose the same point again and again with trials in flight.
PARALLEL_STRATEGY = {
    "GPSampler": "pending trials in its acquisition (Optuna's qLogEI over the running trials)",
    "TPESampler": "constant liar (running trials count among the bad ones)",
    "CmaEsSampler": "one generation at a time (running trials are members of the current generation)",
    "NSGAIISampler": "one generation at a time (running trials are members of the current generation)",
    "RandomSampler": "independent draws (nothing to coordinate)",
    "QMCSampler": "the next points of one low-discrepancy sequence",
    "GridSampler": "each grid point once",
}


def describe(method: str, space: SearchSpace, *, objectives: int = 1, trials: int | None = None,
             concurrent: int | None = None) -> str:
    """One line for the run header and ``automl validate``: the sampler a method resolves to and, with trials in
    flight, how it accounts for the ones still running (``concurrent`` None: as many as the cluster runs)."""
    name = sampler_name(method, space, objectives=objectives, trials=trials)
    if method == "pbt":
        return (f"population-based training: the population drawn by Optuna's {name}, then exploit and explore at "
                "each interval")
    if method == "grid" and space.is_conditional:
        name = "BruteForceSampler"
    if concurrent == 1:
        return f"Optuna {name}, one trial at a time"
    strategy = PARALLEL_STRATEGY.get(name, "each grid point once")
    return f"Optuna {name}; with trials in flight, {strategy}"


def check_method(method: str, space: SearchSpace, *, objectives: int = 1) -> None:
    """Refuse, before anything runs, a space that the method cannot honour (it would silently drop it)."""
    if method == "grid":
        space.grid_size()
    if method == "cmaes" and space.has_categorical:
        raise FieldError("method", "cmaes cannot search categorical parameters; use bayesian or tpe")
    if method in ("cmaes", "qmc", "gp") and space.is_conditional:
        raise FieldError("method", f"{method} cannot search conditional (when:) parameters; use bayesian or tpe")
    if objectives > 1 and method not in MULTI_OBJECTIVE_METHODS:
        raise FieldError(
            "method",
            f"{method} optimises a single metric; with {objectives} metrics use one of "
            f"{', '.join(MULTI_OBJECTIVE_METHODS)}",
        )


def make_sampler(
    method: str, space: SearchSpace, seed: int, *, objectives: int = 1, trials: int | None = None
) -> optuna.samplers.BaseSampler:
    import optuna

    check_method(method, space, objectives=objectives)
    name = sampler_name(method, space, objectives=objectives, trials=trials)
    if name == "GridSampler":
        if space.is_conditional:
            # GridSampler needs a fixed set of names; the brute-force sampler walks define-by-run trees.
            brute: optuna.samplers.BaseSampler = _without_study_stop(optuna.samplers.BruteForceSampler)(seed=seed)
            return brute
        grid: optuna.samplers.BaseSampler = _without_study_stop(optuna.samplers.GridSampler)(
            space.flat_grid(), seed=seed
        )
        return grid
    if name == "TPESampler":
        # multivariate+group model conditional spaces jointly; constant_liar keeps parallel trials apart.
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=space.is_conditional, constant_liar=True
        )
    if name == "GPSampler":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "CmaEsSampler":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "QMCSampler":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    if name == "NSGAIISampler":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)



def _without_study_stop(cls: type) -> type:
    """A grid-type sampler whose exhausted grid does not call ``Study.stop()``.

    ``Study.stop()`` raises outside ``Study.optimize`` (it does under ask/tell), and the orchestrator already
    runs exactly the grid's size.
    """

    def after_trial(self: Any, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None

    return type(f"AskTell{cls.__name__}", (cls,), {"after_trial": after_trial, "__doc__": _without_study_stop.__doc__})
