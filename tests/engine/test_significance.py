"""Bootstrap intervals and paired comparisons against a loop reference that resamples identities, planted
differences, verdicts and the seeds-to-resolve plan."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from php_runner.engine.metrics import METRIC_NAMES, QueryOutcomes, metrics_from_outcomes
from php_runner.engine.significance import (
    CONTRADICTED, METHOD, NOT_RESOLVED, SUPPORTED, Comparison, cell_intervals, compare, seeds_to_resolve, verdict,
)
from php_runner.errors import InputError


def synthetic_test_set(num_identities, queries_per_identity, seed):
    """Query pids (each identity 1..2*queries_per_identity-1 queries, shuffled) and a per-identity difficulty."""
    generator = np.random.default_rng(seed)
    sizes = generator.integers(1, 2 * queries_per_identity, num_identities)
    pids = generator.permutation(np.repeat(np.arange(num_identities) * 7 + 3, sizes)).astype(np.int64)
    difficulty = generator.random(num_identities)
    return pids, difficulty[np.unique(pids, return_inverse=True)[1].reshape(-1)]


def outcomes(pids, difficulty, success_rate, seed, noise=0.1):
    """A seed's outcomes: query q is correct at rank 1 when its difficulty (shared by the identity's queries and
    by every row) plus this seed's noise falls below ``success_rate``; AP and INP follow the rank."""
    generator = np.random.default_rng(seed)
    correct = difficulty + generator.normal(0.0, noise, len(pids)) < success_rate
    first_rank = np.where(correct, 1, generator.integers(2, 30, len(pids))).astype(np.int32)
    average_precision = np.minimum(1.0, 1.0 / first_rank + generator.random(len(pids)) * 0.1)
    return QueryOutcomes(first_rank, average_precision, average_precision / 2, pids)


def loop_reference(cell, n_resamples, confidence, seed):
    """Straightforward pigeonhole bootstrap: draw identities, then seeds, concatenate the drawn identities'
    queries for each drawn seed, average the per-seed metrics."""
    generator = np.random.default_rng(seed)
    seeds = sorted(cell)
    identities = np.unique(cell[seeds[0]].query_pid)
    queries_of = {pid: np.flatnonzero(cell[seeds[0]].query_pid == pid) for pid in identities}
    replicates = []
    for _ in range(n_resamples):
        drawn = generator.choice(identities, size=len(identities), replace=True)
        queries = np.concatenate([queries_of[pid] for pid in drawn])
        drawn_seeds = generator.choice(seeds, size=len(seeds), replace=True) if len(seeds) > 1 else seeds
        per_seed = []
        for s in drawn_seeds:
            o = cell[s]
            per_seed.append([100 * np.mean(o.first_rank[queries] <= k) for k in (1, 5, 10)]
                            + [100 * np.mean(o.average_precision[queries]),
                               100 * np.mean(o.inverse_negative_penalty[queries])])
        replicates.append(np.mean(per_seed, axis=0))
    tail = 100 * (1 - confidence) / 2
    return np.percentile(replicates, [tail, 100 - tail], axis=0)


@pytest.mark.parametrize("num_seeds", [1, 3])
def test_cell_interval_agrees_with_loop_reference(num_seeds):
    pids, difficulty = synthetic_test_set(200, 5, seed=0)  # strong identity clustering: queries of a person share difficulty
    # Seeds differ in level too (0.5, 0.6, 0.7), so the seed draws matter as much as the identity draws.
    cell = {s: outcomes(pids, difficulty, 0.6 + 0.1 * (s - 2) * (num_seeds > 1), seed=s) for s in range(1, num_seeds + 1)}
    intervals = cell_intervals(cell, n_resamples=3000, seed=1)
    low, high = loop_reference(cell, 3000, 0.95, seed=2)
    for i, name in enumerate(METRIC_NAMES):
        width = high[i] - low[i]
        assert width > 0
        # Monte-Carlo error of a 2.5% percentile from 3000 replicates is a few percent of the width.
        assert intervals[name].low == pytest.approx(low[i], abs=0.1 * width), name
        assert intervals[name].high == pytest.approx(high[i], abs=0.1 * width), name


def test_cell_estimate_is_the_mean_of_the_recorded_metrics():
    pids, difficulty = synthetic_test_set(50, 4, seed=3)
    cell = {s: outcomes(pids, difficulty, 0.5, seed=s) for s in (4, 9)}
    intervals = cell_intervals(cell, n_resamples=200)
    for name in METRIC_NAMES:
        assert intervals[name].estimate == np.mean([metrics_from_outcomes(o)[name] for o in cell.values()])
        assert intervals[name].low <= intervals[name].estimate <= intervals[name].high


def test_bootstrap_is_seeded():
    pids, difficulty = synthetic_test_set(40, 4, seed=4)
    cell = {s: outcomes(pids, difficulty, 0.5, seed=s) for s in (1, 2)}
    assert cell_intervals(cell, n_resamples=300, seed=5) == cell_intervals(cell, n_resamples=300, seed=5)
    assert cell_intervals(cell, n_resamples=300, seed=5) != cell_intervals(cell, n_resamples=300, seed=6)


