"""Table building and rendering against hand-built result rows with known values."""

import csv
import io
import shutil
import statistics
import subprocess

import pytest
from rich.console import Console

from php_runner.reports import publish, render
from php_runner.reports import tables as reports
from php_runner.experiment.paper import PAPER_RESULTS_FILE, load_paper_results, paper_value
from php_runner.reports.tables import NOT_PAPER_SCALE_NOTE, build_table
from php_runner.reports.render import render_csv, render_markdown, render_rich
from php_runner.reports.publish import write_reports
from php_runner.store.records import ResultRow

R1S = {1: 80.0, 2: 82.0, 3: 84.5}


def row(table="cnum", label="9", dataset="CUHK-PEDES", seed=1, rule="best-on-test", r1=80.0, mAP=70.0,
        kind="trained", audit=None, forced_test=False):
    return ResultRow(table=table, spec_name=table, row_label=label, dataset=dataset, seed=seed, rule=rule,
                     metrics={"R1": r1, "R5": 90.0, "R10": 95.0, "mAP": mAP, "mINP": 50.0}, kind=kind,
                     audit=audit, forced_test=forced_test)


def seeds_rows(**kwargs):
    return [row(seed=seed, r1=r1, **kwargs) for seed, r1 in R1S.items()]


def test_cell_holds_paper_mean_std_n_delta_and_rule():
    view = build_table("cnum", seeds_rows() + [row(seed=1, rule="last", r1=10.0)])
    line = view.line("9", "CUHK-PEDES")
    cell = line.cell("R1")
    expected_mean = statistics.fmean(R1S.values())
    assert cell.paper == paper_value("cnum", "9", "CUHK-PEDES", "R1") == 82.80
    assert cell.mean == pytest.approx(expected_mean) and cell.n == 3
    assert cell.std == pytest.approx(statistics.stdev(R1S.values()))
    assert cell.delta == pytest.approx(expected_mean - 82.80)
    assert line.rule == "best-on-test" and line.seeds == (1, 2, 3) and line.fill_command is None
    last = build_table("cnum", seeds_rows() + [row(seed=1, rule="last", r1=10.0)], rules=("last",))
    assert last.line("9", "CUHK-PEDES").cell("R1").mean == 10.0


def test_single_seed_has_no_std_and_repeated_seed_counts_once():
    view = build_table("cnum", [row(r1=70.0), row(r1=75.0)])
    cell = view.line("9", "CUHK-PEDES").cell("R1")
    assert (cell.mean, cell.std, cell.n) == (75.0, None, 1)
    assert "75.00 (n=1)" in render_markdown(view)


def test_missing_cells_carry_the_command_that_fills_them():
    view = build_table("cnum", seeds_rows())
    line = view.line("3", "ICFG-PEDES")
    assert line.cell("R1").mean is None and line.cell("R1").n == 0
    assert line.fill_command == "php-run ablate cnum --dataset ICFG-PEDES"
    assert len(view.missing()) == 4 * 3 - 1
    headline = build_table("headline", [], preset="tiny")
    assert headline.line("PHP", "RSTPReid").fill_command == "php-run reproduce --dataset RSTPReid --preset tiny"
    text = render_markdown(view)
    assert "missing: php-run ablate cnum --dataset ICFG-PEDES" in text


def test_reference_methods_show_paper_values_only():
    view = build_table("headline", [])
    irra = view.line("IRRA", "ICFG-PEDES", kind="reference")
    assert irra.fill_command is None and irra.cell("R1").paper == 63.46 and view.line("IRRA", "ICFG-PEDES") is None
    assert {line.row_key for line in view.missing()} == {"PHP"}


