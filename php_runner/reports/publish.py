"""Publishing tables under reports/: one Markdown, CSV and LaTeX file per table, its figures, and the index."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from php_runner.files import write_atomic
from php_runner.reports.claims import report_name
from php_runner.reports.figures import plot_module_chart
from php_runner.reports.render import (
    render_csv,
    render_index,
    render_latex,
    render_markdown,
)
from php_runner.reports.tables import (
    CHART_TABLES,
    PAPER_PRESET,
    SENSITIVITY_TABLES,
    TableView,
)


def write_index(views: Sequence[TableView], folder: str | Path = "reports", preset: str | None = None) -> Path:
    """Write ``index.md`` (``index_PRESET.md`` for a preset other than the paper's) atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = "index.md" if preset in (None, PAPER_PRESET) else f"index_{preset}.md"
    claims = f"{report_name(preset)}.md"
    claims = claims if (folder / claims).is_file() else None
    return write_atomic(folder / name, render_index(views, preset, claims).encode("utf-8"))


def write_reports(view: TableView, folder: str | Path = "reports") -> list[Path]:
    """Write ``STEM.md``, ``STEM.csv`` and ``STEM.tex`` (and ``STEM.png`` for the module chart and the
    cnum/beta sensitivity figures, embedded in the markdown), each atomically.

    ``STEM`` is ``view.file_stem``, so a tiny-preset table never overwrites the paper-scale one.
    """
    from php_runner.reports.figures import plot_sensitivity

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = []
    if view.name in CHART_TABLES:
        figures.append(plot_module_chart(view, folder / f"{view.file_stem}.png"))
    if view.name in SENSITIVITY_TABLES:
        figures.append(write_atomic(folder / f"{view.file_stem}.png", plot_sensitivity(view)))
    return [
        write_atomic(folder / f"{view.file_stem}.md",
                     render_markdown(view, [path.name for path in figures]).encode("utf-8")),
        write_atomic(folder / f"{view.file_stem}.csv", render_csv(view).encode("utf-8")),
        write_atomic(folder / f"{view.file_stem}.tex", render_latex(view).encode("utf-8")),
        *figures,
    ]
