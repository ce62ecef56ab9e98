"""Checks of bad input before any run starts (data folders, weight files, the device), and writing the
synthetic data a run needs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from php_runner.errors import InputError
from php_runner.store.registry import Registry

if TYPE_CHECKING:
    from php_runner.experiment.schema import PlannedRun


def ensure_data(config: dict) -> None:
    """Write the synthetic dataset a run needs when it is missing; real data must already exist.

    A named synthetic variant (``data.source = "synthetic-NAME"``) is checked to be that variant when
    its folder exists, so a run never trains on a default set written under the same root. The annotation
    file is written last, so a folder without one is a write that was killed: it is written again.
    """
    data, runtime = config["data"], config.get("runtime", {})
    root = Path(runtime.get("data_root") or ".")
    source = data.get("source")
    if source == "synthetic":
        if not synthetic_written(root, data["dataset"]):
            from php_runner.data import write_synthetic

            print(f"writing synthetic {data['dataset']} (random images and captions) under {root}", file=sys.stderr)
            write_synthetic(root, data["dataset"])
    elif source is not None and source.startswith("synthetic-"):
        from php_runner.data.synthetic import VARIANTS, variant_problem, write_variant

        variant = source.removeprefix("synthetic-")
        if VARIANTS[variant].dataset != data["dataset"]:
            raise InputError(f"data.source {source!r}: written in the {VARIANTS[variant].dataset} format only; "
                             f"run it with --dataset {VARIANTS[variant].dataset}")
        if not synthetic_written(root, data["dataset"]):
            print(f"writing synthetic {variant} set (random images and captions) under {root}", file=sys.stderr)
            write_variant(root, variant)
        problem = variant_problem(root, variant)
        if problem is not None:
            raise InputError(f"--data-root {root}: {problem}; give an empty folder or one written by "
                             f"php-run synth --variant {variant}")
    elif not (root / data["dataset"]).is_dir():
        raise InputError(f"--data-root {root}: no {data['dataset']} folder there (give the folder that holds it)")


def synthetic_written(root: Path, dataset: str) -> bool:
    """Whether ``root/dataset`` holds a finished write: the synthetic writer's annotation file comes last."""
    from php_runner.data.datasets import LAYOUTS

    return (root / dataset / LAYOUTS[dataset].annotation_files[0]).is_file()


def preflight(config: dict, local: bool = True) -> None:
    """Cheap checks of bad input before any worker starts: data folders, weight files and, for runs
    that execute on this machine (``local``), the device; queued runs may run on other nodes."""
    ensure_data(config)
    runtime = config.get("runtime", {})
    if local:
        check_device(runtime.get("device", "auto"))
    weights = runtime.get("clip_weights")
    if config["model"].get("clip") == "ViT-B/16":
        if not weights:
            raise InputError("--clip-weights: the ViT-B/16 preset needs the OpenAI weights file (ViT-B-16.pt)")
        if not Path(weights).is_file():
            raise InputError(f"--clip-weights {weights}: file not found")
        from php_runner.model.clip import ClipWeightsError, check_clip_weights

        try:
            check_clip_weights(weights)
        except ClipWeightsError as err:
            raise InputError(f"--clip-weights {err}") from None
    if local:  # last: it reads the whole annotation file
        check_annotations(config)


def check_annotations(config: dict) -> None:
    """Read the run's annotation file (depth, size, ids, fields) so a damaged one is refused before anything
    is recorded; images are decoded by ``php-run data check`` and by training, not here (a full pass)."""
    from php_runner.data import read_dataset

    read_dataset(Path(config.get("runtime", {}).get("data_root") or "."), config["data"]["dataset"])


def check_device(device: str) -> None:
    """A CUDA device must exist here (the workers run on this machine); ``auto`` falls back to the CPU."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def preflight_all(registry: Registry, planned: Sequence["PlannedRun"], local: bool = True) -> None:
    """``preflight`` each planned run that is not done yet (once per distinct data/weights/device); reads only."""
    done = {run.config_hash for run in registry.list_runs(status="done",
                                                          config_hashes=[p.config_hash for p in planned])}
    checked: set[str] = set()
    for plan in planned:
        runtime = plan.config.get("runtime", {})
        key = repr((runtime.get("data_root"), plan.config["data"], plan.config["model"].get("clip"),
                    runtime.get("clip_weights"), runtime.get("device")))
        if plan.config_hash not in done and key not in checked:
            checked.add(key)
            preflight(plan.config, local=local)
