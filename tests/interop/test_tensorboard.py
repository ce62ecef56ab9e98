"""TensorBoard events read back with tensorboard's own event reader."""

from __future__ import annotations

import pytest
from interop_records import Epoch, Step

from php_runner.interop.tensorboard import TensorBoardWriter

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

ITERATIONS = 6
LOG_PERIOD = 2


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_steps_epochs_and_evaluations_are_read_back(tmp_path):
    expected_loss = {}
    with TensorBoardWriter(tmp_path / "run") as writer:
        for epoch in (1, 2):
            for iteration in range(LOG_PERIOD, ITERATIONS + 1, LOG_PERIOD):
                total = 10.0 * epoch + iteration  # exact in float32
                writer.on_step(Step(epoch, iteration, ITERATIONS, 1e-3 * epoch, {"sdm_loss": total - 1, "total": total}))
                expected_loss[(epoch - 1) * ITERATIONS + iteration] = total  # an independent global step
            metrics = {"test": {"R1": 10.0 * epoch, "R5": 50.0, "R10": 75.0, "mAP": 20.5, "mINP": 5.25}}
            if epoch == 2:
                metrics["val"] = {"R1": 40.0, "R5": 60.0, "R10": 80.0, "mAP": 30.0, "mINP": 10.0}
            writer.on_epoch(Epoch(epoch, 1e-3 * epoch, {"sdm_loss": epoch + 0.5, "total": epoch + 1.5}, metrics, 3.0))
    scalars = read_scalars(tmp_path / "run")
    assert scalars["train/loss"] == sorted(expected_loss.items())
    assert [step for step, _ in scalars["train/sdm_loss"]] == [2, 4, 6, 8, 10, 12]
    assert scalars["train/lr"][0][1] == pytest.approx(1e-3) and scalars["train/lr"][-1] == (12, pytest.approx(2e-3))
    assert scalars["epoch/loss"] == [(1, 2.5), (2, 3.5)]
    assert scalars["epoch/sdm_loss"] == [(1, 1.5), (2, 2.5)]
    assert scalars["epoch/lr"] == [(1, pytest.approx(1e-3)), (2, pytest.approx(2e-3))]
    assert scalars["test/R1"] == [(1, 10.0), (2, 20.0)]
    assert scalars["test/mINP"] == [(1, 5.25), (2, 5.25)]
    assert scalars["val/R1"] == [(2, 40.0)]
    assert {tag for tag in scalars if tag.startswith("test/")} == {f"test/{m}" for m in ("R1", "R5", "R10", "mAP", "mINP")}


def test_an_epoch_without_evaluation_writes_no_metrics(tmp_path):
    with TensorBoardWriter(tmp_path) as writer:
        writer.on_epoch(Epoch(1, 1e-3, {"total": 1.0}, {}, 1.0))
    assert sorted(read_scalars(tmp_path)) == ["epoch/loss", "epoch/lr", "epoch/seconds"]


def test_events_are_readable_while_the_writer_is_open(tmp_path):
    """A run followed live shows each finished epoch (the writer flushes after it)."""
    writer = TensorBoardWriter(tmp_path)
    try:
        writer.on_epoch(Epoch(1, 1e-3, {"total": 1.0}, {"test": {"R1": 5.0}}, 1.0))
        assert read_scalars(tmp_path)["test/R1"] == [(1, 5.0)]
    finally:
        writer.close()
