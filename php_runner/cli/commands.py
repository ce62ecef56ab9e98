"""The run, table, status, show, validate, evaluate, synth and data commands of php-run.

Heavy imports (torch, the specs, the reports) happen inside the commands, so ``php-run status`` and
``--help`` stay fast.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from php_runner.cli import app
from php_runner.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_RUN_FAILED,
    ClipWeightsOption,
    DataRootOption,
    DbOption,
    DeviceOption,
    GpusOption,
    RunsPerGpuOption,
    JsonOption,
    PresetOption,
    SeedsOption,
    check_run_ref,
    check_run_refs,
    console,
    err_console,
    parse_gpus,
    parse_seeds,
    print_json,
    specs_folder,
)
from php_runner.errors import InputError
from php_runner.store.registry import Registry
from php_runner.store.records import RunRecord
from php_runner.store.database import shown_url
from php_runner.cli.common import datasets_option, runtime_values, spec_of_table

if TYPE_CHECKING:
    from php_runner.experiment.schema import PlannedRun, Spec

METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")
ABLATIONS = ("cnum", "loss", "module", "beta", "sharing", "coupling")
HEADLINE_TABLE = "headline"
SYNTHETIC_ROOT = Path("data/synthetic")
REPORTS_DIR = Path("reports")

data_app = typer.Typer(help="Dataset tools.\n\nExample: php-run data check --data-root data --dataset RSTPReid",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


# --------------------------------------------------------------------------------------------
# Planning and executing specs
# --------------------------------------------------------------------------------------------


def _run_spec(spec: "Spec", preset: str, datasets: list[str] | None, seeds: str | None, data_root: Path | None,
              clip_weights: Path | None, device: str | None, db: str | None, gpus: str | None,
              restart: list[str] | None = None, runs_per_gpu: int = 1) -> int:
    """Plan a spec's runs and execute them (auditing them when the spec asks); returns the exit code."""
    from php_runner.experiment.specs import expand

    planned = expand(spec, preset, datasets, parse_seeds(seeds), runtime_values(data_root, clip_weights, device))
    if not planned:
        raise InputError(f"spec {spec.name}: no runs for preset {preset!r} and the given datasets/seeds")
    return _execute(planned, db, gpus, audit=spec.audit, device=device, restart=restart, runs_per_gpu=runs_per_gpu)


def _execute(planned: list["PlannedRun"], db: str | None, gpus: str | None, audit: bool = False,
             device: str | None = None, restart: list[str] | None = None, runs_per_gpu: int = 1) -> int:
    """Execute ``planned`` and print a summary; returns the exit code (1 when a run failed).

    With ``audit`` (a spec field), every done run without an audit report is audited afterwards.
    """
    from php_runner.execute.pool import RunOutcome
    from php_runner.execute.provenance import command_line
    from php_runner.execute.local import execute_planned

    gpu_ids = parse_gpus(gpus)
    console.print(f"[bold]{len(planned)} planned run(s)[/bold]")

    def on_outcome(outcome: RunOutcome) -> None:
        style = {"done": "green", "skipped": "dim", "busy": "yellow", "failed": "red"}[outcome.status]
        note = {
            "skipped": "done before, not trained again",
            "busy": "another php-run process is running it",
        }.get(outcome.status, outcome.error or "")
        console.print(f"[{style}]{outcome.status:>7}[/{style}] run {outcome.run_id} {outcome.config_hash[:12]} "
                      f"{outcome.dataset} {outcome.row_label} seed {outcome.seed}  {note}")

    summary = execute_planned(planned, db, gpu_ids, command=command_line(), on_outcome=on_outcome,
                              restart=restart or (), runs_per_gpu=runs_per_gpu)
    counts = ", ".join(f"{summary.count(s)} {s}" for s in ("done", "skipped", "busy", "failed") if summary.count(s))
    console.print(f"[bold]runs:[/bold] {counts}")
    if audit:
        _audit_done_runs(planned, db, device)
    return EXIT_RUN_FAILED if summary.failed else 0


