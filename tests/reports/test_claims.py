"""Claims and intervals from the registry: numbers recomputed from stored per-query outcomes, end to end."""

from __future__ import annotations

import numpy as np
import pytest

from php_runner.engine.metrics import QueryOutcomes, metrics_from_outcomes
from php_runner.experiment.paper import Claim, ClaimedValues, load_paper_claims
from php_runner.experiment.specs import expand, load_spec
from php_runner.reports.claims import check_claims
from php_runner.reports.intervals import NO_OUTCOMES
from php_runner.reports.tables import build_table
from php_runner.store.records import ResultRow
from php_runner.store.registry import Registry


def outcomes(seed: int, r1_rate: float, identities: int = 60, per_identity: int = 3) -> QueryOutcomes:
    generator = np.random.default_rng(seed)
    hits = generator.random(identities * per_identity) < r1_rate
    return QueryOutcomes(
        first_rank=np.where(hits, 1, generator.integers(2, 30, hits.size)).astype(np.int32),
        average_precision=np.where(hits, 1.0, generator.uniform(0.05, 0.5, hits.size)),
        inverse_negative_penalty=generator.uniform(0.05, 1.0, hits.size),
        query_pid=np.repeat(np.arange(identities), per_identity).astype(np.int64),
    )


def row(table: str, label: str, seed: int, per_query: QueryOutcomes | None, kind: str = "trained") -> ResultRow:
    metrics = metrics_from_outcomes(per_query) if per_query is not None else {"R1": 50.0, "mAP": 40.0}
    return ResultRow(table, table, label, "CUHK-PEDES", seed, "best-on-test", metrics, kind, None,
                     outcomes=per_query)


def claim(table: str, row_key: str, reference: str, direction: str, against: str = "reproduced") -> Claim:
    return Claim(table=table, row=row_key, reference=reference, dataset="CUHK-PEDES", metric="R1",
                 direction=direction, against=against, paper=ClaimedValues(row=80.0, reference=70.0))


def test_a_paired_claim_is_the_mean_over_seeds_of_the_recorded_difference_with_a_verdict():
    rows = [row("cnum", "7", s, outcomes(s, 0.9)) for s in (1, 2, 3)]
    rows += [row("cnum", "9", s, outcomes(10 + s, 0.4)) for s in (1, 2, 3)]
    [result] = check_claims(rows, [claim("cnum", "7", "9", "higher")])
    expected = np.mean([rows[i].metrics["R1"] - rows[i + 3].metrics["R1"] for i in range(3)])
    assert result.ours.value == pytest.approx(expected, abs=1e-12)
    assert result.ours.low < result.ours.value < result.ours.high and result.seeds == (1, 2, 3)
    assert result.ours.verdict == "supported" and result.paper_difference == pytest.approx(10.0)
    [flipped] = check_claims(rows, [claim("cnum", "7", "9", "lower")])
    assert flipped.ours.verdict == "contradicted"
    assert result.shuffled.value is None and "not available" in result.shuffled.note


def test_a_claim_against_a_published_number_reads_our_interval_against_that_value():
    rows = [row("headline", "PHP", s, outcomes(s, 0.95)) for s in (1, 2)]
    [result] = check_claims(rows, [claim("headline", "PHP", "RDE", "higher", against="published")])
    ours = np.mean([r.metrics["R1"] for r in rows])
    assert result.ours.value == pytest.approx(ours - 70.0, abs=1e-12)
    assert result.ours.verdict == "supported" and result.ours.low > 0


def test_runs_without_outcomes_say_so_in_claims_and_tables():
    rows = [row("cnum", "7", 1, None), row("cnum", "9", 1, outcomes(1, 0.5))]
    [result] = check_claims(rows, [claim("cnum", "7", "9", "higher")])
    assert result.ours.value is None and result.ours.note == NO_OUTCOMES
    view = build_table("cnum", rows)
    old = view.line("7", "CUHK-PEDES").cell("R1")
    new = view.line("9", "CUHK-PEDES").cell("R1")
    assert old.low is None and old.interval_note == NO_OUTCOMES
    assert new.low <= new.mean <= new.high and new.interval_note is None
    [comparison] = [c for c in view.comparisons if c.row_key == "7" and c.metric == "R1"]
    assert comparison.difference is None and comparison.note == NO_OUTCOMES


def test_table_comparisons_use_the_baseline_or_the_named_reference():
    rows = [row("cnum", key, s, outcomes(s * 7 + len(key), rate)) for key, rate in (("7", 0.3), ("9", 0.8), ("12", 0.5))
            for s in (1, 2)]
    view = build_table("cnum", rows)
    assert view.reference == load_paper_claims().baselines["cnum"] == "9"
    r1 = {c.row_key: c for c in view.comparisons if c.metric == "R1"}
    assert set(r1) == {"7", "12"} and r1["7"].difference < 0
    other = build_table("cnum", rows, reference_row="7")
    assert {c.row_key for c in other.comparisons if c.metric == "R1"} == {"9", "12"}


@pytest.mark.slow
def test_tiny_runs_outcomes_reproduce_their_results_and_report_claims_runs(cli, registry_url, spec_dir, tiny_data_root):
    spec = spec_dir / "claims_cnum.toml"
    spec.write_text('extends = "base"\ntable = "cnum"\ndatasets = ["CUHK-PEDES"]\nseeds = [1, 2]\n[train]\nepochs = 1\n'
                    '[grid]\n"model.cnum" = [6, 9]\n')
    code, out, _ = cli("run", spec, "--preset", "tiny", "--data-root", tiny_data_root, "--db", registry_url)
    assert code == 0, out
    registry = Registry(registry_url)
    planned = expand(load_spec(spec), "tiny", runtime={"data_root": str(tiny_data_root)})
    rows = registry.result_rows(preset="tiny")
    assert {r.seed for r in rows} == {p.seed for p in planned}
    for result in rows:
        recomputed = metrics_from_outcomes(result.outcomes)
        assert recomputed["R1"] == result.metrics["R1"] and recomputed["mAP"] == result.metrics["mAP"]
    registry.close()
    code, out, _ = cli("report", "claims", "--preset", "tiny", "--db", registry_url)
    assert code == 0, out
    from pathlib import Path

    markdown = Path("reports/claims_tiny.md").read_text()
    [line] = [line for line in markdown.splitlines() if line.startswith("| cnum | 6 vs 9 | CUHK-PEDES | R1 | trained")]
    best = [r for r in rows if r.rule == "best-on-test"]
    by_seed = {r.seed: r.metrics["R1"] for r in best if r.row_label == "6"}
    expected = np.mean([by_seed[r.seed] - r.metrics["R1"] for r in best if r.row_label == "9"])
    assert f"{expected:+.2f} [" in line and "1 2" in line  # recomputed from the registry's outcomes
    assert "(claims_tiny.md)" in Path("reports/index_tiny.md").read_text()
    code, out, _ = cli("table", "headline", "--preset", "tiny", "--json", "--db", registry_url)
    assert code == 0
