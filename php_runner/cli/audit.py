"""``php-run audit``: the protocol audit of a registry run or a checkpoint file (see ``php_runner/audit.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from php_runner.cli import app
from php_runner.cli.common import (
    DataRootOption,
    DbOption,
    DeviceOption,
    JsonOption,
    check_run_ref,
    console,
    print_json,
)
from php_runner.engine.metrics import METRIC_NAMES
from php_runner.errors import InputError

COUPLING_CHOICES = ("official", "per-sample")
ENCODER_CHOICES = ("full", "base", "crfm", "efp")


@app.command()
def audit(
    run: Annotated[str | None, typer.Argument(help="Registry run id or config-hash prefix (uses its checkpoint and config).",
                                              callback=check_run_ref)] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint file (ours or an official best.pth) instead of a run.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="The official configs.yaml beside --checkpoint.")] = None,
    data_root: DataRootOption = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES or RSTPReid (with --checkpoint).")] = None,
    coupling: Annotated[str | None, typer.Option("--coupling", help="Evaluate with this EFP coupling: official or per-sample (default: the model's).")] = None,
    encoder: Annotated[str | None, typer.Option("--encoder", help="Encoder pair for --checkpoint: full, base, crfm or efp (default: full).")] = None,
    precision: Annotated[str, typer.Option("--precision", help="Weights layout for --checkpoint: official (fp16) or amp.")] = "official",
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Evaluation batch size (default: the run's test_batch_size, the yaml's, or 64).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Shuffled evaluations (seeds 0..N-1).")] = 3,
    sample: Annotated[int, typer.Option("--sample", min=1, help="Queries and gallery images probed for batch independence.")] = 16,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Audit the evaluation protocol: batch coupling, order and batch-size sensitivity, split leakage, selection.

    A RUN's report is stored in the registry (php-run show RUN prints it).

    Example: php-run audit 3   (or php-run audit --checkpoint best.pth --config configs.yaml --data-root data --dataset ICFG-PEDES --json)
    """
    from php_runner.store.registry import Registry
    from php_runner.studies.audit import audit_checkpoint, audit_run

    if (run is None) == (checkpoint is None):
        raise InputError("audit: give either a RUN or --checkpoint, not both and not neither")
    if coupling is not None and coupling not in COUPLING_CHOICES:
        raise InputError(f"--coupling: expected one of {', '.join(COUPLING_CHOICES)}, got {coupling!r}")
    if encoder is not None and encoder not in ENCODER_CHOICES:
        raise InputError(f"--encoder: expected one of {', '.join(ENCODER_CHOICES)}, got {encoder!r}")
    if run is not None:
        for name, value in (("--config", config), ("--dataset", dataset), ("--encoder", encoder)):
            if value is not None:
                raise InputError(f"{name}: only with --checkpoint (a RUN brings its own)")
        registry = Registry(db)
        try:
            report = audit_run(registry, run, data_root, coupling, batch_size, seeds, sample, device)
        finally:
            registry.close()
    else:
        if not checkpoint.is_file():
            raise InputError(f"--checkpoint {checkpoint}: file not found")
        if config is not None and not config.is_file():
            raise InputError(f"--config {config}: file not found")
        if data_root is None:
            raise InputError("--data-root: required with --checkpoint (the folder holding the dataset folder)")
        if precision not in ("official", "amp"):
            raise InputError(f"--precision: expected official or amp, got {precision!r}")
        report = audit_checkpoint(checkpoint, data_root, dataset, config, coupling, encoder, batch_size, seeds, sample, device,
                                  precision)
    if as_json:
        print_json(report)
    else:
        print_report(report)


def _row(values: dict) -> list[str]:
    return [f"{values[name]:.2f}" for name in METRIC_NAMES]


