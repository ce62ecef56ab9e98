"""Paper tables rebuilt from recorded runs, and their renderings (terminal, markdown, CSV, LaTeX, PNG).

``build_table`` puts, for every row and dataset of a table of ``paper_results.toml``, the paper's
value beside ours (mean and sample standard deviation over seeds, with n), their difference and the
checkpoint-selection rule that produced ours. Runs of kind ``imported`` (released checkpoints) and
``trial`` (tuning) get lines of their own next to the trained ones; trials tuned on the test split
are marked. When runs carry an audit report the table gains a verdict per line (batch-dependent
or not, ordered-minus-shuffled R1 gap). A line with no result names the command that would fill it.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from php_runner.experiment.paper import Footnote, load_paper_results
from php_runner.files import write_atomic
from php_runner.store.records import ResultRow

RULE_PREFERENCE = ("best-on-test", "best-on-val", "last")  # best-on-test is the paper's own protocol
KIND_ORDER = ("trained", "imported", "trial")
REFERENCE = "reference"  # a published competitor: paper value only
CHART_TABLES = ("module",)
SENSITIVITY_TABLES = ("cnum", "beta")  # a swept number: drawn as lines of R1 and mAP against the value
FORCED_TEST_NOTE = "Tuned on the test split (forced): the test labels chose its settings, so it is not a held-out result."
IMPORTED_NOTE = "imported: a released checkpoint evaluated by php-run, not retrained."
PAPER_PRESET = "paper"
NOT_PAPER_SCALE_NOTE = ("Trained rows use the {preset!r} preset, not the paper's scale (model, weights, data or "
                        "epochs differ): they check the pipeline and are not comparable with the paper's values.")
KIND_LABELS = {"trained": "trained", "imported": "imported", "trial": "tuning trial", REFERENCE: "paper only"}


@dataclass(frozen=True)
class MetricCell:
    metric: str
    paper: float | None
    mean: float | None
    std: float | None  # sample standard deviation over seeds; None with fewer than two
    n: int
    notes: tuple[int, ...] = ()  # footnote numbers of this cell

    @property
    def delta(self) -> float | None:
        return None if self.mean is None or self.paper is None else self.mean - self.paper


@dataclass(frozen=True)
class AuditVerdict:
    batch_dependent: bool | None  # True when any audited seed was batch-dependent
    r1_ordered: float | None      # means over the audited seeds
    r1_shuffled: float | None
    r1_gap: float | None
    n: int

    def text(self) -> str:
        parts = []
        if self.batch_dependent is not None:
            parts.append("batch-dependent" if self.batch_dependent else "batch-independent")
        if self.r1_ordered is not None and self.r1_shuffled is not None:
            parts.append(f"R1 ordered {self.r1_ordered:.2f} vs shuffled {self.r1_shuffled:.2f}")
        if self.r1_gap is not None:
            parts.append(f"gap {self.r1_gap:+.2f}")
        return "; ".join(parts) + f" (n={self.n})"


@dataclass(frozen=True)
class ViewLine:
    """One row of a table on one dataset, for one kind of run."""

    row_key: str
    row_display: str
    dataset: str
    kind: str  # trained | imported | trial | reference
    forced_test: bool
    rule: str | None
    seeds: tuple[int, ...]
    metrics: tuple[MetricCell, ...]
    audit: AuditVerdict | None
    fill_command: str | None  # set when a reproducible line has no result yet
    notes: tuple[int, ...] = ()  # footnotes of the row or of the row on this dataset

    def cell(self, metric: str) -> MetricCell:
        return next(cell for cell in self.metrics if cell.metric == metric)

    @property
    def source(self) -> str:
        label = KIND_LABELS.get(self.kind, self.kind)
        return f"{label} [forced test]" if self.forced_test else label


@dataclass(frozen=True)
class TableView:
    name: str
    title: str
    source: str
    in_paper: bool
    row_header: str
    datasets: tuple[str, ...]
    metrics: tuple[str, ...]
    lines: tuple[ViewLine, ...]
    footnotes: tuple[str, ...]       # numbered from 1 in this order
    notes: tuple[int, ...] = ()      # footnotes of the whole table
    preset: str | None = None        # the scale of the trained rows; None when not filtered by preset

    @property
    def file_stem(self) -> str:
        """Report file name: the table name, with the preset appended unless it is the paper's."""
        return self.name if self.preset in (None, PAPER_PRESET) else f"{self.name}_{self.preset}"

    @property
    def has_audit(self) -> bool:
        return any(line.audit is not None for line in self.lines)

    def line(self, row_key: str, dataset: str, kind: str = "trained", forced_test: bool = False) -> ViewLine | None:
        return next((line for line in self.lines if (line.row_key, line.dataset, line.kind, line.forced_test)
                     == (row_key, dataset, kind, forced_test)), None)

    def missing(self) -> list[ViewLine]:
        """Lines that still need a run, each with its ``fill_command``."""
        return [line for line in self.lines if line.fill_command is not None]


