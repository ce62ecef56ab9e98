"""Resume state: the RNG states a run captures in ``last.pth`` and restores, and the resumable check.

A resumed run continues as if it had never stopped only when every RNG (torch CPU and CUDA, python,
numpy, the loader's generator) is back where it was and the recipe is the one the checkpoint was
written with.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from php_runner.engine.optim import per_tensor_state_to_merged
from php_runner.errors import InputError


def capture_rng_state(loader_generator: torch.Generator) -> dict:
    """All RNG states as tensors, lists, tuples and ints, so ``torch.load(weights_only=True)`` reads them."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)),
        "loader": loader_generator.get_state(),
    }


def restore_rng_state(state: dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    loader_generator.set_state(state["loader"])


def check_resumable(payload: dict, recipe: dict, path: Path) -> None:
    """Refuse to resume ``path`` when any recipe setting differs from the one it was written with."""
    saved = payload.get("settings", {})
    if not isinstance(saved, dict):
        raise InputError(f"{path}: settings: expected a mapping, found {type(saved).__name__}; use a new run directory")
    for name, value in recipe.items():
        if _plain(saved.get(name)) != _plain(value):
            raise InputError(
                f"{path}: written with train.{name} = {saved.get(name)!r}, not {value!r}; use a new run directory"
            )


def check_run_state(payload: dict, path: Path) -> None:
    """The bookkeeping a resume reads besides the weights has the types php-run writes; else bad input naming
    the file (a damaged or foreign ``last.pth`` must not fail later, mid-run, with a traceback)."""
    epoch, weights = payload.get("epoch"), payload.get("model")
    fits = {
        "model": isinstance(weights, dict) and all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                                   for key, value in weights.items()),
        "epoch": _is_index(epoch),
        "stopped": isinstance(payload.get("stopped"), bool),
        "history": isinstance(payload.get("history"), list) and all(isinstance(item, dict) for item in payload["history"]),
        **{key: isinstance(payload.get(key), dict) for key in ("optimizer", "scheduler", "selection", "rng")},
    }
    if fits["selection"]:  # rule -> [epoch, R1 on the selecting split, reported split, its metrics]
        fits["selection"] = all(isinstance(pick, (list, tuple)) and len(pick) == 4 and _is_index(pick[0])
                                and isinstance(pick[2], str) and isinstance(pick[3], dict)
                                for pick in payload["selection"].values())
    for key, ok in fits.items():
        if not ok:
            raise InputError(f"{path}: {key}: not what php-run writes there (found {type(payload.get(key)).__name__}); "
                             "the file is damaged or not a php-run last.pth")


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def restore_training_state(payload: dict, path: Path, model, optimizer, scheduler) -> None:
    """Load the model, optimiser and schedule of ``path`` (a ``last.pth``); a state that does not fit them
    is bad input naming the file. The per-tensor optimiser groups older php-runs wrote for the ``official``
    regime are translated to today's merged groups (the same per-tensor state)."""
    try:
        model.load_state_dict(payload["model"])
        saved_optimizer = payload["optimizer"]
        optimizer.load_state_dict(per_tensor_state_to_merged(saved_optimizer, optimizer.state_dict()) or saved_optimizer)
        scheduler.load_state_dict(payload["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: its saved training state does not fit this run's model and optimiser "
                         f"({reason})") from err


def _plain(value):
    """Tuples and lists compare equal after a checkpoint round trip."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
