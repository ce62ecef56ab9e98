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
from php_runner.engine.optim import (
    OPTIMIZERS,
    SOLVERS,
    WarmupCosine,
    build_optimizer,
    build_param_groups,
    merge_param_groups,
)
from php_runner.engine.progress import Progress
from php_runner.engine.resume import capture_rng_state, check_resumable, restore_rng_state, restore_training_state
from php_runner.engine.selection import RULE_OF_SELECTION, SELECTIONS, Selection
from php_runner.errors import InputError
from php_runner.model.checkpoint import CONFIG_KEY, config_to_dict, load_checkpoint_file, save_atomic
from php_runner.model.losses import LossConfig, compute_losses
from php_runner.model.precision import PRECISIONS, apply_precision, autocast_context, training_matmul_scope

LAST_CHECKPOINT = "last.pth"
BEST_CHECKPOINT = "best.pth"
# Settings that may differ between an interrupted run and its resumption: they say where and how fast
# it runs, not what it computes (torch.compile changes only kernel fusion and rounding order).
RUNTIME_FIELDS = ("device", "num_workers", "compile")


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


def train(
    model,
    dataset: PedesDataset,
    settings: TrainSettings,
    run_dir: Path,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset.train``, resuming from ``run_dir/last.pth`` when it exists.

    ``on_epoch`` receives every new epoch's record before that epoch's ``last.pth`` is written (so
    an epoch interrupted in between is trained and reported again on resume); raising
    :class:`StopTraining` from it ends the run cleanly after saving.
    """
    if settings.selection == "val" and dataset.val is None:
        raise InputError(f"train.selection: 'val' needs a val split and {dataset.name} has none")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = run_dir / LAST_CHECKPOINT, run_dir / BEST_CHECKPOINT
    device = resolve_device(settings.device)

    with deterministic_mode(settings.deterministic):
        seed_everything(settings.seed)
        loader_generator = torch.Generator().manual_seed(settings.seed)
        model = prepare_training_model(model, settings, device)
        optimizer = build_training_optimizer(model, settings)
        scheduler = WarmupCosine(optimizer, settings.epochs, settings.warmup_epochs, settings.warmup_factor)

        history: list[EpochRecord] = []
        selection = Selection()
        start_epoch, stopped = 1, False
        if last_path.exists():
            payload = load_checkpoint_file(last_path)
            check_resumable(payload, settings.recipe(), last_path)
            restore_training_state(payload, last_path, model, optimizer, scheduler)
            restore_rng_state(payload["rng"], loader_generator)
            history = [EpochRecord(**record) for record in payload["history"]]
            selection = Selection(payload["selection"])
            start_epoch, stopped = payload["epoch"] + 1, payload["stopped"]
            print(f"resuming {run_dir} after epoch {payload['epoch']}", flush=True)

        def save_last(epoch: int) -> None:
            save_atomic(
                {
                    "model": model.state_dict(),
                    CONFIG_KEY: config_to_dict(model.config),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "num_epoch": settings.epochs,
                    "rng": capture_rng_state(loader_generator),
                    "history": [dataclasses.asdict(record) for record in history],
                    "selection": selection.state,
                    "settings": settings.recipe(),
                    "stopped": stopped,
                },
                last_path,
            )

        image_cache = None
        if settings.pipeline == "cache":
            image_cache = open_cache(dataset, model.config.clip.image_size, workers=max(settings.num_workers, 1))
        # The official trainer's evaluation (the one that picks best.pth) batches with the training batch
        # size; only test.py uses test_batch_size. Under official coupling the batch size changes the numbers.
        eval_settings = EvalSettings(
            batch_size=settings.batch_size,
            device=str(device),
            precision=settings.precision,
            num_workers=settings.num_workers,
            image_size=model.config.clip.image_size,
            image_cache=image_cache,
        )
        splits = ({"test": dataset.test} if settings.evaluate_test else {}) | (
            {"val": dataset.val} if dataset.val is not None else {})
        loader = _train_loader(model, dataset, settings, device, loader_generator, image_cache)
        progress = Progress(settings.epochs, len(loader), start_epoch)
        epoch = start_epoch
        try:
            for epoch in range(start_epoch, settings.epochs + 1):
                if stopped:
                    break
                started = time.perf_counter()
                lr = settings.lr * scheduler.factor()
                losses = _train_one_epoch(model, loader, optimizer, settings, device, progress, epoch)
                scheduler.step()
                metrics = {}
                if epoch % settings.eval_period == 0 or epoch == settings.epochs:
                    metrics = {name: evaluate(model, split, eval_settings) for name, split in splits.items()}
                    changed = selection.update(epoch, metrics)
                    if RULE_OF_SELECTION[settings.selection] in changed:
                        save_atomic(
                            {
                                "model": model.state_dict(),
                                CONFIG_KEY: config_to_dict(model.config),
                                "epoch": epoch,
                                "num_epoch": settings.epochs,
                                "rule": RULE_OF_SELECTION[settings.selection],
                                "metrics": metrics,
                                "settings": settings.recipe(),
                            },
                            best_path,
                        )
                record = EpochRecord(epoch=epoch, lr=lr, losses=losses, metrics=metrics, seconds=time.perf_counter() - started)
                history.append(record)
                progress.end_epoch(record)
                try:
                    if on_epoch is not None:
                        on_epoch(record)
                except StopTraining:
                    stopped = True
                save_last(epoch)
        except KeyboardInterrupt:
            print(f"interrupted during epoch {epoch}; run again to resume from {last_path}", flush=True)
            raise
        finally:
            progress.close()

    return TrainResult(
        selected=selection.selected(),
        history=history,
        last_checkpoint=last_path,
        best_checkpoint=best_path,
        stopped=stopped,
    )


def prepare_training_model(model: nn.Module, settings: TrainSettings, device) -> nn.Module:
    """``model`` laid out for training, in place: the precision's weight dtypes, on ``device``, compiled if asked.

    Compiling in place keeps parameter names and state-dict keys. The fp32 matmul precision is no setting of
    the model: each step chooses it for itself (:func:`train_step`).
    """
    device = torch.device(device)
    apply_precision(model, settings.precision)
    model.to(device)
    if settings.compile:
        model.compile()
    return model


def build_training_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """The optimiser of the recipe over ``model`` as :func:`prepare_training_model` left it.

    The per-tensor groups of spec 5 merged where their hyper-parameters agree (a handful remain). ``official``
    keeps torch's default kernel: the multi-tensor one on CUDA (what the per-tensor groups ran), the per-tensor
    loop on CPU (whose fp16 multi-tensor fallback rounds its scalars differently), so parameters and optimiser
    state stay bit-equal to the official per-tensor groups (tested) with a few launches per step instead of
    hundreds. ``amp`` (the fast regime) takes the fused kernel on CUDA (Adam/AdamW), the multi-tensor one
    otherwise; its updates follow the same trajectory (tested).
    """
    groups = merge_param_groups(build_param_groups(
        model,
        settings.lr,
        solver=settings.solver,
        weight_decay=settings.weight_decay,
        weight_decay_bias=settings.weight_decay_bias,
        bias_lr_factor=settings.bias_lr_factor,
        lr_factor=settings.lr_factor,
        transformer_lr_factor=settings.transformer_lr_factor,
        moe_lr_factor=settings.moe_lr_factor,
    ))
    kernel = "default"
    if settings.precision == "amp":
        on_cuda = next(model.parameters()).device.type == "cuda"
        kernel = "fused" if on_cuda and settings.optimizer in ("adam", "adamw") else "foreach"
    return build_optimizer(
        groups, settings.optimizer, lr=settings.lr, betas=settings.betas, adam_eps=settings.adam_eps,
        momentum=settings.momentum, kernel=kernel,
    )


def train_step(model, batch: dict, optimizer, settings: TrainSettings, device) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch (keys images, caption_ids, pids); returns the loss terms.

    The step's fp32 matmul precision (TF32 for ``amp`` on CUDA) holds for the step only.
    """
    images = batch["images"].to(device, non_blocking=True)
    caption_ids = batch["caption_ids"].to(device, non_blocking=True)
    pids = batch["pids"].to(device, non_blocking=True)
    with training_matmul_scope(settings.precision, device):
        with autocast_context(settings.precision, device):
            output = model(images, caption_ids)
        losses = compute_losses(output, pids, settings.loss)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
    return losses


def _train_one_epoch(model, loader, optimizer, settings: TrainSettings, device, progress: Progress, epoch: int) -> dict:
    """One pass over the train loader; returns the sample-weighted mean of every loss term.

    Nothing is read back from the device inside a step: the sums stay on the device and are read once
    at the end of the epoch, and the progress display reads the loss only on the steps it shows.
    """
    model.train()
    progress.start_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    for batch in loader:
        losses = train_step(model, batch, optimizer, settings, device)
        size = len(batch["pids"])
        seen += size
        for name, value in losses.items():
            sums[name] = sums.get(name, 0) + value.detach().float() * size
        progress.step(size, lambda: losses["total"].item())
    means = (torch.stack(list(sums.values())) / seen).tolist()  # one read-back for all the terms
    return dict(zip(sums, means))
