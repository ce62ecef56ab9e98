"""The benchmark: random inputs of the model's shapes, the training step of the engine, honest fields."""

from __future__ import annotations

import pytest
import torch

from php_runner.engine import benchmark as benchmark_module
from php_runner.engine.benchmark import EOT_ID, benchmark, random_batch
from php_runner.model.config import PHPConfig


def test_random_batch_has_the_model_shapes_and_one_eot_per_caption():
    config = PHPConfig.tiny()
    batch = random_batch(config, 6, torch.Generator().manual_seed(0))
    assert batch["images"].shape == (6, 3, *config.clip.image_size)
    ids = batch["caption_ids"]
    assert ids.shape == (6, config.clip.context_length)
    assert (ids == EOT_ID).sum(dim=1).tolist() == [1] * 6
    ends = ids.argmax(dim=1)  # the text encoder's global position
    assert all(ids[row, end + 1:].eq(0).all() for row, end in enumerate(ends.tolist()))
    assert batch["pids"].tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("precision", ["official", "amp"])
def test_benchmark_times_the_engine_training_step(precision, monkeypatch):
    calls = []
    real_step = benchmark_module.train_step

    def counting_step(*args, **kwargs):
        calls.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(benchmark_module, "train_step", counting_step)
    result = benchmark(PHPConfig.tiny(), precision, batch_size=4, steps=2, warmup=1, device="cpu")
    assert len(calls) == 3  # warm-up + timed steps, all through the training loop's own step
    assert result.train_samples_per_s > 0 and result.encode_samples_per_s > 0
    assert result.peak_memory_mib is None and result.device == "cpu"
    assert result.parameters == sum(p.numel() for p in benchmark_module.PHPModel(PHPConfig.tiny()).parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["official", "amp"])
def test_benchmark_reports_cuda_peak_memory(precision):
    result = benchmark(PHPConfig.tiny(), precision, batch_size=8, steps=2, warmup=1, device="cuda")
    assert result.device.startswith("cuda") and result.peak_memory_mib > 0
