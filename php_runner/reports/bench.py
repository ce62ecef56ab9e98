"""The bench report: each ``php-run bench`` record appended to reports/benchmarks.jsonl and rendered as Markdown."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from php_runner.files import write_atomic

BENCHMARK_LOG = "benchmarks.jsonl"
# (label, path in a ``php-run bench`` record, format); ratios come first in each record's section.
BENCHMARK_FIGURES = (
    ("fast / official training samples/s (model only)", "ratios.fast_vs_official_train", "{:.2f}x"),
    ("fast / official training samples/s (end to end)", "ratios.fast_vs_official_end_to_end", "{:.2f}x"),
    ("cache / PIL augmented images/s", "ratios.cache_vs_pil_pipeline", "{:.2f}x"),
    ("compiled / eager fast training samples/s", "ratios.compiled_vs_eager_fast_train", "{:.2f}x"),
    ("packed runs together / one run alone, training samples/s", "ratios.packed_vs_single_process_train", "{:.2f}x"),
    ("projected hours of a 60-epoch CUHK-PEDES run (official / fast / compiled)",
     "projection.official.hours_60_epochs_cuhk", "{:.2f}"),
    ("", "projection.fast.hours_60_epochs_cuhk", "{:.2f}"),
    ("", "projection.fast_compiled.hours_60_epochs_cuhk", "{:.2f}"),
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
    ("packed runs / regime / batch", "packed.runs", "{}"),
    ("", "packed.regime", "{}"),
    ("", "packed.batch_size", "{}"),
    ("packed training samples/s together (all samples / first start to last end)",
     "packed.aggregate_samples_per_s", "{:.1f}"),
    ("packed seconds all at once / from first start to last end", "packed.overlap_s", "{:.2f}"),
    ("", "packed.wall_s", "{:.2f}"),
    ("device hours of one packed 60-epoch CUHK-PEDES run (training at the aggregate rate, evaluation unpacked)",
     "packed.gpu_hours_per_run_60_epochs_cuhk", "{:.2f}"),
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
    ("aten operators per eager training step (official / fast): each a host dispatch",
     "train.official.dispatch_per_step.aten_ops", "{}"),
    ("", "train.fast.dispatch_per_step.aten_ops", "{}"),
    ("of which views, no kernel (official / fast)", "train.official.dispatch_per_step.views", "{}"),
    ("", "train.fast.dispatch_per_step.views", "{}"),
    ("of which kernels, about the launches on CUDA (official / fast)",
     "train.official.dispatch_per_step.kernels", "{}"),
    ("", "train.fast.dispatch_per_step.kernels", "{}"),
    ("of the kernels, dtype/device copies (official / fast)", "train.official.dispatch_per_step.copies", "{}"),
    ("", "train.fast.dispatch_per_step.copies", "{}"),
    ("device reads (synchronisations) per training step (official / fast)",
     "train.official.dispatch_per_step.device_reads", "{}"),
    ("", "train.fast.dispatch_per_step.device_reads", "{}"),
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