def fill_command(table: str, dataset: str, preset: str | None = None) -> str:
    """The php-run command that trains the missing runs of ``table`` on ``dataset``."""
    command = "php-run reproduce" if table == "headline" else f"php-run ablate {table}"
    command += f" --dataset {dataset}"
    return command + (f" --preset {preset}" if preset and preset != "paper" else "")


def build_table(table_name: str, rows: Iterable[ResultRow], *, rules: Sequence[str] = RULE_PREFERENCE,
                preset: str | None = None) -> TableView:
    """The view of one table: paper rows first (then any other row labels found), every dataset.

    Per line the first rule of ``rules`` with results is used. ``preset`` names the scale of the
    trained rows (the caller filters rows by it); it shapes the fill commands of missing lines and,
    unless it is the paper preset, adds a table note that our numbers are not at the paper's scale.
    """
    paper = load_paper_results()
    table = paper.table(table_name)
    rows = [row for row in rows if row.table == table_name]
    row_keys = [row.key for row in table.rows] + _unique(r.row_label for r in rows if table.row(r.row_label) is None)
    datasets = list(table.datasets) + _unique(r.dataset for r in rows if r.dataset not in table.datasets)
    notes = _Notes()
    table_notes = notes.add(paper.footnotes_for(table_name))
    if preset is not None and preset != PAPER_PRESET:
        table_notes += notes.add_text(NOT_PAPER_SCALE_NOTE.format(preset=preset))
    lines = []
    for key in row_keys:
        paper_row = table.row(key)
        reference = paper_row is not None and paper_row.reference
        display = paper_row.display if paper_row is not None else key
        row_notes = notes.add(paper.footnotes_for(table_name, key))
        for dataset in datasets:
            line_notes = row_notes + notes.add(paper.footnotes_for(table_name, key, dataset))
            cell_notes = {m: notes.add(paper.footnotes_for(table_name, key, dataset, m)) for m in table.metrics}
            here = [r for r in rows if r.row_label == key and r.dataset == dataset]
            groups = {(r.kind, r.forced_test) for r in here}
            if not reference:
                groups.add(("trained", False))
            for kind, forced in sorted(groups, key=_group_order):
                members = [r for r in here if (r.kind, r.forced_test) == (kind, forced)]
                rule = next((rule for rule in rules if any(r.rule == rule for r in members)), None)
                chosen = _one_per_seed(r for r in members if r.rule == rule)
                cells = tuple(_metric_cell(metric, table.value(key, dataset, metric), chosen, cell_notes[metric])
                              for metric in table.metrics)
                extra = ()
                if forced:
                    extra += notes.add_text(FORCED_TEST_NOTE)
                if kind == "imported":
                    extra += notes.add_text(IMPORTED_NOTE)
                lines.append(ViewLine(
                    row_key=key, row_display=display, dataset=dataset, kind=kind, forced_test=forced,
                    rule=rule, seeds=tuple(sorted(r.seed for r in chosen)), metrics=cells,
                    audit=_audit_verdict(chosen),
                    fill_command=None if chosen else fill_command(table_name, dataset, preset),
                    notes=line_notes + extra,
                ))
            if reference:
                cells = tuple(_metric_cell(metric, table.value(key, dataset, metric), [], cell_notes[metric])
                              for metric in table.metrics)
                lines.append(ViewLine(key, display, dataset, REFERENCE, False, None, (), cells, None, None, line_notes))
    return TableView(
        name=table_name, title=table.title, source=table.source, in_paper=table.in_paper, preset=preset,
        row_header=table.row_header, datasets=tuple(datasets), metrics=tuple(table.metrics),
        lines=tuple(lines), footnotes=tuple(notes.texts), notes=table_notes,
    )


