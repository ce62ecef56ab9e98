"""``php-run export mlflow``: recorded runs into an MLflow tracking store (the optional ``mlflow`` extra).

The registry stays the source of truth; the export is a copy for labs that browse runs in MLflow. Heavy
imports (the registry, mlflow) happen inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from php_runner.cli import app
from php_runner.cli.common import DbOption, JsonOption, console, print_json

if TYPE_CHECKING:
    from php_runner.interop.mlflow_export import ExportRun
    from php_runner.store.records import RunRecord
    from php_runner.store.registry import Registry

export_app = typer.Typer(help="Copy recorded runs to the tools labs browse them in.\n\n"
                              "Example: php-run export mlflow --tracking-uri sqlite:///mlflow.db",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")


@dataclass(frozen=True)
class EpochValues:
    """One registry epoch row in the shape the exporter reads (``values`` instead of ``metrics``)."""

    epoch: int
    split: str
    values: dict


def export_run_of(registry: "Registry", run: "RunRecord") -> "ExportRun":
    """The exporter's plain view of ``run``: config, epochs, results, its folder's files, best checkpoint."""
    from php_runner.execute.child import RUN_FOLDER_KEY
    from php_runner.interop.mlflow_export import ExportRun

    provenance = registry.provenance(run.id) or {}
    folder = Path(provenance[RUN_FOLDER_KEY]) if provenance.get(RUN_FOLDER_KEY) else None
    best = next((Path(c.path) for c in registry.checkpoints(run.id) if c.role == "best"), None)
    return ExportRun(
        run_id=run.id,
        name=folder.name if folder else f"{run.spec_name}-{run.row_label}_seed{run.seed}",
        config=run.config,
        epochs=[EpochValues(e.epoch, e.split, e.metrics) for e in registry.epochs(run.id)],
        results=registry.results(run.id),
        artefacts=[folder / "configs.yaml", folder / "train_log.txt"] if folder else [],
        checkpoint=best,
        tags={"spec": run.spec_name, "row": run.row_label, "dataset": run.dataset, "seed": run.seed,
              "preset": run.preset, "config_hash": run.config_hash, "kind": run.kind},
        status=run.status, started_at=run.started_at, ended_at=run.finished_at,
    )


@export_app.command("mlflow")
def export_mlflow(
    runs: Annotated[list[str] | None, typer.Argument(help="Run ids or config-hash prefixes (default: every run).",
                                                     show_default=False)] = None,
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", help="MLflow tracking URI, e.g. "
                                              "sqlite:///mlflow.db or http://host:5000.")] = ...,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment name.")] = "php-run",
    checkpoints: Annotated[bool, typer.Option("--checkpoints", help="Also upload each run's best.pth.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export runs as MLflow runs: params (the dotted config), per-epoch losses, lr and metrics, the selected
    results, and the run folder's configs.yaml and train_log.txt. Runs exported before are left as they are.

    Needs the mlflow extra: pip install 'php-runner[mlflow]'.

    Example: php-run export mlflow --tracking-uri sqlite:///mlflow.db 1 2
    """
    from php_runner.interop.mlflow_export import export_runs
    from php_runner.store.registry import Registry

    registry = Registry(db)
    try:
        chosen = [registry.get_run(ref) for ref in runs] if runs else registry.list_runs()
        exported = export_runs(tracking_uri, [export_run_of(registry, run) for run in chosen],
                               experiment=experiment, include_checkpoints=checkpoints)
    finally:
        registry.close()
    if as_json:
        print_json([{"run": item.run_id, "mlflow_run_id": item.mlflow_run_id, "status": item.status}
                    for item in exported])
        return
    for item in exported:
        console.print(f"{item.status:>9} run {item.run_id} -> MLflow run {item.mlflow_run_id}", highlight=False)
    console.print(f"{sum(item.status == 'exported' for item in exported)} exported, "
                  f"{sum(item.status == 'unchanged' for item in exported)} unchanged, "
                  f"experiment {experiment!r} at {tracking_uri}", highlight=False)
