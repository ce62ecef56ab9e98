"""``php-run bench``: the official regime and php-run's fast regime side by side, in one process.

Measured, each on the same model and device:

* training samples/s (image-caption pairs through forward, backward and the optimiser) of the
  official regime as the official code runs it (``precision = "official"``: fp16 weights, per-tensor
  Adam groups, per-sample PIL pipeline) and of the fast regime (``precision = "amp"``, eager and
  compiled), at the requested batch and at the largest batch that fits (doubling up to a cap), both
  model only (random inputs already on the device) and end to end (the regime's input pipeline on a
  synthetic dataset: PIL workers for official, the image cache with batch augmentation for fast);
* input pipeline augmented images/s: PIL with N workers, and the cache (gather + augmentation on the
  device) with 1 and with N intra-op threads (the better is reported);
* the aten operators one eager training step of each regime dispatches (``engine.step_dispatch``: about
  one kernel launch each on CUDA), the copies among them and its host reads;
* evaluation images/s and captions/s (the encoders, no grad, at the requested batch);
* scoring seconds: cosine similarity and the engine's chunked metrics at ICFG-PEDES size
  (19,848 x 19,848 by default);
* peak memory (CUDA allocator peak, or the process's peak RSS on the CPU) and MFU: FLOPs of one
  training step counted by ``torch.utils.flop_counter`` against a measured bf16 matmul peak (CUDA
  only; ``None`` on the CPU, where a matmul "peak" says little about the model);
* with ``sizes.packed_runs`` N > 0: N processes training one regime at the requested batch at once on the
  device (``engine.packed_benchmark``), their aggregate samples/s, and the device hours of a paper run
  packed that way (``engine.projection``).

Random weights throughout: no CLIP file is needed. Synthetic JPEGs are 96x48, smaller than the real
datasets' images, so the PIL figures are if anything optimistic.
"""

from __future__ import annotations

import math
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from php_runner.data import read_dataset, write_synthetic
from php_runner.data.batch_transforms import BatchAugment
from php_runner.data.cache import open_cache
from php_runner.data.loaders import CachedTrainBatches, TrainPairs
from php_runner.data.transforms import build_transform
from php_runner.engine.bench_regime import (
    EOT_ID,
    REGIMES,
    BenchRegime,
    BenchSizes,
    random_batch,
    synchronize,
    timed,
)
from php_runner.engine.metrics import retrieval_metrics
from php_runner.engine.packed_benchmark import packed_training
from php_runner.engine.projection import packed_gpu_hours_per_run, projection
from php_runner.engine.step_dispatch import step_dispatches
from php_runner.engine.train import resolve_device, seed_everything
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel
from php_runner.model.precision import autocast_context

__all__ = ["EOT_ID", "BenchSizes", "random_batch", "run_benchmark", "training_samples_per_s", "matmul_peak_flops"]


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def training_samples_per_s(config: PHPConfig, regime: str, batch_size: int, sizes: BenchSizes, device: str = "auto",
                           compile: bool = False, cuda_graphs: bool = False) -> float:
    """Model-only training samples/s of one regime (``official`` or ``fast``) at ``batch_size``, compiled or not,
    or (``cuda_graphs``, fast only) with forward + losses as CUDA graphs; those need 3 untimed steps (compile
    and warm-up run, recording, first replay), so at least 3 warm-up steps are taken."""
    torch_device = resolve_device(device)
    if cuda_graphs:
        sizes = replace(sizes, warmup=max(sizes.warmup, 3))
    regime_steps = BenchRegime(config, regime, batch_size, torch_device, compile, cuda_graphs)
    return regime_steps.samples_per_s(config, batch_size, sizes)


def _largest_batch(config: PHPConfig, regime: str, sizes: BenchSizes, device: torch.device, compile: bool) -> dict:
    """The largest batch (doubling from ``batch_size`` up to ``max_batch``) whose training step fits, and its rate."""
    best = {"batch_size": None, "samples_per_s": None}
    batch_size = sizes.batch_size
    while batch_size <= sizes.max_batch:
        try:
            trial = BenchRegime(config, regime, batch_size, device, compile)
            rate = trial.samples_per_s(config, batch_size, sizes)
        except (RuntimeError, MemoryError) as err:
            if not _is_out_of_memory(err) and not isinstance(err, MemoryError):
                raise
            break
        finally:
            trial = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        best = {"batch_size": batch_size, "samples_per_s": rate}
        batch_size *= 2
    return best


