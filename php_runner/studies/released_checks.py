"""Checks of a released checkpoint against its configs.yaml and its folder name, and which solver trained it.

``infer_released_config`` reads the architecture from the weights; ``disagreements`` lists every
contradiction between the yaml, the weights and the folder name; ``solver_era`` reads from the
scheduler's ``base_lrs`` whether the V1-era or the HEAD (IRRA) solver built the optimiser groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from php_runner.engine.optim import param_group_rule
from php_runner.model.checkpoint import COUNTER_SUFFIXES
from php_runner.model.config import CLIP_PRESETS, PHPConfig
from php_runner.studies.released import FolderMeaning

# Substrings of the parameters that only the V1-era solver gives their own learning rate (spec 5).
MOE_KEYS = ("feed_forward.experts", "feed_forward.input_gate", "feed_forward.task_gate")


def is_counter_buffer(key: str) -> bool:
    """True for the R1 MoE usage counters: buffers, so no optimiser group has them."""
    return key.endswith(COUNTER_SUFFIXES)


def parameter_names(state_dict: dict) -> list[str]:
    """The checkpoint's parameter names in state-dict order, which is the optimiser's group order."""
    return [key for key in state_dict if not is_counter_buffer(key)]


def infer_released_config(state_dict: dict, yaml_values: dict) -> PHPConfig:
    """The checkpoint's architecture, with topk, heads and input size from the yaml.

    The yaml's cnum, num_experts and moe_layers are left out: ``disagreements`` compares them with the
    weights and reports every contradiction at once. CLIP head counts are not in any shape, so they
    come from the named backbone whose widths the weights have.
    """
    from php_runner.model.checkpoint import CheckpointError, infer_config

    conv = state_dict.get("base_model.visual.conv1.weight")
    projection = state_dict.get("base_model.text_projection")
    widths = None if conv is None or projection is None else (conv.shape[0], *projection.shape)
    named = next((clip for clip in CLIP_PRESETS.values()
                  if widths == (clip.vision_width, clip.text_width, clip.embed_dim)), None)
    if named is None:
        raise CheckpointError(f"checkpoint: backbone widths {widths} match neither {', '.join(CLIP_PRESETS)}")
    shape_keys = ("cnum", "num_experts", "moe_layers")
    return infer_config(state_dict, {key: value for key, value in yaml_values.items() if key not in shape_keys},
                        vision_heads=named.vision_heads, text_heads=named.text_heads)


def disagreements(
    meaning: FolderMeaning, dataset: str, yaml_values: dict, inferred: PHPConfig
) -> list[str]:
    """Where the yaml, the checkpoint's shapes and the folder name contradict each other."""
    problems = []
    yaml_vs_checkpoint = (("cnum", "cnum"), ("num_experts", "num_experts"), ("moe_layers", "efp_layers"),
                          ("reduction", "reduction"))
    for yaml_key, config_field in yaml_vs_checkpoint:
        if yaml_key in yaml_values and yaml_values[yaml_key] != getattr(inferred, config_field):
            problems.append(f"configs.yaml {yaml_key} {yaml_values[yaml_key]} but the checkpoint has "
                            f"{getattr(inferred, config_field)}")
    if meaning.cnum is not None and yaml_values.get("cnum") != meaning.cnum:
        problems.append(f"the folder name means cnum {meaning.cnum} but configs.yaml has {yaml_values.get('cnum')}")
    if meaning.loss_names is not None:
        yaml_losses = frozenset(str(yaml_values.get("loss_names", "")).split("+"))
        if yaml_losses != meaning.loss_names:
            problems.append(f"the folder name means losses {'+'.join(sorted(meaning.loss_names))} but "
                            f"configs.yaml has {yaml_values.get('loss_names')}")
    if inferred.sharing != meaning.sharing:
        problems.append(f"the folder name means {meaning.sharing} CRFM/EFP but the checkpoint's keys are "
                        f"{inferred.sharing}")
    if yaml_values.get("dataset_name", dataset) != dataset:
        problems.append(f"the folder is under {dataset} but configs.yaml has dataset_name "
                        f"{yaml_values['dataset_name']}")
    return problems


# ----------------------------------------------------------------------------------------------
# Which solver trained the checkpoint


@dataclass(frozen=True)
class SolverEra:
    """``v1`` (transformer/MoE lr groups), ``head`` (IRRA rules) or ``unknown``, with the evidence."""

    era: str
    evidence: str


# yaml option -> keyword of optim.param_group_rule
_RULE_OPTIONS = ("weight_decay", "weight_decay_bias", "bias_lr_factor", "lr_factor", "transformer_lr_factor",
                 "moe_lr_factor")


def solver_era(scheduler: Any, names: Sequence[str], yaml_values: dict) -> SolverEra:
    """Which solver version built the optimiser groups, read from the scheduler's ``base_lrs`` (spec 5, 8).

    The MoE weight groups decide: at lr x moe_lr_factor only the V1-era solver puts them, at lr only
    the HEAD (IRRA) solver. The evidence also says whether every other group follows that solver's rules.
    """
    base_lrs = scheduler.get("base_lrs") if isinstance(scheduler, dict) else None
    if not base_lrs:
        return SolverEra("unknown", "the checkpoint has no scheduler base_lrs")
    if len(base_lrs) != len(names):
        return SolverEra("unknown", f"{len(base_lrs)} scheduler groups for {len(names)} parameters")
    missing = [key for key in ("lr", *_RULE_OPTIONS) if key not in yaml_values]
    if missing:
        return SolverEra("unknown", f"configs.yaml has no {', '.join(missing)}")
    lr = float(yaml_values["lr"])
    options = {key: float(yaml_values[key]) for key in _RULE_OPTIONS}
    moe_factor = options["moe_lr_factor"]
    moe_ratios = sorted({
        round(float(base) / lr, 6) for name, base in zip(names, base_lrs)
        if any(key in name for key in MOE_KEYS) and "bias" not in name
    })
    seen = f"MoE weight groups at {' / '.join(f'{ratio:g}' for ratio in moe_ratios) or 'no'} x lr"
    if moe_factor == 1:
        return SolverEra("unknown", f"{seen}: with moe_lr_factor 1 both solvers give them the base lr")
    if moe_ratios == [round(moe_factor, 6)]:
        era, rule = "v1", f"V1-era solver (moe_lr_factor {moe_factor:g})"
    elif moe_ratios == [1.0]:
        era, rule = "head", "HEAD/IRRA solver (no MoE lr group)"
    else:
        return SolverEra("unknown", f"{seen}: neither lr nor lr x moe_lr_factor ({moe_factor:g})")
    differ = sum(
        not math.isclose(float(base), param_group_rule(name, lr, solver=era, **options)[0], rel_tol=1e-6)
        for name, base in zip(names, base_lrs)
    )
    rest = f"all {len(names)} groups follow its rules" if not differ else \
        f"{differ} of {len(names)} groups differ from its rules"
    return SolverEra(era, f"{seen}: {rule}; {rest}")