def test_paper_values_come_from_the_data_file(tmp_path, monkeypatch):
    edited = tmp_path / "paper_results.toml"
    edited.write_text(PAPER_RESULTS_FILE.read_text().replace("[80.82, 73.82]", "[11.11, 73.82]", 1))
    monkeypatch.setattr(reports, "load_paper_results", lambda: load_paper_results(edited))
    view = build_table("cnum", [row(label="3", r1=12.11)])
    assert view.line("3", "CUHK-PEDES").cell("R1").delta == pytest.approx(1.0)
    assert "paper 11.11, Δ +1.00" in render_markdown(view)
    assert "80.82" not in render_markdown(view)


def test_every_paper_cell_of_every_table_is_shown():
    results = load_paper_results()
    for name, table in results.tables.items():
        view = build_table(name, [])
        for paper_row in table.rows:
            for dataset in table.datasets:
                kind = "reference" if paper_row.reference else "trained"
                line = view.line(paper_row.key, dataset, kind=kind)
                for metric in table.metrics:
                    assert line.cell(metric).paper == table.value(paper_row.key, dataset, metric)


def test_inconsistencies_are_footnoted_on_their_cells():
    view = build_table("beta", [])
    cell = view.line("1.5", "RSTPReid").cell("mAP")
    (number,) = cell.notes
    assert "73.16" in view.footnotes[number - 1]
    assert view.line("1.5", "RSTPReid").cell("R1").notes == ()
    text = render_markdown(view)
    assert f"paper 73.16 [{number}]" in text and f"[{number}] {view.footnotes[number - 1]}" in text
    (zero,) = view.line("0.0", "CUHK-PEDES").notes
    assert "sdm" in view.footnotes[zero - 1]


def test_imported_and_forced_test_rows_get_labelled_lines_of_their_own():
    rows = seeds_rows() + [row(kind="imported", seed=0, r1=82.5),
                           row(kind="trial", seed=7, r1=90.0, forced_test=True)]
    view = build_table("cnum", rows)
    trained = view.line("9", "CUHK-PEDES")
    imported = view.line("9", "CUHK-PEDES", kind="imported")
    forced = view.line("9", "CUHK-PEDES", kind="trial", forced_test=True)
    assert trained.cell("R1").n == 3 and imported.cell("R1").mean == 82.5 and forced.cell("R1").mean == 90.0
    assert imported.source == "imported" and forced.source == "tuning trial [forced test]"
    lines = [line for line in view.lines if line.row_key == "9" and line.dataset == "CUHK-PEDES"]
    assert [line.kind for line in lines] == ["trained", "imported", "trial"]
    assert any("test split" in view.footnotes[n - 1] for n in forced.notes)
    assert "tuning trial [forced test]" in render_markdown(view)


def test_audit_verdict_column_appears_with_audit_data():
    assert not build_table("cnum", seeds_rows()).has_audit
    audits = [{"batch_dependent": False, "r1_ordered": 80.0, "r1_shuffled": 79.0, "r1_gap": 1.0},
              {"batch_dependent": True, "r1_ordered": 84.0, "r1_shuffled": 80.0, "r1_gap": 4.0}]
    rows = [row(seed=seed, audit=audit) for seed, audit in zip((1, 2), audits)]
    view = build_table("cnum", rows)
    verdict = view.line("9", "CUHK-PEDES").audit
    assert verdict.batch_dependent is True and verdict.r1_gap == pytest.approx(2.5) and verdict.n == 2
    assert view.has_audit and "batch-dependent; R1 ordered 82.00 vs shuffled 79.50; gap +2.50 (n=2)" in render_markdown(view)
    assert build_table("cnum", [row(audit=audits[0])]).line("9", "CUHK-PEDES").audit.text().startswith("batch-independent")


def test_unknown_row_labels_and_other_tables():
    view = build_table("cnum", [row(label="15", r1=60.0), row(table="beta", label="9", r1=1.0)])
    extra = view.line("15", "CUHK-PEDES")
    assert extra.cell("R1").mean == 60.0 and extra.cell("R1").paper is None and extra.cell("R1").delta is None
    assert view.line("9", "CUHK-PEDES").cell("R1").mean is None  # the beta row belongs to another table


