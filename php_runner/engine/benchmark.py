"""Throughput and memory of training and encoding on random inputs: the numbers behind speed claims.

Uses the training loop's own optimiser and step (``train_step``) and the model's encoders, on random
images and captions of the configured shapes, so it needs no data and no CLIP weights.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from php_runner.engine.train import TrainSettings, build_training_optimizer, resolve_device, seed_everything, train_step
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel
from php_runner.model.precision import apply_precision, autocast_context

EOT_ID = 49407  # the text encoder reads the global feature at the highest id's position


@dataclass(frozen=True)
class BenchmarkResult:
    device: str
    precision: str
    batch_size: int
    steps: int
    parameters: int
    train_samples_per_s: float  # image-caption pairs per second through forward, backward and the optimiser
    encode_samples_per_s: float  # image-caption pairs per second through encode_image + encode_text (no grad)
    peak_memory_mib: float | None  # CUDA peak allocated; None on CPU

    def as_dict(self) -> dict:
        return asdict(self)


def random_batch(config: PHPConfig, batch_size: int, generator: torch.Generator) -> dict:
    """Random images and captions of the model's shapes; pairs share identities two by two, as in training."""
    height, width = config.clip.image_size
    length = config.clip.context_length
    token_ids = torch.randint(1, EOT_ID - 2, (batch_size, length), generator=generator)
    ends = torch.randint(2, length, (batch_size,), generator=generator)
    positions = torch.arange(length).expand(batch_size, length)
    token_ids = torch.where(positions > ends[:, None], 0, token_ids)
    token_ids[torch.arange(batch_size), ends] = EOT_ID
    token_ids[:, 0] = EOT_ID - 1
    return {
        "images": torch.randn(batch_size, 3, height, width, generator=generator),
        "caption_ids": token_ids,
        "pids": torch.arange(batch_size) // 2,
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(config: PHPConfig, precision: str = "official", batch_size: int = 64, steps: int = 10, warmup: int = 2,
              device: str = "auto", seed: int = 0) -> BenchmarkResult:
    """Time ``steps`` training steps and ``steps`` encoding batches after ``warmup`` untimed ones."""
    if batch_size < 2 or steps < 1 or warmup < 0:
        raise ValueError("benchmark needs batch_size >= 2, steps >= 1 and warmup >= 0")
    torch_device = resolve_device(device)
    seed_everything(seed)
    settings = TrainSettings(precision=precision, batch_size=batch_size, device=str(torch_device))
    model = apply_precision(PHPModel(config), precision).to(torch_device)
    optimizer = build_training_optimizer(model, settings)
    batch = random_batch(config, batch_size, torch.Generator().manual_seed(seed))
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)

    model.train()
    for _ in range(warmup):
        train_step(model, batch, optimizer, settings, torch_device)
    _synchronize(torch_device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, batch, optimizer, settings, torch_device)
    _synchronize(torch_device)
    train_rate = steps * batch_size / (time.perf_counter() - started)

    model.eval()
    images = batch["images"].to(torch_device)
    token_ids = batch["caption_ids"].to(torch_device)
    with torch.no_grad(), autocast_context(precision, torch_device):
        for index in range(warmup + steps):
            if index == warmup:
                _synchronize(torch_device)
                started = time.perf_counter()
            model.encode_image(images)
            model.encode_text(token_ids)
    _synchronize(torch_device)
    encode_rate = steps * batch_size / (time.perf_counter() - started)

    peak = torch.cuda.max_memory_allocated(torch_device) / 2**20 if torch_device.type == "cuda" else None
    return BenchmarkResult(
        device=str(torch_device), precision=precision, batch_size=batch_size, steps=steps,
        parameters=sum(p.numel() for p in model.parameters()),
        train_samples_per_s=train_rate, encode_samples_per_s=encode_rate, peak_memory_mib=peak,
    )
