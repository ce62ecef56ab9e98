"""``train_log.txt`` in the official format, written beside each run's checkpoints.

Researchers compare their logs line by line with the official ones (php_spec.md section 8), so the
layout follows the official logger: every record is ``%(asctime)s %(name)s %(levelname)s: %(message)s``
under the official logger names (``IRRA.dataset``, ``IRRA.train``, ``IRRA.eval``); the dataset
statistics table opens the log; after each evaluation come ``Validation Results - Epoch: <e>`` and a
PrettyTable ``task | R1 | R5 | R10 | mAP | mINP`` (row ``t2i``, numbers ``.3f``); the log ends with
``best R1: <value> at epoch <e>``. Cutting the first two fields (the timestamp) off both logs makes
them diffable. Lines the official code prints per iteration have no php-run counterpart; after each
epoch php-run prints the epoch's mean of each loss term in the official meter format instead.
A resumed run appends to its log, as a restarted official run would.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from prettytable import PrettyTable

from php_runner.engine.metrics import METRIC_NAMES

TRAIN_LOG = "train_log.txt"
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
# The official dataset class names, which its statistics line names.
DATASET_CLASSES = {"CUHK-PEDES": "CUHKPEDES", "ICFG-PEDES": "ICFGPEDES", "RSTPReid": "RSTPReid"}


def statistics_table(rows: list[Mapping]) -> str:
    """The official ``subset | ids | images | captions`` table (default PrettyTable style)."""
    table = PrettyTable(["subset", "ids", "images", "captions"])
    for row in rows:
        table.add_row([row["subset"], row["ids"], row["images"], row["captions"]])
    return table.get_string()


def metrics_table(metrics: Mapping[str, float], i2t: Mapping[str, float] | None = None) -> str:
    """The official evaluation table: row ``t2i`` (and ``i2t`` when given), every number ``.3f``."""
    table = PrettyTable(["task", *METRIC_NAMES])
    table.add_row(["t2i", *(float(metrics[name]) for name in METRIC_NAMES)])
    if i2t is not None:
        table.add_row(["i2t", *(float(i2t[name]) for name in METRIC_NAMES)])
    for name in METRIC_NAMES:
        table.custom_format[name] = lambda _field, value: f"{value:.3f}"
    return table.get_string()


def meters_line(epoch: int, losses: Mapping[str, float], lr: float) -> str:
    """``Epoch[<e>] mean, loss: <total>, sdm_loss: ..., Base Lr: <lr>`` (meters with a positive mean)."""
    values = [("loss", losses.get("total"))] + [(name, value) for name, value in losses.items() if name != "total"]
    meters = "".join(f", {name}: {value:.4f}" for name, value in values if value is not None and value > 0)
    return f"Epoch[{epoch}] mean{meters}, Base Lr: {lr:.2e}"


class TrainLog:
    """One run's ``train_log.txt``; a context manager that closes the file on exit."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / TRAIN_LOG
        self._handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter(LOG_FORMAT))
        # Loggers of our own (not registered globally), so that nothing else's handlers see these lines.
        self._loggers = {}
        for part in ("dataset", "train", "eval"):
            logger = logging.Logger(f"IRRA.{part}", logging.INFO)
            logger.addHandler(self._handler)
            self._loggers[part] = logger

    def dataset_statistics(self, dataset_name: str, rows: list[Mapping]) -> None:
        name = DATASET_CLASSES.get(dataset_name, dataset_name)
        self._loggers["dataset"].info(f"{name} Dataset statistics:\n{statistics_table(rows)}")

    def epoch(self, epoch: int, losses: Mapping[str, float], lr: float, metrics: Mapping[str, Mapping]) -> None:
        """The epoch's loss meters, then one evaluation block per evaluated split (test as officially; then val)."""
        self._loggers["train"].info(meters_line(epoch, losses, lr))
        for split in sorted(metrics, key=lambda name: name != "test"):
            where = "" if split == "test" else f" ({split} split)"
            self._loggers["train"].info(f"Validation Results - Epoch: {epoch}{where}")
            values = metrics[split]
            i2t = values.get("i2t") if isinstance(values.get("i2t"), Mapping) else None
            self._loggers["eval"].info("\n" + metrics_table(values, i2t))

    def best(self, r1: float, epoch: int) -> None:
        self._loggers["train"].info(f"best R1: {r1} at epoch {epoch}")

    def close(self) -> None:
        for logger in self._loggers.values():
            logger.removeHandler(self._handler)
        self._handler.close()

    def __enter__(self) -> "TrainLog":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()
