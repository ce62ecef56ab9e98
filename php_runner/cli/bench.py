"""`php-run bench`: the official and the fast regime side by side."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from php_runner.cli import app
from php_runner.cli.common import (
    REPORTS_DIR,
    JsonOption,
    console,
    err_console,
    print_json,
)
from php_runner.errors import InputError

if TYPE_CHECKING:
    import torch


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
    packed: Annotated[int | None, typer.Option("--packed", help="Also time N runs packed on the device: N processes "
                                               "training at --batch-size at once, their aggregate samples/s (0: "
                                               "skip; default: 4 on CUDA, 0 on the CPU).", min=0)] = None,
    packed_regime: Annotated[str, typer.Option("--packed-regime", help="Regime of the packed runs: official or "
                                               "fast.")] = "fast",
    as_json: JsonOption = False,
) -> None:
    """Time the official and the fast training regime side by side, with their input pipelines; record it.

    Training samples/s (model only and end to end, at --batch-size and the largest batch that
    fits), input pipeline images/s (PIL workers vs the image cache), evaluation images/s and
    captions/s, ICFG-PEDES-sized scoring seconds, peak memory and MFU (CUDA); with --packed N, N
    processes (as php-run worker --runs-per-gpu N runs them) training at once: each one's samples/s,
    start and end, their aggregate (all their samples over the time from the first start to the last
    end) and the device hours of a packed paper run. Random weights and
    a synthetic dataset in a temporary folder: no data or CLIP file needed. Each call is added to
    reports/benchmarks.jsonl and reports/benchmarks.md with the machine, versions and git commit.

    Example: php-run bench --device cuda --clip ViT-B/16 --json
    """
    from php_runner.cli.cache import parse_image_size
    from php_runner.engine.benchmark import BenchSizes, run_benchmark
    from php_runner.model.config import ClipConfig, PHPConfig
    from php_runner.reports import bench

    configs = {"ViT-B/16": PHPConfig(clip=ClipConfig()), "tiny": PHPConfig.tiny()}
    if clip not in configs:
        raise InputError(f"--clip: expected ViT-B/16 or tiny, got {clip!r}")
    torch_device = _bench_device(device)
    if packed_regime not in ("official", "fast"):
        raise InputError(f"--packed-regime: expected official or fast, got {packed_regime!r}")
    on_cuda = torch_device.type == "cuda"
    sizes = BenchSizes(batch_size=batch_size, steps=steps, warmup=warmup,
                       max_batch=max_batch or (1024 if on_cuda else 2 * batch_size), workers=workers,
                       pipeline_images=pipeline_images, scoring_queries=scoring_queries,
                       scoring_gallery=scoring_gallery, compile=on_cuda if compile is None else compile,
                       pipeline_size=None if pipeline_size is None else parse_image_size(pipeline_size,
                                                                                          "--pipeline-size"),
                       packed_runs=(4 if on_cuda else 0) if packed is None else packed, packed_regime=packed_regime)
    log = (lambda _: None) if as_json else (lambda text: err_console.print(f"[dim]bench: {text}[/dim]"))
    result = run_benchmark(configs[clip], sizes, str(torch_device), log=log)
    record = _bench_record(result, clip)
    written = bench.record_benchmark(record, REPORTS_DIR)
    if as_json:
        print_json(record)
        return
    _print_bench(result, f"{clip} on {record['device_name']}, batch {batch_size}:")
    console.print(f"[dim]written: {', '.join(str(p) for p in written)}[/dim]")


def _bench_device(device: str) -> torch.device:
    """The torch device --device names; a one-line error when it is malformed or CUDA is missing."""
    import torch

    from php_runner.engine.train import resolve_device

    try:
        torch_device = resolve_device(device)
    except RuntimeError as err:
        raise InputError(f"--device: {err}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available here")
    return torch_device


def _bench_record(result: dict, clip: str) -> dict:
    """The benchmark ``result`` with the model size, the machine, the versions, the git commit and the time."""
    from datetime import UTC, datetime

    from php_runner.execute.provenance import command_line, provenance_info

    provenance = provenance_info(result["device"], command_line())
    return {**result, "clip": clip, "device_name": provenance["device"], "host": provenance["host"],
            **{key: provenance[key] for key in ("git_commit", "git_dirty", "torch", "torchvision", "python")},
            "recorded": datetime.now(UTC).isoformat(timespec="seconds")}


def _dispatch_text(dispatch: dict | None) -> str:
    if dispatch is None:
        return ""
    return (f"; a step dispatches {dispatch['aten_ops']} aten ops ({dispatch['views']} views, {dispatch['kernels']} "
            f"kernels, dtype/device copies among them: {dispatch['copies']}; device reads: {dispatch['device_reads']})")


def _print_bench(result: dict, heading: str) -> None:
    """The ratios, then each measurement in one line."""
    train, pipeline = result["train"], result["pipeline"]
    console.print(heading)
    for name, ratio in result["ratios"].items():
        console.print(f"  {name.replace('_', ' ')}: {ratio:.2f}x")
    for name, entry in train.items():
        console.print(f"  train {name}: {entry['samples_per_s']:.1f} samples/s model only, "
                      f"{entry['end_to_end_samples_per_s']:.1f} end to end ({entry['pipeline']}); largest batch "
                      f"{entry['largest_batch']}: {entry['largest_batch_samples_per_s'] or float('nan'):.1f} samples/s"
                      + _dispatch_text(entry.get("dispatch_per_step")))
    console.print(f"  pipeline at {'x'.join(map(str, pipeline['image_size']))} ({pipeline['workers']} workers): PIL {pipeline['pil_images_per_s']:.1f} images/s, "
                  f"cache {pipeline['cache_images_per_s']:.1f} images/s")
    console.print(f"  eval: {result['eval']['images_per_s']:.1f} images/s, {result['eval']['texts_per_s']:.1f} "
                  f"captions/s; scoring {result['scoring']['queries']}x{result['scoring']['gallery']}: "
                  f"{result['scoring']['seconds']:.2f} s")
    console.print("  projected 60-epoch CUHK-PEDES run (per-epoch evaluation): " + ", ".join(
        f"{name} {entry['hours_60_epochs_cuhk']:.2f} h" for name, entry in result["projection"].items()))
    if "packed" in result:
        packed = result["packed"]
        console.print(f"  packed: {packed['runs']} {packed['regime']} runs at once, "
                      f"{packed['aggregate_samples_per_s']:.1f} samples/s together (one alone "
                      f"{packed['single_process_samples_per_s']:.1f}; each " + ", ".join(
                          f"{process['samples_per_s']:.1f}" for process in packed["processes"])
                      + f"; all {packed['overlap_s']:.2f} s of {packed['wall_s']:.2f} s at once); a packed paper run "
                      f"{packed['gpu_hours_per_run_60_epochs_cuhk']:.2f} device hours")
    mfu = "n/a on CPU" if result["mfu"] is None else f"{result['mfu']:.1%}"
    console.print(f"  peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB ({result['peak_memory_kind']}), MFU {mfu}")
