"""Executing planned runs: one worker process per run, claimed atomically in the registry, resumable.

The parent (``execute_planned``) records each planned run in the registry, skips the done ones and
starts a worker process for each of the others, one at a time or one per GPU. The worker
(``python -m php_runner.execute.child RUN_ID --db URL``, entry point ``execute_run``) claims the run, builds
the library objects from the run's resolved config, trains with a callback that writes every epoch to
the registry, and records the selected results, checkpoints and provenance. A crash, a CUDA error or a
SIGKILL ends one worker only; its run stays resumable from its last checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from php_runner.data.datasets import DatasetError
from php_runner.errors import InputError
from php_runner.files import file_sha256, remove_stale_temporaries
from php_runner.execute.checkpoints import restart_hint, run_dir_of
from php_runner.execute.preflight import ensure_data
from php_runner.execute.provenance import provenance_info
from php_runner.experiment.build import (
    build_model,
    build_train_settings,
    load_training_data,
)
from php_runner.interop.official_config import CONFIGS_YAML, DEFAULT_LOG_PERIOD
from php_runner.interop.run_folder import OfficialRunFolder
from php_runner.interop.tensorboard import TensorBoardWriter
from php_runner.model.checkpoint import read_official_yaml
from php_runner.store.heartbeat import HEARTBEAT_INTERVAL_S, Heartbeat
from php_runner.store.registry import Registry
from php_runner.store.records import RunRecord
from php_runner.store.claims import this_worker
from php_runner.store.tables import EVALUATION_SOURCE

# Worker exit codes beyond 0 (done) and 1 (failed).
EXIT_NOT_CLAIMED = 3  # done already, or another live process owns the run
# The run's dataset was refused while training read it (an unreadable image, found by the cache build or
# the loader; preflight reads only the annotation file): bad input, as php-run's exit code 2.
EXIT_BAD_DATA = 2
EXIT_INTERRUPTED = 130
# Test-only: seconds to wait after each epoch is recorded, so that interruption tests (scancel, preemption,
# SIGKILL) can land between epochs however fast the machine trains.
EPOCH_PAUSE_ENV = "PHP_RUN_TEST_EPOCH_PAUSE_S"
# The official run folders live in logs/ beside checkpoints/; the provenance key naming a run's folder.
LOGS_FOLDER = "logs"
RUN_FOLDER_KEY = "run_folder"


class LostClaim(Exception):
    """Another process took over this run (our heartbeat went stale); stop without recording."""


# --------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------


def _record_training(registry: Registry, run_id: int, settings, result) -> None:
    from php_runner.engine.train import RULE_OF_SELECTION

    for rule, (epoch, split, metrics) in result.selected.items():
        registry.record_result(run_id, rule, epoch, split, metrics)
    chosen = result.selected.get(RULE_OF_SELECTION[settings.selection])
    roles = (
        ("best", result.best_checkpoint, chosen[0] if chosen else None),
        ("last", result.last_checkpoint, result.history[-1].epoch if result.history else None),
    )
    for role, path, epoch in roles:
        if Path(path).is_file():
            registry.record_checkpoint(run_id, str(Path(path).resolve()), file_sha256(path), epoch, role)


def execute_run(run_id: int, db_url: str | None = None, command: str | None = None,
                on_epoch: Callable[[Any], None] | None = None, claimed_by: str | None = None,
                heartbeat_interval: float = HEARTBEAT_INTERVAL_S) -> int:
    """Claim run ``run_id`` and train it; returns the worker exit code (0 done, 1 failed, 2 its dataset
    refused, 3 not claimed).

    ``on_epoch`` is called with each ``EpochRecord`` after it is recorded; it may raise
    ``engine.train.StopTraining`` to end the run early (tuning trials run this in-process to prune).
    ``claimed_by`` trains a run that this worker id claimed already (a queue worker, ``launch.worker``),
    heartbeating and recording failures under that id.
    """
    registry = Registry(db_url)
    try:
        return _claim_and_train(registry, run_id, command, on_epoch, claimed_by, heartbeat_interval)
    finally:
        registry.close()


def _claim_and_train(registry: Registry, run_id: int, command: str | None,
                     on_epoch: Callable[[Any], None] | None, claimed_by: str | None = None,
                     heartbeat_interval: float = HEARTBEAT_INTERVAL_S) -> int:
    worker = claimed_by or this_worker()
    if claimed_by is None and not registry.claim_run(run_id, worker):
        run = registry.get_run(run_id)
        print(f"run {run_id} ({run.short_hash}) is {run.status} (worker {run.worker}); not executing it", file=sys.stderr)
        return EXIT_NOT_CLAIMED
    run = registry.get_run(run_id)
    if run.status != "running" or run.worker != worker:
        print(f"run {run_id} ({run.short_hash}) is {run.status} (worker {run.worker}), not held by {worker}; "
              "not executing it", file=sys.stderr)
        return EXIT_NOT_CLAIMED
    heartbeat = Heartbeat(registry, run_id, worker, heartbeat_interval)
    try:
        with heartbeat:
            _train_claimed(registry, run, heartbeat, command, on_epoch)
    except LostClaim:
        print(f"run {run_id}: another process took over this run; stopping", file=sys.stderr)
        return EXIT_NOT_CLAIMED
    except KeyboardInterrupt:
        registry.mark_interrupted(run_id, worker)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - every failure is recorded on the run, then reported
        if not isinstance(err, InputError):
            traceback.print_exc()
        message = one_line(err)
        from php_runner.engine.train import LAST_CHECKPOINT

        if str(run_dir_of(run) / LAST_CHECKPOINT) in message:  # its resume state is unusable
            message += f"; {restart_hint(run)}"
        registry.mark_failed(run_id, f"{type(err).__name__}: {message}", worker=worker)
        if claimed_by is None or not isinstance(err, InputError):  # a claiming parent prints the reason once
            print(f"run {run_id} failed: {type(err).__name__}: {message}", file=sys.stderr)
        return EXIT_BAD_DATA if isinstance(err, DatasetError) else 1
    registry.mark_done(run_id)
    return 0


def one_line(err: BaseException) -> str:
    """The last line of ``err``'s message; an error re-raised from a DataLoader worker carries the worker's
    traceback, whose end is the qualified class name and the original message."""
    lines = str(err).strip().splitlines()
    return lines[-1].rpartition(f"{type(err).__module__}.{type(err).__name__}: ")[2] if lines else ""


def _train_claimed(registry: Registry, run: RunRecord, heartbeat: Heartbeat, command: str | None,
                   then: Callable[[Any], None] | None) -> None:
    from php_runner.data.datasets import dataset_statistics
    from php_runner.engine.train import resolve_device, seed_everything, train

    config = run.config
    settings = build_train_settings(config)
    device = resolve_device(settings.device)
    overrides = run.config.get("runtime", {}).get("overrides") or {}  # the command line's key=value values
    run_dir = run_dir_of(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)  # last.pth/best.pth temporaries of a writer killed mid-save
    registry.set_run_dir(run.id, str(run_dir))
    folder, fresh = open_run_folder(run, run_dir, registry.provenance(run.id))
    registry.record_provenance(run.id, {**provenance_info(str(device), command), RUN_FOLDER_KEY: str(folder.path),
                                        **({"overrides": overrides} if overrides else {})})
    with folder, TensorBoardWriter(folder.path) as board:
        ensure_data(config)
        dataset = load_training_data(config)
        seed_everything(settings.seed)  # the initial weights are a function of the run's seed, as officially
        model = build_model(config, dataset.num_classes)
        if fresh:
            folder.start(total_params=sum(p.numel() for p in model.parameters()),
                         num_gpus=int(device.type == "cuda"), statistics=dataset_statistics(dataset))
        iterations = math.ceil(len(dataset.train) / settings.batch_size)  # the loader keeps the last batch
        epoch_pause = float(os.environ.get(EPOCH_PAUSE_ENV) or 0)

        def on_step(step) -> None:
            folder.on_step(step)
            board.on_step(step)

        def on_epoch(record) -> None:
            if heartbeat.lost.is_set():
                raise LostClaim()
            train_values = {**{k: float(v) for k, v in record.losses.items()}, "lr": float(record.lr),
                            "seconds": float(record.seconds)}
            registry.record_epoch(run.id, record.epoch, "train", train_values)
            for split, metrics in record.metrics.items():
                registry.record_epoch(run.id, record.epoch, split, {k: float(v) for k, v in metrics.items()})
            for split, outcomes in record.outcomes.items():
                registry.record_outcomes(run.id, EVALUATION_SOURCE, record.epoch, split, outcomes)
            folder.on_epoch(record, iterations)
            board.on_epoch(record)
            heartbeat.beat()
            if then is not None:
                then(record)
            time.sleep(epoch_pause)

        result = train(model, dataset, settings, run_dir, on_epoch=on_epoch, on_step=on_step,
                       log_period=log_period_of(config))
        if heartbeat.lost.is_set():
            raise LostClaim()
        best = result.selected.get("best-on-test")
        if Path(result.best_checkpoint).is_file():
            folder.finish(result.best_checkpoint, *((best[2]["R1"], best[0]) if best else ()))
    _record_training(registry, run.id, settings, result)


def open_run_folder(run: RunRecord, run_dir: Path, provenance: dict | None) -> tuple[OfficialRunFolder, bool]:
    """The run's official folder ``logs/<dataset>/<name>/`` beside ``checkpoints/``, and whether it is new.

    A run resuming from its ``last.pth`` reopens the folder its provenance names (its log continues);
    a run starting from scratch (first try, ``--restart``, or killed before its first epoch was saved)
    gets a new folder, so no log mixes two trainings.
    """
    from php_runner.engine.train import LAST_CHECKPOINT

    recorded = Path((provenance or {}).get(RUN_FOLDER_KEY) or run_dir / "missing")
    yaml_path = recorded / CONFIGS_YAML
    if (run_dir / LAST_CHECKPOINT).is_file() and yaml_path.is_file():
        return OfficialRunFolder(recorded, read_official_yaml(yaml_path)), False
    identity = {"run_id": run.id, "config_hash": run.config_hash, "preset": run.preset, "table": run.table}
    folder = OfficialRunFolder.create(run_dir.parent.parent / LOGS_FOLDER, run.config, spec=run.spec_name,
                                      row=run.row_label, seed=run.seed, identity=identity,
                                      log_period=log_period_of(run.config))
    return folder, True


def log_period_of(config: dict) -> int:
    """The run's iterations between per-iteration records (runs recorded before the field: the official 100)."""
    return int(config.get("runtime", {}).get("log_period", DEFAULT_LOG_PERIOD))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m php_runner.execute.child", description="Execute one registry run (the php-run worker process)."
    )
    parser.add_argument("run_id", type=int)
    parser.add_argument("--db", default=None, help="registry URL (default: $PHP_RUN_DB or sqlite:///registry.db)")
    parser.add_argument("--command", default=None, help="the php-run command line, for provenance")
    parser.add_argument("--claimed-by", default=None,
                        help="the worker id (host:pid of the parent) that claimed the run for this process")
    parser.add_argument("--heartbeat", type=float, default=HEARTBEAT_INTERVAL_S, help="seconds between heartbeats")
    args = parser.parse_args(argv)
    if args.claimed_by:
        die_with_parent(args.claimed_by)
    try:
        return execute_run(args.run_id, args.db, args.command, claimed_by=args.claimed_by,
                           heartbeat_interval=args.heartbeat)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def die_with_parent(owner: str) -> None:
    """End this process when the worker that claimed its run dies (Linux), so that a killed worker's
    runs go stale instead of training on unowned; exits at once when that worker is gone already."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and os.getppid() != int(pid):
        sys.exit(EXIT_NOT_CLAIMED)



if __name__ == "__main__":
    sys.exit(main())
