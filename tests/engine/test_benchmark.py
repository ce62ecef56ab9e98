"""The benchmark: random inputs of the model's shapes, the engine's own training step, honest fields."""

from __future__ import annotations

import pytest
import torch

from php_runner.engine import bench_regime
from php_runner.engine import benchmark as benchmark_module
from php_runner.engine.benchmark import (
    EOT_ID,
    BenchSizes,
    _largest_batch,
    _scoring,
    projection,
    random_batch,
    run_benchmark,
)
from php_runner.model.config import PHPConfig
from php_runner.reports.bench import render_benchmarks

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

    monkeypatch.setattr(benchmark_module.BenchRegime, "samples_per_s", fake_rate)
    sizes = BenchSizes(batch_size=2, max_batch=64)
    found = _largest_batch(PHPConfig.tiny(), "fast", sizes, torch.device("cpu"), False)
    assert tried == [2, 4, 8, 16] and found == {"batch_size": 8, "samples_per_s": 8.0}
    capped = _largest_batch(PHPConfig.tiny(), "fast", BenchSizes(batch_size=2, max_batch=4), torch.device("cpu"), False)
    assert capped["batch_size"] == 4


def test_scoring_uses_the_requested_sizes():
    result = _scoring(SMALL, 8, torch.device("cpu"))
    assert (result["queries"], result["gallery"]) == (30, 20) and result["seconds"] > 0


def test_projection_is_sixty_cuhk_epochs_of_training_and_evaluation_per_regime():
    result = {
        "train": {"official": {"samples_per_s": 300.0, "batch_size": 64},
                  "fast": {"samples_per_s": 600.0, "batch_size": 64},
                  "fast_compiled": {"samples_per_s": 800.0, "batch_size": 64}},
        "eval": {"official": {"images_per_s": 1000.0, "texts_per_s": 4000.0},
                 "fast": {"images_per_s": 2000.0, "texts_per_s": 9000.0}},
    }
    projected = projection(result)
    # 68,126 pairs per epoch; 3,074 images and 6,156 captions per evaluation; 60 epochs.
    official_epoch = 68126 / 300 + 3074 / 1000 + 6156 / 4000
    fast_eval = 3074 / 2000 + 6156 / 9000
    assert projected["official"]["hours_60_epochs_cuhk"] == pytest.approx(60 * official_epoch / 3600)
    assert projected["fast"]["hours_60_epochs_cuhk"] == pytest.approx(60 * (68126 / 600 + fast_eval) / 3600)
    assert projected["fast_compiled"]["hours_60_epochs_cuhk"] == pytest.approx(60 * (68126 / 800 + fast_eval) / 3600)
    assert projected["official"]["hours_60_epochs_cuhk"] == pytest.approx(3.8617, abs=1e-4)
    assert {entry["batch_size"] for entry in projected.values()} == {64}
    markdown = render_benchmarks([{"ratios": {}, "projection": projected}])
    fast_hours = projected["fast"]["hours_60_epochs_cuhk"]
    assert f"| projected hours of a 60-epoch CUHK-PEDES run (official / fast / compiled) | 3.86 / {fast_hours:.2f} / " in markdown


@pytest.mark.slow
def test_run_benchmark_times_both_regimes_through_the_engine(monkeypatch):
    steps, settings_seen = [], []
    real_step = bench_regime.TrainingStep.__call__

    def counting_step(self, batch):
        steps.append(batch["images"].dtype)
        settings_seen.append((self.settings.precision, self.settings.compile))
        return real_step(self, batch)

    monkeypatch.setattr(bench_regime.TrainingStep, "__call__", counting_step)
    result = run_benchmark(PHPConfig.tiny(), SMALL, "cpu")
    assert {precision for precision, _ in settings_seen} == {"official", "amp"}
    assert result["train"]["official"]["pipeline"] == "pil" and result["train"]["fast"]["pipeline"] == "cache"
    for regime in ("official", "fast"):
        entry = result["train"][regime]
        assert entry["samples_per_s"] > 0 and entry["end_to_end_samples_per_s"] > 0
        assert entry["largest_batch"] == 4
        dispatch = entry["dispatch_per_step"]
        assert dispatch["aten_ops"] > dispatch["kernels"] > dispatch["copies"] >= 0 and dispatch["views"] > 0
    assert result["mfu"] is None and result["matmul_peak_flops"] is None and result["flops_per_sample"] > 0
    assert result["pipeline"]["pil_images_per_s"] > 0 and result["pipeline"]["cache_images_per_s"] > 0
    assert result["peak_memory_bytes"] > 0 and result["scoring"]["queries"] == 30
    assert set(result["projection"]) == {"official", "fast"}
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
