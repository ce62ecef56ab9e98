"""Checkpoint files: safe loading of official ``best.pth`` / ``configs.yaml``, architecture inference from
a state dict, the official suffix-matching loader made strict (spec 3.6), and atomic saving.

Nothing here unpickles arbitrary objects: ``.pth`` files go through ``torch.load(weights_only=True)`` and
YAML through a SafeLoader that additionally builds tuples (the official files tag ``img_size`` and
``milestones`` as ``!!python/tuple``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from php_runner.data.limits import MAX_NESTING, value_depth
from php_runner.errors import InputError
from php_runner.files import atomic_path
from php_runner.model.clip import clip_config_from_state_dict
from php_runner.model.config import ClipConfig, PHPConfig
from php_runner.model.php import PHPModel
from php_runner.model.precision import PRECISIONS

COUNTER_SUFFIXES = ("feed_forward.expert_count_accum", "feed_forward.token_count_accum")  # R1 builds only
CONFIG_KEY = "config"  # where our own checkpoints store ``config_to_dict(model.config)``
DEFAULT_IMAGE_SIZE = (384, 128)
DEFAULT_STRIDE = 16
DEFAULT_TOPK = 2
DEFAULT_EFP_HEADS = 8
_CLIP_FIELDS = {f.name for f in dataclasses.fields(ClipConfig)}
_PHP_FIELDS = {f.name for f in dataclasses.fields(PHPConfig)} - {"clip"}
MAX_DIMENSION = 2**31 - 1


class CheckpointError(InputError):
    """A checkpoint or official config file that is unsafe, unreadable or does not fit the model."""


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _preview(keys: list[str], shown: int = 3) -> str:
    more = f", +{len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


# torch.save writes a zip archive holding <name>/data.pkl; its legacy format starts with a pickled magic number.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:-1]


def _not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a torch.save file (None when its container looks like one)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any(name.rsplit("/", 1)[-1] == "data.pkl" for name in archive.namelist()):
                    return None
            return "a zip archive without data.pkl"
    except (OSError, zipfile.BadZipFile) as error:
        return f"unreadable: {_first_line(error)}"
    if not head:
        return "empty file"
    if head[:1] == b"\x80" and head[2:].startswith(_LEGACY_MAGIC):
        return None
    if head.startswith(b"PK"):
        return "a damaged or truncated zip archive"
    return "neither a torch.save zip archive nor a legacy torch file"


def load_checkpoint_file(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` on CPU; pickled code is refused before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    problem = _not_a_checkpoint(path)
    if problem:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({problem})")
    try:
        with warnings.catch_warnings():  # sparse tensors are refused below; torch's note on checking them is noise
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every reader failure becomes one line naming the file
        raise CheckpointError(f"{path}: refused to load ({_first_line(error)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(payload).__name__}")
    return payload


class OfficialYamlLoader(yaml.SafeLoader):
    """SafeLoader plus ``!!python/tuple``; every other python tag stays an error."""


OfficialYamlLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
)


def read_official_yaml(path: str | Path) -> dict:
    """An official ``configs.yaml`` as plain data (tuples for the tagged sequences)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.load(handle, Loader=OfficialYamlLoader)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or _first_line(error)
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise CheckpointError(f"{path}: refused YAML{where} ({' '.join(str(problem).split())})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read ({_first_line(error)})") from None
    except RecursionError:  # the YAML composer recurses once per level of nesting
        raise CheckpointError(f"{path}: YAML nested too deep for the parser (the limit is {MAX_NESTING.value()} "
                              f"levels, ${MAX_NESTING.env})") from None
    if value_depth(values) > MAX_NESTING.value():
        raise CheckpointError(f"{path}: YAML nested more than the limit of {MAX_NESTING.value()} levels "
                              f"(${MAX_NESTING.env})")
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a mapping at the top level")
    _check_yaml_fields(path, values)
    return values


# The configs.yaml options php-run reads, by kind (the official file holds more, left unread).
_YAML_COUNTS = ("topk", "moe_heads", "cnum", "num_experts", "moe_layers", "stride_size", "batch_size",
                "test_batch_size", "num_epoch", "eval_period")
_YAML_NUMBERS = ("lr", "alpha", "beta", "momentum", "temperature", "aux_factor", "weight_decay", "weight_decay_bias",
                 "bias_lr_factor", "lr_factor", "transformer_lr_factor", "moe_lr_factor", "warmup_factor",
                 "warmup_epochs")
