"""Rendering a ``TableView``: the terminal (rich), Markdown, CSV and LaTeX, and the index of all tables."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from rich.table import Table

from php_runner.reports.tables import (
    CHART_TABLES,
    SENSITIVITY_TABLES,
    MetricCell,
    TableView,
    ViewLine,
)


def render_rich(view: TableView) -> Table:
    """A rich table: one line per row and dataset, ours over paper and delta in each metric column."""
    table = Table(title=_title(view), caption=_footnote_block(view), caption_justify="left", show_lines=True)
    for header in _headers(view):
        table.add_column(header, no_wrap=header in view.metrics)
    for line in view.lines:
        table.add_row(*_line_cells(line, view, separator="\n"))
    return table


def render_markdown(view: TableView, figures: Sequence[str] = ()) -> str:
    """The table as markdown; ``figures`` (file names beside the markdown file) are embedded below the title."""
    headers = _headers(view)
    out = [f"## {_title(view)}", "", f"Source: {view.source}.", ""]
    out += [item for name in figures for item in (f"![{view.title}]({name})", "")]
    out += ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for line in view.lines:
        cells = [cell.replace("|", "\\|") for cell in _line_cells(line, view, separator="<br>")]
        out.append("| " + " | ".join(cells) + " |")
    if view.footnotes:
        out += ["", *(f"[{number}] {text}" + "  " for number, text in enumerate(view.footnotes, 1))]
    out += ["", f"Intervals in brackets: {view.method}.", *comparison_markdown(view)]
    return "\n".join(out).rstrip() + "\n"


COMPARISON_HEADERS = ("row", "dataset", "source", "metric", "claimed", "difference [interval]", "verdict",
                      "seeds", "seeds to resolve")


def comparison_cells(comparison) -> list[str]:
    """One paired comparison as table cells (see ``COMPARISON_HEADERS``)."""
    if comparison.difference is None:
        difference, verdict = "—", comparison.note
    else:
        difference = f"{comparison.difference:+.2f} [{comparison.low:+.2f}, {comparison.high:+.2f}]"
        verdict = comparison.verdict
    needed = "" if comparison.verdict != "not resolved" else (
        str(comparison.seeds_needed) if comparison.seeds_needed is not None else comparison.note)
    return [comparison.row_key, comparison.dataset, comparison.kind, comparison.metric, comparison.direction,
            difference, verdict, " ".join(map(str, comparison.seeds)), needed]


def comparison_markdown(view: TableView) -> list[str]:
    if not view.comparisons:
        return []
    out = ["", f"### Paired comparisons with {view.reference} (row minus reference, same seeds and test identities)",
           "", "| " + " | ".join(COMPARISON_HEADERS) + " |", "|" + "|".join("---" for _ in COMPARISON_HEADERS) + "|"]
    return out + ["| " + " | ".join(cell.replace("|", "\\|") for cell in comparison_cells(c)) + " |"
                  for c in view.comparisons]


def render_comparisons_rich(view: TableView) -> Table | None:
    """The paired comparisons of ``view`` as a rich table (None when there are none)."""
    if not view.comparisons:
        return None
    table = Table(title=f"{view.title}: each row minus {view.reference}", caption=f"Intervals: {view.method}.",
                  caption_justify="left")
    for header in COMPARISON_HEADERS:
        table.add_column(header)
    for comparison in view.comparisons:
        table.add_row(*comparison_cells(comparison))
    return table


CSV_COLUMNS = ("table", "row", "dataset", "kind", "forced_test", "metric", "paper", "mean", "std", "n",
               "delta", "rule", "seeds", "batch_dependent", "r1_gap", "fill_command", "footnotes", "low", "high",
               "interval_note")


def render_csv(view: TableView) -> str:
    """Long format: one record per line and metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for line in view.lines:
        for cell in line.metrics:
            notes = view.notes + line.notes + cell.notes
            writer.writerow([
                view.name, line.row_key, line.dataset, line.kind, line.forced_test, cell.metric,
                _plain(cell.paper), _plain(cell.mean), _plain(cell.std), cell.n, _plain(cell.delta),
                line.rule or "", " ".join(map(str, line.seeds)),
                "" if line.audit is None or line.audit.batch_dependent is None else line.audit.batch_dependent,
                "" if line.audit is None else _plain(line.audit.r1_gap),
                line.fill_command or "", " ".join(view.footnotes[number - 1] for number in sorted(set(notes))),
                _plain(cell.low), _plain(cell.high), cell.interval_note or "",
            ])
    return buffer.getvalue()


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   "±": r"$\pm$", "Δ": r"$\Delta$", "—": "---", "–": "--", "×": r"$\times$", "≈": r"$\approx$",
                   "→": r"$\rightarrow$", "≥": r"$\geq$", "≤": r"$\leq$", "’": "'", "“": "``", "”": "''"}


