"""One training step and one epoch: the model's training layout, the optimiser, the step, the epoch loop.

The step holds the precision's settings for itself (bf16 autocast and TF32 for ``amp`` on CUDA) and gives
them back, so nothing leaks into evaluation or another run in the same process.

``cuda_graphs`` (the fast regime only) compiles the forward *and the losses* as one region with
``torch.compile(mode="reduce-overhead")`` and static shapes: on CUDA the region's forward and its backward
(AOTAutograd compiles both; the autograd engine runs the backward when the step calls ``backward()``) are
replayed as CUDA graphs, one launch instead of thousands. The optimiser step stays outside, eager: its
fused/multi-tensor kernels are already a few launches, and outside a graph it keeps the optimiser state
and the learning-rate schedule as plain tensors that ``last.pth`` saves and restores. The official loader
keeps the final partial batch, and under the official coupling a sample's EFP attention reads its
batch-mates (spec 2.5), so padding that batch would change the results: it is a second static shape with
a graph of its own (every epoch's last batch has the same size, so a run records two). On the CPU
reduce-overhead records no graphs and the region is a plain compiled one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from php_runner.engine.optim import (
    build_optimizer,
    build_param_groups,
    merge_param_groups,
)
from php_runner.engine.progress import LOG_PERIOD, Progress
from php_runner.model.losses import compute_losses
from php_runner.model.precision import (
    apply_precision,
    autocast_context,
    training_matmul_scope,
)


@dataclass
class StepRecord:
    """Every ``log_period`` iterations: where training is, and the epoch's running mean losses so far."""

    epoch: int
    iteration: int
    iterations_per_epoch: int
    lr: float
    losses: dict[str, float]


def prepare_training_model(model: nn.Module, settings, device) -> nn.Module:
    """``model`` laid out for training, in place: the precision's weight dtypes, on ``device``, compiled if asked.

    Compiling in place keeps parameter names and state-dict keys. The fp32 matmul precision is no setting of
    the model: each step chooses it for itself (:func:`train_step`). With ``cuda_graphs`` the model is not
    compiled on its own: :class:`TrainingStep` compiles it together with the losses.
    """
    device = torch.device(device)
    apply_precision(model, settings.precision)
    model.to(device)
    if settings.compile and not settings.cuda_graphs:
        model.compile()
    return model


def build_training_optimizer(model: nn.Module, settings) -> torch.optim.Optimizer:
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


def forward_losses(model, images, caption_ids, pids, precision: str, loss_config) -> dict[str, torch.Tensor]:
    """The loss terms of one batch: the forward under the precision's autocast, then the losses."""
    with autocast_context(precision, images.device):
        output = model(images, caption_ids)
    return compute_losses(output, pids, loss_config)


def train_step(model, batch: dict, optimizer, settings, device) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch (keys images, caption_ids, pids) without a compiled region (the model
    itself may be ``compile``-d); returns the loss terms. For ``cuda_graphs``, whose compiled region lives
    across steps, use :class:`TrainingStep`.

    The step's fp32 matmul precision (TF32 for ``amp`` on CUDA) holds for the step only.
    """
    return _optimise(forward_losses, model, batch, optimizer, settings, torch.device(device))


class TrainingStep:
    """``step(batch) -> losses``: one optimisation step of ``model``, its forward and losses compiled once as
    one region when ``settings.cuda_graphs`` asks (CUDA graphs on CUDA, a plain compiled region on the CPU)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings, device) -> None:
        self.model, self.optimizer, self.settings, self.device = model, optimizer, settings, torch.device(device)
        self.compiled = settings.cuda_graphs
        self.forward_losses: Callable = forward_losses
        if self.compiled:
            self.forward_losses = torch.compile(forward_losses, mode="reduce-overhead", dynamic=False)

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.compiled:
            # The previous step's graph outputs (losses, gradients) are consumed: the next replay may reuse them.
            torch.compiler.cudagraph_mark_step_begin()
        return _optimise(self.forward_losses, self.model, batch, self.optimizer, self.settings, self.device)


def _optimise(forward: Callable, model, batch: dict, optimizer, settings, device: torch.device) -> dict[str, torch.Tensor]:
    """``forward`` (:func:`forward_losses`, compiled or not), then backward and the optimiser step."""
    images = batch["images"].to(device, non_blocking=True)
    caption_ids = batch["caption_ids"].to(device, non_blocking=True)
    pids = batch["pids"].to(device, non_blocking=True)
    # Gradients dropped before the forward: under CUDA graphs the previous step's are outputs of its replay,
    # whose memory this step's replay reuses.
    optimizer.zero_grad(set_to_none=True)
    with training_matmul_scope(settings.precision, device):
        losses = forward(model, images, caption_ids, pids, settings.precision, settings.loss)
        losses["total"].backward()
        optimizer.step()
    return losses


def train_one_epoch(step: TrainingStep, loader, progress: Progress, epoch: int, lr: float,
                    on_step: Callable[[StepRecord], None] | None = None, log_period: int = LOG_PERIOD) -> dict:
    """One pass over the train loader; returns the sample-weighted mean of every loss term.

    Nothing is read back from the device inside a step: the sums stay on the device and are read once at
    the end of the epoch, every ``log_period`` iterations when ``on_step`` listens (the running means), and
    when the progress display shows a loss.
    """
    step.model.train()
    progress.start_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    for iteration, batch in enumerate(loader, start=1):
        losses = step(batch)
        size = len(batch["pids"])
        seen += size
        for name, value in losses.items():
            sums[name] = sums.get(name, 0) + value.detach().float() * size
        progress.step(size, lambda: losses["total"].item())
        if on_step is not None and iteration % log_period == 0:
            on_step(StepRecord(epoch, iteration, len(loader), lr, _means(sums, seen)))
    return _means(sums, seen)


def _means(sums: dict[str, torch.Tensor], seen: int) -> dict[str, float]:
    """Mean of every loss term, read back from the device at once."""
    return dict(zip(sums, (torch.stack(list(sums.values())) / seen).tolist()))
