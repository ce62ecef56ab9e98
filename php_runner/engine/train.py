"""The training loop: official recipe (spec 5), per-epoch evaluation, checkpoint selection and resume.

Every epoch ends with ``last.pth`` written atomically; it holds everything needed to continue as if
the run had never stopped (model, optimiser, scheduler, RNG states, history, best-so-far). ``best.pth``
holds the model of the epoch chosen by ``TrainSettings.selection``. All three selection rules are
tracked regardless, so a run reports best-on-test (official), best-on-val and last side by side;
``evaluate_test=False`` (tuning trials) leaves the test split unevaluated until someone asks once.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from php_runner.data import PedesDataset
from php_runner.data.batch_transforms import BatchAugment
from php_runner.data.cache import open_cache
from php_runner.data.loaders import PIPELINES, CachedTrainBatches, TrainPairs
from php_runner.data.transforms import build_transform
from php_runner.engine.evaluate import EvalSettings, evaluate
from php_runner.engine.metrics import QueryOutcomes
from php_runner.engine.optim import OPTIMIZERS, SOLVERS, WarmupCosine
from php_runner.engine.progress import LOG_PERIOD, Progress
from php_runner.engine.resume import (
    capture_rng_state,
    check_resumable,
    check_run_state,
    restore_rng_state,
    restore_training_state,
)
from php_runner.engine.selection import RULE_OF_SELECTION, SELECTIONS, Selection
from php_runner.engine.step import (
    StepRecord,
    TrainingStep,
    build_training_optimizer,
    prepare_training_model,
    train_one_epoch,
    train_step,
)
from php_runner.errors import InputError
from php_runner.model.checkpoint import (
    CONFIG_KEY,
    config_to_dict,
    load_checkpoint_file,
    save_atomic,
)
from php_runner.model.losses import LossConfig
from php_runner.model.precision import GRAPHABLE_PRECISIONS, PRECISIONS

__all__ = ["BEST_CHECKPOINT", "LAST_CHECKPOINT", "RUNTIME_FIELDS", "EpochRecord", "StepRecord", "StopTraining",
           "TrainResult", "TrainSettings", "TrainingStep", "build_training_optimizer", "deterministic_mode",
           "prepare_training_model", "resolve_device", "seed_everything", "train", "train_step"]

LAST_CHECKPOINT = "last.pth"
BEST_CHECKPOINT = "best.pth"
# Settings that may differ between an interrupted run and its resumption: they say where and how fast
# it runs, not what it computes (torch.compile and CUDA graphs change only kernel fusion and rounding order).
RUNTIME_FIELDS = ("device", "num_workers", "compile", "cuda_graphs")


@dataclass
class TrainSettings:
    """The training recipe; field names are also the keys of a spec's ``[train]`` section."""

    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-6
    optimizer: str = "adam"
    adam_eps: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 4e-5
    weight_decay_bias: float = 0.0
    bias_lr_factor: float = 2.0
    lr_factor: float = 5.0
    solver: str = "head"
    transformer_lr_factor: float = 1.0
    moe_lr_factor: float = 2.0
    warmup_epochs: int = 5
    warmup_factor: float = 0.1
    img_aug: bool = True
    precision: str = "official"
    selection: str = "test"
    evaluate_test: bool = True  # False keeps the test split untouched during training (tuning trials)
    eval_period: int = 1
    test_batch_size: int = 64
    seed: int = 1
    deterministic: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    device: str = "auto"
    num_workers: int = 8
    compile: bool = False  # torch.compile the model's training forward
    cuda_graphs: bool = False  # forward + losses as one compiled region, CUDA graphs on CUDA (amp only)
    pipeline: str = "pil"  # "cache": decoded-image cache + batch augmentation on the device (spec data.pipeline)

    def __post_init__(self) -> None:
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("solver", SOLVERS),
            ("precision", PRECISIONS),
            ("selection", SELECTIONS),
            ("pipeline", PIPELINES),
        ):
            if getattr(self, name) not in allowed:
                raise InputError(f"train.{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "eval_period", "test_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"train.{name}: must be at least 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0 or self.num_workers < 0:
            raise InputError("train.warmup_epochs and train.num_workers must not be negative")
        if self.cuda_graphs and self.precision not in GRAPHABLE_PRECISIONS:
            raise InputError(f"runtime.cuda_graphs: needs train.precision = 'amp' (the fast regime), "
                             f"got {self.precision!r}")
        if not self.evaluate_test and self.selection != "val":
            raise InputError(f"train.evaluate_test: false needs train.selection = 'val', got {self.selection!r}")
        self.betas = tuple(self.betas)

    def recipe(self) -> dict:
        """The settings that define the experiment (everything but where it runs), as plain data."""
        values = dataclasses.asdict(self)
        for name in RUNTIME_FIELDS:
            values.pop(name)
        return values


class StopTraining(Exception):
    """Raised by an ``on_epoch`` callback to end training after the current epoch (e.g. Optuna pruning)."""


@dataclass
class EpochRecord:
    """What one epoch produced: base learning rate, mean losses, and metrics per evaluated split."""

    epoch: int
    lr: float
    losses: dict[str, float]
    metrics: dict[str, dict]  # split name -> metrics; empty when the epoch was not evaluated
    seconds: float
    # split name -> per-query outcomes the metrics average (not kept in last.pth: the registry stores them)
    outcomes: dict[str, QueryOutcomes] = field(default_factory=dict)


@dataclass
class TrainResult:
    """Selected epochs per rule, the full history and the checkpoint paths.

    ``selected[rule] = (epoch, split, metrics)``: the epoch the rule picks and the test metrics at that
    epoch, or the val metrics with ``evaluate_test`` off (rules: best-on-test when test is evaluated,
    best-on-val when the dataset has a val split, last).
    """

    selected: dict[str, tuple[int, str, dict]]
    history: list[EpochRecord]
    last_checkpoint: Path
    best_checkpoint: Path
    stopped: bool = False  # True when an on_epoch callback raised StopTraining


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def deterministic_mode(enabled: bool):
    """Deterministic algorithms for the duration of a run; the previous global setting is restored."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[1], previous[2]


def _train_loader(model, dataset: PedesDataset, settings: TrainSettings, device, generator, image_cache=None):
    """The PIL per-sample loader, or with ``image_cache`` batches gathered from it and augmented on ``device``."""
    if image_cache is not None:
        augment = BatchAugment(model.config.clip.image_size, img_aug=settings.img_aug)
        return CachedTrainBatches(dataset.train, image_cache, augment, settings.batch_size, generator, device)
    transform = build_transform(model.config.clip.image_size, train=True, img_aug=settings.img_aug)
    return DataLoader(
        TrainPairs(dataset.train, transform),
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=False,
        generator=generator,  # worker seeds are drawn from it too, so shuffling and augmentation replay
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
    )


@dataclass
class _Run:
    """What a training call carries from phase to phase."""

    model: nn.Module
    settings: TrainSettings
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    loader_generator: torch.Generator
    step: TrainingStep
    last_path: Path
    best_path: Path
    history: list[EpochRecord] = field(default_factory=list)
    selection: Selection = field(default_factory=Selection)
    start_epoch: int = 1
    stopped: bool = False


def train(
    model,
    dataset: PedesDataset,
    settings: TrainSettings,
    run_dir: Path,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    log_period: int = LOG_PERIOD,
) -> TrainResult:
    """Train ``model`` on ``dataset.train``, resuming from ``run_dir/last.pth`` when it exists.

    ``on_epoch`` receives every new epoch's record before that epoch's ``last.pth`` is written (so
    an epoch interrupted in between is trained and reported again on resume); raising
    :class:`StopTraining` from it ends the run cleanly after saving. ``on_step`` receives a
    :class:`StepRecord` every ``log_period`` iterations (the official 100), the only host syncs it adds.
    """
    if settings.selection == "val" and dataset.val is None:
        raise InputError(f"train.selection: 'val' needs a val split and {dataset.name} has none")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    with deterministic_mode(settings.deterministic):
        run = _start(model, settings, device, run_dir)
        image_cache = None
        if settings.pipeline == "cache":
            image_cache = open_cache(dataset, model.config.clip.image_size, workers=max(settings.num_workers, 1))
        # The official trainer's evaluation (the one that picks best.pth) batches with the training batch
        # size; only test.py uses test_batch_size. Under official coupling the batch size changes the numbers.
        eval_settings = EvalSettings(batch_size=settings.batch_size, device=str(device), precision=settings.precision,
                                     num_workers=settings.num_workers, image_size=model.config.clip.image_size,
                                     image_cache=image_cache)
        splits = ({"test": dataset.test} if settings.evaluate_test else {}) | (
            {"val": dataset.val} if dataset.val is not None else {})
        loader = _train_loader(run.model, dataset, settings, device, run.loader_generator, image_cache)
        progress = Progress(settings.epochs, len(loader), run.start_epoch)
        epoch = run.start_epoch
        try:
            for epoch in range(run.start_epoch, settings.epochs + 1):
                if run.stopped:
                    break
                started = time.perf_counter()
                lr = settings.lr * run.scheduler.factor()
                losses = train_one_epoch(run.step, loader, progress, epoch, lr, on_step, log_period)
                run.scheduler.step()
                metrics, outcomes = _evaluate_and_select(run, epoch, splits, eval_settings)
                record = EpochRecord(epoch, lr, losses, metrics, seconds=time.perf_counter() - started,
                                     outcomes=outcomes)
                run.history.append(record)
                progress.end_epoch(record)
                _deliver(record, on_epoch, run)
                _save_last(run, epoch)
        except KeyboardInterrupt:
            print(f"interrupted during epoch {epoch}; run again to resume from {run.last_path}", flush=True)
            raise
        finally:
            progress.close()
    return TrainResult(selected=run.selection.selected(), history=run.history, last_checkpoint=run.last_path,
                       best_checkpoint=run.best_path, stopped=run.stopped)


def _start(model, settings: TrainSettings, device, run_dir: Path) -> _Run:
    """Seeded model, optimiser and schedule, restored from ``run_dir/last.pth`` when it exists."""
    seed_everything(settings.seed)
    loader_generator = torch.Generator().manual_seed(settings.seed)
    model = prepare_training_model(model, settings, device)
    optimizer = build_training_optimizer(model, settings)
    scheduler = WarmupCosine(optimizer, settings.epochs, settings.warmup_epochs, settings.warmup_factor)
    step = TrainingStep(model, optimizer, settings, device)
    run = _Run(model, settings, optimizer, scheduler, loader_generator, step, run_dir / LAST_CHECKPOINT,
               run_dir / BEST_CHECKPOINT)
    if run.last_path.exists():
        payload = load_checkpoint_file(run.last_path)
        check_resumable(payload, settings.recipe(), run.last_path)
        check_run_state(payload, run.last_path)
        restore_training_state(payload, run.last_path, model, optimizer, scheduler)
        try:
            restore_rng_state(payload["rng"], loader_generator)
            run.history = [EpochRecord(**record) for record in payload["history"]]
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"{run.last_path}: its saved RNG states or history are unreadable ({reason})") from err
        run.selection = Selection(payload["selection"])
        run.start_epoch, run.stopped = payload["epoch"] + 1, payload["stopped"]
        print(f"resuming {run_dir} after epoch {payload['epoch']}", flush=True)
    return run


def _evaluate_and_select(run: _Run, epoch: int, splits: dict, eval_settings: EvalSettings) -> tuple[dict, dict]:
    """The epoch's metrics and per-query outcomes per split (none off the evaluation period); ``best.pth``
    when the rule picks it."""
    settings = run.settings
    if epoch % settings.eval_period != 0 and epoch != settings.epochs:
        return {}, {}
    evaluated = {name: evaluate(run.model, split, eval_settings, outcomes=True) for name, split in splits.items()}
    metrics = {name: pair[0] for name, pair in evaluated.items()}
    rule = RULE_OF_SELECTION[settings.selection]
    if rule in run.selection.update(epoch, metrics):
        save_atomic({"model": run.model.state_dict(), CONFIG_KEY: config_to_dict(run.model.config), "epoch": epoch,
                     "num_epoch": settings.epochs, "rule": rule, "metrics": metrics, "settings": settings.recipe()},
                    run.best_path)
    return metrics, {name: pair[1] for name, pair in evaluated.items()}


def _deliver(record: EpochRecord, on_epoch: Callable[[EpochRecord], None] | None, run: _Run) -> None:
    """Hand the record to ``on_epoch``; its :class:`StopTraining` marks the run stopped."""
    try:
        if on_epoch is not None:
            on_epoch(record)
    except StopTraining:
        run.stopped = True


def _save_last(run: _Run, epoch: int) -> None:
    """``last.pth``: everything needed to continue after ``epoch`` as if the run had never stopped."""
    save_atomic(
        {
            "model": run.model.state_dict(),
            CONFIG_KEY: config_to_dict(run.model.config),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "epoch": epoch,
            "num_epoch": run.settings.epochs,
            "rng": capture_rng_state(run.loader_generator),
            # Outcomes stay out of last.pth (weights_only loading reads no numpy arrays): the registry keeps them.
            "history": [dataclasses.asdict(dataclasses.replace(record, outcomes={})) for record in run.history],
            "selection": run.selection.state,
            "settings": run.settings.recipe(),
            "stopped": run.stopped,
        },
        run.last_path,
    )
