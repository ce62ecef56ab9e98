"""The engine's record shapes, written out for the tests (StepRecord as documented, EpochRecord)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Step:
    """The engine's per-iteration record (StepRecord), written out here as its documented shape."""

    epoch: int
    iteration: int
    iterations_per_epoch: int
    lr: float
    losses: dict


@dataclass
class Epoch:
    """The engine's EpochRecord shape."""

    epoch: int
    lr: float
    losses: dict
    metrics: dict = field(default_factory=dict)
    seconds: float = 1.0
