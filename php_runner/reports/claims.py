"""Every claim of the paper checked against the registry: ``php-run report claims`` (reports/claims.md + figure).

For each claim of ``paper_claims.toml`` and each kind of run that fills it (trained, imported): our
difference (row minus reference, in points of the claim's metric) with its interval and verdict, the seeds
used, the paper's own difference, and the same difference under shuffled test order from the audits'
per-query outcomes where they exist. A claim against a *published* number reads our cell's interval
against that fixed value. Every number is recomputed from the per-query outcomes in the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from php_runner.engine import significance
from php_runner.experiment.paper import Claim, load_paper_claims
from php_runner.files import write_atomic
from php_runner.reports.figures import plot_claims
from php_runner.reports.intervals import (
    CONFIDENCE,
    NO_OUTCOMES,
    compare_cells,
    method_text,
    outcomes_by_seed,
    seed_intervals,
)
from php_runner.reports.tables import PAPER_PRESET, RULE_PREFERENCE
from php_runner.store.records import ResultRow

NO_AUDIT = "not available (no audit with per-query outcomes)"


@dataclass(frozen=True)
class Difference:
    """Row minus reference (or minus the published value), its interval and verdict; ``note`` says why not."""

    value: float | None
    low: float | None
    high: float | None
    verdict: str | None
    note: str = ""


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    kind: str                      # the kind of our runs: trained | imported
    ours: Difference
    shuffled: Difference           # the same under shuffled test order (audits)
    seeds: tuple[int, ...]
    seeds_needed: int | None       # for an unresolved paired comparison; else None
    seeds_note: str

    @property
    def paper_difference(self) -> float:
        return self.claim.paper_difference


def cell_rows(rows: Sequence[ResultRow], table: str, row: str, dataset: str, kind: str) -> list[ResultRow]:
    """One result row per seed of a cell, under the first rule of ``RULE_PREFERENCE`` it has."""
    members = [r for r in rows if (r.table, r.row_label, r.dataset, r.kind) == (table, row, dataset, kind)]
    rule = next((rule for rule in RULE_PREFERENCE if any(r.rule == rule for r in members)), None)
    return list({r.seed: r for r in members if r.rule == rule}.values())


def check_claims(rows: Sequence[ResultRow], claims: Sequence[Claim] | None = None) -> list[ClaimResult]:
    """Every claim (default: the packaged ones) for every kind of run that fills its row."""
    claims = load_paper_claims().claims if claims is None else claims
    results = []
    for claim in claims:
        kinds = sorted({r.kind for r in rows if (r.table, r.row_label, r.dataset) == (claim.table, claim.row,
                                                                                      claim.dataset)})
        for kind in kinds or ["trained"]:
            results.append(_check(claim, kind, rows))
    return results


def _check(claim: Claim, kind: str, rows: Sequence[ResultRow]) -> ClaimResult:
    cell = cell_rows(rows, claim.table, claim.row, claim.dataset, kind)
    if not cell:
        missing = Difference(None, None, None, None, f"no {kind} runs of {claim.row!r}")
        return ClaimResult(claim, kind, missing, missing, (), None, "")
    seeds = tuple(sorted(r.seed for r in cell))
    if claim.against == "published":
        ours = _against_published(claim, outcomes_by_seed(cell))
        shuffled = _against_published(claim, outcomes_by_seed(cell, "shuffled_outcomes"), NO_AUDIT)
        return ClaimResult(claim, kind, ours, shuffled, seeds, None, "")
    reference = cell_rows(rows, claim.table, claim.reference, claim.dataset, kind)
    if not reference:
        missing = Difference(None, None, None, None, f"no {kind} runs of the reference {claim.reference!r}")
        return ClaimResult(claim, kind, missing, missing, seeds, None, "")
    ours, comparison = _paired(claim, outcomes_by_seed(cell), outcomes_by_seed(reference))
    shuffled, _ = _paired(claim, outcomes_by_seed(cell, "shuffled_outcomes"),
                          outcomes_by_seed(reference, "shuffled_outcomes"), NO_AUDIT)
    needed, note = None, ""
    if comparison is not None:
        seeds = comparison.seeds
        if ours.verdict == significance.NOT_RESOLVED:
            plan = significance.seeds_to_resolve(comparison, CONFIDENCE)
            needed, note = plan.seeds, plan.note
    return ClaimResult(claim, kind, ours, shuffled, seeds, needed, note)


def _paired(claim: Claim, row, reference, missing: str = NO_OUTCOMES):
    if row is None or reference is None:
        return Difference(None, None, None, None, missing), None
    found, why = compare_cells(row, reference, claim.direction)
    if found is None:
        return Difference(None, None, None, None, why), None
    comparison = found[claim.metric]
    return Difference(comparison.difference, comparison.low, comparison.high, comparison.verdict), comparison


def _against_published(claim: Claim, by_seed, missing: str = NO_OUTCOMES) -> Difference:
    """Our cell's interval minus the fixed published value of the reference method."""
    if by_seed is None:
        return Difference(None, None, None, None, missing)
    intervals, why = seed_intervals(by_seed)
    if intervals is None:
        return Difference(None, None, None, None, why)
    interval, published = intervals[claim.metric], claim.paper.reference
    low, high = interval.low - published, interval.high - published
    return Difference(interval.estimate - published, low, high, significance.verdict(low, high, claim.direction))


