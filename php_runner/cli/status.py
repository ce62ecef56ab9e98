"""`php-run status` and `php-run show`: the registry's runs, one line each or one run in full."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from php_runner.cli import app
from php_runner.cli.common import (
    DbOption,
    JsonOption,
    check_run_ref,
    console,
    print_json,
)
from php_runner.engine.metrics import METRIC_NAMES
from php_runner.store.database import shown_url
from php_runner.store.records import RunRecord
from php_runner.store.registry import Registry
from php_runner.store.tables import RUN_STATUSES


def selected_metrics(registry: Registry, run: RunRecord) -> tuple[str | None, dict | None]:
    """(rule, R1..mINP) of the checkpoint the run's selection rule picked; (None, None) before results."""
    results = registry.results(run.id)
    if not results:
        return None, None
    selection = run.config.get("train", {}).get("selection", "test")
    rule = {"test": "best-on-test", "val": "best-on-val", "last": "last"}.get(selection)
    if rule not in results:
        rule = next(iter(results))
    return rule, {k: results[rule]["metrics"].get(k) for k in METRIC_NAMES}


def _age(timestamp: float) -> str:
    seconds = time.time() - timestamp
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


@app.command()
def status(
    spec: Annotated[str | None, typer.Option("--spec", help="Only runs of this spec (its name, e.g. cnum or my_aux).")]
    = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Only runs on this dataset.")] = None,
    run_status: Annotated[str | None, typer.Option(
        "--status", help=f"Only runs with this status: {', '.join(RUN_STATUSES)}.")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="Only runs of this preset (paper, tiny, ...).")] = None,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """List the registry's runs with their status and the metrics of their selected checkpoint.

    Example: php-run status --spec cnum --preset tiny --status failed   (or: php-run status --json)
    """
    from php_runner.data.datasets import DATASET_NAMES
    from php_runner.errors import InputError
    from php_runner.execute.jobs import job_states

    if run_status is not None and run_status not in RUN_STATUSES:
        raise InputError(f"--status: expected one of {', '.join(RUN_STATUSES)}, got {run_status!r}")
    if dataset is not None and dataset not in DATASET_NAMES:
        raise InputError(f"--dataset: expected one of {', '.join(DATASET_NAMES)}, got {dataset!r}")
    spec_name = None if spec is None else Path(spec).stem  # a path names the spec by its file name
    registry = Registry(db, read_only=True)
    entries, abandoned = _listed_runs(registry, run_status, dataset, spec_name, preset)
    registry.close()
    jobs = job_states([run for run, _, _ in entries])
    if as_json:
        print_json([
            {"id": run.id, "config_hash": run.config_hash, "dataset": run.dataset, "status": run.status,
             "metrics": metrics, "rule": rule, "kind": run.kind, "spec": run.spec_name, "table": run.table,
             "row": run.row_label, "seed": run.seed, "preset": run.preset, "error": run.error,
             "executor": run.executor, "job_id": run.job_id, "job_state": jobs.get(run.id)}
            for run, rule, metrics in entries
        ])
        return
    filtered = any(value is not None for value in (spec, dataset, run_status, preset))
    empty = f"No registry at {shown_url(registry.url)} yet" if registry.absent else "The registry has no runs yet"
    console.print(_runs_table(entries, abandoned, jobs, f"runs in {shown_url(registry.url)}") if entries
                  else "No run matches these filters." if filtered else f"{empty}. Start with: php-run demo")


RunEntry = tuple[RunRecord, str | None, dict | None]


def _listed_runs(
    registry: Registry, run_status: str | None, dataset: str | None, spec_name: str | None, preset: str | None
) -> tuple[list[RunEntry], set[int]]:
    """(run, selected rule, its metrics) for each matching run, and the ids of running runs whose worker died."""
    entries, abandoned = [], set()
    for run in registry.list_runs(status=run_status, dataset=dataset, spec_name=spec_name, preset=preset):
        rule, metrics = selected_metrics(registry, run)
        entries.append((run, rule, metrics))
        if run.status == "running" and registry.is_claimable(run):
            abandoned.add(run.id)  # its worker died; the next invocation resumes it
    return entries, abandoned


