"""`php-run evaluate`: evaluate an official or php-run checkpoint on a dataset's test split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from php_runner.cli import app
from php_runner.cli.common import (
    DataRootOption,
    DeviceOption,
    JsonOption,
    console,
    print_json,
)
from php_runner.cli.outputs import check_output
from php_runner.engine.metrics import METRIC_NAMES
from php_runner.errors import InputError


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="best.pth (official) or a php-run checkpoint.")],
    dataset: Annotated[str | None, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES or RSTPReid "
                                                "(default: dataset_name from configs.yaml).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="The official configs.yaml next to best.pth; its "
                                                "values apply unless overridden.")] = None,
    data_root: DataRootOption = None,
    encoder: Annotated[str | None, typer.Option("--encoder", help="full, base, crfm or efp (default: the model's).")]
    = None,
    coupling: Annotated[str | None, typer.Option("--coupling", help="EFP attention: official or per-sample.")] = None,
    test_batch_size: Annotated[int | None, typer.Option("--test-batch-size", help="Evaluation batch size "
                                                        "(default: the checkpoint's recipe or configs.yaml's, "
                                                        "else 64).", min=1)] = None,
    order: Annotated[str, typer.Option("--order", help="Batching order: annotation (official) or shuffled.")]
    = "annotation",
    precision: Annotated[str | None, typer.Option("--precision", help="Weight layout: official (fp16, as the "
                                                  "official test.py) or amp (fp32; bf16 autocast on CUDA). Default: "
                                                  "the regime a php-run checkpoint was trained in, else official.")]
    = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
    save_embeddings: Annotated[Path | None, typer.Option("--save-embeddings", help="Write text, image, text_pids "
                                                         "and image_pids arrays to this .npz file.")] = None,
) -> None:
    """Evaluate a checkpoint on a dataset's test split (text-to-image R1, R5, R10, mAP, mINP).

    Example: php-run evaluate --checkpoint logs/CUHK-PEDES/sdm+itc+aux/best.pth
    --config logs/CUHK-PEDES/sdm+itc+aux/configs.yaml --data-root data --dataset CUHK-PEDES --json
    """
    from php_runner.data import read_dataset
    from php_runner.engine.evaluate import extract_embeddings, score_embeddings
    from php_runner.engine.evaluation_model import prepare_for_evaluation
    from php_runner.model.checkpoint import load_model, read_official_yaml

    yaml_values = read_official_yaml(config) if config is not None else {}
    name, root = _check_options(yaml_values, dataset, data_root, order, coupling, encoder, precision)
    if save_embeddings is not None:
        check_output(save_embeddings, "--save-embeddings", inputs=[checkpoint, config])
    model, info = load_model(checkpoint, config)
    recipe = info["settings"]  # our checkpoints: evaluate as training evaluated, unless overridden
    split = read_dataset(root, name).test
    settings = prepare_for_evaluation(
        model,
        precision=precision or recipe.get("precision", "official"),
        device=device or "auto",
        batch_size=test_batch_size or int(recipe.get("test_batch_size", yaml_values.get("test_batch_size", 64))),
        encoder=encoder,
        order=order,
        coupling=coupling,
    )
    embeddings = extract_embeddings(model, split, settings)
    metrics = score_embeddings(embeddings)
    if save_embeddings is not None:
        _save_embeddings(embeddings, save_embeddings)
    result = {k: metrics[k] for k in METRIC_NAMES}
    if as_json:
        print_json(result)
    else:
        _print_metrics(result, f"{checkpoint} on {name} test ({settings.order} order, batch {settings.batch_size})")


def _check_options(
    yaml_values: dict,
    dataset: str | None,
    data_root: Path | None,
    order: str,
    coupling: str | None,
    encoder: str | None,
    precision: str | None,
) -> tuple[str, Path | str]:
    """Refuse a bad option in one line; return the dataset name and data root (configs.yaml's when not given)."""
    from php_runner.data import DATASET_NAMES
    from php_runner.model.precision import PRECISIONS

    name = dataset or yaml_values.get("dataset_name")
    if name not in DATASET_NAMES:
        raise InputError(f"--dataset: expected one of {', '.join(DATASET_NAMES)}, got {name!r}")
    root = data_root or yaml_values.get("root_dir")
    if root is None:
        raise InputError("--data-root: required when no configs.yaml gives root_dir")
    if order not in ("annotation", "shuffled"):
        raise InputError(f"--order: expected annotation or shuffled, got {order!r}")
    if coupling is not None and coupling not in ("official", "per-sample"):
        raise InputError(f"--coupling: expected official or per-sample, got {coupling!r}")
    if encoder is not None and encoder not in ("full", "base", "crfm", "efp"):
        raise InputError(f"--encoder: expected full, base, crfm or efp, got {encoder!r}")
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return name, root


def _print_metrics(result: dict[str, float], title: str) -> None:
    """One-row table of the metrics, three decimals."""
    view = Table(title=title)
    for column in METRIC_NAMES:
        view.add_column(column, justify="right")
    view.add_row(*(f"{result[m]:.3f}" for m in METRIC_NAMES))
    console.print(view)


def _save_embeddings(embeddings, path: Path) -> None:
    """Write the embeddings as an .npz atomically (temporary file in the same folder, then rename)."""
    import numpy as np

    from php_runner.files import atomic_path

    with atomic_path(path, suffix=".npz.tmp") as temporary, open(temporary, "wb") as handle:
        np.savez(handle, text=embeddings.text.numpy(), image=embeddings.image.numpy(),
                 text_pids=embeddings.text_pids.numpy(), image_pids=embeddings.image_pids.numpy())
