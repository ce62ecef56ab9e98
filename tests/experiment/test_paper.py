"""The paper's numbers as data: values, internal consistency, footnotes and validation errors."""

from pathlib import Path

import pytest

from php_runner.errors import InputError
from php_runner.experiment.paper import PAPER_RESULTS_FILE, load_paper_results, paper_value, table_names

HEADLINE_CONFIG_ROWS = {  # the row of each table that is the paper's headline configuration
    "module": "full", "loss": "sdm+itc+aux", "cnum": "9", "beta": "0.5", "sharing": "shared",
}


@pytest.mark.parametrize(("table", "row", "dataset", "metric", "expected"), [
    ("headline", "PHP", "ICFG-PEDES", "R1", 97.32),
    ("headline", "IRRA", "RSTPReid", "mAP", 47.17),
    ("module", "efp", "ICFG-PEDES", "R5", 97.18),
    ("loss", "sdm+aux", "RSTPReid", "R1", 75.75),   # Table VIII lists RSTPReid before ICFG-PEDES
    ("loss", "itc+aux", "ICFG-PEDES", "mAP", 76.46),
    ("cnum", "12", "ICFG-PEDES", "mAP", 78.43),
    ("beta", "1.5", "RSTPReid", "mAP", 73.16),
    ("sharing", "separate", "ICFG-PEDES", "R1", 21.76),
])
def test_transcribed_values_round_trip(table, row, dataset, metric, expected):
    assert paper_value(table, row, dataset, metric) == expected


def test_cells_the_paper_does_not_report_are_none():
    assert paper_value("cnum", "9", "CUHK-PEDES", "R5") is None  # Table VI gives R1 and mAP only
    assert paper_value("coupling", "official", "CUHK-PEDES", "R1") is None
    assert paper_value("beta", "4.0", "CUHK-PEDES", "R1") is None


def test_the_headline_configuration_has_the_same_numbers_in_every_table():
    results = load_paper_results()
    headline = results.table("headline")
    for table_name, row in HEADLINE_CONFIG_ROWS.items():
        table = results.table(table_name)
        for dataset in table.datasets:
            for metric in table.metrics:
                assert table.value(row, dataset, metric) == headline.value("PHP", dataset, metric), (table_name, dataset, metric)


def test_the_known_inconsistencies_are_in_the_data_and_footnoted():
    results = load_paper_results()
    beta, loss = results.table("beta"), results.table("loss")
    for dataset in beta.datasets:
        for metric in beta.metrics:
            assert beta.value("0.0", dataset, metric) == loss.value("itc+aux", dataset, metric)
    assert results.footnotes_for("beta", "0.0")
    assert any("73.16" in note.text for note in results.footnotes_for("beta", "1.5", "RSTPReid", "mAP"))
    assert not results.footnotes_for("beta", "1.5", "RSTPReid", "R1")


def test_table_catalogue_includes_our_own_coupling_table():
    assert table_names()[:6] == ["headline", "module", "loss", "cnum", "beta", "sharing"]
    coupling = load_paper_results().table("coupling")
    assert not coupling.in_paper and [row.key for row in coupling.rows] == ["official", "per-sample"]


def test_unknown_table_is_an_input_error():
    with pytest.raises(InputError, match="unknown table 'nope'"):
        paper_value("nope", "PHP", "CUHK-PEDES", "R1")


def _edited(tmp_path: Path, old: str, new: str) -> Path:
    text = PAPER_RESULTS_FILE.read_text()
    assert old in text
    path = tmp_path / "paper_results.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(("old", "new", "field"), [
    ('"CUHK-PEDES" = [82.80, 93.55, 96.20, 75.40]', '"CUHK-PEDES" = [82.80, 93.55, 96.20]', "tables.headline"),
    ('row_header = "variant"', 'row_header = "variant"\ncolour = "red"', "tables.module.colour"),
    ('{ table = "beta", row = "1.5"', '{ table = "beta", row = "7.5"', "footnotes"),
    ('metrics = ["R1", "mAP"]', 'metrics = ["R1", "top1"]', "tables.cnum.metrics"),
])
def test_invalid_files_give_one_line_errors_naming_file_and_field(tmp_path, old, new, field):
    path = _edited(tmp_path, old, new)
    with pytest.raises(InputError) as caught:
        load_paper_results(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: {field}")


def test_edited_file_is_read_not_the_packaged_values(tmp_path):
    path = _edited(tmp_path, "[80.82, 73.82]", "[12.34, 73.82]")
    assert load_paper_results(path).value("cnum", "3", "CUHK-PEDES", "R1") == 12.34
