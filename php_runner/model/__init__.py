"""PHP model library: configuration, CLIP backbone, PHP head, losses, precision regimes, checkpoints."""

from php_runner.model.checkpoint import (
    CheckpointError,
    config_to_dict,
    extract_state_dict,
    infer_config,
    load_checkpoint_file,
    load_model,
    load_state_dict_checked,
    read_official_yaml,
    save_atomic,
    split_counters,
)
from php_runner.model.clip import CLIP, ClipWeightsError, read_clip_state_dict, resize_visual_positional_embedding
from php_runner.model.config import COUPLINGS, SHARINGS, VARIANTS, ClipConfig, PHPConfig
from php_runner.model.losses import LOSS_NAMES, LossConfig, compute_losses
from php_runner.model.php import ENCODERS, PHPModel, PHPOutput
from php_runner.model.precision import PRECISIONS, apply_precision, autocast_context

__all__ = [
    "CLIP",
    "COUPLINGS",
    "ENCODERS",
    "LOSS_NAMES",
    "PRECISIONS",
    "SHARINGS",
    "VARIANTS",
    "CheckpointError",
    "ClipConfig",
    "ClipWeightsError",
    "LossConfig",
    "PHPConfig",
    "PHPModel",
    "PHPOutput",
    "apply_precision",
    "autocast_context",
    "compute_losses",
    "config_to_dict",
    "extract_state_dict",
    "infer_config",
    "load_checkpoint_file",
    "load_model",
    "load_state_dict_checked",
    "read_clip_state_dict",
    "read_official_yaml",
    "resize_visual_positional_embedding",
    "save_atomic",
    "split_counters",
]
