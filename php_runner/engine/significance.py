"""Is a difference real? Bootstrap intervals of a cell's metrics and paired comparisons of two rows.

A *cell* is one configuration evaluated with several training seeds, each seed's evaluation kept as
per-query outcomes (``engine.metrics.QueryOutcomes``) on the same test set. Two sources of noise
are crossed in it: the seed (every seed evaluates every identity) and the test sample (a test split
is a sample of identities; the captions of one person are correlated, so the unit is the identity).

The bootstrap is the *pigeonhole* bootstrap for crossed designs (Owen 2007, "The pigeonhole
bootstrap", Ann. Appl. Stat.): each replicate draws the test identities with replacement (one draw
shared by all seeds and by both rows of a comparison: the test set is shared) and, with two seeds or
more, draws the seeds with replacement; the replicate's value is the mean over the drawn seeds of each
seed's metric on the drawn identities (all queries of a drawn identity, as often as it is drawn). It is
conservative: the seed-by-identity interaction is counted twice. With one seed the interval covers the
test sample only. Intervals are percentile intervals of the replicates.

Comparisons pair seeds by seed number and use the same draws for both rows, so a replicate's difference
is the difference on the same identities and seeds. A verdict reads the interval against the paper's
claimed direction. ``seeds_to_resolve`` plans how many seeds would resolve an unresolved difference.

A replicate is a weighted sum over identities: per-identity sums of each query value are computed once,
and the identity draws are a count matrix (replicates x identities), so a replicate costs one matrix
product.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from php_runner.engine.metrics import CMC_RANKS, METRIC_NAMES, QueryOutcomes, metrics_from_outcomes
from php_runner.errors import InputError

METHOD = (
    "pigeonhole bootstrap (Owen 2007): test identities resampled with replacement (all queries of a person "
    "together; one draw shared by every seed and both rows of a comparison), seeds resampled with replacement "
    "when there are two or more (paired by seed number in comparisons); replicate = mean over drawn seeds of "
    "the metric on the drawn identities; percentile interval"
)
SUPPORTED, NOT_RESOLVED, CONTRADICTED = "supported", "not resolved", "contradicted"
DIRECTIONS = ("higher", "lower")


@dataclass(frozen=True)
class Interval:
    """A metric of a cell in percent: ``estimate`` is the mean over seeds on the whole test set."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """Row minus reference row for one metric, in percentage points, over the paired ``seeds``.

    ``seed_variance``: sample variance over seeds of the per-seed difference on the whole test set (None
    with one seed); ``test_variance``: variance of the seed-averaged difference over identity draws alone.
    """

    metric: str
    direction: str
    difference: float
    low: float
    high: float
    verdict: str
    seeds: tuple[int, ...]
    seed_variance: float | None
    test_variance: float


@dataclass(frozen=True)
class SeedPlan:
    """Seeds needed to resolve a comparison (``seeds`` None where no number of seeds can) and why."""

    seeds: int | None
    note: str


def cell_intervals(
    outcomes: Mapping[int, QueryOutcomes], n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Interval]:
    """Interval of R1, R5, R10, mAP and mINP of one cell; ``outcomes`` maps training seed -> outcomes."""
    seeds = sorted(outcomes)
    _check_same_test_set([outcomes[s] for s in seeds], [f"seed {s}" for s in seeds])
    values = _per_seed_values([outcomes[s] for s in seeds])
    replicates, _ = _replicates(values, _identities(outcomes[seeds[0]]), n_resamples, seed)
    low, high = _percentiles(replicates, confidence)
    estimates = _estimates([outcomes[s] for s in seeds])
    return {name: Interval(estimates[i], low[i], high[i]) for i, name in enumerate(METRIC_NAMES)}


def compare(
    row: Mapping[int, QueryOutcomes], reference: Mapping[int, QueryOutcomes], direction: str = "higher",
    n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> dict[str, Comparison]:
    """Row minus reference for every metric, paired on the seeds both have and on the test identities.

    ``direction`` is the paper's claim about the row: "higher" or "lower" than the reference.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    seeds = sorted(set(row) & set(reference))
    if not seeds:
        raise InputError(f"no seed in common: row has seeds {sorted(row)}, reference has {sorted(reference)}")
    row_outcomes, reference_outcomes = [row[s] for s in seeds], [reference[s] for s in seeds]
    _check_same_test_set(row_outcomes + reference_outcomes,
                         [f"row seed {s}" for s in seeds] + [f"reference seed {s}" for s in seeds])
    values = _per_seed_values(row_outcomes) - _per_seed_values(reference_outcomes)
    replicates, identity_only = _replicates(values, _identities(row_outcomes[0]), n_resamples, seed)
    low, high = _percentiles(replicates, confidence)
    row_estimates, reference_estimates = _per_seed_estimates(row_outcomes), _per_seed_estimates(reference_outcomes)
    differences = row_estimates - reference_estimates  # (seeds, metrics), each metric as recorded
    comparisons = {}
    for i, name in enumerate(METRIC_NAMES):
        seed_variance = float(np.var(differences[:, i], ddof=1)) if len(seeds) > 1 else None
        comparisons[name] = Comparison(
            metric=name, direction=direction, difference=float(np.mean(differences[:, i])), low=low[i], high=high[i],
            verdict=verdict(low[i], high[i], direction), seeds=tuple(seeds), seed_variance=seed_variance,
            test_variance=float(np.var(identity_only[:, i], ddof=1)),
        )
    return comparisons


