"""TensorBoard event files of a run, written where the official code writes them: its output folder
(the official run folder, ``logs/<dataset>/<name>/``), so ``tensorboard --logdir logs`` shows every run
under its readable name.

Tags (``TAGS`` documents them): per logged iteration ``train/<meter>`` and ``train/lr`` at global step
``(epoch - 1) * iterations_per_epoch + iteration``; per epoch ``epoch/<meter>``, ``epoch/lr`` and
``epoch/seconds`` at step ``epoch``; per evaluation ``<split>/R1``, ``R5``, ``R10``, ``mAP``, ``mINP``
at step ``epoch``. Meters use the official names (``loss`` for the total, then ``sdm_loss``, ...).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from php_runner.engine.metrics import METRIC_NAMES
from php_runner.interop.records import EpochLike, StepLike, global_step, meter_name

TAGS = {
    "train/<meter>": "a loss meter at a logged iteration (global step)",
    "train/lr": "the base learning rate at a logged iteration (global step)",
    "epoch/<meter>": "the epoch's mean of a loss meter (step = epoch)",
    "epoch/lr": "the epoch's base learning rate (step = epoch)",
    "epoch/seconds": "the epoch's wall time (step = epoch)",
    "<split>/<metric>": "R1, R5, R10, mAP, mINP of an evaluated split (step = epoch)",
}


class TensorBoardWriter:
    """A SummaryWriter fed by step and epoch records; a context manager that flushes and closes it."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def on_step(self, step: StepLike) -> None:
        at = global_step(step)
        for name, value in step.losses.items():
            self._writer.add_scalar(f"train/{meter_name(name)}", float(value), at)
        self._writer.add_scalar("train/lr", float(step.lr), at)

    def on_epoch(self, record: EpochLike) -> None:
        for name, value in record.losses.items():
            self._writer.add_scalar(f"epoch/{meter_name(name)}", float(value), record.epoch)
        self._writer.add_scalar("epoch/lr", float(record.lr), record.epoch)
        self._writer.add_scalar("epoch/seconds", float(record.seconds), record.epoch)
        for split, metrics in record.metrics.items():
            for metric in METRIC_NAMES:
                if metric in metrics:
                    self._writer.add_scalar(f"{split}/{metric}", float(metrics[metric]), record.epoch)
        self._writer.flush()  # a run followed live shows each epoch as soon as it ends

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