_YAML_STRINGS = ("dataset_name", "root_dir", "loss_names", "optimizer", "val_dataset")


def _check_yaml_fields(path: Path, values: dict) -> None:
    """Each option php-run reads has the type it is read as; one line naming the file and the option."""
    for key in _YAML_COUNTS:
        if key in values and not _is_count(values[key]):
            raise CheckpointError(f"{path}: {key}: expected a positive integer, got {values[key]!r}")
    for key in _YAML_NUMBERS:
        value = values.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{path}: {key}: expected a finite number, got {value!r}")
    for key in _YAML_STRINGS:
        if key in values and not isinstance(values[key], str):
            raise CheckpointError(f"{path}: {key}: expected a string, got {values[key]!r}")
    size = values.get("img_size", DEFAULT_IMAGE_SIZE)
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_count(v) for v in size)):
        raise CheckpointError(f"{path}: img_size: expected two positive integers (height, width), got {size!r}")


def extract_state_dict(payload: dict) -> dict[str, Tensor]:
    """The state dict under ``payload["model"]`` (or the payload itself); a ``module.`` prefix carried by
    every key is stripped. Counter buffers are kept (see ``split_counters``)."""
    state_dict = payload.get("model", payload) if isinstance(payload, dict) else payload
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError("checkpoint: no state dict (expected a non-empty 'model' mapping)")
    not_strings = [key for key in state_dict if not isinstance(key, str)]
    if not_strings:
        raise CheckpointError(f"checkpoint: state dict keys are not strings: {_preview(sorted(map(repr, not_strings)))}")
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise CheckpointError(f"checkpoint: state dict entries are not tensors: {_preview(sorted(map(str, not_tensors)))}")
    not_dense = [key for key, value in state_dict.items() if value.layout != torch.strided or value.is_meta]
    if not_dense:
        raise CheckpointError(f"checkpoint: state dict entries are not dense tensors: {_preview(sorted(not_dense))}")
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def split_counters(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """Separate the R1 usage-counter buffers (which the model does not hold) from the weights."""
    weights, counters = {}, {}
    for key, value in state_dict.items():
        if key.endswith(COUNTER_SUFFIXES):
            counters[key] = [int(v) for v in value.reshape(-1).tolist()]
        else:
            weights[key] = value
    return weights, counters


def config_to_dict(config: PHPConfig) -> dict[str, Any]:
    """A JSON-able form of ``config`` to store under ``CONFIG_KEY`` in our checkpoints."""
    values = dataclasses.asdict(config)
    values["clip"]["image_size"] = list(config.clip.image_size)
    return values


def _flatten_stored_config(stored: dict) -> dict[str, Any]:
    flat = {key: value for key, value in stored.items() if key in _PHP_FIELDS}
    flat.update({key: value for key, value in (stored.get("clip") or {}).items() if key in _CLIP_FIELDS})
    return flat


def _stored_config(path: Path, payload: dict) -> dict[str, Any]:
    """The architecture fields a php-run checkpoint stores under ``config``, each type-checked."""
    if CONFIG_KEY not in payload:
        return {}
    stored = payload[CONFIG_KEY]
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: {CONFIG_KEY}: expected a mapping of model fields, found {type(stored).__name__}")
    if not isinstance(stored.get("clip", {}), dict):
        raise CheckpointError(f"{path}: {CONFIG_KEY}.clip: expected a mapping of CLIP fields, "
                              f"found {type(stored['clip']).__name__}")
    flat = _flatten_stored_config(stored)
    for key, value in flat.items():
        field = f"{CONFIG_KEY}.{'clip.' if key in _CLIP_FIELDS else ''}{key}"
        if key == "image_size":
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_count(v) for v in value)):
                raise CheckpointError(f"{path}: {field}: expected two positive integers, got {value!r}")
        elif key in ("variant", "sharing", "coupling"):
            if not isinstance(value, str):
                raise CheckpointError(f"{path}: {field}: expected a string, got {value!r}")
        elif not _is_count(value, minimum=0 if key == "num_classes" else 1):
            raise CheckpointError(f"{path}: {field}: expected a {'non-negative' if key == 'num_classes' else 'positive'} "
                                  f"integer, got {value!r}")
    return flat


