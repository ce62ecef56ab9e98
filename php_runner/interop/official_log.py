"""The official run folder's ``train_log.txt``, line for line as the official trainer writes it.

Every record is ``%(asctime)s %(name)s %(levelname)s: %(message)s`` (php_spec.md section 8). The
header is what the official training script logs before its first iteration: ``Using <n> GPUs``,
the argument namespace with each comma turned into a line break, the dataset statistics table,
``Total params: <n>M`` and ``start training``. Then every ``log_period`` iterations
``Epoch[<e>] Iteration[<i>/<n>], loss: ..., <term>: ..., Base Lr: <lr>`` (the running means of the
epoch so far, from the engine's step records), after each epoch ``Epoch <e> done. Time per batch:
...``, the evaluation table of each evaluated split, and at the end ``best R1: <v> at epoch <e>``.

The file is appended to record by record, as a logger does (a resumed run continues its log).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from prettytable import PrettyTable

from php_runner.interop.records import EpochLike, StepLike, official_meters

TRAIN_LOG = "train_log.txt"
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
METRIC_COLUMNS = ("R1", "R5", "R10", "mAP", "mINP")
# The official dataset class names, which its statistics line names.
DATASET_CLASSES = {"CUHK-PEDES": "CUHKPEDES", "ICFG-PEDES": "ICFGPEDES", "RSTPReid": "RSTPReid"}
# The official namespace held tuples here; the dump shows them as the official log does.
TUPLE_OPTIONS = ("img_size", "milestones")


def statistics_table(rows: list[Mapping]) -> str:
    """The official ``subset | ids | images | captions`` table (default PrettyTable style)."""
    table = PrettyTable(["subset", "ids", "images", "captions"])
    for row in rows:
        table.add_row([row["subset"], row["ids"], row["images"], row["captions"]])
    return table.get_string()


def metrics_table(metrics: Mapping[str, float], i2t: Mapping[str, float] | None = None) -> str:
    """The official evaluation table: row ``t2i`` (and ``i2t`` when given), every number ``.3f``."""
    table = PrettyTable(["task", *METRIC_COLUMNS])
    table.add_row(["t2i", *(float(metrics[name]) for name in METRIC_COLUMNS)])
    if i2t is not None:
        table.add_row(["i2t", *(float(i2t[name]) for name in METRIC_COLUMNS)])
    for name in METRIC_COLUMNS:
        table.custom_format[name] = lambda _field, value: f"{value:.3f}"
    return table.get_string()


def step_line(step: StepLike) -> str:
    """``Epoch[<e>] Iteration[<i>/<n>], loss: <v>, sdm_loss: <v>, ..., Base Lr: <lr>``."""
    meters = "".join(f", {name}: {value:.4f}" for name, value in official_meters(step.losses))
    return f"Epoch[{step.epoch}] Iteration[{step.iteration}/{step.iterations_per_epoch}]{meters}, Base Lr: {step.lr:.2e}"


def epoch_mean_line(epoch: int, losses: Mapping[str, float], lr: float) -> str:
    """``Epoch[<e>] mean, loss: <total>, sdm_loss: ..., Base Lr: <lr>``: the epoch's means, for a trainer
    that gives no per-iteration records."""
    meters = "".join(f", {name}: {value:.4f}" for name, value in official_meters(losses))
    return f"Epoch[{epoch}] mean{meters}, Base Lr: {lr:.2e}"


def epoch_done_line(epoch: int, seconds: float, iterations: int, batch_size: int) -> str:
    """``Epoch <e> done. Time per batch: <t>[s] Speed: <s>[samples/s]``."""
    per_batch = seconds / iterations
    return f"Epoch {epoch} done. Time per batch: {per_batch:.3f}[s] Speed: {batch_size / per_batch:.1f}[samples/s]"


def args_dump(args: Mapping[str, Any]) -> str:
    """The argument namespace as the official script logs it: its repr with every comma a line break."""
    values = {key: tuple(value) if key in TUPLE_OPTIONS and isinstance(value, list) else value
              for key, value in sorted(args.items()) if not isinstance(value, Mapping)}
    return str(argparse.Namespace(**values)).replace(",", "\n")


def total_params_line(count: int) -> str:
    """``Total params: <millions>M``, printed as the official ``%2.f`` does."""
    return f"Total params: {count / 1e6:2.0f}M"


class OfficialTrainLog:
    """``train_log.txt`` in a run folder; a context manager that closes the file on exit."""

    def __init__(self, folder: str | Path, batch_size: int) -> None:
        self.path = Path(folder) / TRAIN_LOG
        self.batch_size = batch_size
        self._iterations: dict[int, int] = {}  # epoch -> iterations per epoch, from its step records
        self._handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter(LOG_FORMAT))
        # Loggers of our own (not registered globally), so that nothing else's handlers see these lines.
        self._loggers = {}
        for name in ("IRRA", "IRRA.dataset", "IRRA.train", "IRRA.eval"):
            logger = logging.Logger(name, logging.INFO)
            logger.addHandler(self._handler)
            self._loggers[name] = logger

    def header(self, args: Mapping[str, Any], total_params: int, num_gpus: int,
               statistics: Sequence[Mapping] | None = None) -> None:
        """The lines before training: GPUs, the arguments, the dataset table (when given), the size."""
        main = self._loggers["IRRA"]
        main.info(f"Using {num_gpus} GPUs")
        main.info(args_dump(args))
        if statistics is not None:
            name = DATASET_CLASSES.get(args["dataset_name"], args["dataset_name"])
            self._loggers["IRRA.dataset"].info(f"{name} Dataset statistics:\n{statistics_table(list(statistics))}")
        main.info(total_params_line(total_params))
        self._loggers["IRRA.train"].info("start training")

    def step(self, step: StepLike) -> None:
        self._iterations[step.epoch] = step.iterations_per_epoch
        self._loggers["IRRA.train"].info(step_line(step))

    def epoch(self, record: EpochLike, iterations: int | None = None) -> None:
        """The epoch's loss means when no step record of it came (no official line has them), its timing
        line (when its iteration count is known), then one evaluation per split (test first, as
        officially; other splits are named)."""
        train = self._loggers["IRRA.train"]
        if record.epoch not in self._iterations:
            train.info(epoch_mean_line(record.epoch, record.losses, record.lr))
        iterations = iterations or self._iterations.get(record.epoch)
        if iterations:
            train.info(epoch_done_line(record.epoch, record.seconds, iterations, self.batch_size))
        for split in sorted(record.metrics, key=lambda name: name != "test"):
            where = "" if split == "test" else f" ({split} split)"
            train.info(f"Validation Results - Epoch: {record.epoch}{where}")
            self._loggers["IRRA.eval"].info("\n" + metrics_table(record.metrics[split]))

    def best(self, r1: float, epoch: int) -> None:
        self._loggers["IRRA.train"].info(f"best R1: {r1} at epoch {epoch}")

    def close(self) -> None:
        for logger in self._loggers.values():
            logger.removeHandler(self._handler)
        self._handler.close()

    def __enter__(self) -> "OfficialTrainLog":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
