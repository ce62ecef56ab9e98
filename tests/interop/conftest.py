"""Fixtures for the interop tests: a real resolved run config (the shipped headline spec under the tiny
preset) and a checkpoint saved in the hash-addressed store as php-run's trainer saves ``best.pth``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from php_runner.model.checkpoint import CONFIG_KEY, config_to_dict, save_atomic
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel


# Architecture values that differ from each other and from the tiny preset's, so that a yaml key
# written from the wrong field cannot go unnoticed.
MODEL_CHANGES = {"cnum": 5, "num_experts": 4, "topk": 1, "reduction": 8, "efp_layers": 3, "efp_heads": 2}


@pytest.fixture(scope="session")
def planned_run(tiny_data_root):
    """The headline spec's RSTPReid run under the tiny preset, with ``MODEL_CHANGES``."""
    from php_runner.experiment.specs import expand, find_spec, load_spec

    runtime = {"data_root": str(tiny_data_root), "clip_weights": None, "device": "cpu", "num_workers": 0}
    (run,) = expand(load_spec(find_spec("headline")), "tiny", ["RSTPReid"], [1], runtime)
    run.config["model"].update(MODEL_CHANGES)
    return run


@pytest.fixture
def stored_checkpoint(tmp_path, planned_run) -> Path:
    """``checkpoints/<hash>/best.pth`` of a tiny model with the run's architecture, as train.py writes it."""
    assert planned_run.config["model"]["clip"] == "tiny"
    torch.manual_seed(3)
    model = PHPModel(PHPConfig.tiny(**MODEL_CHANGES))  # the run's architecture (the tests check it)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "experts" in name and name.endswith("up.weight"):  # not the identity at init
                parameter.normal_(0, 0.05)
    path = tmp_path / "checkpoints" / planned_run.config_hash[:12] / "best.pth"
    save_atomic({"model": model.state_dict(), CONFIG_KEY: config_to_dict(model.config), "epoch": 2, "num_epoch": 4,
                 "rule": "best-on-test", "metrics": {}, "settings": {"precision": "amp", "test_batch_size": 64}}, path)
    return path
