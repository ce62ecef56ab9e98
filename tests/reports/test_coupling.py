"""Tests of php_runner/coupling_report.py: the report's figures are the registry's audits, aggregated."""

from __future__ import annotations

import statistics

import pytest
from typer.testing import CliRunner

from php_runner.reports import coupling as coupling_report
from php_runner.cli import app
from php_runner.errors import InputError
from php_runner.store.registry import Registry
from php_runner.experiment.schema import PlannedRun

SIZES = ("1", "8", "64", "256")


def _metrics(r1: float) -> dict:
    return {"R1": r1, "R5": r1 + 1, "R10": r1 + 2, "mAP": r1 / 2, "mINP": r1 / 4}


def _audit(ordered: float, shuffled: float, alone: float) -> dict:
    """An audit report shaped like audit.run_audit's, with the given R1 at batch 64 and at batch 1."""
    sweep_ordered = {"1": _metrics(alone), "8": _metrics(alone + 1), "64": _metrics(ordered), "256": _metrics(ordered - 1)}
    sweep_shuffled = {"1": _metrics(alone), "8": _metrics(alone + 1), "64": _metrics(shuffled),
                      "256": _metrics(shuffled - 1)}
    shuffled_runs = [_metrics(shuffled), _metrics(shuffled)]
    sweep_shuffled = {size: {**metrics, "runs": [metrics]} for size, metrics in sweep_shuffled.items()}
    return {
        "ordered": _metrics(ordered), "shuffled": {**_metrics(shuffled), "runs": shuffled_runs},
        "eval_batch_size": 64, "r1_ordered": ordered, "r1_shuffled": shuffled, "r1_gap": ordered - shuffled,
        "batch_size_sweep": {"batch_sizes": [1, 8, 64, 256], "ordered": sweep_ordered, "shuffled": sweep_shuffled},
        "chance_r1": {"gallery": 1.0, "same_batch": 28.75, "batch_size": 64},
        "alignment": {"queries_with_match_in_same_batch": 1.0},
        "split": {"splits": {"test": {"identities": 100, "images": 2000, "captions": 2000}}},
        "seconds": 30.0,
    }


# (coupling, seed, trained R1, ordered, shuffled, alone)
RUNS = [("official", 1, 46.0, 46.45, 18.58, 12.75), ("official", 2, 40.0, 30.0, 22.0, 10.0),
        ("official", 3, 44.0, 41.0, 20.0, 11.0), ("per-sample", 1, 5.0, 5.0, 5.0, 5.0),
        ("per-sample", 2, 6.0, 6.0, 6.0, 6.0)]


@pytest.fixture
def filled(registry_url):
    registry = Registry(registry_url)
    for coupling, seed, trained, ordered, shuffled, alone in RUNS:
        config = {"model": {"coupling": coupling}, "train": {"seed": seed}, "data": {"dataset": "ICFG-PEDES"},
                  "runtime": {"data_root": "d"}}
        run = registry.plan_run(PlannedRun(config=config, config_hash=f"{coupling}{seed}".ljust(64, "0"),
                                           spec_name="coupling", table="coupling", row_label=coupling,
                                           dataset="ICFG-PEDES", seed=seed, preset="tiny-icfg-scale"))
        assert registry.claim_run(run.id, "w")
        registry.record_provenance(run.id, {"command": "php-run ablate coupling --dataset ICFG-PEDES",
                                            "device": "cpu (x86_64, 2 cores)"})
        registry.record_result(run.id, "best-on-test", 8, "test", _metrics(trained))
        registry.record_audit(run.id, _audit(ordered, shuffled, alone))
        registry.mark_done(run.id)
    # A run of another preset and a run without an audit stay out of the rows.
    other = registry.plan_run(PlannedRun(config={"model": {"coupling": "official"}}, config_hash="f" * 64,
                                         spec_name="coupling", table="coupling", row_label="official",
                                         dataset="ICFG-PEDES", seed=1, preset="tiny"))
    registry.mark_done(other.id)
    yield registry
    registry.close()


def test_rows_are_the_audits_per_coupling_and_seed(filled):
    report = coupling_report.collect(filled, "ICFG-PEDES", "tiny-icfg-scale")
    assert list(report.rows) == ["official", "per-sample"]
    official = report.rows["official"]
    assert [(r.seed, r.ordered, r.shuffled, r.alone, r.trained_r1) for r in official] == [
        (seed, ordered, shuffled, alone, trained) for c, seed, trained, ordered, shuffled, alone in RUNS
        if c == "official"]
    assert official[0].sweep_ordered == {1: 12.75, 8: 13.75, 64: 46.45, 256: 45.45}
    assert report.commands == ["php-run ablate coupling --dataset ICFG-PEDES"]
    assert report.missing == [] and report.wall_seconds is not None


def test_markdown_shows_mean_and_std_over_seeds_and_the_goal_verdict(filled):
    markdown = coupling_report.render_markdown(coupling_report.collect(filled, "ICFG-PEDES", "tiny-icfg-scale"), "f.png")
    gaps = [ordered - shuffled for c, _, _, ordered, shuffled, _ in RUNS if c == "official"]
    ordered = [ordered for c, _, _, ordered, _, _ in RUNS if c == "official"]
    assert f"{statistics.fmean(ordered):.2f} ± {statistics.stdev(ordered):.2f}" in markdown
    assert f"{statistics.fmean(gaps):.2f} ± {statistics.stdev(gaps):.2f}" in markdown
    assert "| official | 1, 2, 3 |" in markdown and "| 3 of 3 |" not in markdown and "| 2 of 3 |" in markdown
    assert "the goal of at least 10 points on every seed is not met" in markdown
    assert "exactly equal on every seed and at every batch size" in markdown
    assert "![R1 against evaluation batch size](f.png)" in markdown
    assert "cpu (x86_64, 2 cores)" in markdown


def test_cli_writes_the_report_and_a_png(filled, registry_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "coupling", "--db", registry_url], catch_exceptions=False)
    assert result.exit_code == 0, result.stdout
    png = (tmp_path / "reports" / "coupling_artefact.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "46.45" in (tmp_path / "reports" / "coupling_artefact.md").read_text()


def test_no_audited_runs_is_a_one_line_input_error(filled):
    with pytest.raises(InputError, match="php-run ablate coupling --dataset RSTPReid --preset tiny-icfg-scale"):
        coupling_report.collect(filled, "RSTPReid", "tiny-icfg-scale")