# ---- renderers ------------------------------------------------------------------------------------

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
    return "\n".join(out).rstrip() + "\n"


CSV_COLUMNS = ("table", "row", "dataset", "kind", "forced_test", "metric", "paper", "mean", "std", "n",
               "delta", "rule", "seeds", "batch_dependent", "r1_gap", "fill_command", "footnotes")


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
            paper = "--" if cell.paper is None else f"{cell.paper:.2f}{marks(cell.notes)}"
            delta = "--" if cell.delta is None else f"${cell.delta:+.2f}$"
            cells += [ours, paper, delta]
        if audit:
            cells.append(latex_escape(line.audit.text()) if line.audit else "")
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", "", r"\smallskip", r"\footnotesize",
            r"Ours: mean $\pm$ sample standard deviation over seeds (a single seed shows no $\pm$); "
            r"$\Delta$ = ours $-$ paper.\\"]
    out += [rf"\textsuperscript{{{number}}}{latex_escape(text)}\\" for number, text in enumerate(view.footnotes, 1)]
    out.append(r"\end{table*}")
    return "\n".join(out) + "\n"


RENDERERS = {"markdown": render_markdown, "csv": render_csv, "latex": render_latex}


def filled_cells(view: TableView) -> tuple[int, int]:
    """(cells with a result, cells to fill) over the trained lines: what a reproduction still lacks."""
    cells = [cell for line in view.lines if line.kind == "trained" for cell in line.metrics]
    return sum(cell.mean is not None for cell in cells), len(cells)


