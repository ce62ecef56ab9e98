"""The benchmark: random inputs of the model's shapes, the engine's own training step, honest fields."""

from __future__ import annotations

import pytest
import torch

from php_runner.engine import benchmark as benchmark_module
from php_runner.engine.benchmark import EOT_ID, BenchSizes, _largest_batch, _scoring, random_batch, run_benchmark
from php_runner.model.config import PHPConfig

SMALL = BenchSizes(batch_size=2, steps=1, warmup=0, max_batch=4, workers=0, pipeline_images=4,
                   scoring_queries=30, scoring_gallery=20, compile=False)


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


def test_largest_batch_doubles_until_out_of_memory(monkeypatch):
    tried = []

    def fake_rate(self, config, batch_size, sizes):
        tried.append(batch_size)
        if batch_size > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate")
        return float(batch_size)

    monkeypatch.setattr(benchmark_module._Regime, "samples_per_s", fake_rate)
    sizes = BenchSizes(batch_size=2, max_batch=64)
    found = _largest_batch(PHPConfig.tiny(), "fast", sizes, torch.device("cpu"), False)
    assert tried == [2, 4, 8, 16] and found == {"batch_size": 8, "samples_per_s": 8.0}
    capped = _largest_batch(PHPConfig.tiny(), "fast", BenchSizes(batch_size=2, max_batch=4), torch.device("cpu"), False)
    assert capped["batch_size"] == 4


def test_scoring_uses_the_requested_sizes():
    result = _scoring(SMALL, 8, torch.device("cpu"))
    assert (result["queries"], result["gallery"]) == (30, 20) and result["seconds"] > 0


@pytest.mark.slow
def test_run_benchmark_times_both_regimes_through_the_engine(monkeypatch):
    steps, settings_seen = [], []
    real_step = benchmark_module.train_step

    def counting_step(model, batch, optimizer, settings, device):
        steps.append(batch["images"].dtype)
        settings_seen.append((settings.precision, settings.compile))
        return real_step(model, batch, optimizer, settings, device)

    monkeypatch.setattr(benchmark_module, "train_step", counting_step)
    result = run_benchmark(PHPConfig.tiny(), SMALL, "cpu")
    assert {precision for precision, _ in settings_seen} == {"official", "amp"}
    assert result["train"]["official"]["pipeline"] == "pil" and result["train"]["fast"]["pipeline"] == "cache"
    for regime in ("official", "fast"):
        entry = result["train"][regime]
        assert entry["samples_per_s"] > 0 and entry["end_to_end_samples_per_s"] > 0
        assert entry["largest_batch"] == 4
    assert result["mfu"] is None and result["matmul_peak_flops"] is None and result["flops_per_sample"] > 0
    assert result["pipeline"]["pil_images_per_s"] > 0 and result["pipeline"]["cache_images_per_s"] > 0
    assert result["peak_memory_bytes"] > 0 and result["scoring"]["queries"] == 30
    assert result["ratios"]["cache_vs_pil_pipeline"] == (
        result["pipeline"]["cache_images_per_s"] / result["pipeline"]["pil_images_per_s"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_benchmark_on_cuda_reports_peak_memory_and_mfu():
    sizes = BenchSizes(batch_size=8, steps=2, warmup=1, max_batch=16, workers=2, pipeline_images=64,
                       scoring_queries=1000, scoring_gallery=1000, compile=False)
    result = run_benchmark(PHPConfig.tiny(), sizes, "cuda")
    assert result["device"].startswith("cuda") and result["peak_memory_bytes"] > 0
    assert 0 < result["mfu"] < 1 and result["matmul_peak_flops"] > 1e12
