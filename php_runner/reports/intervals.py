"""Confidence intervals of table cells and paired comparisons of rows, from the recorded per-query outcomes.

A cell's runs are its seeds; each needs the per-query outcomes of the evaluation behind its result
(``ResultRow.outcomes``). Where one lacks them the cell has no interval and says why (``NO_OUTCOMES``)
rather than showing a number. The statistics are ``engine.significance``'s; ``method_text`` names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from php_runner.engine import significance
from php_runner.engine.metrics import QueryOutcomes
from php_runner.errors import InputError
from php_runner.store.records import ResultRow

NO_OUTCOMES = "no per-query outcomes recorded"
N_RESAMPLES = 2000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0  # the generator of the resampling, fixed so a report is reproducible


def method_text(n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> str:
    return f"{confidence:.0%} intervals, {significance.METHOD}; {n_resamples} resamples"


@dataclass(frozen=True)
class RowComparison:
    """A line (row, dataset, kind) of a table against its reference row, for one metric."""

    row_key: str
    reference: str
    dataset: str
    kind: str
    metric: str
    direction: str
    difference: float | None
    low: float | None
    high: float | None
    verdict: str | None
    seeds: tuple[int, ...]
    seeds_needed: int | None
    note: str  # why there is no difference, or the seed plan's note


def outcomes_by_seed(rows: Sequence[ResultRow], source: str = "outcomes") -> dict[int, QueryOutcomes] | None:
    """{seed: outcomes} of a cell's rows (``source``: ``outcomes`` or ``shuffled_outcomes``); None if one lacks them."""
    found = {row.seed: getattr(row, source) for row in rows}
    if not found or any(value is None for value in found.values()):
        return None
    return found


def cell_intervals(rows: Sequence[ResultRow]) -> tuple[dict[str, significance.Interval] | None, str | None]:
    """(intervals by metric, None) or (None, why there are none)."""
    by_seed = outcomes_by_seed(rows)
    if by_seed is None:
        return None, NO_OUTCOMES if rows else None
    return seed_intervals(by_seed)


def seed_intervals(by_seed: dict[int, QueryOutcomes]) -> tuple[dict[str, significance.Interval] | None, str | None]:
    """``cell_intervals`` of outcomes already grouped by seed."""
    try:
        return significance.cell_intervals(by_seed, N_RESAMPLES, CONFIDENCE, BOOTSTRAP_SEED), None
    except InputError as err:
        return None, str(err)


def compare_cells(row: dict[int, QueryOutcomes] | None, reference: dict[int, QueryOutcomes] | None,
                  direction: str) -> tuple[dict[str, significance.Comparison] | None, str]:
    """(comparisons by metric, "") or (None, why not): both cells need outcomes and a seed in common."""
    if row is None or reference is None:
        return None, NO_OUTCOMES
    try:
        return significance.compare(row, reference, direction, N_RESAMPLES, CONFIDENCE, BOOTSTRAP_SEED), ""
    except InputError as err:
        return None, str(err)


def row_comparisons(key: str, reference: str, dataset: str, kind: str, metrics: Sequence[str],
                    rows: Sequence[ResultRow], reference_rows: Sequence[ResultRow],
                    directions: dict[str, str]) -> list[RowComparison]:
    """One ``RowComparison`` per metric of ``rows`` against ``reference_rows`` (seeds paired by number)."""
    found, note = compare_cells(outcomes_by_seed(rows), outcomes_by_seed(reference_rows), "higher")
    out = []
    for metric in metrics:
        direction = directions.get(metric, "higher")
        if found is None:
            out.append(RowComparison(key, reference, dataset, kind, metric, direction, None, None, None, None, (),
                                     None, note))
            continue
        comparison = found[metric]
        plan = significance.seeds_to_resolve(comparison, CONFIDENCE)
        resolved = significance.verdict(comparison.low, comparison.high, direction)
        out.append(RowComparison(
            key, reference, dataset, kind, metric, direction, comparison.difference, comparison.low, comparison.high,
            resolved, comparison.seeds, plan.seeds if resolved == significance.NOT_RESOLVED else None,
            plan.note if resolved == significance.NOT_RESOLVED else "",
        ))
    return out
