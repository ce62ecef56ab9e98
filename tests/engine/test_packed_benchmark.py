"""Packed runs: N processes training at once, their recorded intervals, and the aggregate computed from them."""

from __future__ import annotations

import os

import pytest
import torch

from php_runner.engine import benchmark as benchmark_module
from php_runner.engine.bench_regime import BenchSizes
from php_runner.engine.packed_benchmark import packed_training, summarize_packed
from php_runner.model.config import PHPConfig

TWO_PACKED = BenchSizes(batch_size=2, steps=4, warmup=1, packed_runs=2, packed_regime="fast")


def test_two_packed_runs_train_at_once_in_their_own_processes():
    packed = packed_training(PHPConfig.tiny(), TWO_PACKED, torch.device("cpu"))
    processes = packed["processes"]
    assert len(processes) == 2 and packed["runs"] == 2 and packed["precision"] == "amp"
    pids = {process["pid"] for process in processes}
    assert len(pids) == 2 and os.getpid() not in pids
    # Overlap read from the recorded intervals: the later start comes before the earlier end.
    later_start = max(process["start"] for process in processes)
    earlier_end = min(process["end"] for process in processes)
    assert later_start < earlier_end
    assert packed["overlap_s"] == pytest.approx(earlier_end - later_start)
    # The aggregate: every process's samples over the span from the first start to the last end.
    samples = [TWO_PACKED.steps * TWO_PACKED.batch_size] * 2
    span = max(process["end"] for process in processes) - min(process["start"] for process in processes)
    assert [process["samples"] for process in processes] == samples
    assert packed["aggregate_samples_per_s"] == pytest.approx(sum(samples) / span)
    for process in processes:
        assert process["samples_per_s"] == pytest.approx(process["samples"] / (process["end"] - process["start"]))
    assert packed["aggregate_samples_per_s"] <= sum(process["samples_per_s"] for process in processes)


def test_the_aggregate_is_total_samples_over_the_whole_span():
    processes = [{"samples": 128, "start": 10.0, "end": 12.0}, {"samples": 64, "start": 10.5, "end": 13.0}]
    assert summarize_packed(processes) == pytest.approx(
        {"samples": 192, "wall_s": 3.0, "aggregate_samples_per_s": 64.0, "overlap_s": 1.5})
    apart = [{"samples": 10, "start": 0.0, "end": 1.0}, {"samples": 10, "start": 3.0, "end": 5.0}]
    assert summarize_packed(apart)["overlap_s"] == pytest.approx(-2.0)  # one after the other: no overlap
    assert summarize_packed(apart)["aggregate_samples_per_s"] == pytest.approx(20 / 5)


def test_a_failing_packed_process_raises_instead_of_leaving_the_others_waiting():
    unavailable = "cuda:99"  # no such device on any machine: every process fails before the barrier
    with pytest.raises(RuntimeError, match="packed training failed"):
        packed_training(PHPConfig.tiny(), TWO_PACKED, torch.device(unavailable), timeout=300)
    with pytest.raises(ValueError, match="regime"):
        packed_training(PHPConfig.tiny(), BenchSizes(packed_runs=2, packed_regime="slow"), torch.device("cpu"))


def test_the_bench_costs_a_packed_run_at_the_aggregate_rate(monkeypatch):
    processes = [{"samples": 40, "start": 0.0, "end": 2.0}, {"samples": 40, "start": 0.5, "end": 2.5}]
    monkeypatch.setattr(benchmark_module, "packed_training",
                        lambda config, sizes, device: summarize_packed(processes))
    result = {"train": {"fast": {"samples_per_s": 25.0}},
              "eval": {"fast": {"images_per_s": 200.0, "texts_per_s": 500.0}}}
    sizes = BenchSizes(batch_size=2, packed_runs=2, packed_regime="fast")
    packed = benchmark_module._packed(result, PHPConfig.tiny(), sizes, torch.device("cpu"), lambda _: None)
    aggregate = 80 / 2.5
    # Device time of one packed run: 68,126 pairs an epoch at the aggregate rate, evaluation at the unpacked rates.
    expected = 60 * (68126 / aggregate + 3074 / 200 + 6156 / 500) / 3600
    assert packed["gpu_hours_per_run_60_epochs_cuhk"] == pytest.approx(expected)
    assert packed["single_process_samples_per_s"] == 25.0
    assert benchmark_module._ratios({**result, "packed": packed, "train": {
        "official": {"samples_per_s": 1.0, "end_to_end_samples_per_s": 1.0},
        "fast": {"samples_per_s": 25.0, "end_to_end_samples_per_s": 1.0}},
        "pipeline": {"cache_images_per_s": 1.0, "pil_images_per_s": 1.0}})["packed_vs_single_process_train"] == (
        pytest.approx(aggregate / 25.0))