def report_name(preset: str | None) -> str:
    return "claims" if preset in (None, PAPER_PRESET) else f"claims_{preset}"


def _text(difference: Difference) -> tuple[str, str]:
    if difference.value is None:
        return "—", difference.note
    return f"{difference.value:+.2f} [{difference.low:+.2f}, {difference.high:+.2f}]", difference.verdict


def render_claims_markdown(results: Sequence[ClaimResult], preset: str | None, figure: str | None) -> str:
    scale = f" (preset {preset})" if preset else ""
    out = [f"# The paper's claims, checked{scale}", "",
           "Each claim of `paper_claims.toml`: row minus reference in points of the metric, recomputed from the "
           "per-query outcomes in the registry. Against a published number (another method's), our cell's interval "
           "minus that value. Verdict against the paper's direction: supported (the interval excludes 0 on the "
           "paper's side), not resolved (it includes 0), contradicted (it excludes 0 on the other side).", "",
           f"Intervals: {method_text()}.", ""]
    if figure:
        out += [f"![claims]({figure})", ""]
    headers = ("table", "row vs reference", "dataset", "metric", "runs", "paper's difference", "ours [interval]",
               "verdict", "seeds", "seeds to resolve", "shuffled test order [interval]", "verdict (shuffled)")
    out += ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for result in results:
        claim = result.claim
        ours, verdict = _text(result.ours)
        shuffled, shuffled_verdict = _text(result.shuffled)
        needed = "" if result.ours.verdict != significance.NOT_RESOLVED else (
            str(result.seeds_needed) if result.seeds_needed is not None else result.seeds_note)
        reference = claim.reference + (" (published)" if claim.against == "published" else "")
        cells = [claim.table, f"{claim.row} vs {reference}", claim.dataset, claim.metric, result.kind,
                 f"{result.paper_difference:+.2f} ({claim.direction})", ours, verdict,
                 " ".join(map(str, result.seeds)), needed, shuffled, shuffled_verdict]
        out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(out) + "\n"


def write_claims_report(rows: Sequence[ResultRow], folder: str | Path, preset: str | None) -> list[Path]:
    """Write CLAIMS.md (and CLAIMS.png when a difference exists); return the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results = check_claims(rows)
    stem = report_name(preset)
    png = plot_claims(results)
    written = [write_atomic(folder / f"{stem}.png", png)] if png is not None else []
    markdown = render_claims_markdown(results, preset, f"{stem}.png" if png is not None else None)
    return [write_atomic(folder / f"{stem}.md", markdown.encode("utf-8")), *written]
