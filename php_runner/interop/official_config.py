"""The official ``configs.yaml`` of a php-run run: every option the official training writes (php_spec.md
section 8, ``yaml.dump(vars(args))``), valued from a resolved run config (docs/architecture.md).

The official ``test.py`` reads this file with PyYAML's FullLoader into an EasyDict and builds its data
loaders and model from it (spec 7); php-run reads it with ``read_official_yaml``. It is written with
``yaml.safe_dump``: ``img_size`` and ``milestones`` become plain lists instead of the official
``!!python/tuple`` tags, which both readers accept (and ``yaml.safe_load`` too, unlike the official
files). Options php-run has no counterpart for (MLM, id/mlm weights, the step scheduler's
``gamma``/``milestones``, ...) carry the official defaults; they are unused by the paper recipe.

One extra key, ``php_run``, holds the run's identity and its whole resolved config, so that a
php-run ``logs/`` tree can be imported back exactly; the official code ignores it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from php_runner.errors import InputError
from php_runner.files import write_atomic
from php_runner.model.config import CLIP_PRESETS

CONFIGS_YAML = "configs.yaml"
PHP_RUN_KEY = "php_run"
DEFAULT_LOG_PERIOD = 100

# Every key of an official configs.yaml (php_spec.md section 8, sorted as yaml.dump sorts them).
OFFICIAL_KEYS = (
    "MLM", "alpha", "aux_factor", "batch_size", "beta", "bias_lr_factor", "cmt_depth", "cnum", "dataset_name",
    "distributed", "eval_period", "gamma", "id_loss_weight", "img_aug", "img_size", "local_rank", "log_period",
    "loss_names", "lr", "lr_factor", "lrscheduler", "masked_token_rate", "masked_token_unchanged_rate",
    "milestones", "mlm_loss_weight", "moe_heads", "moe_layers", "moe_lr_factor", "momentum", "name", "num_epoch",
    "num_experts", "num_instance", "num_workers", "optimizer", "output_dir", "power", "pretrain_choice",
    "reduction", "resume", "resume_ckpt_file", "root_dir", "sampler", "stride_size", "target_lr", "temperature",
    "test_batch_size", "text_length", "topk", "training", "transformer_lr_factor", "val_dataset", "vocab_size",
    "warmup_epochs", "warmup_factor", "warmup_method", "weight_decay", "weight_decay_bias",
)

# Official options without a php-run counterpart, at the official defaults (unused by the paper recipe).
OFFICIAL_FIXED: dict[str, Any] = {
    "MLM": False, "cmt_depth": 4, "distributed": False, "gamma": 0.1, "id_loss_weight": 1.0, "local_rank": 0,
    "lrscheduler": "cosine", "masked_token_rate": 0.8, "masked_token_unchanged_rate": 0.1, "milestones": [20, 50],
    "mlm_loss_weight": 1.0, "num_instance": 4, "power": 0.9, "resume": False, "resume_ckpt_file": "",
    "sampler": "random", "target_lr": 0, "text_length": 77, "training": True, "vocab_size": 49408,
    "warmup_method": "linear",
}
OFFICIAL_OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


def _section(config: Mapping, name: str) -> Mapping:
    section = config.get(name)
    if not isinstance(section, Mapping):
        raise InputError(f"run config: no {name!r} section")
    return section


def _stride(clip_name: str) -> int:
    if clip_name not in CLIP_PRESETS:
        raise InputError(f"run config: model.clip: expected one of {', '.join(CLIP_PRESETS)}, got {clip_name!r}")
    return CLIP_PRESETS[clip_name].stride


def official_args(config: Mapping, *, output_dir: str | Path, name: str, log_period: int = DEFAULT_LOG_PERIOD,
                  identity: Mapping | None = None) -> dict[str, Any]:
    """The official options of ``config`` (a resolved run config) as the run folder ``output_dir``'s yaml.

    ``name`` is the official ``--name``; ``identity`` (run id, hash, spec, row, seed, preset) is stored
    with the whole config under ``php_run``. Paths are absolute, as the official trainer writes them.
    """
    model, loss, train, data = (_section(config, part) for part in ("model", "loss", "train", "data"))
    runtime = config.get("runtime") or {}
    try:
        betas = list(train["betas"])
        values = {
            **OFFICIAL_FIXED,
            "alpha": float(betas[0]), "beta": float(betas[1]),
            "aux_factor": float(loss["aux_factor"]), "temperature": float(loss["temperature"]),
            "loss_names": "+".join(loss["names"]),
            "batch_size": int(train["batch_size"]), "bias_lr_factor": float(train["bias_lr_factor"]),
            "eval_period": int(train["eval_period"]), "img_aug": bool(train["img_aug"]), "lr": float(train["lr"]),
            "lr_factor": float(train["lr_factor"]), "moe_lr_factor": float(train["moe_lr_factor"]),
            "momentum": float(train["momentum"]), "num_epoch": int(train["epochs"]),
            "optimizer": OFFICIAL_OPTIMIZERS[train["optimizer"]], "test_batch_size": int(train["test_batch_size"]),
            "transformer_lr_factor": float(train["transformer_lr_factor"]),
            # The official code selects on the split it evaluates; php-run's "last" rule evaluates on test.
            "val_dataset": "val" if train["selection"] == "val" else "test",
            "warmup_epochs": int(train["warmup_epochs"]), "warmup_factor": float(train["warmup_factor"]),
            "weight_decay": float(train["weight_decay"]), "weight_decay_bias": float(train["weight_decay_bias"]),
            "cnum": int(model["cnum"]), "num_experts": int(model["num_experts"]), "topk": int(model["topk"]),
            "reduction": int(model["reduction"]), "moe_layers": int(model["efp_layers"]),
            "moe_heads": int(model["efp_heads"]), "img_size": [int(v) for v in model["image_size"]],
            "stride_size": _stride(model["clip"]), "pretrain_choice": str(model["clip"]),
            "dataset_name": str(data["dataset"]),
        }
    except KeyError as missing:
        raise InputError(f"run config: missing field {missing.args[0]!r}") from None
    values.update(
        name=name, log_period=int(log_period), output_dir=str(Path(output_dir).absolute()),
        root_dir=str(Path(runtime.get("data_root") or ".").absolute()), num_workers=int(runtime.get("num_workers", 0)),
    )
    values[PHP_RUN_KEY] = {**(identity or {}), "config": _plain(config)}
    return values


def _plain(value: Any) -> Any:
    """Plain YAML data: mappings, lists, scalars (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def configs_yaml_text(args: Mapping[str, Any]) -> str:
    """``yaml.safe_dump`` of ``args`` with sorted keys, as the official file sorts them."""
    return yaml.safe_dump(_plain(args), sort_keys=True, default_flow_style=False)


def write_configs_yaml(folder: str | Path, args: Mapping[str, Any]) -> Path:
    """Write ``folder/configs.yaml`` atomically; returns its path."""
    return write_atomic(Path(folder) / CONFIGS_YAML, configs_yaml_text(args).encode("utf-8"))


def php_run_identity(yaml_values: Mapping) -> dict | None:
    """The ``php_run`` section of a configs.yaml written here (None for an official file): what an importer
    needs to recognise a php-run folder and restore its resolved config exactly."""
    section = yaml_values.get(PHP_RUN_KEY)
    return dict(section) if isinstance(section, Mapping) and isinstance(section.get("config"), Mapping) else None