def _audit_done_runs(planned: list["PlannedRun"], db: str | None, device: str | None) -> None:
    """Audit each done run of ``planned`` that has no audit report yet, and store the report."""
    from php_runner.studies.audit import audit_run, audit_summary

    registry = Registry(db)
    try:
        for plan in planned:
            run = registry.get_run(plan.config_hash)
            if run.status != "done" or registry.latest_audit(run.id) is not None:
                continue
            console.print(f"auditing run {run.id} {run.config_hash[:12]} {run.dataset} {run.row_label}")
            summary = audit_summary(audit_run(registry, run.id, device=device or "auto"))
            console.print("   " + ", ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
                                            for key, value in summary.items()))
    finally:
        registry.close()


def _damaged_checkpoints(registry: Registry, run_ids: list[int]) -> list[str]:
    """One line per recorded checkpoint of these runs whose file is missing or no longer has its sha256."""
    from php_runner.store.checksums import checkpoint_problem

    lines = []
    for run_id in run_ids:
        for record in registry.checkpoints(run_id):
            problem = checkpoint_problem(record.path, record.sha256)
            if problem is not None:
                lines.append(f"run {run_id}: checkpoint {record.role} {record.path}: {problem}")
    return lines


def _print_tables(names: list[str], db: str | None, include_empty: bool, as_json: bool, preset: str,
                  fmt: str = "rich", index: bool = False) -> None:
    """Render tables from the registry to the terminal (``fmt``: rich, markdown, csv or latex) and to
    reports/ (markdown, CSV, LaTeX, figures; with ``index`` also reports/index.md).

    Only runs of ``preset`` fill the trained lines (imported checkpoints are always shown).
    """
    from php_runner.reports import publish, render
    from php_runner.reports import tables as reports

    registry = Registry(db)
    views, run_ids = [], set()
    for name in names:
        rows = registry.result_rows(name, preset=preset)
        run_ids.update(run.id for run in registry.list_runs(status="done", table=name)
                       if run.preset == preset or run.kind == "imported")
        if rows or include_empty:
            views.append(reports.build_table(name, rows, preset=preset))
    damaged = _damaged_checkpoints(registry, sorted(run_ids))
    registry.close()
    for line in damaged:
        err_console.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)
    written = [path for view in views for path in publish.write_reports(view, REPORTS_DIR)]
    if index:
        written.append(publish.write_index(views, REPORTS_DIR, preset))
    if as_json:
        print_json([dataclasses.asdict(view) for view in views])
        return
    for view in views:
        if fmt == "rich":
            console.print(render.render_rich(view))
        else:
            typer.echo(reports.RENDERERS[fmt](view))
    if not views:
        console.print("No results recorded yet. Start with: php-run demo   (php-run table --all lists what to run)")
    if written:
        console.print(f"[dim]written: {', '.join(str(p) for p in written)}[/dim]")


# --------------------------------------------------------------------------------------------
# Run commands
# --------------------------------------------------------------------------------------------


@app.command()
def demo(
    seeds: SeedsOption = None,
    db: DbOption = None,
    device: DeviceOption = None,
    gpus: GpusOption = None,
    data_root: DataRootOption = None,
) -> None:
    """Write synthetic data, reproduce the headline table with the tiny preset, and print it.

    Runs already in the registry are not trained again, so a second demo prints the table at once.

    Example: php-run demo
    """
    from php_runner.data import DATASET_NAMES, write_synthetic

    root = data_root or SYNTHETIC_ROOT
    for name in DATASET_NAMES:
        if not (root / name).exists():
            console.print(f"writing synthetic {name} under {root}")
            write_synthetic(root, name)
    code = _run_spec(spec_of_table(HEADLINE_TABLE), "tiny", None, seeds, root, None, device, db, gpus)
    _print_tables([HEADLINE_TABLE], db, include_empty=True, as_json=False, preset="tiny")
    raise typer.Exit(code)


