"""paper_claims.toml: every claim names a table, rows, dataset and metric of paper_results.toml, copies its
values, points the way the paper's own numbers do, and every ablation row is compared with its baseline."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "php_runner" / "experiment"
CLAIM_KEYS = {"table", "row", "reference", "dataset", "metric", "direction", "against", "paper"}


def read(name):
    with (PACKAGE / name).open("rb") as handle:
        return tomllib.load(handle)


CLAIMS = read("paper_claims.toml")
TABLES = read("paper_results.toml")["tables"]


def paper_row(table, key):
    return next((row for row in TABLES[table]["rows"] if row["key"] == key), None)


def paper_value(table, key, dataset, metric):
    return paper_row(table, key)["values"][dataset][TABLES[table]["metrics"].index(metric)]


@pytest.mark.parametrize("claim", CLAIMS["claims"], ids=lambda c: f"{c['table']}:{c['row']}-{c['reference']}:{c['dataset']}")
def test_claim_names_exist_and_copy_the_papers_values(claim):
    assert set(claim) == CLAIM_KEYS
    table = TABLES[claim["table"]]
    assert table.get("in_paper", True)
    assert paper_row(claim["table"], claim["row"]) is not None
    reference = paper_row(claim["table"], claim["reference"])
    assert reference is not None
    assert claim["dataset"] in table["datasets"] and claim["metric"] in table["metrics"]
    row_value = paper_value(claim["table"], claim["row"], claim["dataset"], claim["metric"])
    reference_value = paper_value(claim["table"], claim["reference"], claim["dataset"], claim["metric"])
    assert claim["paper"] == {"row": row_value, "reference": reference_value}
    assert claim["direction"] == ("higher" if row_value > reference_value else "lower")
    assert row_value != reference_value
    assert claim["against"] == ("published" if reference.get("reference", False) else "reproduced")


def test_every_ablation_row_is_compared_with_its_baseline_on_every_dataset():
    baselines = CLAIMS["baselines"]
    assert set(baselines) == {"module", "loss", "cnum", "beta", "sharing"}
    present = {(c["table"], c["row"], c["reference"], c["dataset"]) for c in CLAIMS["claims"]}
    for table, baseline in baselines.items():
        assert paper_row(table, baseline) is not None
        for row in TABLES[table]["rows"]:
            for dataset in TABLES[table]["datasets"]:
                if row["key"] != baseline:
                    assert (table, row["key"], baseline, dataset) in present


def test_headline_claims_face_the_best_other_published_method():
    headline = [c for c in CLAIMS["claims"] if c["table"] == "headline"]
    assert sorted(c["dataset"] for c in headline) == sorted(TABLES["headline"]["datasets"])
    for claim in headline:
        published = [row for row in TABLES["headline"]["rows"] if row.get("reference", False)]
        best = max(published, key=lambda row: paper_value("headline", row["key"], claim["dataset"], "R1"))
        assert (claim["row"], claim["reference"], claim["metric"]) == ("PHP", best["key"], "R1")


def test_no_claim_is_listed_twice():
    keys = [(c["table"], c["row"], c["reference"], c["dataset"], c["metric"]) for c in CLAIMS["claims"]]
    assert len(keys) == len(set(keys))
