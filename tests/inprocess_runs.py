"""Test doubles for running php-run's runs in the test's own process: a finished worker process, and a
training that writes its checkpoints without training."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from php_runner.model.checkpoint import config_to_dict, save_atomic


class FinishedWorker:
    """What ``finish_run`` reads of a worker process that already ran (in-process)."""

    def __init__(self, code: int):
        self.returncode, self.pid = code, os.getpid()

    def poll(self) -> int:
        return self.returncode

    def wait(self) -> int:
        return self.returncode


def stub_train(model, dataset, settings, run_dir, on_epoch=None, on_step=None, log_period=100):
    """Writes best.pth and last.pth as training would, without training."""
    payload = {"model": model.state_dict(), "config": config_to_dict(model.config), "epoch": 1,
               "settings": settings.recipe()}
    for name in ("best.pth", "last.pth"):
        save_atomic(payload, Path(run_dir) / name)
    return SimpleNamespace(selected={}, history=[], best_checkpoint=Path(run_dir) / "best.pth",
                           last_checkpoint=Path(run_dir) / "last.pth")
