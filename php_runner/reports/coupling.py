"""The coupling-artefact report: how much of a coupling run's R1 comes from the test order.

For the runs of the coupling ablation (spec ``coupling``) on one dataset and preset, the report reads
each run's latest audit from the registry and shows, per coupling, the R1 of annotation-order
("ordered"), shuffled and alone (batch size 1) evaluation, per seed and as mean +- std over seeds, the
ordered-minus-shuffled gap against the goal, the batch-size sweep as a table and a figure, the chance
levels, and the command and time of the runs. Every number comes from the registry.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from php_runner.errors import InputError
from php_runner.files import atomic_path, write_atomic

SPEC_NAME = "coupling"
COUPLINGS = ("official", "per-sample")
REPORT_NAME = "coupling_artefact"
# The documented goal (issue 15): the artefact is visible when every official seed shows this gap.
GOAL_GAP = 10.0


@dataclass(frozen=True)
class SeedRow:
    """One audited run: its training result and its audit's ordered / shuffled / alone R1."""

    run_id: int
    seed: int
    trained_r1: float | None  # best-on-test R1 of the in-training evaluation
    losses: list[float]  # total training loss per epoch
    ordered: float
    shuffled: float
    alone: float
    sweep_ordered: dict[int, float]
    sweep_shuffled: dict[int, float]
    train_seconds: float | None
    audit_seconds: float | None
    order_free: bool  # every shuffled evaluation of the audit gave exactly the ordered R1
    largest_change: float  # largest difference of any metric between ordered and shuffled, any batch size

    @property
    def gap(self) -> float:
        return self.ordered - self.shuffled


@dataclass
class CouplingArtefact:
    """The report's content: audited runs per coupling, plus what the registry says about how they ran."""

    dataset: str
    preset: str
    rows: dict[str, list[SeedRow]]
    eval_batch_size: int
    chance: dict
    alignment: dict
    split: dict
    commands: list[str]
    device: str | None
    wall_seconds: float | None
    missing: list[str] = field(default_factory=list)  # runs without an audit that has the sweep


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(registry, dataset: str, preset: str) -> CouplingArtefact:
    """Gather the audited coupling runs of ``dataset`` and ``preset``; InputError when there are none."""
    runs = registry.list_runs(spec_name=SPEC_NAME, dataset=dataset, preset=preset, kind="trained")
    rows: dict[str, list[SeedRow]] = {coupling: [] for coupling in COUPLINGS}
    missing, commands, reports, started, ended = [], [], [], [], []
    device = None
    # The coupling is read from the config: a run planned by several specs carries several row labels.
    for run in sorted(runs, key=lambda r: (r.config["model"]["coupling"], r.seed)):
        coupling = run.config["model"]["coupling"]
        audit = registry.latest_audit(run.id)
        if run.status != "done" or audit is None or "batch_size_sweep" not in audit.report:
            missing.append(f"run {run.id} ({coupling}, seed {run.seed}): status {run.status}, "
                           f"{'no audit' if audit is None else 'audit without the batch-size sweep'}")
            continue
        report = audit.report
        rows.setdefault(coupling, []).append(_seed_row(registry, run, report))
        reports.append(report)
        provenance = registry.provenance(run.id) or {}
        if provenance.get("command") and provenance["command"] not in commands:
            commands.append(provenance["command"])
        device = provenance.get("device", device)
        if run.started_at is not None:
            started.append(run.started_at)
        ended.append(audit.created_at)
    if not reports:
        found = "; ".join(missing) or "none"
        raise InputError(f"no audited coupling runs for {dataset} with preset {preset!r} (runs found: {found}); "
                         f"run: php-run ablate coupling --dataset {dataset} --preset {preset}")
    first = reports[0]
    return CouplingArtefact(
        dataset=dataset,
        preset=preset,
        rows={label: seeds for label, seeds in rows.items() if seeds},
        eval_batch_size=first["eval_batch_size"],
        chance=first.get("chance_r1", {}),
        alignment=first.get("alignment", {}),
        split=first.get("split", {}).get("splits", {}).get("test", {}),
        commands=commands,
        device=device,
        wall_seconds=max(ended) - min(started) if started else None,
        missing=missing,
    )


def _seed_row(registry, run, report: dict) -> SeedRow:
    """One audited run's row: its training result, losses and times, and its audit's R1 by order and batch size."""
    sweep = report["batch_size_sweep"]
    # (ordered, shuffled) metric pairs of every shuffled evaluation the audit made
    pairs = [(report["ordered"], shuffled) for shuffled in report["shuffled"]["runs"]] + [
        (sweep["ordered"][size], shuffled) for size, evaluations in sweep["shuffled"].items()
        for shuffled in evaluations["runs"]]
    results = registry.results(run.id)
    return SeedRow(
        run_id=run.id,
        seed=run.seed,
        trained_r1=results.get("best-on-test", {}).get("metrics", {}).get("R1"),
        losses=[entry.metrics["total"] for entry in registry.epochs(run.id)
                if entry.split == "train" and "total" in entry.metrics],
        ordered=report["r1_ordered"],
        shuffled=report["r1_shuffled"],
        alone=sweep["ordered"]["1"]["R1"],
        sweep_ordered={int(size): metrics["R1"] for size, metrics in sweep["ordered"].items()},
        sweep_shuffled={int(size): metrics["R1"] for size, metrics in sweep["shuffled"].items()},
        train_seconds=None if run.started_at is None or run.finished_at is None
        else run.finished_at - run.started_at,
        audit_seconds=report.get("seconds"),
        order_free=all(ordered["R1"] == shuffled["R1"] for ordered, shuffled in pairs),
        largest_change=max(abs(ordered[name] - shuffled[name]) for ordered, shuffled in pairs for name in ordered),
    )


