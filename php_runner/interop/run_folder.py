"""The official run folder ``logs/<dataset>/<name>/{best.pth, configs.yaml, train_log.txt}`` of a php-run run.

IRRA-family tools and the official ``test.py`` expect this layout. The hash-addressed store
(``checkpoints/<hash>/``) stays the source of truth: ``best.pth`` here is a relative symbolic link to
the run's checkpoint there (a hard link where the file system has no symbolic links, a copy where
neither works; ``link_checkpoint`` says which). A relative link survives moving the project folder
as a whole; to ship a ``logs/`` tree alone, copy it dereferencing links (``cp -rL``).

The folder name follows the official ``<YYYYmmdd_HHMMSS>_<name>`` with ``<name>`` = ``<spec>-<row>_seed<seed>``,
made file-system safe; a second run started in the same second gets ``_2``, ``_3``, ...
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from php_runner.errors import InputError
from php_runner.files import atomic_path
from php_runner.interop.official_config import DEFAULT_LOG_PERIOD, official_args, write_configs_yaml
from php_runner.interop.official_log import OfficialTrainLog
from php_runner.interop.records import EpochLike, StepLike

BEST_CHECKPOINT = "best.pth"
UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME = 120


def safe_part(text: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._+-]`` replaced by one ``-``."""
    cleaned = UNSAFE.sub("-", str(text)).strip("-.")
    return cleaned or "run"


def run_name(spec: str, row: str, seed: int) -> str:
    """The official ``--name`` of a run: ``<spec>-<row>_seed<seed>``, file-system safe."""
    return f"{safe_part(spec)}-{safe_part(row)}_seed{int(seed)}"[:MAX_NAME]


def readable_name(spec: str, row: str, seed: int, started: datetime) -> str:
    """``<YYYYmmdd_HHMMSS>_<spec>-<row>_seed<seed>``, the official ``output_dir`` naming."""
    return f"{started:%Y%m%d_%H%M%S}_{run_name(spec, row, seed)}"


def create_unique_folder(parent: str | Path, name: str) -> Path:
    """Create ``parent/name``, or ``name_2``, ``name_3``, ... when taken (atomic: ``mkdir`` without exist_ok)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        folder = parent / (name if attempt == 1 else f"{name}_{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise InputError(f"{parent}: 999 run folders named {name}; choose another logs root")


def link_checkpoint(checkpoint: str | Path, destination: str | Path) -> str:
    """Make ``destination`` point at ``checkpoint``; returns ``symlink``, ``hardlink`` or ``copy``.

    The link replaces any previous one atomically. A hard link or a copy is a snapshot: make it once
    the checkpoint is final (the trainer replaces ``best.pth`` whenever the selected R1 improves).
    """
    checkpoint, destination = Path(checkpoint).absolute(), Path(destination)
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: checkpoint file not found")
    target = os.path.relpath(checkpoint, destination.parent.absolute())
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.link")
    for method, make in (("symlink", lambda: os.symlink(target, temporary)),
                         ("hardlink", lambda: os.link(checkpoint, temporary))):
        try:
            temporary.unlink(missing_ok=True)
            make()
            os.replace(temporary, destination)
            return method
        except OSError:
            temporary.unlink(missing_ok=True)
    with atomic_path(destination) as copy:
        shutil.copyfile(checkpoint, copy)
    return "copy"


class OfficialRunFolder:
    """One run's official folder, written while it trains; a context manager closing its log.

    Call ``on_step`` for each step record and ``on_epoch`` for each epoch record, then ``finish``
    with the final checkpoint. ``path`` is the folder (``logs_root/<dataset>/<readable name>``).
    """

    def __init__(self, path: Path, args: Mapping[str, Any]) -> None:
        self.path = path
        self.args = dict(args)
        self.log = OfficialTrainLog(path, batch_size=int(args["batch_size"]))

    @classmethod
    def create(cls, logs_root: str | Path, config: Mapping, *, spec: str, row: str, seed: int,
               identity: Mapping | None = None, started: datetime | None = None,
               log_period: int = DEFAULT_LOG_PERIOD) -> "OfficialRunFolder":
        """Make a new folder for ``config`` (a resolved run config) and write its ``configs.yaml``."""
        dataset = safe_part(config["data"]["dataset"])
        name = readable_name(spec, row, seed, started or datetime.now())
        folder = create_unique_folder(Path(logs_root) / dataset, name)
        args = official_args(config, output_dir=folder, name=run_name(spec, row, seed), log_period=log_period,
                             identity={"spec": spec, "row": row, "seed": int(seed), **(identity or {})})
        write_configs_yaml(folder, args)
        return cls(folder, args)

    def start(self, total_params: int, num_gpus: int, statistics: Sequence[Mapping] | None = None) -> None:
        """The log's header: call once before the first step (not again when a run resumes)."""
        self.log.header(self.args, total_params=total_params, num_gpus=num_gpus, statistics=statistics)

    def on_step(self, step: StepLike) -> None:
        self.log.step(step)

    def on_epoch(self, record: EpochLike, iterations: int | None = None) -> None:
        """``iterations``: the epoch's iteration count for its timing line, where no step record gave it."""
        self.log.epoch(record, iterations)

    def finish(self, checkpoint: str | Path, best_r1: float | None = None, best_epoch: int | None = None) -> str:
        """Log ``best R1`` (when given), point ``best.pth`` at ``checkpoint``; returns the link method."""
        if best_r1 is not None and best_epoch is not None:
            self.log.best(best_r1, best_epoch)
        return link_checkpoint(checkpoint, self.path / BEST_CHECKPOINT)

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> "OfficialRunFolder":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
