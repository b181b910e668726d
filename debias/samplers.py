"""The Optuna sampler behind each ``search.algorithm``: one ask/tell path for every search.

Imported where a study is created (the driver), never by trial workers: Optuna is a library
a trial does not need (tests/test_startup.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import optuna

__all__ = ["AskTellGrid", "make_sampler"]


class AskTellGrid(optuna.samplers.GridSampler):
    """Optuna's grid sampler for ask and tell. Its ``after_trial`` stops an ``optimize`` loop
    once the grid is covered, which raises outside one; the searcher stops asking on its own
    (it knows the grid's size), so there is nothing to stop."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        del study, trial, state, values


def make_sampler(algorithm: str, domains: Sequence[Any], n_startup: int, seed: int
                 ) -> optuna.samplers.BaseSampler:
    """The sampler of a pipeline's ``search.algorithm`` over its search ``domains``
    (:class:`debias.params.SearchDomain`).

    ``optuna``: TPE with ``n_startup`` random trials first; multivariate (a joint
    density over the searched keys, which learns interactions such as lr x epochs), grouped
    where keys are conditional (``when``: each subspace its own density), and a constant liar,
    so a config asked while others run is pushed away from theirs. ``random``: independent
    uniform draws (log-uniform for ``log: true``). ``grid``: every combination of the
    choices, once each, in a seeded order."""
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if algorithm == "grid":
        return AskTellGrid({d.path: list(d.values) for d in domains}, seed=seed)
    conditional = any(d.when for d in domains)
    with warnings.catch_warnings():  # multivariate and group are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=n_startup, multivariate=True,
            group=conditional, constant_liar=True)