def _runs_table(entries: list[RunEntry], abandoned: set[int], jobs: dict[int, str], title: str) -> Table:
    """One line per run; abandoned running runs show as interrupted; a job column when any run has a job."""
    view = Table(title=title)
    view.add_column("id", justify="right", no_wrap=True)
    view.add_column("hash", no_wrap=True)
    view.add_column("experiment")
    view.add_column("dataset")
    view.add_column("seed", justify="right")
    view.add_column("preset", no_wrap=True)
    view.add_column("status", no_wrap=True)
    for metric in METRIC_NAMES:
        view.add_column(metric, justify="right", no_wrap=True)
    with_jobs = any(run.job_id for run, _, _ in entries)
    if with_jobs:
        view.add_column("job", no_wrap=True)
    styles = {"done": "green", "failed": "red", "running": "yellow", "queued": "dim", "interrupted": "red"}
    for run, _rule, metrics in entries:
        shown = "interrupted" if run.id in abandoned else run.status
        values = [f"{metrics[m]:.2f}" if metrics and metrics[m] is not None else "-" for m in METRIC_NAMES]
        kind = "" if run.kind == "trained" else f" ({run.kind})"
        job = [f"{run.job_id or '-'} {jobs.get(run.id, '')}".strip()] if with_jobs else []
        view.add_row(str(run.id), run.config_hash[:8], f"{run.spec_name}: {run.row_label}{kind}", run.dataset,
                     str(run.seed), run.preset, f"[{styles[shown]}]{shown}[/]", *values, *job)
    return view


def _run_details(registry: Registry, run: RunRecord) -> dict:
    from php_runner.store.checksums import checkpoint_problem

    audit = registry.latest_audit(run.id)
    return {
        "run": dataclasses.asdict(run),
        "epochs": [dataclasses.asdict(e) for e in registry.epochs(run.id)],
        "results": registry.results(run.id),
        "checkpoints": [{**dataclasses.asdict(c), "problem": checkpoint_problem(c.path, c.sha256)}
                        for c in registry.checkpoints(run.id)],
        "provenance": registry.provenance(run.id),
        "audit": None if audit is None else dataclasses.asdict(audit),
    }


@app.command()
def show(
    run: Annotated[str, typer.Argument(help="Run id or a prefix of its config hash.", callback=check_run_ref)],
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Show one run: config, per-epoch metrics, selected results, checkpoints, provenance, latest audit.

    Example: php-run show 3   (or php-run show 1f2e3d4c --json)
    """
    import json

    registry = Registry(db, read_only=True)
    details = _run_details(registry, registry.get_run(run))
    registry.close()
    if as_json:
        print_json(details)
        return
    record = details["run"]
    console.rule(f"run {record['id']}  {record['config_hash'][:12]}  {record['status']}")
    for key in ("kind", "spec_name", "table", "row_label", "dataset", "seed", "preset", "worker", "attempts",
                "run_dir", "error"):
        if record[key] is not None:
            console.print(f"[bold]{key}[/bold]: {record[key]}")
    overrides = record["config"].get("runtime", {}).get("overrides")
    if overrides:
        console.print("[bold]overrides[/bold]: " + " ".join(f"{key}={value}" for key, value in overrides.items()))
    console.print("[bold]config[/bold]:")
    console.print_json(json.dumps(record["config"]))

    epochs = Table(title="epochs")
    for column in ("epoch", "split", "values"):
        epochs.add_column(column)
    for entry in details["epochs"]:
        values = "  ".join(f"{k}={v:.4g}" for k, v in entry["metrics"].items())
        epochs.add_row(str(entry["epoch"]), entry["split"], values)
    if details["epochs"]:
        console.print(epochs)

    results = Table(title="selected results")
    for column in ("rule", "epoch", "split", *METRIC_NAMES):
        results.add_column(column)
    for rule, result in details["results"].items():
        results.add_row(rule, str(result["epoch"]), result["split"],
                        *(f"{result['metrics'].get(m, float('nan')):.2f}" for m in METRIC_NAMES))
    if details["results"]:
        console.print(results)

    for checkpoint in details["checkpoints"]:
        console.print(f"[bold]checkpoint {checkpoint['role']}[/bold] (epoch {checkpoint['epoch']}): "
                      f"{checkpoint['path']}  sha256 {checkpoint['sha256']}", soft_wrap=True)
        if checkpoint["problem"]:
            console.print(f"  [red]{checkpoint['problem']}[/red]", highlight=False)
    if details["provenance"]:
        console.print("[bold]provenance[/bold]: " + ", ".join(f"{k}={v}" for k, v in details["provenance"].items()))
    if details["audit"]:
        console.print(f"[bold]latest audit[/bold] ({_age(details['audit']['created_at'])}):")
        console.print_json(json.dumps(details["audit"]["report"]))
