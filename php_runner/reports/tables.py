"""Paper tables rebuilt from recorded runs, and their renderings (terminal, markdown, CSV, LaTeX, PNG).

``build_table`` puts, for every row and dataset of a table of ``paper_results.toml``, the paper's
value beside ours (mean and sample standard deviation over seeds, with n), their difference and the
checkpoint-selection rule that produced ours. Runs of kind ``imported`` (released checkpoints) and
``trial`` (tuning) get lines of their own next to the trained ones; trials tuned on the test split
are marked. When runs carry an audit report the table gains a verdict per line (batch-dependent
or not, ordered-minus-shuffled R1 gap). A line with no result names the command that would fill it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from php_runner.experiment.paper import Footnote, load_paper_claims, load_paper_results
from php_runner.reports.intervals import RowComparison, cell_intervals, method_text, row_comparisons
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
    low: float | None = None     # confidence interval over seeds and test identities (reports/intervals.py)
    high: float | None = None
    interval_note: str | None = None  # why there is no interval (e.g. no per-query outcomes recorded)

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
    reference: str | None = None     # the row every other row is compared with
    comparisons: tuple[RowComparison, ...] = ()
    method: str = ""                 # how intervals and comparisons are computed

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
                preset: str | None = None, reference_row: str | None = None) -> TableView:
    """The view of one table: paper rows first (then any other row labels found), every dataset.

    Per line the first rule of ``rules`` with results is used. ``preset`` names the scale of the
    trained rows (the caller filters rows by it); it shapes the fill commands of missing lines and,
    unless it is the paper preset, adds a table note that our numbers are not at the paper's scale.
    Each row is compared with ``reference_row`` (default: the table's baseline in ``paper_claims.toml``).
    """
    paper = load_paper_results()
    table = paper.table(table_name)
    rows = [row for row in rows if row.table == table_name]
    row_keys = [row.key for row in table.rows] + unique_items(r.row_label for r in rows if table.row(r.row_label) is None)
    datasets = list(table.datasets) + unique_items(r.dataset for r in rows if r.dataset not in table.datasets)
    notes = _Notes()
    table_notes = notes.add(paper.footnotes_for(table_name))
    if preset is not None and preset != PAPER_PRESET:
        table_notes += notes.add_text(NOT_PAPER_SCALE_NOTE.format(preset=preset))
    lines, chosen_cells = [], {}
    for key in row_keys:
        row_notes = notes.add(paper.footnotes_for(table_name, key))
        for dataset in datasets:
            here = [r for r in rows if r.row_label == key and r.dataset == dataset]
            dataset_lines, chosen = _dataset_lines(paper, table_name, key, dataset, here, rules=rules, preset=preset,
                                                   notes=notes, row_notes=row_notes)
            lines += dataset_lines
            chosen_cells.update(chosen)
    reference_row = reference_row or load_paper_claims().baselines.get(table_name)
    return TableView(
        name=table_name, title=table.title, source=table.source, in_paper=table.in_paper, preset=preset,
        row_header=table.row_header, datasets=tuple(datasets), metrics=tuple(table.metrics),
        lines=tuple(lines), footnotes=tuple(notes.texts), notes=table_notes, reference=reference_row,
        comparisons=_comparisons(table, reference_row, chosen_cells), method=method_text(),
    )

def _dataset_lines(paper, table_name: str, key: str, dataset: str, here: list[ResultRow], *, rules: Sequence[str],
                   preset: str | None, notes: _Notes, row_notes: tuple) -> tuple[list[ViewLine], dict]:
    """The lines of one row on one dataset: one per (kind, forced test) group of ``here`` (a trained line even
    without results, unless the row is a reference), then the paper's line of a reference row; and the rows
    each group chose, by ``(key, dataset, kind, forced)``."""
    table = paper.table(table_name)
    paper_row = table.row(key)
    reference = paper_row is not None and paper_row.reference
    display = paper_row.display if paper_row is not None else key
    line_notes = row_notes + notes.add(paper.footnotes_for(table_name, key, dataset))
    cell_notes = {m: notes.add(paper.footnotes_for(table_name, key, dataset, m)) for m in table.metrics}
    groups = {(r.kind, r.forced_test) for r in here}
    if not reference:
        groups.add(("trained", False))
    lines, chosen_cells = [], {}
    for kind, forced in sorted(groups, key=_group_order):
        members = [r for r in here if (r.kind, r.forced_test) == (kind, forced)]
        rule = next((rule for rule in rules if any(r.rule == rule for r in members)), None)
        chosen = _one_per_seed(r for r in members if r.rule == rule)
        chosen_cells[(key, dataset, kind, forced)] = chosen
        intervals, why = cell_intervals(chosen)
        cells = tuple(_metric_cell(metric, table.value(key, dataset, metric), chosen, cell_notes[metric],
                                   intervals, why) for metric in table.metrics)
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
    return lines, chosen_cells



def _comparisons(table, reference_row: str | None, chosen_cells: dict) -> tuple[RowComparison, ...]:
    """Each line with results against the reference row's line of the same dataset and kind, per metric.

    The claimed direction of a metric is the sign of the paper's own difference ("higher" where unknown).
    """
    if reference_row is None:
        return ()
    out = []
    for (key, dataset, kind, forced), chosen in chosen_cells.items():
        reference = chosen_cells.get((reference_row, dataset, kind, forced))
        if key == reference_row or not chosen or not reference:
            continue
        directions = {}
        for metric in table.metrics:
            ours, theirs = table.value(key, dataset, metric), table.value(reference_row, dataset, metric)
            if ours is not None and theirs is not None and ours != theirs:
                directions[metric] = "higher" if ours > theirs else "lower"
        out += row_comparisons(key, reference_row, dataset, kind, table.metrics, chosen, reference, directions)
    return tuple(out)


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


def _metric_cell(metric: str, paper: float | None, rows: Sequence[ResultRow], notes: tuple[int, ...],
                 intervals: dict | None = None, why: str | None = None) -> MetricCell:
    values = [float(row.metrics[metric]) for row in rows if row.metrics.get(metric) is not None]
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) > 1 else None
    interval = (intervals or {}).get(metric)
    return MetricCell(metric=metric, paper=paper, mean=mean, std=std, n=len(values), notes=notes,
                      low=None if interval is None else interval.low, high=None if interval is None else interval.high,
                      interval_note=why if interval is None and values else None)


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


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def unique_items(items: Iterable) -> list:
    return list(dict.fromkeys(items))
