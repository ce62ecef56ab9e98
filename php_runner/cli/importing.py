"""``php-run import``: evaluate, audit and record the PHP authors' released checkpoints.

Heavy imports (torch, the importer) happen inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from php_runner.cli import app
from php_runner.cli.common import EXIT_RUN_FAILED, DbOption, DeviceOption, JsonOption, console, print_json
from php_runner.errors import InputError

if TYPE_CHECKING:
    from php_runner.studies.importer import ImportOutcome

DATA_SOURCES = ("real", "synthetic")
STATUS_STYLES = {"imported": "green", "audited": "green", "unchanged": "dim", "busy": "yellow", "skipped": "yellow",
                 "failed": "red"}


def parse_datasets(text: str | None) -> list[str] | None:
    """``"CUHK-PEDES,RSTPReid"`` -> a list; None imports every dataset of the tree."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise InputError("--datasets: no dataset given")
    from php_runner.data import DATASET_NAMES

    for name in names:
        if name not in DATASET_NAMES:
            raise InputError(f"--datasets: unknown dataset {name!r}; expected {', '.join(DATASET_NAMES)}")
    return names


def outcome_to_dict(outcome: "ImportOutcome") -> dict:
    """A JSON-able view of one folder's outcome."""
    return {
        "folder": outcome.label,
        "status": outcome.status,
        "reason": outcome.reason,
        "cells": [f"{cell.table}/{cell.row}" for cell in outcome.cells],
        "encoder": outcome.encoder,
        "sharing": outcome.sharing,
        "solver_era": None if outcome.solver is None else outcome.solver.era,
        "solver_evidence": None if outcome.solver is None else outcome.solver.evidence,
        "counter_buffers": outcome.counter_buffers,
        "sha256": outcome.sha256,
        "metrics": outcome.metrics,
        "audit": outcome.audit,
        "run_ids": list(outcome.run_ids),
    }


def _figure(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _audit_text(summary: dict | None) -> str:
    if not summary:
        return ""
    dependent = {True: "batch-dependent", False: "batch-independent"}.get(summary.get("batch_dependent"), "")
    gap = summary.get("r1_gap")
    return f"{dependent}, R1 shuffled {_figure(summary.get('r1_shuffled'))} (gap {_figure(gap)})"


def render_outcomes(outcomes: list["ImportOutcome"], logs_dir: Path) -> Table:
    view = Table(title=f"released checkpoints under {logs_dir}")
    for column in ("folder", "status", "cells", "encoder", "sharing", "solver", "R1", "mAP", "audit", "note"):
        view.add_column(column, justify="right" if column in ("R1", "mAP") else "left")
    for outcome in outcomes:
        style = STATUS_STYLES.get(outcome.status, "")
        metrics = outcome.metrics or {}
        view.add_row(
            outcome.label,
            f"[{style}]{outcome.status}[/{style}]" if style else outcome.status,
            ", ".join(f"{cell.table}/{cell.row}" for cell in outcome.cells),
            outcome.encoder or "",
            outcome.sharing or "",
            "" if outcome.solver is None else outcome.solver.era,
            _figure(metrics.get("R1")),
            _figure(metrics.get("mAP")),
            _audit_text(outcome.audit),
            outcome.reason or "",
        )
    return view


@app.command("import")
def import_command(
    logs_dir: Annotated[Path, typer.Argument(help="The released logs folder: "
                                             "<dataset>/<run>/{best.pth, configs.yaml}.")],
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder holding the dataset folders.")],
    datasets: Annotated[str | None, typer.Option("--datasets", help="Comma-separated datasets to import "
                                                 "(default: every dataset in the tree).")] = None,
    audit: Annotated[bool, typer.Option("--audit/--no-audit", help="Also audit each checkpoint: ordered against "
                                        "shuffled batches, batch independence, data splits.")] = True,
    device: DeviceOption = "auto",
    db: DbOption = None,
    num_workers: Annotated[int, typer.Option("--num-workers", help="Image loading workers.", min=0)] = 0,
    data_source: Annotated[str, typer.Option("--data-source", help="What --data-root holds: real or synthetic "
                                             "(recorded in each run's config).")] = "real",
    as_json: JsonOption = False,
) -> None:
    """Evaluate the released best.pth of every table cell with the official batching and record it.

    Each folder is mapped to its paper table cell by its name (itc+aux, sdm+aux, sdm+itc+aux,
    sdm+itc+aux_cnumN, ablation_base|crfm|efp, <date>[_<time>]_<name>_ns); unknown names and folders whose
    configs.yaml contradicts the checkpoint are listed and skipped. Checkpoints already recorded with the
    same evaluation settings are not evaluated again. php-run table then shows them as imported rows.

    Example: php-run import logs --data-root data --datasets ICFG-PEDES
    """
    from php_runner.studies import importer
    from php_runner.engine.train import resolve_device
    from php_runner.store.registry import Registry
    from php_runner.execute.provenance import command_line

    if data_source not in DATA_SOURCES:
        raise InputError(f"--data-source: expected real or synthetic, got {data_source!r}")
    if not data_root.is_dir():
        raise InputError(f"--data-root {data_root}: not a folder")
    options = importer.ImportOptions(
        data_root=data_root, audit=audit, device=str(resolve_device(device)), num_workers=num_workers,
        data_source=data_source, command=command_line(),
    )
    chosen = parse_datasets(datasets)  # bad input refused before the registry is opened (or created)
    registry = Registry(db)

    def progress(outcome: "ImportOutcome") -> None:
        if not as_json:
            style = STATUS_STYLES.get(outcome.status, "")
            console.print(f"[{style}]{outcome.status:>9}[/{style}] {outcome.label}"
                          + (f": {outcome.reason}" if outcome.reason else ""), highlight=False)

    try:
        outcomes = importer.import_logs(logs_dir, registry, options, chosen, on_outcome=progress)
    finally:
        registry.close()
    if as_json:
        print_json([outcome_to_dict(outcome) for outcome in outcomes])
    else:
        console.print(render_outcomes(outcomes, logs_dir))
        console.print("Compare with the paper and with retrained runs: php-run table")
    if any(outcome.status == "failed" for outcome in outcomes):
        raise typer.Exit(EXIT_RUN_FAILED)