def render_index(views: Sequence[TableView], preset: str | None = None) -> str:
    """One page for the whole reproduction: every table, its files and figures, cells filled, audit verdicts."""
    scale = f" (preset {preset})" if preset else ""
    out = [f"# Reproduction index{scale}", "",
           "Regenerated from the registry by `php-run table --all`; each table links to its markdown, CSV and "
           "LaTeX files.", "",
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


def write_index(views: Sequence[TableView], folder: str | Path = "reports", preset: str | None = None) -> Path:
    """Write ``index.md`` (``index_PRESET.md`` for a preset other than the paper's) atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = "index.md" if preset in (None, PAPER_PRESET) else f"index_{preset}.md"
    return write_atomic(folder / name, render_index(views, preset).encode("utf-8"))


def plot_module_chart(view: TableView, path: str | Path) -> Path:
    """Grouped bars like the paper's module-ablation figure: paper against ours, per dataset and metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = _unique(line.row_key for line in view.lines)
    displays = {line.row_key: line.row_display for line in view.lines}
    figure = Figure(figsize=(4.2 * len(view.datasets), 3.2 * len(view.metrics)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(view.metrics), len(view.datasets), squeeze=False)
    width = 0.38
    for i, metric in enumerate(view.metrics):
        for j, dataset in enumerate(view.datasets):
            ax = axes[i][j]
            paper, ours, spread = [], [], []
            for key in keys:
                line = view.line(key, dataset)
                cell = line.cell(metric) if line is not None else None
                paper.append(_nan(cell.paper if cell else None))
                ours.append(_nan(cell.mean if cell else None))
                spread.append((cell.std or 0.0) if cell else 0.0)
            positions = range(len(keys))
            ax.bar([p - width / 2 for p in positions], paper, width, label="paper", color="#9aa5b1")
            ax.bar([p + width / 2 for p in positions], ours, width, yerr=spread, capsize=3, label="ours (mean ± std)",
                   color="#2f6db3")
            ax.set_xticks(list(positions), [displays[key] for key in keys], rotation=20, ha="right", fontsize=8)
            ax.set_title(f"{dataset} {metric}", fontsize=10)
            ax.set_ylabel("%")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(view.title, fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return write_atomic(Path(path), buffer.getvalue())


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


def figure_names(view: TableView) -> list[str]:
    """The figure files ``write_reports`` writes for ``view``."""
    return [f"{view.file_stem}.png"] if view.name in CHART_TABLES + SENSITIVITY_TABLES else []


BENCHMARK_LOG = "benchmarks.jsonl"
# (label, path in a ``php-run bench`` record, format); ratios come first in each record's section.
BENCHMARK_FIGURES = (
    ("fast / official training samples/s (model only)", "ratios.fast_vs_official_train", "{:.2f}x"),
    ("fast / official training samples/s (end to end)", "ratios.fast_vs_official_end_to_end", "{:.2f}x"),
    ("cache / PIL augmented images/s", "ratios.cache_vs_pil_pipeline", "{:.2f}x"),
    ("compiled / eager fast training samples/s", "ratios.compiled_vs_eager_fast_train", "{:.2f}x"),
    ("official training samples/s, model only", "train.official.samples_per_s", "{:.1f}"),
    ("official training samples/s, end to end (PIL)", "train.official.end_to_end_samples_per_s", "{:.1f}"),
    ("official largest batch / its samples/s", "train.official.largest_batch", "{}"),
    ("", "train.official.largest_batch_samples_per_s", "{:.1f}"),
    ("fast training samples/s, model only", "train.fast.samples_per_s", "{:.1f}"),
    ("fast training samples/s, end to end (cache)", "train.fast.end_to_end_samples_per_s", "{:.1f}"),
    ("fast largest batch / its samples/s", "train.fast.largest_batch", "{}"),
    ("", "train.fast.largest_batch_samples_per_s", "{:.1f}"),
    ("fast compiled training samples/s, model only", "train.fast_compiled.samples_per_s", "{:.1f}"),
    ("fast compiled largest batch / its samples/s", "train.fast_compiled.largest_batch", "{}"),
    ("", "train.fast_compiled.largest_batch_samples_per_s", "{:.1f}"),
    ("PIL pipeline augmented images/s", "pipeline.pil_images_per_s", "{:.1f}"),
    ("cache pipeline augmented images/s", "pipeline.cache_images_per_s", "{:.1f}"),
    ("pipeline workers / threads", "pipeline.workers", "{}"),
    ("cache build images/s", "pipeline.cache_build_images_per_s", "{:.1f}"),
    ("evaluation images/s (fast)", "eval.images_per_s", "{:.1f}"),
    ("evaluation captions/s (fast)", "eval.texts_per_s", "{:.1f}"),
    ("evaluation images/s (official)", "eval.official.images_per_s", "{:.1f}"),
    ("evaluation captions/s (official)", "eval.official.texts_per_s", "{:.1f}"),
    ("scoring seconds", "scoring.seconds", "{:.2f}"),
    ("scoring queries x gallery", "scoring.queries", "{}"),
    ("", "scoring.gallery", "{}"),
    ("training GFLOP per sample", "flops_per_sample", "gflop"),
    ("measured bf16 matmul peak TFLOP/s", "matmul_peak_flops", "tflop"),
    ("MFU of the best fast rate", "mfu", "{:.1%}"),
    ("peak memory GiB", "peak_memory_bytes", "gib"),
)


def _lookup(record: dict, path: str):
    value = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _format_figure(value, fmt: str) -> str:
    if value is None:
        return "n/a"
    if fmt == "gflop":
        return f"{value / 1e9:.2f}"
    if fmt == "tflop":
        return f"{value / 1e12:.1f}"
    if fmt == "gib":
        return f"{value / 2**30:.2f}"
    return fmt.format(value)


def render_benchmarks(records: Sequence[dict]) -> str:
    """``benchmarks.md``: one section per ``php-run bench`` call, newest first, ratios first."""
    lines = ["# Benchmarks", "", "Recorded by `php-run bench` (random weights; samples are image-caption pairs; "
             "pipelines on synthetic 96x48 JPEGs). Newest first.", ""]
    for entry in reversed(records):
        if "ratios" not in entry:
            continue  # a record of the earlier single-regime bench
        sizes = entry.get("sizes", {})
        lines += [f"## {entry.get('recorded')}: {entry.get('clip')} on {entry.get('device_name')}", "",
                  f"git {entry.get('git_commit')}{' (dirty)' if entry.get('git_dirty') else ''}, torch "
                  f"{entry.get('torch')}, torchvision {entry.get('torchvision')}, python {entry.get('python')}; "
                  f"batch {sizes.get('batch_size')}, {sizes.get('steps')} timed steps, peak memory as "
                  f"{entry.get('peak_memory_kind')}", "", "| figure | value |", "|---|---|"]
        pending = None
        for label, path, fmt in BENCHMARK_FIGURES:
            text = _format_figure(_lookup(entry, path), fmt)
            if label:
                if pending:
                    lines.append(f"| {pending[0]} | {pending[1]} |")
                pending = [label, text]
            else:
                pending[1] += f" / {text}"
        lines += [f"| {pending[0]} | {pending[1]} |", ""]
    return "\n".join(lines) + "\n"


def record_benchmark(record: dict, folder: str | Path = "reports") -> list[Path]:
    """Add one benchmark record to ``benchmarks.jsonl`` and regenerate ``benchmarks.md`` from all records.

    Both files are rewritten atomically, so an interrupted call leaves the earlier records intact.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / BENCHMARK_LOG
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    records.append(record)
    return [
        write_atomic(log, "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in records).encode("utf-8")),
        write_atomic(folder / "benchmarks.md", render_benchmarks(records).encode("utf-8")),
    ]


# ---- internals ------------------------------------------------------------------------------------

class _Notes:
    """Footnote numbering for one view: each text gets one number, in order of first use."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, footnotes: Iterable[Footnote]) -> tuple[int, ...]:
        return tuple(number for note in footnotes for number in self.add_text(note.text))

    def add_text(self, text: str) -> tuple[int, ...]:
        if text not in self.texts:
            self.texts.append(text)
        return (self.texts.index(text) + 1,)


def _group_order(group: tuple[str, bool]) -> tuple[int, bool, str]:
    kind, forced = group
    rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    return rank, forced, kind


def _one_per_seed(rows: Iterable[ResultRow]) -> list[ResultRow]:
    """The last row recorded for each seed (a run listed twice counts once)."""
    return list({row.seed: row for row in rows}.values())


def _metric_cell(metric: str, paper: float | None, rows: Sequence[ResultRow], notes: tuple[int, ...]) -> MetricCell:
    values = [float(row.metrics[metric]) for row in rows if row.metrics.get(metric) is not None]
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) > 1 else None
    return MetricCell(metric=metric, paper=paper, mean=mean, std=std, n=len(values), notes=notes)


def _audit_verdict(rows: Sequence[ResultRow]) -> AuditVerdict | None:
    audits = [row.audit for row in rows if row.audit]
    if not audits:
        return None
    flags = [audit["batch_dependent"] for audit in audits if audit.get("batch_dependent") is not None]

    def mean_of(key: str) -> float | None:
        values = [float(audit[key]) for audit in audits if audit.get(key) is not None]
        return statistics.fmean(values) if values else None

    return AuditVerdict(batch_dependent=any(flags) if flags else None, r1_ordered=mean_of("r1_ordered"),
                        r1_shuffled=mean_of("r1_shuffled"), r1_gap=mean_of("r1_gap"), n=len(audits))


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


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))
