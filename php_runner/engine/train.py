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
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from php_runner.data import PedesDataset
from php_runner.data.loaders import TrainPairs
from php_runner.data.transforms import build_transform
from php_runner.engine.evaluate import EvalSettings, evaluate
from php_runner.engine.optim import OPTIMIZERS, SOLVERS, WarmupCosine, build_optimizer, build_param_groups
from php_runner.errors import InputError
from php_runner.model.checkpoint import CONFIG_KEY, config_to_dict, load_checkpoint_file, save_atomic
from php_runner.model.losses import LossConfig, compute_losses
from php_runner.model.precision import PRECISIONS, apply_precision, autocast_context

SELECTIONS = ("test", "val", "last")
RULE_OF_SELECTION = {"test": "best-on-test", "val": "best-on-val", "last": "last"}
LAST_CHECKPOINT = "last.pth"
BEST_CHECKPOINT = "best.pth"
LOG_PERIOD = 100  # steps between plain progress lines, the official log_period
# Settings that may differ between an interrupted run and its resumption: they only say where it runs.
RUNTIME_FIELDS = ("device", "num_workers")


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

    def __post_init__(self) -> None:
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("solver", SOLVERS),
            ("precision", PRECISIONS),
            ("selection", SELECTIONS),
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


def _rng_state(loader_generator: torch.Generator) -> dict:
    """All RNG states as tensors, lists, tuples and ints, so ``torch.load(weights_only=True)`` reads them."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)),
        "loader": loader_generator.get_state(),
    }


def _restore_rng_state(state: dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    loader_generator.set_state(state["loader"])


class _Progress:
    """Rich progress bars on a terminal, plain log lines otherwise."""

    def __init__(self, epochs: int, steps_per_epoch: int, first_epoch: int) -> None:
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.rich = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.rich = Progress(
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


class _Selection:
    """Best-so-far bookkeeping for the three rules; ``best-on-*`` move only on a strict R1 improvement.

    Each pick reports the test metrics at its epoch, or the val metrics when test is not evaluated.
    """

    def __init__(self, state: dict | None = None) -> None:
        # rule -> [epoch, score R1 on the selecting split, reported split, its metrics at that epoch]
        self.state: dict[str, list] = state or {}

    def update(self, epoch: int, metrics: dict[str, dict]) -> set[str]:
        """Feed an evaluated epoch; returns the rules whose pick changed."""
        changed = set()
        reported = "test" if "test" in metrics else "val"
        candidates = {"best-on-test": metrics.get("test"), "best-on-val": metrics.get("val"),
                      "last": metrics.get(reported)}
        for rule, scored in candidates.items():
            if scored is None:
                continue
            current = self.state.get(rule)
            if rule == "last" or current is None or scored["R1"] > current[1]:
                self.state[rule] = [epoch, scored["R1"], reported, dict(metrics[reported])]
                changed.add(rule)
        return changed

    def selected(self) -> dict[str, tuple[int, str, dict]]:
        return {rule: (epoch, split, metrics) for rule, (epoch, _, split, metrics) in self.state.items()}


def _train_loader(model, dataset: PedesDataset, settings: TrainSettings, device, generator) -> DataLoader:
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


def _check_resumable(payload: dict, settings: TrainSettings, path: Path) -> None:
    saved, wanted = payload.get("settings", {}), settings.recipe()
    for name, value in wanted.items():
        if _plain(saved.get(name)) != _plain(value):
            raise InputError(
                f"{path}: written with train.{name} = {saved.get(name)!r}, not {value!r}; use a new run directory"
            )


def _plain(value):
    """Tuples and lists compare equal after a checkpoint round trip."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


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
        apply_precision(model, settings.precision)
        model.to(device)
        optimizer = build_training_optimizer(model, settings)
        scheduler = WarmupCosine(optimizer, settings.epochs, settings.warmup_epochs, settings.warmup_factor)

        history: list[EpochRecord] = []
        selection = _Selection()
        start_epoch, stopped = 1, False
        if last_path.exists():
            payload = load_checkpoint_file(last_path)
            _check_resumable(payload, settings, last_path)
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            _restore_rng_state(payload["rng"], loader_generator)
            history = [EpochRecord(**record) for record in payload["history"]]
            selection = _Selection(payload["selection"])
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
                    "rng": _rng_state(loader_generator),
                    "history": [dataclasses.asdict(record) for record in history],
                    "selection": selection.state,
                    "settings": settings.recipe(),
                    "stopped": stopped,
                },
                last_path,
            )

        eval_settings = EvalSettings(
            batch_size=settings.test_batch_size,
            device=str(device),
            precision=settings.precision,
            num_workers=settings.num_workers,
            image_size=model.config.clip.image_size,
        )
        splits = ({"test": dataset.test} if settings.evaluate_test else {}) | (
            {"val": dataset.val} if dataset.val is not None else {})
        loader = _train_loader(model, dataset, settings, device, loader_generator)
        progress = _Progress(settings.epochs, len(loader), start_epoch)
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


def build_training_optimizer(model, settings: TrainSettings) -> torch.optim.Optimizer:
    """The official per-parameter groups (spec 5) and the optimiser, from the recipe."""
    groups = build_param_groups(
        model,
        settings.lr,
        solver=settings.solver,
        weight_decay=settings.weight_decay,
        weight_decay_bias=settings.weight_decay_bias,
        bias_lr_factor=settings.bias_lr_factor,
        lr_factor=settings.lr_factor,
        transformer_lr_factor=settings.transformer_lr_factor,
        moe_lr_factor=settings.moe_lr_factor,
    )
    return build_optimizer(
        groups, settings.optimizer, lr=settings.lr, betas=settings.betas, adam_eps=settings.adam_eps, momentum=settings.momentum
    )


def train_step(model, batch: dict, optimizer, settings: TrainSettings, device) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch (keys images, caption_ids, pids); returns the loss terms."""
    images = batch["images"].to(device, non_blocking=True)
    caption_ids = batch["caption_ids"].to(device, non_blocking=True)
    pids = batch["pids"].to(device, non_blocking=True)
    with autocast_context(settings.precision, device):
        output = model(images, caption_ids)
    losses = compute_losses(output, pids, settings.loss)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    optimizer.step()
    return losses


def _train_one_epoch(model, loader, optimizer, settings: TrainSettings, device, progress: _Progress, epoch: int) -> dict:
    """One pass over the train loader; returns the sample-weighted mean of every loss term."""
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
    return {name: (total / seen).item() for name, total in sums.items()}