# ---- rendering ------------------------------------------------------------------------------------

def _pm(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def render_markdown(report: CouplingArtefact, figure_name: str) -> str:
    """The markdown report; ``figure_name`` is the PNG beside it."""
    lines = [f"# The coupling artefact on {report.dataset}, preset {report.preset}", ""]
    lines += ["Regenerated from the registry by", "", "```bash",
              f"php-run report coupling --dataset {report.dataset} --preset {report.preset}", "```", ""]
    if report.commands:
        lines += ["The runs were trained and audited by", "", "```bash", *report.commands, "```", ""]
    lines += _setting_lines(report) + _summary_lines(report) + _per_seed_lines(report)
    lines += _sweep_lines(report, figure_name)
    lines += ["", "## Reading", "", *_reading(report)]
    if report.missing:
        lines += ["", "Not shown (no audit with the batch-size sweep): " + "; ".join(report.missing) + "."]
    return "\n".join(lines) + "\n"


def _setting_lines(report: CouplingArtefact) -> list[str]:
    """Where and how long the runs ran; the test split, its chance levels and batch alignment."""
    seeds_total = sum(len(seeds) for seeds in report.rows.values())
    train_total = sum(row.train_seconds or 0.0 for seeds in report.rows.values() for row in seeds)
    audit_total = sum(row.audit_seconds or 0.0 for seeds in report.rows.values() for row in seeds)
    lines = [f"on {report.device or 'an unrecorded device'}: {seeds_total} runs, "
             f"{_minutes(report.wall_seconds)} wall from the first training start to the last audit "
             f"(training {_minutes(train_total)}, audits {_minutes(audit_total)}, summed over runs).", ""]
    split = report.split
    chance = report.chance
    if split:
        lines += [f"Test split: {split.get('identities')} identities, {split.get('images')} images, "
                  f"{split.get('captions')} captions, in annotation order. Chance R1 over the whole gallery "
                  f"{chance.get('gallery', float('nan')):.2f}; a retriever that picks at random inside the image "
                  f"batch with the query's batch index (evaluation batch {report.eval_batch_size}) would reach "
                  f"{chance.get('same_batch', float('nan')):.2f}. Queries whose match is in that batch: "
                  f"{100 * report.alignment.get('queries_with_match_in_same_batch', float('nan')):.1f} %.", ""]
    return lines


def _summary_lines(report: CouplingArtefact) -> list[str]:
    """R1 by evaluation order per coupling, mean ± std over seeds, and how many seeds reach the goal gap."""
    lines = ["## R1 by evaluation order, mean ± std over seeds", "",
             f"Ordered and shuffled at the evaluation batch size {report.eval_batch_size}; shuffled is the mean "
             "over the audit's shuffle seeds; alone is batch size 1 (no batch-mates); trained is the "
             "in-training best-on-test R1.", "",
             "| coupling | seeds | trained R1 | ordered R1 | shuffled R1 | alone R1 | gap ordered − shuffled | "
             f"seeds with gap ≥ {GOAL_GAP:g} |",
             "|---|---|---|---|---|---|---|---|"]
    for coupling, seeds in report.rows.items():
        trained = [row.trained_r1 for row in seeds if row.trained_r1 is not None]
        reached = sum(row.gap >= GOAL_GAP for row in seeds)
        lines.append(f"| {coupling} | {', '.join(str(row.seed) for row in seeds)} | "
                     f"{_pm(trained) if trained else '—'} | {_pm([r.ordered for r in seeds])} | "
                     f"{_pm([r.shuffled for r in seeds])} | {_pm([r.alone for r in seeds])} | "
                     f"{_pm([r.gap for r in seeds])} | {reached} of {len(seeds)} |")
    return lines


def _per_seed_lines(report: CouplingArtefact) -> list[str]:
    """One table line per audited run."""
    lines = ["", "## Per seed", "",
             "| coupling | seed | run | trained R1 | ordered R1 | shuffled R1 | alone R1 | gap | training loss per epoch "
             "| training | audit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for coupling, seeds in report.rows.items():
        for row in seeds:
            trained = "—" if row.trained_r1 is None else f"{row.trained_r1:.2f}"
            lines.append(f"| {coupling} | {row.seed} | {row.run_id} | {trained} | {row.ordered:.2f} | "
                         f"{row.shuffled:.2f} | {row.alone:.2f} | {row.gap:+.2f} | "
                         f"{' '.join(f'{loss:.1f}' for loss in row.losses)} | {_minutes(row.train_seconds)} | "
                         f"{_minutes(row.audit_seconds)} |")
    return lines


def _sweep_lines(report: CouplingArtefact, figure_name: str) -> list[str]:
    """R1 against the evaluation batch size: the figure, mean ± std per order, the gap per seed."""
    sizes = sorted({size for seeds in report.rows.values() for row in seeds for size in row.sweep_ordered})
    lines = ["", "## R1 against the evaluation batch size", "", f"![R1 against evaluation batch size]({figure_name})",
             "", "| coupling | order | " + " | ".join(f"batch {size}" for size in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for coupling, seeds in report.rows.items():
        for order, attribute in (("ordered", "sweep_ordered"), ("shuffled", "sweep_shuffled")):
            cells = [_pm([getattr(row, attribute)[size] for row in seeds]) for size in sizes]
            lines.append(f"| {coupling} | {order} | " + " | ".join(cells) + " |")
    lines += ["", "Ordered − shuffled R1 per seed and batch size:", "",
              "| coupling | seed | " + " | ".join(f"batch {size}" for size in sizes) + " |",
              "|---|---|" + "---|" * len(sizes)]
    for coupling, seeds in report.rows.items():
        for row in seeds:
            cells = [f"{row.sweep_ordered[size] - row.sweep_shuffled[size]:+.2f}" for size in sizes]
            lines.append(f"| {coupling} | {row.seed} | " + " | ".join(cells) + " |")
    return lines


def _reading(report: CouplingArtefact) -> list[str]:
    """Verdicts against the goal, computed from the rows."""
    out = []
    official = report.rows.get("official", [])
    per_sample = report.rows.get("per-sample", [])
    if official:
        gaps = ", ".join(f"{row.gap:+.2f}" for row in official)
        met = all(row.gap >= GOAL_GAP for row in official)
        out.append(f"- Official coupling: ordered − shuffled R1 per seed {gaps}; the goal of at least {GOAL_GAP:g} "
                   f"points on every seed is {'met' if met else 'not met'}.")
        sizes = sorted(official[0].sweep_ordered)
        mean_gaps = {size: statistics.fmean(row.sweep_ordered[size] - row.sweep_shuffled[size] for row in official)
                     for size in sizes}
        widest = max(mean_gaps, key=mean_gaps.get)
        out.append("- Mean gap by evaluation batch size: " + ", ".join(
            f"{size}: {gap:+.2f}" for size, gap in mean_gaps.items()) + f"; widest at batch {widest}.")
        short = [row for row in official if row.gap < GOAL_GAP]
        final_losses = ", ".join(f"seed {row.seed} {row.losses[-1]:.1f}" for row in official if row.losses)
        for row in short:
            out.append(f"- Seed {row.seed} short of the goal (gap {row.gap:+.2f}): ordered R1 {row.ordered:.2f}, "
                       f"alone R1 {row.alone:.2f}" + (f"; final training loss per seed: {final_losses}" if final_losses
                                                       else "") + ".")
    if per_sample:
        exact = all(row.order_free for row in per_sample)
        largest = max(row.largest_change for row in per_sample)
        out.append(f"- Per-sample coupling: ordered and shuffled R1 are "
                   f"{'exactly equal on every seed and at every batch size' if exact else 'NOT exactly equal'}; "
                   f"the largest difference of any metric is {largest:.2g} (fp32 rounding of kernels whose "
                   "summation order depends on the batch).")
    return out


def write_figure(report: CouplingArtefact, path: Path) -> None:
    """R1 (mean ± std over seeds) against the evaluation batch size, ordered and shuffled, per coupling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    styles = {"official": "tab:red", "per-sample": "tab:blue"}
    for coupling, seeds in report.rows.items():
        sizes = sorted(seeds[0].sweep_ordered)
        for order, attribute, line in (("ordered", "sweep_ordered", "-"), ("shuffled", "sweep_shuffled", "--")):
            stats = [_mean_std([getattr(row, attribute)[size] for row in seeds]) for size in sizes]
            axes.errorbar(sizes, [m for m, _ in stats], yerr=[s for _, s in stats], linestyle=line, marker="o",
                          capsize=3, color=styles.get(coupling), label=f"{coupling}, {order}")
    if report.chance.get("gallery") is not None:
        axes.axhline(report.chance["gallery"], color="grey", linewidth=0.8, linestyle=":", label="chance")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("evaluation batch size")
    axes.set_ylabel("test R1 (%)")
    axes.set_title(f"{report.dataset} ({report.preset}): R1 against evaluation batch size")
    axes.legend(fontsize=8)
    figure.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as temporary:
            figure.savefig(temporary, format="png", dpi=120)
    finally:
        plt.close(figure)


def write_report(registry, dataset: str, preset: str, folder: Path) -> list[Path]:
    """Write ``coupling_artefact.md`` and its PNG into ``folder``; returns both paths."""
    report = collect(registry, dataset, preset)
    figure = folder / f"{REPORT_NAME}.png"
    markdown = folder / f"{REPORT_NAME}.md"
    write_figure(report, figure)
    write_atomic(markdown, render_markdown(report, figure.name).encode("utf-8"))
    return [markdown, figure]