def print_report(report: dict) -> None:
    """The audit as rich tables: verdict, metrics per protocol, split overlaps, selection."""
    verdict = "[red]batch-dependent[/]" if report["batch_dependent"] else "[green]batch-independent[/]"
    console.rule(f"audit of {report.get('run') or report.get('checkpoint')}: {report['dataset']}, "
                 f"coupling {report['coupling']}, encoder {report['encoder']}")
    console.print(f"verdict: {verdict}; ordered - shuffled R1 = [bold]{report['r1_gap']:+.2f}[/]")
    _print_coupling(report)
    _print_split(report["split"])
    _print_selection(report["selection"])


def _print_coupling(report: dict) -> None:
    """Embedding changes against the evaluation batch, metrics per protocol, batch alignment."""
    probes = report["batch_independence"]
    table = Table(title=f"relative embedding change vs. the evaluation batch (threshold {probes['threshold']:.1e}, "
                        f"noise floor {probes['noise_floor']:.1e}, from the CLIP-only encoder)")
    for column in ("modality", "probed", "alone max", "alone mean", "other batch max", "other batch mean", "batch-dependent"):
        table.add_column(column)
    for modality in ("text", "image"):
        entry = probes[modality]
        table.add_row(modality, str(entry["probed"]), *(f"{entry[k][s]:.2e}" for k in ("alone", "other_batch") for s in ("max", "mean")),
                      "yes" if entry["batch_dependent"] else "no")
    console.print(table)

    table = Table(title="metrics per evaluation protocol")
    for column in ("protocol", *METRIC_NAMES):
        table.add_column(column, justify="left" if column == "protocol" else "right")
    table.add_row(f"annotation order, batch {report['eval_batch_size']}", *_row(report["ordered"]))
    shuffled = report["shuffled"]
    table.add_row(f"shuffled, mean ± std of {len(shuffled['seeds'])} seeds",
                  *(f"{shuffled[m]:.2f} ± {shuffled['std'][m]:.2f}" for m in METRIC_NAMES))
    for size, metrics in report["batch_sizes"].items():
        if int(size) != report["eval_batch_size"]:
            table.add_row(f"annotation order, batch {size}", *_row(metrics))
    console.print(table)
    alignment = report["alignment"]
    console.print(f"text batch k vs image batch k: {alignment['identical_batches']:.0%} hold the same people; "
                  f"{alignment['queries_with_match_in_same_batch']:.0%} of queries have their match in the same batch")


def _print_split(split: dict) -> None:
    """Overlaps between the splits and each split's counts."""
    table = Table(title="data split overlaps (count, examples)")
    for column in ("splits", "image paths", "image content", "identities"):
        table.add_column(column)
    for pair, overlap in split["overlaps"].items():
        table.add_row(pair, *(f"{overlap[k]['count']} {overlap[k]['examples'][:2] if overlap[k]['count'] else ''}"
                              for k in ("image_paths", "image_content", "identities")))
    console.print(table)
    shared = split["captions_shared_across_identities"]
    console.print(f"captions shared across identities: {shared['count']}"
                  + (f" (e.g. {shared['examples'][0]['caption'][:60]!r})" if shared["count"] else ""))
    for name, stats in split["splits"].items():
        console.print(f"{name}: {stats['images']} images, {stats['identities']} identities, {stats['captions']} "
                      f"captions; captions per image {stats['captions_per_image'] or 'not linked in this split'}")
    if split["unreadable_images"]["count"]:
        console.print(f"[red]unreadable images: {split['unreadable_images']['count']}[/]")



def _print_selection(selection: dict | None) -> None:
    """Which rule chose the checkpoint, and the R1 gaps between the rules."""
    if selection:
        console.print(f"checkpoint selected on: [bold]{selection['selected_by']}[/]")
        gaps = selection.get("r1_gaps") or {}
        for rule, entry in (selection.get("rules") or {}).items():
            if entry:
                console.print(f"  {rule}: epoch {entry['epoch']}, test R1 "
                              + (f"{entry['test']['R1']:.2f}" if entry.get("test") else "-"))
        for name, value in gaps.items():
            if value is not None:
                console.print(f"  R1 gap {name.replace('_', ' ')}: {value:+.2f}")