def test_comparison_pairs_seeds_and_identities():
    pids, difficulty = synthetic_test_set(80, 4, seed=6)
    row = {s: outcomes(pids, difficulty, 0.6, seed=s) for s in (1, 2, 3)}
    reference = {s: outcomes(pids, difficulty, 0.5, seed=s + 100) for s in (2, 3, 4)}
    result = compare(row, reference, n_resamples=500)
    assert result["R1"].seeds == (2, 3)
    expected = np.mean([metrics_from_outcomes(row[s])["R1"] - metrics_from_outcomes(reference[s])["R1"] for s in (2, 3)])
    assert result["R1"].difference == pytest.approx(expected, abs=1e-12)
    # Paired on identities: narrower than a cell's own interval (unpaired draws would be about 1.4 times wider).
    own = cell_intervals({s: row[s] for s in (2, 3)}, n_resamples=500)["R1"]
    assert result["R1"].high - result["R1"].low < 0.75 * (own.high - own.low)


def planted(difference_points, seed, num_seeds=3):
    pids, difficulty = synthetic_test_set(600, 5, seed=seed)
    base = 0.6
    reference = {s: outcomes(pids, difficulty, base, seed=seed * 1000 + s) for s in range(num_seeds)}
    row = {s: outcomes(pids, difficulty, base + difference_points / 100, seed=seed * 1000 + 500 + s)
           for s in range(num_seeds)}
    return compare(row, reference, direction="higher", n_resamples=400, seed=seed)["R1"]


@pytest.mark.parametrize(("difference", "expected"), [(3, SUPPORTED), (-3, CONTRADICTED)])
@pytest.mark.parametrize("generator_seed", [0, 1, 2])
def test_planted_difference_gets_its_verdict(difference, expected, generator_seed):
    comparison = planted(difference, generator_seed)
    assert comparison.difference == pytest.approx(difference, abs=1.5)
    assert comparison.verdict == expected


def test_planted_zero_difference_is_not_resolved_in_95_percent_of_repetitions():
    verdicts = [planted(0, seed).verdict for seed in range(100)]
    assert verdicts.count(NOT_RESOLVED) >= 95, verdicts


@pytest.mark.parametrize(("low", "high", "direction", "expected"), [
    (0.1, 2.0, "higher", SUPPORTED), (-0.1, 2.0, "higher", NOT_RESOLVED), (-2.0, -0.1, "higher", CONTRADICTED),
    (0.1, 2.0, "lower", CONTRADICTED), (-2.0, -0.1, "lower", SUPPORTED), (0.0, 1.0, "higher", NOT_RESOLVED),
])
def test_verdict(low, high, direction, expected):
    assert verdict(low, high, direction) == expected


def comparison(difference, seed_variance, test_variance):
    return Comparison("R1", "higher", difference, difference - 1, difference + 1, NOT_RESOLVED, (1, 2, 3),
                      seed_variance, test_variance)


@pytest.mark.parametrize(("difference", "seed_variance", "test_variance"),
                         [(0.5, 1.0, 0.01), (-0.8, 4.0, 0.05), (1.0, 0.3, 0.0), (0.3, 2.0, 0.02)])
def test_seeds_to_resolve_is_the_smallest_count_whose_half_width_is_below_the_difference(
        difference, seed_variance, test_variance):
    plan = seeds_to_resolve(comparison(difference, seed_variance, test_variance), max_seeds=10_000)
    z = 1.959963984540054

    def half_width(n):
        return z * math.sqrt(seed_variance / n + test_variance)

    assert plan.seeds is not None and half_width(plan.seeds) < abs(difference)
    assert plan.seeds == 2 or half_width(plan.seeds - 1) >= abs(difference)


@pytest.mark.parametrize(("difference", "seed_variance", "test_variance", "note"), [
    (0.0, 1.0, 0.01, "difference is 0"),
    (0.2, 1.0, 0.02, "sampling error"),      # z^2 * 0.02 = 0.077 > 0.04
    (0.1, 1.0, 0.0, "more than 100 seeds"),  # needs 385
    (0.5, None, 0.01, "one seed"),
])
def test_seeds_to_resolve_says_when_no_count_will_do(difference, seed_variance, test_variance, note):
    plan = seeds_to_resolve(comparison(difference, seed_variance, test_variance))
    assert plan.seeds is None and note in plan.note


def test_outcomes_on_different_test_sets_or_without_common_seeds_are_input_errors():
    pids, difficulty = synthetic_test_set(30, 3, seed=7)
    cell = {1: outcomes(pids, difficulty, 0.5, seed=1)}
    other = {1: outcomes(pids[::-1].copy(), difficulty, 0.5, seed=1)}
    with pytest.raises(InputError, match="same test set"):
        compare(cell, other)
    with pytest.raises(InputError, match="same test set"):
        cell_intervals({1: cell[1], 2: other[1]})
    with pytest.raises(InputError, match="no seed in common"):
        compare(cell, {2: cell[1]})
    with pytest.raises(ValueError):
        compare(cell, cell, direction="better")


def test_a_cuhk_sized_cell_takes_well_under_a_few_seconds():
    pids, difficulty = synthetic_test_set(1000, 6, seed=8)  # about 6,000 queries, like CUHK-PEDES's 6,156
    cell = {s: outcomes(pids, difficulty, 0.7, seed=s) for s in range(3)}
    start = time.perf_counter()
    cell_intervals(cell, n_resamples=2000)
    compare(cell, cell, n_resamples=2000)
    assert time.perf_counter() - start < 3.0


def test_method_names_the_scheme_and_the_unit():
    assert "pigeonhole" in METHOD and "identities" in METHOD
