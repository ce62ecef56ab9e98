"""Building the library's objects from a resolved run config: the one CLIP-name factory, ``PHPConfig``,
``LossConfig``, ``TrainSettings``, the training dataset and the model, and the evaluation model of a checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from php_runner.errors import InputError
from php_runner.experiment.schema import CLIP_NAMES

if TYPE_CHECKING:
    pass


def clip_config(name: str):
    """The ``ClipConfig`` of a CLIP name (``model.clip``: a key of ``model.config.CLIP_PRESETS``)."""
    from php_runner.model.config import CLIP_PRESETS

    if name not in CLIP_PRESETS:
        raise InputError(f"model.clip: expected one of {', '.join(CLIP_NAMES)}, got {name!r}")
    return CLIP_PRESETS[name]


def build_php_config(model_section: dict, num_classes: int = 0):
    """``PHPConfig`` from the ``model`` section of a resolved config."""
    from php_runner.model.config import ClipConfig, PHPConfig

    fields = dict(model_section)
    clip = clip_config(fields.pop("clip", "ViT-B/16"))
    image_size = tuple(fields.pop("image_size", ClipConfig().image_size))
    try:
        return PHPConfig(clip=replace(clip, image_size=image_size), num_classes=num_classes, **fields)
    except (TypeError, ValueError) as err:
        raise InputError(f"model: {err}") from None


def build_loss_config(loss_section: dict):
    from php_runner.model.losses import LossConfig

    values = dict(loss_section)
    if "names" in values:
        values["names"] = tuple(values["names"])
    return LossConfig(**values)


def build_train_settings(config: dict):
    """``TrainSettings`` from the ``train``, ``loss`` and ``runtime`` sections and ``data.pipeline``."""
    from php_runner.engine.train import TrainSettings

    values = dict(config["train"])
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    runtime = config.get("runtime", {})
    try:
        return TrainSettings(
            **values,
            loss=build_loss_config(config["loss"]),
            device=runtime.get("device", "auto"),
            num_workers=runtime.get("num_workers", 0),
            compile=runtime.get("compile", False),
            cuda_graphs=runtime.get("cuda_graphs", False),
            # Runs recorded before data.pipeline existed were trained with the per-sample PIL loader.
            pipeline=config.get("data", {}).get("pipeline", "pil"),
        )
    except TypeError as err:  # an unknown key in the train or loss section
        raise InputError(f"train/loss: {err}") from None


def load_training_data(config: dict):
    from php_runner.data import read_dataset
    from php_runner.data.splits import hold_out_validation

    data = config["data"]
    dataset = read_dataset(config.get("runtime", {}).get("data_root") or ".", data["dataset"])
    if data.get("val_from_train", 0.0):
        dataset = hold_out_validation(dataset, data["val_from_train"], data.get("val_seed", 0))
    return dataset


def build_model(config: dict, num_classes: int):
    """The PHP model of ``config``; ViT-B/16 starts from the OpenAI weights in ``runtime.clip_weights``."""
    from php_runner.model.php import PHPModel

    uses_id_loss = "id" in config["loss"].get("names", ())
    php_config = build_php_config(config["model"], num_classes if uses_id_loss else 0)
    weights = config.get("runtime", {}).get("clip_weights")
    if config["model"].get("clip") != "ViT-B/16":
        return PHPModel(php_config)
    if not weights:
        raise InputError("runtime.clip_weights: the ViT-B/16 model needs the OpenAI weights (--clip-weights)")
    return PHPModel(php_config, clip_weights=weights)
