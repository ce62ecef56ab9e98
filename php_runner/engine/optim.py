"""Optimiser recipe of spec 5: one parameter group per tensor, Adam/AdamW/SGD, per-epoch warm-up + cosine.

Training merges the per-tensor groups that share their hyper-parameters (a handful remain): Adam, AdamW
and SGD update each element from its own gradient and state only, so with the same kernel the updates are
bit-equal, and the fast regime's multi-tensor (``foreach``, or ``fused`` on CUDA) kernels follow the same
trajectory. A
``last.pth`` written with per-tensor groups is translated to the merged layout on resume
(:func:`per_tensor_state_to_merged`).

Two solver versions exist in the official history. ``head`` (the IRRA rules, current code) and ``v1``
(the 2025 solver that adds the EFP transformer and MoE learning-rate factors). Rules are applied in
order and a later matching rule replaces the learning rate set by an earlier one, as in the official
solver; the bias rule is the only one that changes weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

SOLVERS = ("head", "v1")
OPTIMIZERS = ("adam", "adamw", "sgd")
KERNELS = ("default", "foreach", "fused")  # torch's per-tensor loop (CPU default), multi-tensor, one fused kernel

_MOE_KEYS = ("feed_forward.experts", "feed_forward.input_gate", "feed_forward.task_gate")
_HEAD_KEYS = ("classifier", "mlm_head")


def param_group_rule(
    name: str,
    lr: float,
    *,
    solver: str = "head",
    weight_decay: float = 4e-5,
    weight_decay_bias: float = 0.0,
    bias_lr_factor: float = 2.0,
    lr_factor: float = 5.0,
    transformer_lr_factor: float = 1.0,
    moe_lr_factor: float = 2.0,
) -> tuple[float, float]:
    """(learning rate, weight decay) that the official solver gives the parameter called ``name``."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    group_lr, group_wd = lr, weight_decay
    if "cross" in name:
        group_lr = lr * lr_factor
    if solver == "v1":
        # "shared_transformer" also matches the separate-sharing names shared_transformerv/t.
        if "shared_transformer" in name:
            group_lr = lr * transformer_lr_factor
        if any(key in name for key in _MOE_KEYS):
            group_lr = lr * moe_lr_factor
    if "bias" in name:
        group_lr = lr * bias_lr_factor
        group_wd = weight_decay_bias
    if any(key in name for key in _HEAD_KEYS):
        group_lr = lr * lr_factor
    return group_lr, group_wd


def build_param_groups(model: nn.Module, lr: float, **rule_options) -> list[dict]:
    """One optimiser group per trainable parameter, in ``named_parameters`` order (spec 5).

    Each group carries its parameter ``name`` so that optimiser state files stay readable.
    ``rule_options`` are the keyword arguments of :func:`param_group_rule`.
    """
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group_lr, group_wd = param_group_rule(name, lr, **rule_options)
        groups.append({"params": [param], "lr": group_lr, "weight_decay": group_wd, "name": name})
    return groups


def merge_param_groups(param_groups: list[dict]) -> list[dict]:
    """Groups with identical hyper-parameters merged, in order of first appearance.

    Each merged group lists its parameters' ``names`` (from the per-tensor groups' ``name``), so optimiser
    state files stay readable.
    """
    merged: dict[tuple, dict] = {}
    for group in param_groups:
        options = {key: value for key, value in group.items() if key not in ("params", "name")}
        target = merged.setdefault(tuple(sorted(options.items())), {**options, "params": [], "names": []})
        target["params"].extend(group["params"])
        target["names"].append(group["name"])
    return list(merged.values())


def per_tensor_state_to_merged(saved: dict, current: dict) -> dict | None:
    """``saved`` (an optimiser state dict with one group per tensor, each naming its ``name``) laid out as
    ``current`` (the state dict of an optimiser over merged groups, each listing its ``names``).

    None when ``saved`` is not of that per-tensor form. Raises ValueError when the saved groups no longer fit
    the merged ones (other names, or hyper-parameters that differ within one merged group).
    """
    saved_groups, current_groups = saved["param_groups"], current["param_groups"]
    if not all("name" in group and len(group["params"]) == 1 for group in saved_groups):
        return None
    if not all("names" in group for group in current_groups):
        return None
    by_name = {group["name"]: group for group in saved_groups}
    if sorted(by_name) != sorted(name for group in current_groups for name in group["names"]):
        raise ValueError("the saved per-tensor optimiser groups no longer fit this model's parameters")
    state, groups = {}, []
    for group in current_groups:
        members = [by_name[name] for name in group["names"]]
        options = [{key: value for key, value in member.items() if key not in ("params", "name")} for member in members]
        if any(option != options[0] for option in options):
            raise ValueError(f"the saved per-tensor optimiser groups no longer fit the merged group of {members[0]['name']}")
        groups.append({**options[0], "params": list(group["params"]), "names": list(group["names"])})
        for index, member in zip(group["params"], members):
            if member["params"][0] in saved["state"]:
                state[index] = saved["state"][member["params"][0]]
    return {"state": state, "param_groups": groups}


def build_optimizer(
    param_groups: list[dict],
    optimizer: str = "adam",
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-3,
    momentum: float = 0.9,
    kernel: str = "default",
) -> torch.optim.Optimizer:
    """The official optimiser choices: Adam (eps ``adam_eps``, 1e-3 officially), AdamW (eps 1e-8), SGD.

    ``kernel`` picks torch's implementation (``KERNELS``); ``fused`` exists for Adam and AdamW only.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    implementation = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kernel]
    if optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=lr, betas=tuple(betas), eps=adam_eps, **implementation)
    if optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=1e-8, **implementation)
    if optimizer == "sgd":
        if kernel == "fused":
            raise ValueError("kernel 'fused' is for adam and adamw; sgd takes 'default' or 'foreach'")
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, **implementation)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")


def schedule_factor(epoch_index: int, epochs: int, warmup_epochs: int = 5, warmup_factor: float = 0.1) -> float:
    """Multiplier f(t) of spec 5 for the epoch with 0-based index ``t`` (epoch t+1 trains at base_lr * f(t)).

    Linear warm-up from ``warmup_factor`` over ``warmup_epochs``, then cosine decay to 0 at ``epochs``.
    """
    if epoch_index < warmup_epochs:
        alpha = epoch_index / warmup_epochs
        return warmup_factor * (1 - alpha) + alpha
    progress = (epoch_index - warmup_epochs) / max(1, epochs - warmup_epochs)
    return 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine(LRScheduler):
    """Per-epoch warm-up + cosine schedule; call ``step()`` once after each epoch's iterations."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        warmup_epochs: int = 5,
        warmup_factor: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must not be negative, got {warmup_epochs}")
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, last_epoch)

    def factor(self) -> float:
        """f(t) for the epoch about to be trained."""
        return schedule_factor(self.last_epoch, self.epochs, self.warmup_epochs, self.warmup_factor)

    def get_lr(self) -> list[float]:
        factor = self.factor()
        return [base_lr * factor for base_lr in self.base_lrs]