def verdict(low: float, high: float, direction: str = "higher") -> str:
    """supported: the interval excludes 0 on the claimed side; contradicted: on the other; else not resolved."""
    sign = 1.0 if direction == "higher" else -1.0
    low, high = sorted((sign * low, sign * high))
    if low > 0:
        return SUPPORTED
    if high < 0:
        return CONTRADICTED
    return NOT_RESOLVED


def seeds_to_resolve(comparison: Comparison, confidence: float = 0.95, max_seeds: int = 100) -> SeedPlan:
    """Seeds n at which the interval's half-width falls below the observed |difference|.

    Normal approximation of the two variance components: half-width(n) = z * sqrt(s2 / n + v), with s2 the
    seed variance of the per-seed difference and v the test-sample variance (which more seeds do not shrink),
    so n = ceil(z^2 s2 / (d^2 - z^2 v)). Not reachable when d = 0, when z^2 v >= d^2 (the test set alone is too
    noisy), or beyond ``max_seeds``; unknown with one seed (no seed variance to scale).
    """
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    squared_difference = comparison.difference ** 2
    if comparison.seed_variance is None:
        return SeedPlan(None, "unknown: one seed gives no seed variance; run at least two")
    if squared_difference == 0.0:
        return SeedPlan(None, "not reachable: the observed difference is 0")
    margin = squared_difference - z * z * comparison.test_variance
    if margin <= 0:
        return SeedPlan(None, "not reachable: the test set's sampling error alone exceeds the difference")
    needed = max(2, math.ceil(z * z * comparison.seed_variance / margin))
    if needed > max_seeds:
        return SeedPlan(None, f"not reachable: more than {max_seeds} seeds")
    return SeedPlan(needed, f"{needed} seeds at the observed seed and test-set variance")


def _per_seed_values(outcomes: list[QueryOutcomes]) -> np.ndarray:
    """(seeds, queries, metrics) per-query values in percent whose query means are the metrics."""
    columns = [[o.first_rank <= k for k in CMC_RANKS] + [o.average_precision, o.inverse_negative_penalty]
               for o in outcomes]
    return 100.0 * np.asarray(columns, dtype=np.float64).transpose(0, 2, 1)


def _identities(outcomes: QueryOutcomes) -> np.ndarray:
    """Identity index (0..identities-1) of every query."""
    return np.unique(outcomes.query_pid, return_inverse=True)[1].reshape(-1)


def _replicates(values: np.ndarray, identity: np.ndarray, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(replicates, metrics) values of the pigeonhole bootstrap and of identity draws alone (all seeds kept)."""
    if n_resamples < 2:
        raise ValueError(f"n_resamples must be at least 2, got {n_resamples}")
    num_seeds, _, num_metrics = values.shape
    num_identities = int(identity.max()) + 1
    sums = np.stack([np.stack([np.bincount(identity, weights=v[:, m], minlength=num_identities)
                               for m in range(num_metrics)], axis=1) for v in values])  # (seeds, ids, metrics)
    sizes = np.bincount(identity, minlength=num_identities).astype(np.float64)
    generator = np.random.default_rng(seed)
    counts = _draw_counts(generator, n_resamples, num_identities)  # (replicates, identities)
    totals = counts @ sums.transpose(1, 0, 2).reshape(num_identities, num_seeds * num_metrics)
    per_seed = totals.reshape(n_resamples, num_seeds, num_metrics) / (counts @ sizes)[:, None, None]
    identity_only = per_seed.mean(axis=1)
    if num_seeds == 1:
        return identity_only, identity_only
    seed_weights = _draw_counts(generator, n_resamples, num_seeds) / num_seeds
    return np.einsum("bs,bsm->bm", seed_weights, per_seed), identity_only


def _draw_counts(generator: np.random.Generator, n_resamples: int, size: int) -> np.ndarray:
    """How often each of ``size`` units is drawn in each of ``n_resamples`` draws of ``size`` with replacement."""
    draws = generator.integers(0, size, (n_resamples, size)) + size * np.arange(n_resamples)[:, None]
    return np.bincount(draws.reshape(-1), minlength=n_resamples * size).reshape(n_resamples, size).astype(np.float64)


def _percentiles(replicates: np.ndarray, confidence: float) -> tuple[list[float], list[float]]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = 100.0 * (1.0 - confidence) / 2
    low, high = np.percentile(replicates, [tail, 100.0 - tail], axis=0)
    return low.tolist(), high.tolist()


def _per_seed_estimates(outcomes: list[QueryOutcomes]) -> np.ndarray:
    """(seeds, metrics) each seed's metrics exactly as ``metrics_from_outcomes`` records them."""
    return np.array([[metrics_from_outcomes(o)[name] for name in METRIC_NAMES] for o in outcomes])


def _estimates(outcomes: list[QueryOutcomes]) -> list[float]:
    return _per_seed_estimates(outcomes).mean(axis=0).tolist()


def _check_same_test_set(outcomes: list[QueryOutcomes], labels: list[str]) -> None:
    if not outcomes:
        raise ValueError("need the outcomes of at least one seed")
    for label, other in zip(labels[1:], outcomes[1:]):
        if not np.array_equal(other.query_pid, outcomes[0].query_pid):
            raise InputError(f"outcomes of {label} are not on the same test set as those of {labels[0]} "
                             "(query identities differ)")