def test_csv_is_long_format_with_numbers():
    view = build_table("cnum", seeds_rows())
    records = list(csv.DictReader(io.StringIO(render_csv(view))))
    assert len(records) == len(view.lines) * len(view.metrics)
    (r1,) = [r for r in records if (r["row"], r["dataset"], r["metric"]) == ("9", "CUHK-PEDES", "R1")]
    assert float(r1["paper"]) == 82.80 and float(r1["mean"]) == pytest.approx(statistics.fmean(R1S.values()))
    assert float(r1["std"]) == pytest.approx(statistics.stdev(R1S.values()), abs=1e-4) and r1["n"] == "3"
    assert r1["rule"] == "best-on-test" and r1["seeds"] == "1 2 3" and r1["fill_command"] == ""
    (gap,) = [r for r in records if (r["row"], r["dataset"], r["metric"]) == ("3", "RSTPReid", "mAP")]
    assert gap["mean"] == "" and gap["fill_command"] == "php-run ablate cnum --dataset RSTPReid"


def test_rich_rendering_shows_values_and_footnotes():
    console = Console(width=250, record=True)
    console.print(render_rich(build_table("beta", [row(table="beta", label="1.5", dataset="RSTPReid", r1=74.7)])))
    text = console.export_text()
    assert "74.70 (n=1)" in text and "Δ +0.00" in text and "73.16" in text and "out of line" in text