def _stored_settings(path: Path, payload: dict) -> dict[str, Any]:
    """The training recipe a php-run checkpoint stores under ``settings``; the fields evaluation reads checked."""
    settings = payload.get("settings")
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: settings: expected a mapping, found {type(settings).__name__}")
    if "precision" in settings and settings["precision"] not in PRECISIONS:
        raise CheckpointError(f"{path}: settings.precision: expected one of {', '.join(PRECISIONS)}, "
                              f"got {settings['precision']!r}")
    if "test_batch_size" in settings and not _is_count(settings["test_batch_size"]):
        raise CheckpointError(f"{path}: settings.test_batch_size: expected a positive integer, "
                              f"got {settings['test_batch_size']!r}")
    return dict(settings)


def _is_count(value: Any, minimum: int = 1) -> bool:
    """An int (not a bool) in ``[minimum, 2**31 - 1]``: every such field becomes a tensor dimension."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= MAX_DIMENSION


def _block_count(state_dict: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"resblocks\.(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def infer_config(state_dict: dict[str, Tensor], yaml_values: dict | None = None, **overrides) -> PHPConfig:
    """The architecture from the weights; topk, heads and input size from the yaml or official defaults.

    ``overrides`` may name any ``PHPConfig`` or ``ClipConfig`` field and wins over everything else.
    """
    try:
        return _infer_config(state_dict, yaml_values, **overrides)
    except (IndexError, ValueError, ZeroDivisionError) as error:  # a tensor with too few dimensions, or an empty one
        raise CheckpointError(f"checkpoint: the weights' shapes do not describe a PHP model ({_first_line(error)})") from None


def _infer_config(state_dict: dict[str, Tensor], yaml_values: dict | None, **overrides) -> PHPConfig:
    yaml_values = yaml_values or {}
    unknown = sorted(set(overrides) - _PHP_FIELDS - _CLIP_FIELDS)
    if unknown:
        raise CheckpointError(f"unknown config overrides: {', '.join(unknown)}")
    if "safl.part_tokens" in state_dict:
        sharing, crfm, efp = "shared", "safl.", "shared_transformer."
    elif "saflv.part_tokens" in state_dict:
        sharing, crfm, efp = "separate", "saflv.", "shared_transformerv."
    else:
        raise CheckpointError("checkpoint: neither safl.part_tokens nor saflv.part_tokens present; not a PHP state dict")
    try:
        part_tokens = state_dict[crfm + "part_tokens"]
        input_gate = state_dict[efp + "resblocks.0.feed_forward.input_gate.weight"]
        down = state_dict[efp + "resblocks.0.feed_forward.experts.0.down.weight"]
    except KeyError as missing:
        raise CheckpointError(f"checkpoint: missing key {missing.args[0]}") from None
    clip_state = {key[len("base_model."):]: value for key, value in state_dict.items() if key.startswith("base_model.")}
    image_size = tuple(overrides.get("image_size", yaml_values.get("img_size", DEFAULT_IMAGE_SIZE)))
    stride = int(overrides.get("stride", yaml_values.get("stride_size", DEFAULT_STRIDE)))
    clip_overrides = {key: value for key, value in overrides.items() if key in _CLIP_FIELDS - {"image_size", "stride"}}
    try:
        clip = clip_config_from_state_dict(clip_state, image_size=image_size, stride=stride, **clip_overrides)
    except InputError as error:
        raise CheckpointError(f"checkpoint base_model: {error}") from None
    table = clip_state.get("visual.positional_embedding")
    if table is not None and table.shape[0] != clip.grid[0] * clip.grid[1] + 1:
        raise CheckpointError(
            f"checkpoint: visual.positional_embedding has {table.shape[0]} rows but image size {image_size} "
            f"with stride {stride} needs {clip.grid[0] * clip.grid[1] + 1}; pass the training image size"
        )
    width = part_tokens.shape[1]
    values: dict[str, Any] = dict(
        cnum=part_tokens.shape[0],
        num_experts=input_gate.shape[0],
        topk=int(yaml_values.get("topk", DEFAULT_TOPK)),
        reduction=width // down.shape[0],
        efp_layers=_block_count(state_dict, efp),
        efp_heads=int(yaml_values.get("moe_heads", DEFAULT_EFP_HEADS)),
        sharing=sharing,
        num_classes=state_dict["classifier.weight"].shape[0] if "classifier.weight" in state_dict else 0,
    )
    for yaml_key, field in (("cnum", "cnum"), ("num_experts", "num_experts"), ("moe_layers", "efp_layers")):
        if yaml_key in yaml_values and int(yaml_values[yaml_key]) != values[field]:
            raise CheckpointError(f"configs.yaml: {yaml_key} = {yaml_values[yaml_key]} but the weights have {values[field]}")
    values.update({key: value for key, value in overrides.items() if key in _PHP_FIELDS})
    try:
        return PHPConfig(clip=clip, **values)
    except ValueError as error:
        raise CheckpointError(f"checkpoint config: {error}") from None


def fitted_state_dict(model: torch.nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Spec 3.6 made strict: each model key takes the longest checkpoint key that is a dotted suffix of it;
    any model key left unmatched or checkpoint key left unused is an error naming them. Returns the model's
    keys filled from ``state_dict`` (R1 counter buffers ignored); ``model`` may live on the meta device."""
    weights, _ = split_counters(state_dict)
    own = model.state_dict()
    chosen: dict[str, str] = {}
    for key in own:
        parts = key.split(".")
        for start in range(len(parts)):
            candidate = ".".join(parts[start:])
            if candidate in weights:
                chosen[key] = candidate
                break
    missing = [key for key in own if key not in chosen]
    unexpected = sorted(set(weights) - set(chosen.values()))
    mismatched = [
        f"{key} {tuple(weights[chosen[key]].shape)} vs {tuple(own[key].shape)}"
        if weights[chosen[key]].shape != own[key].shape else f"{key} {weights[chosen[key]].dtype} vs {own[key].dtype}"
        for key in chosen
        if weights[chosen[key]].shape != own[key].shape or weights[chosen[key]].is_complex() != own[key].is_complex()
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys ({_preview(missing)})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys ({_preview(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape or dtype mismatches ({_preview(mismatched)})")
    if problems:
        raise CheckpointError(f"{source}: state dict does not fit the model: {'; '.join(problems)}")
    fitted = {key: weights[chosen[key]] for key in own}
    # Checked once the shapes are the model's: a stride-0 view of one number may claim any size.
    not_finite = sorted(chosen[key] for key, value in fitted.items()
                        if value.is_floating_point() and not bool(torch.isfinite(value).all()))
    if not_finite:
        raise CheckpointError(f"{source}: weights are not finite (NaN or inf in {_preview(not_finite)}); the file is damaged "
                              "or the run diverged")
    return fitted


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """``fitted_state_dict`` loaded into ``model``; values are cast to the model's dtypes."""
    model.load_state_dict(fitted_state_dict(model, state_dict, source), strict=True)


def load_model(path: str | Path, yaml_path: str | Path | None = None, **overrides) -> tuple[PHPModel, dict]:
    """Build the model a checkpoint describes (no CLIP weights needed) and load it; fp32 weights.

    Precedence of settings: ``overrides`` > the checkpoint's stored config (our own files) > the yaml >
    defaults. Returns ``(model, info)`` with the epoch, R1 counters, scheduler base lrs, the config and
    the training settings stored by php-run (``info["settings"]``).
    """
    path = Path(path)
    payload = load_checkpoint_file(path)
    yaml_values = read_official_yaml(yaml_path) if yaml_path is not None else None
    settings = {**_stored_config(path, payload), **overrides}
    recipe = _stored_settings(path, payload)
    try:
        weights, counters = split_counters(extract_state_dict(payload))
        config = infer_config(weights, yaml_values, **settings)
    except CheckpointError as error:  # their messages name the field, not the file
        raise CheckpointError(f"{path}: {error}") from None
    with torch.device("meta"):
        model = PHPModel(config)
    model = model.to_empty(device="cpu")  # every tensor is then written by the strict load below
    load_state_dict_checked(model, weights, source=str(path))
    scheduler = payload.get("scheduler")
    info = {
        "path": str(path),
        "config": config_to_dict(config),
        "epoch": payload.get("epoch"),
        "num_epoch": payload.get("num_epoch"),
        "counters": counters,
        "scheduler_base_lrs": scheduler.get("base_lrs") if isinstance(scheduler, dict) else None,
        "has_optimizer": "optimizer" in payload,
        "yaml": yaml_values,
        # The training recipe our own checkpoints carry (precision, test batch size, ...); empty for official files.
        "settings": recipe,
    }
    return model, info


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the destination folder, then ``os.replace``."""
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        torch.save(obj, stream)
        stream.flush()
        os.fsync(stream.fileno())