def latex_escape(text: str) -> str:
    """Text safe inside a LaTeX document (pdflatex): specials escaped, the few non-ASCII signs we print mapped."""
    return "".join(_LATEX_SPECIALS.get(char, char) for char in text)


def render_latex(view: TableView) -> str:
    """A booktabs table: per metric ours (mean ± std over seeds), the paper's value and the delta; footnotes
    kept as numbered notes below it. Needs ``\\usepackage{booktabs}``."""
    metric_columns = 3 * len(view.metrics)
    audit = view.has_audit
    spec = "lll" + "r" * metric_columns + ("l" if audit else "")
    marks = lambda numbers: "".join(rf"\textsuperscript{{{n}}}" for n in sorted(set(numbers)))
    out = [f"% php-run table {view.name}" + (f" --preset {view.preset}" if view.preset else "")
           + ": generated from the registry; needs \\usepackage{booktabs}",
           r"\begin{table*}[t]", r"\centering", r"\small",
           rf"\caption{{{latex_escape(view.title)}{marks(view.notes)}}}",
           rf"\label{{tab:php-run-{view.file_stem}}}",
           rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & & & " + " & ".join(rf"\multicolumn{{3}}{{c}}{{{latex_escape(m)}}}" for m in view.metrics)
           + (" & " if audit else "") + r" \\",
           " ".join(rf"\cmidrule(lr){{{4 + 3 * i}-{6 + 3 * i}}}" for i in range(len(view.metrics))),
           " & ".join([latex_escape(view.row_header), "Dataset", "Source"]
                      + ["Ours", "Paper", r"$\Delta$"] * len(view.metrics) + (["Audit"] if audit else [])) + r" \\",
           r"\midrule"]
    for line in view.lines:
        cells = [latex_escape(line.row_display) + marks(line.notes), latex_escape(line.dataset), latex_escape(line.source)]
        for cell in line.metrics:
            if cell.mean is None:
                ours = "--"
            elif cell.std is None:
                ours = f"{cell.mean:.2f}"
            else:
                ours = rf"${cell.mean:.2f} \pm {cell.std:.2f}$"
            if cell.low is not None:
                ours += f" [{cell.low:.1f}, {cell.high:.1f}]"
            paper = "--" if cell.paper is None else f"{cell.paper:.2f}{marks(cell.notes)}"
            delta = "--" if cell.delta is None else f"${cell.delta:+.2f}$"
            cells += [ours, paper, delta]
        if audit:
            cells.append(latex_escape(line.audit.text()) if line.audit else "")
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", "", r"\smallskip", r"\footnotesize",
            r"Ours: mean $\pm$ sample standard deviation over seeds (a single seed shows no $\pm$); "
            r"$\Delta$ = ours $-$ paper; brackets: " + latex_escape(view.method) + r".\\"]
    out += [rf"\textsuperscript{{{number}}}{latex_escape(text)}\\" for number, text in enumerate(view.footnotes, 1)]
    out.append(r"\end{table*}")
    return "\n".join(out) + "\n"


RENDERERS = {"markdown": render_markdown, "csv": render_csv, "latex": render_latex}


def filled_cells(view: TableView) -> tuple[int, int]:
    """(cells with a result, cells to fill) over the trained lines: what a reproduction still lacks."""
    cells = [cell for line in view.lines if line.kind == "trained" for cell in line.metrics]
    return sum(cell.mean is not None for cell in cells), len(cells)