@app.command()
def reproduce(
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES, RSTPReid or all.")] = "all",
    preset: PresetOption = "paper",
    data_root: DataRootOption = None,
    clip_weights: ClipWeightsOption = None,
    seeds: SeedsOption = None,
    db: DbOption = None,
    device: DeviceOption = None,
    gpus: GpusOption = None,
    runs_per_gpu: RunsPerGpuOption = 1,
) -> None:
    """Train the paper's headline configuration on one or all datasets, then print the headline table.

    Example: php-run reproduce --dataset CUHK-PEDES --data-root data --clip-weights ViT-B-16.pt
    """
    code = _run_spec(spec_of_table(HEADLINE_TABLE), preset, datasets_option(dataset), seeds, data_root,
                     clip_weights, device, db, gpus, runs_per_gpu=runs_per_gpu)
    _print_tables([HEADLINE_TABLE], db, include_empty=True, as_json=False, preset=preset)
    raise typer.Exit(code)


@app.command()
def ablate(
    name: Annotated[str, typer.Argument(help=f"The ablation: {', '.join(ABLATIONS)}.")],
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES, RSTPReid or all.")] = "all",
    preset: PresetOption = "paper",
    data_root: DataRootOption = None,
    clip_weights: ClipWeightsOption = None,
    seeds: SeedsOption = None,
    db: DbOption = None,
    device: DeviceOption = None,
    gpus: GpusOption = None,
    runs_per_gpu: RunsPerGpuOption = 1,
) -> None:
    """Run one of the paper's ablations (or our coupling ablation), then print its table.

    Example: php-run ablate cnum --dataset CUHK-PEDES --preset tiny
    """
    if name not in ABLATIONS:
        raise InputError(f"ablation {name!r}: expected one of {', '.join(ABLATIONS)}")
    code = _run_spec(spec_of_table(name), preset, datasets_option(dataset), seeds, data_root, clip_weights,
                     device, db, gpus, runs_per_gpu=runs_per_gpu)
    _print_tables([name], db, include_empty=True, as_json=False, preset=preset)
    raise typer.Exit(code)


@app.command("run")
def run_spec(
    spec_path: Annotated[Path, typer.Argument(help="A spec file (TOML), or a shipped spec's name (php-run ls), e.g. cnum.")],
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES, RSTPReid or all.")] = "all",
    preset: PresetOption = "paper",
    data_root: DataRootOption = None,
    clip_weights: ClipWeightsOption = None,
    seeds: SeedsOption = None,
    db: DbOption = None,
    device: DeviceOption = None,
    gpus: GpusOption = None,
    runs_per_gpu: RunsPerGpuOption = 1,
    restart: Annotated[list[str] | None, typer.Option(
        "--restart", help="Train this run (id or hash prefix, one of the spec's) again from scratch, deleting its "
        "checkpoints: the way on when its last.pth is damaged. Repeatable.", callback=check_run_refs)] = None,
) -> None:
    """Execute every run a spec file expands to (done runs are skipped, interrupted ones resume).

    Example: php-run run cnum --preset tiny --seeds 1,2   (or a file: php-run run my_specs/cnum6.toml; --restart 7 retrains run 7)
    """
    from php_runner.experiment.specs import find_spec, load_spec

    raise typer.Exit(_run_spec(load_spec(find_spec(spec_path)), preset, datasets_option(dataset), seeds, data_root,
                               clip_weights, device, db, gpus, restart, runs_per_gpu))


# --------------------------------------------------------------------------------------------
# Registry views
# --------------------------------------------------------------------------------------------


