"""What every bench measurement shares: its sizes, random inputs of the model's shapes, device-synchronised
timing, and a training regime built the way the training loop builds it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from php_runner.engine.train import (
    TrainingStep,
    TrainSettings,
    build_training_optimizer,
    prepare_training_model,
)
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel

EOT_ID = 49407  # the text encoder reads the global feature at the highest id's position
ICFG_TEST_SIZE = 19_848
REGIMES = {"official": "official", "fast": "amp"}  # regime name -> train.precision


@dataclass(frozen=True)
class BenchSizes:
    """How much work each measurement does; the defaults are the issue's, tests pass small ones."""

    batch_size: int = 64
    steps: int = 10
    warmup: int = 2
    max_batch: int = 1024  # cap of the largest-batch search (doubling from batch_size)
    workers: int = 8  # PIL loader workers, and intra-op threads of the cache pipeline
    pipeline_images: int = 2048  # augmented images timed through each input pipeline
    scoring_queries: int = ICFG_TEST_SIZE
    scoring_gallery: int = ICFG_TEST_SIZE
    compile: bool = True  # also time the fast regime compiled
    pipeline_size: tuple[int, int] | None = None  # image size of the pipeline measurement (None: the model's)
    packed_runs: int = 0  # processes training at once in the packed measurement (0: no packed measurement)
    packed_regime: str = "fast"  # the regime the packed processes train in


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, count: int, warmup: int, work: Callable[[int], None]) -> float:
    """Seconds of ``count`` calls of ``work(index)`` after ``warmup`` untimed ones."""
    for index in range(warmup):
        work(index)
    synchronize(device)
    started = time.perf_counter()
    for index in range(count):
        work(warmup + index)
    synchronize(device)
    return time.perf_counter() - started


class BenchRegime:
    """A model, optimiser and settings of one regime, built the way the training loop builds them."""

    def __init__(self, config: PHPConfig, regime: str, batch_size: int, device: torch.device, compile: bool = False,
                 cuda_graphs: bool = False):
        self.settings = TrainSettings(precision=REGIMES[regime], batch_size=batch_size, device=str(device),
                                      compile=compile, cuda_graphs=cuda_graphs)
        self.device = device
        self.model = prepare_training_model(PHPModel(config), self.settings, device)
        self.optimizer = build_training_optimizer(self.model, self.settings)
        # A compiled region lives across steps: built once here, not per step.
        self.training_step = TrainingStep(self.model, self.optimizer, self.settings, device)

    def step(self, batch: dict) -> None:
        self.model.train()
        self.training_step(batch)

    def device_batch(self, config: PHPConfig, batch_size: int) -> dict:
        """The random batch the model-only measurements train on, already on the device."""
        return {key: value.to(self.device) for key, value in
                random_batch(config, batch_size, torch.Generator().manual_seed(batch_size)).items()}

    def samples_per_s(self, config: PHPConfig, batch_size: int, sizes: BenchSizes) -> float:
        batch = self.device_batch(config, batch_size)
        return sizes.steps * batch_size / timed(self.device, sizes.steps, sizes.warmup, lambda _: self.step(batch))