def render_index(views: Sequence[TableView], preset: str | None = None, claims: str | None = None) -> str:
    """One page for the whole reproduction: every table, its files and figures, cells filled, audit verdicts.

    ``claims``: the file name of the claims report (``php-run report claims``) beside the index, if written.
    """
    scale = f" (preset {preset})" if preset else ""
    claims_line = (f"The paper's claims, each with our difference, interval and verdict: [{claims}]({claims})."
                   if claims else "The paper's claims: run `php-run report claims` to check each one.")
    out = [f"# Reproduction index{scale}", "",
           "Regenerated from the registry by `php-run table --all`; each table links to its markdown, CSV and "
           "LaTeX files.", "", claims_line, "",
           "| table | source | cells filled | figures | audited lines |", "|---|---|---|---|---|"]
    for view in views:
        filled, total = filled_cells(view)
        figures = ", ".join(f"[{name}]({name})" for name in figure_names(view)) or "—"
        audited = [line for line in view.lines if line.audit is not None]
        dependent = sum(bool(line.audit.batch_dependent) for line in audited)
        audit_text = f"{len(audited)} ({dependent} batch-dependent)" if audited else "—"
        stem = view.file_stem
        links = f"[{view.title}]({stem}.md) ([csv]({stem}.csv), [tex]({stem}.tex))"
        out.append(f"| {links} | {view.source} | {filled} / {total} | {figures} | {audit_text} |".replace("\n", " "))
    for view in views:
        figures = figure_names(view)
        audited = [line for line in view.lines if line.audit is not None]
        if not figures and not audited:
            continue
        out += ["", f"## {view.title}", ""]
        out += [item for name in figures for item in (f"![{view.title}]({name})", "")]
        for line in audited:
            out.append(f"- {line.row_display}, {line.dataset} ({line.source}): {line.audit.text()}")
    return "\n".join(out).rstrip() + "\n"


def _headers(view: TableView) -> list[str]:
    headers = [view.row_header, "dataset", "source", "rule / to fill", *view.metrics]
    return headers + (["audit"] if view.has_audit else [])


def _line_cells(line: ViewLine, view: TableView, separator: str) -> list[str]:
    status = line.rule or (f"missing: {line.fill_command}" if line.fill_command else "")
    cells = [line.row_display + _marks(line.notes), line.dataset, line.source, status]
    cells += [_metric_text(cell, separator) for cell in line.metrics]
    if view.has_audit:
        cells.append(line.audit.text() if line.audit else "")
    return cells


def _metric_text(cell: MetricCell, separator: str) -> str:
    if cell.mean is None:
        ours = "—"
    elif cell.std is None:
        ours = f"{cell.mean:.2f} (n={cell.n})"
    else:
        ours = f"{cell.mean:.2f} ± {cell.std:.2f} (n={cell.n})"
    if cell.low is not None:
        ours = ours.replace(" (n=", f" [{cell.low:.1f}, {cell.high:.1f}] (n=", 1)
    elif cell.interval_note:
        ours += f"{separator}{cell.interval_note}"
    if cell.paper is None:
        return ours
    paper = f"paper {cell.paper:.2f}{_marks(cell.notes)}"
    delta = "" if cell.delta is None else f", Δ {cell.delta:+.2f}"
    return f"{ours}{separator}{paper}{delta}"


def _title(view: TableView) -> str:
    return view.title + _marks(view.notes)


def _footnote_block(view: TableView) -> str | None:
    if not view.footnotes:
        return None
    return "\n".join(f"[{number}] {text}" for number, text in enumerate(view.footnotes, 1))


def _marks(numbers: Iterable[int]) -> str:
    return "".join(f" [{number}]" for number in sorted(set(numbers)))


def _plain(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def figure_names(view: TableView) -> list[str]:
    """The figure files ``write_reports`` writes for ``view``."""
    return [f"{view.file_stem}.png"] if view.name in CHART_TABLES + SENSITIVITY_TABLES else []