@app.command()
def table(
    name: Annotated[str | None, typer.Argument(help="A table: headline, module, loss, cnum, beta, sharing, coupling, "
                                               "or 'tune' followed by a study name.")] = None,
    study: Annotated[str | None, typer.Argument(help="With 'tune': the Optuna study to show.")] = None,
    all_tables: Annotated[bool, typer.Option("--all", help="Every table, also those with no results yet "
                                             "(their cells say which command fills them).")] = False,
    preset: PresetOption = "paper",
    fmt: Annotated[str, typer.Option("--format", help="What to print: rich (the terminal table), markdown, csv "
                                     "or latex (booktabs).")] = "rich",
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Render paper tables from the registry (paper value, ours as mean +- std over seeds, delta).

    Also writes each table to reports/ as markdown, CSV and LaTeX, with figures for module, cnum and
    beta (NAME_PRESET.* for a preset other than paper); --all also writes reports/index.md.

    Example: php-run table cnum --preset tiny     (or: php-run table tune my-study)
    """
    from php_runner.experiment.paper import table_names

    if name == "tune":
        _print_study(study, db, as_json)
        return
    if study is not None:
        raise InputError(f"table {name!r}: a study name goes only with 'table tune STUDY'")
    known = list(table_names())
    if name is not None and name not in known:
        raise InputError(f"table {name!r}: expected one of {', '.join(known)}")
    from php_runner.reports.render import RENDERERS

    if fmt != "rich" and fmt not in RENDERERS:
        raise InputError(f"--format: expected rich, {', '.join(RENDERERS)}, got {fmt!r}")
    names = [name] if name is not None else known
    _print_tables(names, db, include_empty=all_tables or name is not None, as_json=as_json, preset=preset, fmt=fmt,
                  index=all_tables)


def _print_study(study: str | None, db: str | None, as_json: bool) -> None:
    """The tuning table of one Optuna study: trials, best parameters, importances, best trial's test metrics."""
    from php_runner.studies.tuning import tune_table

    if study is None:
        raise InputError("table tune: give the study name, e.g. php-run table tune php-tiny")
    renderable, data = tune_table(study, db)
    if as_json:
        print_json(data)
    else:
        console.print(renderable)


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
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """List the registry's runs with their status and the metrics of their selected checkpoint.

    Example: php-run status --json
    """
    from php_runner.execute.jobs import job_states

    registry = Registry(db)
    entries = []
    abandoned = set()
    for run in registry.list_runs():
        rule, metrics = selected_metrics(registry, run)
        entries.append((run, rule, metrics))
        if run.status == "running" and registry.is_claimable(run):
            abandoned.add(run.id)  # its worker died; the next invocation resumes it
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
    view = Table(title=f"runs in {shown_url(registry.url)}")
    view.add_column("id", justify="right", no_wrap=True)
    view.add_column("hash", no_wrap=True)
    view.add_column("experiment")
    view.add_column("dataset")
    view.add_column("seed", justify="right")
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
                     str(run.seed), f"[{styles[shown]}]{shown}[/]", *values, *job)
    console.print(view if entries else "The registry has no runs yet. Start with: php-run demo")


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

    registry = Registry(db)
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


@app.command()
def validate() -> None:
    """Load and check every shipped spec; errors name the file and the field.

    Example: php-run validate
    """
    from php_runner.experiment.specs import load_all_specs

    specs = load_all_specs(specs_folder())
    view = Table(title=f"{len(specs)} specs valid")
    for column in ("spec", "table", "description"):
        view.add_column(column)
    for name, spec in sorted(specs.items()):
        view.add_row(name, spec.table or "-", getattr(spec, "description", "") or "")
    console.print(view)


