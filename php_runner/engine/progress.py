"""Training progress display: rich bars on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from php_runner.engine.train import EpochRecord

LOG_PERIOD = 100  # steps between plain progress lines, the official log_period


class Progress:
    """Rich progress bars on a terminal, plain log lines otherwise."""

    def __init__(self, epochs: int, steps_per_epoch: int, first_epoch: int) -> None:
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.rich = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} samples/s"),
                TimeRemainingColumn(),
            )
            self.rich.start()
            self.epoch_task = self.rich.add_task("epochs", total=epochs, completed=first_epoch - 1, loss="-", rate="-")
            self.step_task = self.rich.add_task("steps", total=steps_per_epoch, loss="-", rate="-")

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step_count, self.samples, self.started = epoch, 0, 0, time.perf_counter()
        if self.rich:
            self.rich.reset(self.step_task, total=self.steps_per_epoch, description=f"epoch {epoch}/{self.epochs}")

    def step(self, batch_size: int, loss: Callable[[], float]) -> None:
        """Count a step; ``loss`` is only called when a value is shown (it may synchronise the device)."""
        self.step_count += 1
        self.samples += batch_size
        rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
        if self.rich:
            fields = {}
            if self.step_count % 10 == 0 or self.step_count == self.steps_per_epoch:
                fields = {"loss": f"{loss():.4f}", "rate": f"{rate:.1f}"}
            self.rich.update(self.step_task, advance=1, **fields)
        elif self.step_count % LOG_PERIOD == 0:
            eta = (self.steps_per_epoch - self.step_count) * (time.perf_counter() - self.started) / self.step_count
            print(
                f"epoch {self.epoch}/{self.epochs} step {self.step_count}/{self.steps_per_epoch} "
                f"loss {loss():.4f} {rate:.1f} samples/s epoch ETA {eta:.0f}s",
                flush=True,
            )

    def end_epoch(self, record: EpochRecord) -> None:
        scores = " ".join(f"{split} R1 {values['R1']:.3f}" for split, values in record.metrics.items())
        line = (
            f"epoch {record.epoch}/{self.epochs} lr {record.lr:.3g} loss {record.losses.get('total', float('nan')):.4f} "
            f"{self.samples / max(record.seconds, 1e-9):.1f} samples/s {record.seconds:.1f}s {scores}".rstrip()
        )
        if self.rich:
            rate = f"{self.samples / max(record.seconds, 1e-9):.1f}"
            self.rich.update(self.epoch_task, advance=1, loss=f"{record.losses.get('total', float('nan')):.4f}", rate=rate)
            self.rich.console.print(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.rich:
            self.rich.stop()
