"""A loaded model made ready for evaluation, with the ``EvalSettings`` that evaluate it.

Every path that evaluates a checkpoint outside training (``php-run evaluate``, the audit of a run or
a checkpoint file, a tuning study's final test, the import of released checkpoints) sets the weight
precision, the EFP coupling and the device the same way, here.
"""

from __future__ import annotations

from torch import nn

from php_runner.engine.evaluate import EvalSettings
from php_runner.engine.train import resolve_device
from php_runner.model.precision import apply_precision


def prepare_for_evaluation(
    model: nn.Module,
    *,
    precision: str,
    device: str,
    batch_size: int,
    encoder: str | None = None,
    order: str = "annotation",
    coupling: str | None = None,
    num_workers: int = 0,
) -> EvalSettings:
    """Set ``model``'s weight ``precision`` and ``coupling`` (None: its own), move it to ``device`` (``auto``:
    CUDA when available) in eval mode, and return the settings that evaluate it at its image size."""
    resolved = str(resolve_device(device))
    apply_precision(model, precision)
    if coupling is not None:
        model.coupling = coupling
    model.to(resolved).eval()
    return EvalSettings(
        batch_size=batch_size,
        order=order,
        encoder=encoder,
        device=resolved,
        precision=precision,
        num_workers=num_workers,
        image_size=model.config.clip.image_size,
    )
