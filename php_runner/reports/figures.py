"""Figures drawn from the registry (matplotlib, Agg canvas; no display needed).

* ``plot_learning_curves``: one run's loss terms and test/val R1 per epoch, with the epochs that
  best-on-test, best-on-val and last picked marked, so a reader sees whether a "best" epoch is an
  outlier (IRRA#45: a reported number came from one outlier epoch).
* ``plot_sensitivity``: R1 and mAP against a swept value (cnum, beta) per dataset, the paper's
  values beside ours with a band of plus or minus one standard deviation over seeds.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from php_runner.files import write_atomic
from php_runner.reports.intervals import CONFIDENCE
from php_runner.reports.tables import unique_items

if TYPE_CHECKING:
    from php_runner.reports.tables import TableView  # noqa: F401
    from php_runner.store.records import EpochMetrics

RULE_STYLES = {"best-on-test": ("#c0392b", "--"), "best-on-val": ("#27ae60", "-."), "last": ("#7f8c8d", ":")}
NOT_LOSSES = ("lr", "seconds")
SENSITIVITY_METRICS = ("R1", "mAP")


def plot_learning_curves(epochs: Sequence["EpochMetrics"], results: Mapping[str, Mapping], title: str) -> bytes:
    """PNG bytes: loss terms per epoch (top), test and val R1 per epoch (bottom), selected epochs marked."""
    figure, (losses_ax, r1_ax) = _figure(2, 1, (7.5, 6.5), sharex=True)
    train = [entry for entry in epochs if entry.split == "train"]
    names = sorted({name for entry in train for name in entry.metrics if name not in NOT_LOSSES},
                   key=lambda name: (name == "total", name))
    for name in names:
        points = [(entry.epoch, entry.metrics[name]) for entry in train if name in entry.metrics]
        losses_ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    losses_ax.set_ylabel("mean loss over the epoch")
    for split, colour in (("test", "#2f6db3"), ("val", "#e67e22")):
        points = [(entry.epoch, entry.metrics["R1"]) for entry in epochs if entry.split == split and "R1" in entry.metrics]
        if points:
            r1_ax.plot(*zip(*points), marker="o", markersize=3, color=colour, label=f"{split} R1")
    for rule, result in results.items():
        colour, style = RULE_STYLES.get(rule, ("black", "-"))
        for ax in (losses_ax, r1_ax):
            ax.axvline(result["epoch"], color=colour, linestyle=style, linewidth=1.2,
                       label=f"{rule} (epoch {result['epoch']}, R1 {result['metrics']['R1']:.2f})" if ax is r1_ax else None)
    r1_ax.set_xlabel("epoch")
    r1_ax.set_ylabel("R1 (%)")
    for ax in (losses_ax, r1_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    return _png(figure)


def plot_sensitivity(view: "TableView") -> bytes:
    """PNG bytes: R1 and mAP (rows) against the table's numeric row keys, one column per dataset."""
    keys = sorted({line.row_key for line in view.lines if _number(line.row_key) is not None}, key=_number)
    xs = [_number(key) for key in keys]
    metrics = [metric for metric in SENSITIVITY_METRICS if metric in view.metrics]
    figure, axes = _figure(len(metrics), len(view.datasets), (4.2 * len(view.datasets), 3.0 * len(metrics)),
                           squeeze=False)
    for i, metric in enumerate(metrics):
        for j, dataset in enumerate(view.datasets):
            ax = axes[i][j]
            cells = [_cell(view, key, dataset, metric) for key in keys]
            paper = [_nan(cell.paper if cell else None) for cell in cells]
            mean = [_nan(cell.mean if cell else None) for cell in cells]
            spread = [(cell.std or 0.0) if cell and cell.mean is not None else 0.0 for cell in cells]
            ax.plot(xs, paper, marker="s", linestyle="--", color="#7f8c8d", label="paper")
            ax.plot(xs, mean, marker="o", color="#2f6db3", label="ours (mean)")
            ax.fill_between(xs, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                            color="#2f6db3", alpha=0.2, label="ours ± 1 std over seeds")
            low = [_nan(cell.low if cell else None) for cell in cells]
            high = [_nan(cell.high if cell else None) for cell in cells]
            if any(value == value for value in low):  # NaN != NaN: cells without outcomes leave gaps
                ax.fill_between(xs, low, high, color="#e67e22", alpha=0.2,
                                label=f"ours: {CONFIDENCE:.0%} interval (seeds, test identities)")
            ax.set_xticks(xs, keys)
            ax.set_title(f"{dataset} {metric}", fontsize=10)
            ax.set_xlabel(view.row_header)
            ax.set_ylabel("%")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(view.title, fontsize=11)
    return _png(figure)


def plot_claims(results: Sequence) -> bytes | None:
    """PNG bytes of ``reports.claims.ClaimResult``s: our differences with intervals, the paper's difference marked."""
    shown = [r for r in results if r.ours.value is not None]
    if not shown:
        return None
    figure, ax = _figure(1, 1, (7.0, 0.35 * len(shown) + 1.5))
    ys = list(range(len(shown)))
    values = [r.ours.value for r in shown]
    errors = [[v - r.ours.low for v, r in zip(values, shown)], [r.ours.high - v for v, r in zip(values, shown)]]
    ax.errorbar(values, ys, xerr=errors, fmt="o", color="#2f6db3", capsize=3, label="ours (interval)")
    ax.scatter([r.paper_difference for r in shown], ys, marker="x", color="#c0392b", label="paper's difference")
    ax.axvline(0.0, color="#7f8c8d", linewidth=0.8)
    ax.set_yticks(ys, [f"{r.claim.table}: {r.claim.row} vs {r.claim.reference}, {r.claim.dataset} ({r.kind})"
                       for r in shown], fontsize=7)
    ax.set_xlabel("difference (points)")
    ax.legend(fontsize=7)
    return _png(figure)


def _cell(view: "TableView", key: str, dataset: str, metric: str):
    line = view.line(key, dataset)
    return line.cell(metric) if line is not None else None


def _figure(rows: int, columns: int, size: tuple[float, float], **options):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, **options)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def write_png(path: str | Path, data: bytes) -> Path:
    """Write PNG bytes atomically, creating the folder."""
    from php_runner.files import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, data)


def plot_module_chart(view: TableView, path: str | Path) -> Path:
    """Grouped bars like the paper's module-ablation figure: paper against ours, per dataset and metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = unique_items(line.row_key for line in view.lines)
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