def test_write_reports_writes_markdown_csv_latex_and_the_figures(tmp_path):
    module_rows = [row(table="module", label=variant, seed=seed, r1=60.0 + seed)
                   for variant in ("base", "full") for seed in (1, 2)]
    written = write_reports(build_table("module", module_rows), tmp_path / "reports")
    assert sorted(p.name for p in written) == ["module.csv", "module.md", "module.png", "module.tex"]
    assert (tmp_path / "reports" / "module.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "reports" / "module.md").read_text().startswith("## Module ablation")
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == sorted(p.name for p in written)
    others = write_reports(build_table("cnum", []), tmp_path / "reports")
    assert sorted(p.name for p in others) == ["cnum.csv", "cnum.md", "cnum.png", "cnum.tex"]
    loss = write_reports(build_table("loss", []), tmp_path / "reports")
    assert sorted(p.name for p in loss) == ["loss.csv", "loss.md", "loss.tex"]


def test_a_table_of_another_preset_says_so_and_writes_its_own_files(tmp_path):
    paper_view = build_table("headline", [], preset="paper")
    tiny_view = build_table("headline", [], preset="tiny")
    note = NOT_PAPER_SCALE_NOTE.format(preset="tiny")
    assert note in tiny_view.footnotes and note not in paper_view.footnotes
    assert tiny_view.footnotes.index(note) + 1 in tiny_view.notes
    written = write_reports(tiny_view, tmp_path) + write_reports(paper_view, tmp_path)
    assert sorted(p.name for p in written) == ["headline.csv", "headline.md", "headline.tex", "headline_tiny.csv",
                                               "headline_tiny.md", "headline_tiny.tex"]
    assert "'tiny' preset" in (tmp_path / "headline_tiny.md").read_text()



# ---- LaTeX ------------------------------------------------------------------------------------------

def latex_rows(text: str) -> list[str]:
    body = text.split("\\midrule\n", 1)[1].split("\\bottomrule", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def test_latex_is_a_booktabs_table_with_ours_paper_delta_and_footnotes():
    view = build_table("cnum", seeds_rows(), preset="tiny")
    text = render.render_latex(view)
    assert text.index("\\toprule") < text.index("\\midrule") < text.index("\\bottomrule") < text.index("\\end{tabular}")
    assert "\\begin{tabular}{lll" + "r" * 3 * len(view.metrics) + "}" in text
    rows = latex_rows(text)
    assert len(rows) == len(view.lines)
    assert all(row.count(" & ") == 3 + 3 * len(view.metrics) - 1 and row.endswith("\\\\") for row in rows)
    mean, std = statistics.fmean(R1S.values()), statistics.stdev(R1S.values())
    (filled,) = [row for row in rows if row.startswith("9 & CUHK-PEDES & trained")]
    ours, paper, delta = filled.split(" & ")[3:6]
    assert ours == f"${mean:.2f} \\pm {std:.2f}$" and paper == "82.80" and delta == f"${mean - 82.80:+.2f}$"
    assert "6 & CUHK-PEDES & trained & -- & 82.31 & --" in text
    note = NOT_PAPER_SCALE_NOTE.format(preset="tiny")
    assert f"\\textsuperscript{{1}}{render.latex_escape(note)}\\\\" in text
    assert "\\caption{" + render.latex_escape(view.title) + "\\textsuperscript{1}}" in text


def test_latex_escape_leaves_no_bare_specials():
    assert render.latex_escape("a_b & 5% ± Δ #1 {x}") == "a\\_b \\& 5\\% $\\pm$ $\\Delta$ \\#1 \\{x\\}"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no LaTeX engine (pdflatex) installed")
def test_latex_of_every_table_compiles_with_pdflatex(tmp_path):
    rows = seeds_rows() + [row(table="coupling", label="official", dataset="ICFG-PEDES",
                                  audit={"batch_dependent": True, "r1_gap": 1.5, "r1_ordered": 10.0,
                                         "r1_shuffled": 8.5}),
                          row(table="loss", label="sdm_itc 5% & #2 ± Δ")]  # specials must be escaped
    inputs = []
    for name in load_paper_results().tables:
        (tmp_path / f"{name}.tex").write_text(render.render_latex(build_table(name, rows, preset="tiny")))
        inputs.append(f"\\input{{{name}.tex}}\\clearpage")
    document = ("\\documentclass{article}\n\\usepackage[a3paper,landscape,margin=1cm]{geometry}\n"
                "\\usepackage{booktabs}\n\\begin{document}\n" + "\n".join(inputs) + "\n\\end{document}\n")
    (tmp_path / "all.tex").write_text(document)
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "all.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "all.pdf").stat().st_size > 1000


# ---- the report index -------------------------------------------------------------------------------

def test_index_lists_every_table_its_figures_filled_cells_and_audit_verdicts(tmp_path):
    audit = {"batch_dependent": True, "r1_gap": 1.5, "r1_ordered": 10.0, "r1_shuffled": 8.5}
    rows = seeds_rows() + [row(table="coupling", label="official", dataset="ICFG-PEDES", audit=audit)]
    views = [build_table(name, rows, preset="tiny") for name in load_paper_results().tables]
    path = publish.write_index(views, tmp_path, "tiny")
    assert path == tmp_path / "index_tiny.md"
    text = path.read_text()
    lines = {line.split("](", 1)[0].lstrip("| ["): line for line in text.splitlines() if line.startswith("| [")}
    assert len(lines) == len(views)
    for view in views:
        trained = [line for line in view.lines if line.kind == "trained"]
        filled = sum(cell.mean is not None for line in trained for cell in line.metrics)
        assert f"| {filled} / {len(trained) * len(view.metrics)} |" in lines[view.title]
        assert f"({view.file_stem}.md)" in lines[view.title]
    assert "[cnum_tiny.png](cnum_tiny.png)" in lines[next(v.title for v in views if v.name == "cnum")]
    assert "[module_tiny.png](module_tiny.png)" in lines[next(v.title for v in views if v.name == "module")]
    assert "1 (1 batch-dependent)" in lines[next(v.title for v in views if v.name == "coupling")]
    assert "- official (batch-mixing), ICFG-PEDES (trained): batch-dependent; R1 ordered 10.00 vs shuffled 8.50; gap +1.50 (n=1)" in text