# --------------------------------------------------------------------------------------------
# Evaluation and data
# --------------------------------------------------------------------------------------------


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="best.pth (official) or a php-run checkpoint.")],
    dataset: Annotated[str | None, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES or RSTPReid "
                                                "(default: dataset_name from configs.yaml).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="The official configs.yaml next to best.pth; its "
                                                "values apply unless overridden.")] = None,
    data_root: DataRootOption = None,
    encoder: Annotated[str | None, typer.Option("--encoder", help="full, base, crfm or efp (default: the model's).")]
    = None,
    coupling: Annotated[str | None, typer.Option("--coupling", help="EFP attention: official or per-sample.")] = None,
    test_batch_size: Annotated[int | None, typer.Option("--test-batch-size", help="Evaluation batch size "
                                                        "(default: the checkpoint's recipe or configs.yaml's, "
                                                        "else 64).", min=1)] = None,
    order: Annotated[str, typer.Option("--order", help="Batching order: annotation (official) or shuffled.")]
    = "annotation",
    precision: Annotated[str | None, typer.Option("--precision", help="Weight layout: official (fp16, as the "
                                                  "official test.py) or amp (fp32; bf16 autocast on CUDA). Default: "
                                                  "the regime a php-run checkpoint was trained in, else official.")]
    = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
    save_embeddings: Annotated[Path | None, typer.Option("--save-embeddings", help="Write text, image, text_pids "
                                                         "and image_pids arrays to this .npz file.")] = None,
) -> None:
    """Evaluate a checkpoint on a dataset's test split (text-to-image R1, R5, R10, mAP, mINP).

    Example: php-run evaluate --checkpoint logs/CUHK-PEDES/sdm+itc+aux/best.pth
    --config logs/CUHK-PEDES/sdm+itc+aux/configs.yaml --data-root data --dataset CUHK-PEDES --json
    """
    from php_runner.data import DATASET_NAMES, read_dataset
    from php_runner.engine.evaluate import EvalSettings, extract_embeddings, score_embeddings
    from php_runner.engine.train import resolve_device
    from php_runner.model.checkpoint import load_model, read_official_yaml
    from php_runner.model.precision import PRECISIONS, apply_precision

    yaml_values = read_official_yaml(config) if config is not None else {}
    name = dataset or yaml_values.get("dataset_name")
    if name not in DATASET_NAMES:
        raise InputError(f"--dataset: expected one of {', '.join(DATASET_NAMES)}, got {name!r}")
    root = data_root or yaml_values.get("root_dir")
    if root is None:
        raise InputError("--data-root: required when no configs.yaml gives root_dir")
    if order not in ("annotation", "shuffled"):
        raise InputError(f"--order: expected annotation or shuffled, got {order!r}")
    if coupling is not None and coupling not in ("official", "per-sample"):
        raise InputError(f"--coupling: expected official or per-sample, got {coupling!r}")
    if encoder is not None and encoder not in ("full", "base", "crfm", "efp"):
        raise InputError(f"--encoder: expected full, base, crfm or efp, got {encoder!r}")
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")

    model, info = load_model(checkpoint, config)
    recipe = info["settings"]  # our checkpoints: evaluate as training evaluated, unless overridden
    precision = precision or recipe.get("precision", "official")
    if coupling is not None:
        model.coupling = coupling
    split = read_dataset(root, name).test
    torch_device = resolve_device(device or "auto")
    apply_precision(model, precision).to(torch_device).eval()
    settings = EvalSettings(
        batch_size=test_batch_size or int(recipe.get("test_batch_size", yaml_values.get("test_batch_size", 64))),
        order=order,
        encoder=encoder,
        device=str(torch_device),
        precision=precision,
        image_size=model.config.clip.image_size,
    )
    embeddings = extract_embeddings(model, split, settings)
    metrics = score_embeddings(embeddings)
    if save_embeddings is not None:
        _save_embeddings(embeddings, save_embeddings)
    result = {k: metrics[k] for k in METRIC_NAMES}
    if as_json:
        print_json(result)
        return
    view = Table(title=f"{checkpoint} on {name} test ({settings.order} order, batch {settings.batch_size})")
    for column in METRIC_NAMES:
        view.add_column(column, justify="right")
    view.add_row(*(f"{result[m]:.3f}" for m in METRIC_NAMES))
    console.print(view)


def _save_embeddings(embeddings, path: Path) -> None:
    """Write the embeddings as an .npz atomically (temporary file in the same folder, then rename)."""
    import numpy as np

    from php_runner.files import atomic_path

    with atomic_path(path, suffix=".npz.tmp") as temporary, open(temporary, "wb") as handle:
        np.savez(handle, text=embeddings.text.numpy(), image=embeddings.image.numpy(),
                 text_pids=embeddings.text_pids.numpy(), image_pids=embeddings.image_pids.numpy())


