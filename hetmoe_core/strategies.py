"""Placement strategies: one registry holding each strategy's name, label, what it needs, and its score function.

A strategy scores every routed expert (higher -> kept digital); ``placement.place`` ranks by that score. Declared
once, as lm-eval declares its metrics: ``@register_strategy("frequency", label="Activation frequency",
needs="stats")`` above a function returning per-layer float arrays. Callers read ``STRATEGIES[name].needs`` (what
to compute first), ``.label`` (figures, pages) and ``list(STRATEGIES)`` (CLI choices).

``needs`` is one of:
  * ``"scores"``: weight-derived expert scores (``scores.expert_scores``: MaxNNScore, Router Norm);
  * ``"stats"``: routing statistics on calibration text (``routing.activation_stats``);
  * ``"measurement"``: measured damage per expert (``sensitivity``);
  * ``None``: nothing but the seed.
numpy is imported at call time: the CLI builds its argument help from this registry before any heavy import.
Sources: MaxNNScore and the baselines (Router Norm, Activation Frequency / Weight, random): arXiv 2603.02633.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

NEEDS = ("scores", "stats", "measurement", None)


@dataclass(frozen=True)
class Strategy:
    """One placement strategy: ``score(num_experts=, scores=, stats=, measured=, seed=)`` -> per-layer [E]."""
    name: str
    label: str
    needs: str | None
    score: Callable
    doc: str = ""


STRATEGIES: dict[str, Strategy] = {}
_NEED_HELP = {"scores": "expert scores (scores.expert_scores(anatomy))",
              "stats": "activation statistics from calibration text (routing.activation_stats)",
              "measurement": "measured scores under a noise preset (measured=sensitivity.measured_scores(lm, "
                             "strategy, preset))"}


def register_strategy(name: str, *, label: str, needs: str | None = None):
    """Decorator: register ``fn`` as strategy ``name`` (``label`` for people, ``needs`` one of NEEDS).

    Raises ValueError for a taken name or an unknown ``needs``."""
    if needs not in NEEDS:
        raise ValueError(f"strategy {name!r}: needs must be one of {NEEDS}, got {needs!r}")

    def deco(fn: Callable) -> Callable:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        STRATEGIES[name] = Strategy(name, label, needs, fn, (fn.__doc__ or "").strip())
        return fn
    return deco


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``. Raises ValueError "unknown strategy ..." with close names and the list."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    close = difflib.get_close_matches(str(name), list(STRATEGIES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown strategy {name!r};{hint} choose one of {', '.join(STRATEGIES)}")


def needs(name: str) -> str | None:
    """What strategy ``name`` needs computed first (see NEEDS); ValueError for an unknown name."""
    return get_strategy(name).needs


def criterion_labels() -> dict[str, str]:
    """Display label of every criterion the Validate page ranks (criteria.PAPER_CRITERIA and the strategies): the
    registry's labels plus the per-projection maxima of MaxNNScore (``<p>_max`` for scores.PROJECTIONS; spelled
    out here so that charts need no torch import)."""
    return {**{n: s.label for n, s in STRATEGIES.items()},
            **{f"{p}_max": f"Max neuron norm of {p}_proj" for p in ("gate", "up", "down")}}


def label(name: str) -> str:
    """Display label of a strategy (the name itself for "ideal" and unknown names, e.g. in stored results)."""
    s = STRATEGIES.get(name)
    return s.label if s else name


def ordered(names) -> list:
    """Strategy names in the registry's canonical order (the order of declaration: MaxNNScore, Activation frequency,
    Activation weight, Router norm, Random, Oracle, Local output error), each once; names outside the registry
    ("ideal", a strategy a stored result names but this version lacks) follow, by label. For every list of
    strategies people pick from (the Results page's chips): machine names sorted would put Activation frequency
    before MaxNNScore and Local output error before Oracle."""
    rank = {n: i for i, n in enumerate(STRATEGIES)}
    return sorted(dict.fromkeys(names), key=lambda n: (rank.get(n, len(rank)), label(n)))


def strategy_scores(strategy: str, *, num_experts: list[int], scores=None, stats=None, measured=None,
                    seed: int = 0) -> list:
    """Per-layer float64 [E] scores for a placement strategy (higher -> digital); NaN counts as 0.

    scores: ``scores.ExpertScores``; stats: ``routing.ActivationStats``; measured: per-layer [E] scores measured
    under a noise preset (``sensitivity.measured_scores``); seed: for "random". Raises ValueError for an unknown strategy, a missing input, or scores
    whose experts per layer differ from ``num_experts``.
    """
    import numpy as np
    s = get_strategy(strategy)
    given = {"scores": scores, "stats": stats, "measurement": measured}
    if s.needs is not None and given[s.needs] is None:
        raise ValueError(f"strategy {strategy!r} needs {_NEED_HELP[s.needs]}")
    out = s.score(num_experts=list(num_experts), scores=scores, stats=stats, measured=measured, seed=seed)
    out = [np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0) for x in out]
    if [len(x) for x in out] != list(num_experts):
        raise ValueError(f"scores have {[len(x) for x in out]} experts per layer but the model has {list(num_experts)}")
    return out


def random_scores(num_experts: list[int], seed: int = 0) -> list:
    """Random baseline: i.i.d. U[0, 1) per expert from numpy's PCG64 seeded with ``seed`` (deterministic)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return [rng.random(e) for e in num_experts]


# ---------------------------------------------------------------- the strategies (order = order shown to people)

@register_strategy("maxnn", label="MaxNNScore", needs="scores")
def _maxnn(*, scores, **_):
    """Product over projections of each expert's largest neuron norm (arXiv 2603.02633)."""
    return scores.get("maxnn")


@register_strategy("frequency", label="Activation frequency", needs="stats")
def _frequency(*, stats, **_):
    """Share of calibration tokens routed to the expert."""
    return list(stats.frequency)


@register_strategy("weight", label="Activation weight", needs="stats")
def _weight(*, stats, **_):
    """Mean routing weight when routed (0 for never-routed experts)."""
    return list(stats.weight)


@register_strategy("router_norm", label="Router norm", needs="scores")
def _router_norm(*, scores, **_):
    """L2 norm of the expert's router row."""
    return scores.get("router_norm")


@register_strategy("random", label="Random", needs=None)
def _random(*, num_experts, seed, **_):
    """i.i.d. uniform scores from ``seed``."""
    return random_scores(num_experts, seed)


@register_strategy("oracle", label="Oracle (measured damage)", needs="measurement")
def _oracle(*, measured, **_):
    """Measured only-this damage of each expert on analog tiles under the preset (sensitivity.measure)."""
    return measured


@register_strategy("local_error", label="Local output error", needs="measurement")
def _local_error(*, measured, **_):
    """The Local Output Error criterion of each expert under the preset (criteria module)."""
    return measured