def _bench_dataset(folder: Path, images: int):
    """A synthetic CUHK-PEDES with at least ``images`` training samples (8 per identity)."""
    write_synthetic(folder, "CUHK-PEDES", num_ids=max(2, math.ceil(images / 8)), seed=0)
    return read_dataset(folder, "CUHK-PEDES")


def _pil_loader(dataset, image_size: tuple[int, int], batch_size: int, workers: int) -> DataLoader:
    transform = build_transform(image_size, train=True, img_aug=True)
    return DataLoader(TrainPairs(dataset.train, transform), batch_size=batch_size, shuffle=True, drop_last=False,
                      num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def _cache_loader(dataset, cache, batch_size: int, device: torch.device) -> CachedTrainBatches:
    return CachedTrainBatches(dataset.train, cache, BatchAugment(cache.image_size), batch_size,
                              torch.Generator().manual_seed(0), device)


def _batches(loader, count: int):
    """``count`` batches, cycling over epochs."""
    produced = 0
    while produced < count:
        for batch in loader:
            yield batch
            produced += 1
            if produced == count:
                return


def _images_per_s(loader, images: int, batch_size: int, device: torch.device) -> float:
    """Augmented images/s of a loader over ``images`` images, after one untimed batch (worker start-up)."""
    count = max(1, math.ceil(images / batch_size))
    stream = _batches(loader, count + 1)
    next(stream)
    synchronize(device)
    started, seen = time.perf_counter(), 0
    for batch in stream:
        seen += len(batch["images"])
        batch["images"].to(device, non_blocking=True)
    synchronize(device)
    return seen / (time.perf_counter() - started)


def _end_to_end(regime: BenchRegime, loader, sizes: BenchSizes) -> float:
    """Training samples/s with the regime's input pipeline feeding the step."""
    stream = _batches(loader, sizes.warmup + sizes.steps)
    seen = []

    def work(_: int) -> None:
        batch = next(stream)
        seen.append(len(batch["pids"]))
        regime.step(batch)

    seconds = timed(regime.device, sizes.steps, sizes.warmup, work)
    return sum(seen[sizes.warmup:]) / seconds


@torch.no_grad()
def _eval_rates(regime: BenchRegime, config: PHPConfig, sizes: BenchSizes) -> dict:
    model, device = regime.model, regime.device
    model.eval()
    batch = random_batch(config, sizes.batch_size, torch.Generator().manual_seed(1))
    images, token_ids = batch["images"].to(device), batch["caption_ids"].to(device)
    rates = {}
    for name, encode, inputs in (("images_per_s", model.encode_image, images), ("texts_per_s", model.encode_text, token_ids)):
        def work(_: int) -> None:
            with autocast_context(regime.settings.precision, device):
                encode(inputs)
        rates[name] = sizes.steps * sizes.batch_size / timed(device, sizes.steps, sizes.warmup, work)
    rates["batch_size"] = sizes.batch_size
    return rates


def _scoring(sizes: BenchSizes, dim: int, device: torch.device) -> dict:
    """Seconds of similarity + chunked retrieval metrics on random embeddings of the requested sizes."""
    generator = torch.Generator().manual_seed(2)
    text = torch.nn.functional.normalize(torch.randn(sizes.scoring_queries, dim, generator=generator), dim=1).to(device)
    image = torch.nn.functional.normalize(torch.randn(sizes.scoring_gallery, dim, generator=generator), dim=1).to(device)
    identities = max(1, sizes.scoring_gallery // 20)
    text_pids = torch.randint(0, identities, (sizes.scoring_queries,), generator=generator).to(device)
    image_pids = torch.randint(0, identities, (sizes.scoring_gallery,), generator=generator).to(device)
    synchronize(device)
    started = time.perf_counter()
    retrieval_metrics(text @ image.t(), text_pids, image_pids)
    synchronize(device)
    return {"seconds": time.perf_counter() - started, "queries": sizes.scoring_queries, "gallery": sizes.scoring_gallery}


def _step_flops(regime: BenchRegime, config: PHPConfig, batch_size: int) -> int:
    """FLOPs of one training step (forward + backward) at ``batch_size``, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = {key: value.to(regime.device) for key, value in random_batch(config, batch_size, torch.Generator().manual_seed(3)).items()}
    counter = FlopCounterMode(display=False)
    with counter:
        regime.step(batch)
    return counter.get_total_flops()


def matmul_peak_flops(device: torch.device, size: int = 8192, repeats: int = 20) -> float | None:
    """Measured bf16 dense matmul FLOP/s on CUDA (the roofline MFU is taken against); None on the CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    seconds = timed(device, repeats, 3, lambda _: a @ b)
    return 2 * size**3 * repeats / seconds


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def _pipelines(dataset, cache, pipeline_cache, build_seconds: float, sizes: BenchSizes, device: torch.device) -> dict:
    """Augmented images/s of the PIL workers and of the image cache at the pipeline's image size."""
    pipeline_size = tuple(pipeline_cache.image_size)
    pil_rate = _images_per_s(_pil_loader(dataset, pipeline_size, sizes.batch_size, sizes.workers),
                             sizes.pipeline_images, sizes.batch_size, device)
    # Intra-op threads: 1 and the worker count. On an oversubscribed CPU more threads can be much
    # slower (OpenMP barriers wait for descheduled threads), so the best of the two is reported.
    threads, cache_rates = torch.get_num_threads(), {}
    try:
        for count in sorted({1, max(sizes.workers, 1)}):
            torch.set_num_threads(count)
            cached = _cache_loader(dataset, pipeline_cache, sizes.batch_size, device)
            cache_rates[str(count)] = _images_per_s(cached, sizes.pipeline_images, sizes.batch_size, device)
    finally:
        torch.set_num_threads(threads)
    return {
        "pil_images_per_s": pil_rate, "cache_images_per_s": max(cache_rates.values()),
        "cache_images_per_s_by_threads": cache_rates, "workers": sizes.workers,
        "image_size": list(pipeline_size), "cache_build_images_per_s": len(cache.array) / build_seconds,
        "images": sizes.pipeline_images,
    }


def _training(result: dict, config: PHPConfig, dataset, cache, sizes: BenchSizes, device: torch.device,
              log: Callable[[str], None]) -> None:
    """Each regime variant's training rates into ``result["train"]``; the eager ones' evaluation rates into
    ``result["eval"]``, and the FLOPs of a fast step."""
    pil = _pil_loader(dataset, config.clip.image_size, sizes.batch_size, sizes.workers)
    variants = [("official", False), ("fast", False)] + ([("fast_compiled", True)] if sizes.compile else [])
    for name, compiled in variants:
        regime_name = "fast" if name.startswith("fast") else "official"
        log(f"training: {name}")
        regime = BenchRegime(config, regime_name, sizes.batch_size, device, compiled)
        loader = pil if regime_name == "official" else _cache_loader(dataset, cache, sizes.batch_size, device)
        entry = {
            "precision": REGIMES[regime_name], "compile": compiled, "batch_size": sizes.batch_size,
            "samples_per_s": regime.samples_per_s(config, sizes.batch_size, sizes),
            "end_to_end_samples_per_s": _end_to_end(regime, loader, sizes),
            "pipeline": "pil" if regime_name == "official" else "cache",
        }
        if name != "fast_compiled":
            batch = regime.device_batch(config, sizes.batch_size)
            entry["dispatch_per_step"] = step_dispatches(lambda: regime.step(batch))
            result.setdefault("eval", {})[name] = _eval_rates(regime, config, sizes)
            if name == "fast":
                result["flops_per_sample"] = _step_flops(regime, config, sizes.batch_size) / sizes.batch_size
        regime = None
        largest = _largest_batch(config, regime_name, sizes, device, compiled)
        entry["largest_batch"], entry["largest_batch_samples_per_s"] = largest["batch_size"], largest["samples_per_s"]
        result["train"][name] = entry


def _on_bench_data(result: dict, config: PHPConfig, sizes: BenchSizes, device: torch.device,
                   log: Callable[[str], None]) -> None:
    """The measurements that need a dataset (input pipelines, training end to end), on a temporary one."""
    with tempfile.TemporaryDirectory(prefix="php-run-bench-") as folder:
        dataset = _bench_dataset(Path(folder) / "data", sizes.pipeline_images)
        log("building the image cache of the bench dataset")
        started = time.perf_counter()
        cache = open_cache(dataset, config.clip.image_size, root=Path(folder) / "cache", workers=max(sizes.workers, 1),
                           progress=False)
        build_seconds = time.perf_counter() - started
        pipeline_size = tuple(sizes.pipeline_size or config.clip.image_size)
        pipeline_cache = cache if pipeline_size == tuple(config.clip.image_size) else open_cache(
            dataset, pipeline_size, root=Path(folder) / "cache", workers=max(sizes.workers, 1), progress=False)
        log(f"input pipelines at {pipeline_size[0]}x{pipeline_size[1]}")
        result["pipeline"] = _pipelines(dataset, cache, pipeline_cache, build_seconds, sizes, device)
        _training(result, config, dataset, cache, sizes, device, log)


def _packed(result: dict, config: PHPConfig, sizes: BenchSizes, device: torch.device,
            log: Callable[[str], None]) -> dict:
    """The packed measurement, its regime's single-process rate beside it, and a packed run's device hours."""
    log(f"packed: {sizes.packed_runs} processes of the {sizes.packed_regime} regime at batch {sizes.batch_size}")
    packed = packed_training(config, sizes, device)
    rates = result["eval"][sizes.packed_regime]
    packed["single_process_samples_per_s"] = result["train"][sizes.packed_regime]["samples_per_s"]
    packed["gpu_hours_per_run_60_epochs_cuhk"] = packed_gpu_hours_per_run(
        packed["aggregate_samples_per_s"], rates["images_per_s"], rates["texts_per_s"])
    return packed


def run_benchmark(config: PHPConfig, sizes: BenchSizes = BenchSizes(), device: str = "auto", seed: int = 0,
                  log: Callable[[str], None] = lambda _: None) -> dict:
    """Every measurement of the module docstring, as one JSON-able dict (nested as ``php-run bench --json``)."""
    if sizes.batch_size < 2 or sizes.steps < 1 or sizes.warmup < 0 or sizes.workers < 0 or sizes.packed_runs < 0:
        raise ValueError("benchmark needs batch_size >= 2, steps >= 1, warmup >= 0, workers >= 0 and packed_runs >= 0")
    torch_device = resolve_device(device)
    seed_everything(seed)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    result: dict = {"device": str(torch_device), "sizes": sizes.__dict__.copy(), "train": {}}
    _on_bench_data(result, config, sizes, torch_device, log)

    result["parameters"] = sum(p.numel() for p in PHPModel(config).parameters())
    result["eval"].update({key: result["eval"]["fast"][key] for key in ("images_per_s", "texts_per_s")})
    log("scoring")
    result["scoring"] = _scoring(sizes, config.clip.embed_dim, torch_device)
    peak = matmul_peak_flops(torch_device)
    result["matmul_peak_flops"] = peak
    fast = result["train"]["fast"]
    best_rate = max(rate for rate in (fast["samples_per_s"], fast["largest_batch_samples_per_s"],
                                      (result["train"].get("fast_compiled") or {}).get("largest_batch_samples_per_s"))
                    if rate is not None)
    result["mfu"] = None if peak is None else best_rate * result["flops_per_sample"] / peak
    result["peak_memory_bytes"], result["peak_memory_kind"] = _peak_memory(torch_device)
    if sizes.packed_runs:
        result["packed"] = _packed(result, config, sizes, torch_device, log)
    result["ratios"] = _ratios(result)
    result["projection"] = projection(result)
    return result


def _ratios(result: dict) -> dict:
    train, pipeline = result["train"], result["pipeline"]
    ratios = {
        "fast_vs_official_train": train["fast"]["samples_per_s"] / train["official"]["samples_per_s"],
        "fast_vs_official_end_to_end": train["fast"]["end_to_end_samples_per_s"] / train["official"]["end_to_end_samples_per_s"],
        "cache_vs_pil_pipeline": pipeline["cache_images_per_s"] / pipeline["pil_images_per_s"],
    }
    if "packed" in result:
        packed = result["packed"]
        ratios["packed_vs_single_process_train"] = (packed["aggregate_samples_per_s"]
                                                    / packed["single_process_samples_per_s"])
    if "fast_compiled" in train:
        ratios["compiled_vs_eager_fast_train"] = train["fast_compiled"]["samples_per_s"] / train["fast"]["samples_per_s"]
    return ratios