@app.command()
def bench(
    clip: Annotated[str, typer.Option("--clip", help="Model size: ViT-B/16 (the paper's) or tiny.")] = "ViT-B/16",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ... or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Image-caption pairs per step.", min=2)] = 64,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps per measurement (after the warm-up).", min=1)] = 10,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps first.", min=0)] = 2,
    max_batch: Annotated[int | None, typer.Option("--max-batch", help="Cap of the largest-batch search "
                                                  "(default: 1024 on CUDA, twice --batch-size on the CPU).", min=2)] = None,
    workers: Annotated[int, typer.Option("--workers", help="PIL loader workers = cache pipeline threads.", min=0)] = 8,
    pipeline_images: Annotated[int, typer.Option("--pipeline-images", help="Images timed per input pipeline.",
                                                 min=1)] = 2048,
    scoring_queries: Annotated[int, typer.Option("--scoring-queries", help="Scoring queries (ICFG-PEDES: 19848).",
                                                 min=1)] = 19_848,
    scoring_gallery: Annotated[int, typer.Option("--scoring-gallery", help="Scoring gallery (ICFG-PEDES: 19848).",
                                                 min=1)] = 19_848,
    pipeline_size: Annotated[str | None, typer.Option("--pipeline-size", help="HxW of the input pipeline "
                                                      "measurement (default: the model's input size).")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="Also time the fast regime "
                                                 "compiled (default: on CUDA only).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Time the official and the fast training regime side by side, with their input pipelines; record it.

    Training samples/s (model only and end to end, at --batch-size and the largest batch that
    fits), input pipeline images/s (PIL workers vs the image cache), evaluation images/s and
    captions/s, ICFG-PEDES-sized scoring seconds, peak memory and MFU (CUDA). Random weights and
    a synthetic dataset in a temporary folder: no data or CLIP file needed. Each call is added to
    reports/benchmarks.jsonl and reports/benchmarks.md with the machine, versions and git commit.

    Example: php-run bench --device cuda --clip ViT-B/16 --json
    """
    from datetime import datetime, timezone

    import torch

    from php_runner.reports import bench
    from php_runner.cli.cache import parse_image_size
    from php_runner.engine.benchmark import BenchSizes, run_benchmark
    from php_runner.engine.train import resolve_device
    from php_runner.model.config import ClipConfig, PHPConfig
    from php_runner.execute.provenance import command_line, provenance_info

    configs = {"ViT-B/16": PHPConfig(clip=ClipConfig()), "tiny": PHPConfig.tiny()}
    if clip not in configs:
        raise InputError(f"--clip: expected ViT-B/16 or tiny, got {clip!r}")
    try:
        torch_device = resolve_device(device)
    except RuntimeError as err:
        raise InputError(f"--device: {err}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available here")
    on_cuda = torch_device.type == "cuda"
    sizes = BenchSizes(batch_size=batch_size, steps=steps, warmup=warmup,
                       max_batch=max_batch or (1024 if on_cuda else 2 * batch_size), workers=workers,
                       pipeline_images=pipeline_images, scoring_queries=scoring_queries,
                       scoring_gallery=scoring_gallery, compile=on_cuda if compile is None else compile,
                       pipeline_size=None if pipeline_size is None else parse_image_size(pipeline_size, "--pipeline-size"))
    log = (lambda _: None) if as_json else (lambda text: err_console.print(f"[dim]bench: {text}[/dim]"))
    result = run_benchmark(configs[clip], sizes, str(torch_device), log=log)
    provenance = provenance_info(result["device"], command_line())
    record = {**result, "clip": clip, "device_name": provenance["device"], "host": provenance["host"],
              **{key: provenance[key] for key in ("git_commit", "git_dirty", "torch", "torchvision", "python")},
              "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    written = bench.record_benchmark(record, REPORTS_DIR)
    if as_json:
        print_json(record)
        return
    train, pipeline = result["train"], result["pipeline"]
    console.print(f"{clip} on {provenance['device']}, batch {batch_size}:")
    for name, ratio in result["ratios"].items():
        console.print(f"  {name.replace('_', ' ')}: {ratio:.2f}x")
    for name, entry in train.items():
        console.print(f"  train {name}: {entry['samples_per_s']:.1f} samples/s model only, "
                      f"{entry['end_to_end_samples_per_s']:.1f} end to end ({entry['pipeline']}); largest batch "
                      f"{entry['largest_batch']}: {entry['largest_batch_samples_per_s'] or float('nan'):.1f} samples/s")
    console.print(f"  pipeline at {'x'.join(map(str, pipeline['image_size']))} ({pipeline['workers']} workers): PIL {pipeline['pil_images_per_s']:.1f} images/s, "
                  f"cache {pipeline['cache_images_per_s']:.1f} images/s")
    console.print(f"  eval: {result['eval']['images_per_s']:.1f} images/s, {result['eval']['texts_per_s']:.1f} "
                  f"captions/s; scoring {result['scoring']['queries']}x{result['scoring']['gallery']}: "
                  f"{result['scoring']['seconds']:.2f} s")
    mfu = "n/a on CPU" if result["mfu"] is None else f"{result['mfu']:.1%}"
    console.print(f"  peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB ({result['peak_memory_kind']}), MFU {mfu}")
    console.print(f"[dim]written: {', '.join(str(p) for p in written)}[/dim]")


@app.command()
def synth(
    root: Annotated[Path, typer.Option("--root", help="Folder to write the dataset folders into.")],
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES, RSTPReid or all.")] = "all",
    ids: Annotated[int | None, typer.Option("--ids", help="Training identities per dataset (default: demo size).",
                                            min=1)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed writes the same files.")] = 0,
    test_ids: Annotated[int | None, typer.Option("--test-ids", help="Test identities (default: half the "
                                                 "training identities).", min=1)] = None,
    test_images_per_id: Annotated[int, typer.Option("--test-images-per-id", help="Test images per identity.",
                                                    min=1)] = 2,
    test_captions_per_image: Annotated[int | None, typer.Option("--test-captions-per-image", help="Test captions "
                                                                "per image (default: the format's, 1 for "
                                                                "ICFG-PEDES, else 2).", min=1)] = None,
    variant: Annotated[str | None, typer.Option("--variant", help="A named set instead of the size options: "
                                                "icfg-scale (ICFG-PEDES format, 2,000 test images).")] = None,
) -> None:
    """Write synthetic datasets in the official on-disk formats (JPEG images + annotation JSON).

    Example: php-run synth --root data/synthetic --dataset all --ids 40 --seed 0
    (or: php-run synth --root data/synthetic-icfg-scale --variant icfg-scale)
    """
    from php_runner.data import TestSplitSize, write_synthetic, write_variant

    if variant is not None:
        if ids is not None or test_ids is not None or test_captions_per_image is not None or test_images_per_id != 2:
            raise InputError("--variant: fixes the sizes; give it without --ids and the --test-* options")
        console.print(f"wrote {write_variant(root, variant, seed)}")
        return
    test = TestSplitSize(test_ids, test_images_per_id, test_captions_per_image)
    for path in write_synthetic(root, dataset, ids, seed, test):
        console.print(f"wrote {path}")


@data_app.command("check")
def data_check(
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder holding the dataset folder.")],
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES or RSTPReid.")],
) -> None:
    """Print a dataset's subset/ids/images/captions table and every problem found (exit 2 on problems).

    Example: php-run data check --data-root data --dataset CUHK-PEDES
    """
    from php_runner.data import check_dataset

    rows, problems = check_dataset(data_root, dataset)
    view = Table(title=f"{dataset} under {data_root}")
    for column in ("subset", "ids", "images", "captions"):
        view.add_column(column, justify="left" if column == "subset" else "right")
    for row in rows:
        view.add_row(*(str(row[c]) for c in ("subset", "ids", "images", "captions")))
    if rows:
        console.print(view)
    for problem in problems:
        err_console.print(f"[red]problem:[/red] {problem}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(EXIT_BAD_INPUT)
    console.print(f"[green]{dataset}: no problems found[/green]")
