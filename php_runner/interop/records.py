"""The shapes of the training records the writers read, as Protocols, so that any object with these
attributes fits (the engine's ``EpochRecord``, its per-iteration ``StepRecord``, registry rows)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

TOTAL_LOSS = "total"  # the engine's key of the summed loss; the official meter calls it "loss"


class StepLike(Protocol):
    """One logged training iteration (every ``log_period`` iterations); ``iteration`` counts from 1."""

    epoch: int
    iteration: int
    iterations_per_epoch: int
    lr: float
    losses: Mapping[str, float]


class EpochLike(Protocol):
    """One finished epoch: base lr, mean losses, metrics per evaluated split (empty: not evaluated)."""

    epoch: int
    lr: float
    losses: Mapping[str, float]
    metrics: Mapping[str, Mapping[str, float]]
    seconds: float


def global_step(step: StepLike) -> int:
    """Iterations done since training began: ``(epoch - 1) * iterations_per_epoch + iteration``."""
    return (step.epoch - 1) * step.iterations_per_epoch + step.iteration


def meter_name(loss_name: str) -> str:
    """The official meter name of an engine loss key (``total`` -> ``loss``; ``sdm_loss`` stays)."""
    return "loss" if loss_name == TOTAL_LOSS else loss_name


def official_meters(losses: Mapping[str, float]) -> list[tuple[str, float]]:
    """``loss`` first, then each term in its order; only positive values, as the official log shows."""
    ordered = [(TOTAL_LOSS, losses.get(TOTAL_LOSS))] + [(k, v) for k, v in losses.items() if k != TOTAL_LOSS]
    return [(meter_name(name), float(value)) for name, value in ordered if value is not None and value > 0]
