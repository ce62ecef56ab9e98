"""Guards that stay red when a realistic bug is planted (issue 24, items 21 and the weak guards): every
field the shipped ablations vary reaches the object it configures, each hashed field changes the config
hash and no runtime field does, and a finished run is never claimed again."""

from __future__ import annotations

import copy
import time

import pytest
from pydantic import BaseModel

from php_runner.experiment.build import (
    build_loss_config,
    build_php_config,
    build_train_settings,
)
from php_runner.experiment.expand import config_hash
from php_runner.experiment.schema import PlannedRun, RunConfig
from php_runner.experiment.specs import expand, load_all_specs
from php_runner.store.registry import Registry

SPECS = load_all_specs()
ABLATED = sorted({(name, key) for name, spec in SPECS.items() for point in spec.points for key in point.values})


def built_objects(config: dict) -> dict:
    """The library objects a run is built from: ``PHPConfig``, ``LossConfig`` (as the training uses it) and
    ``TrainSettings``, by the config section each is configured from."""
    settings = build_train_settings(config)
    return {"model": build_php_config(config["model"]), "loss": settings.loss, "train": settings,
            "loss_config": build_loss_config(config["loss"])}


def as_built(value):
    return tuple(value) if isinstance(value, list) else value


def test_the_shipped_ablations_vary_fields_of_every_kind():
    assert {key.split(".")[0] for _, key in ABLATED} >= {"model", "loss"}
    assert {key for _, key in ABLATED} >= {"model.cnum", "loss.names", "model.variant", "loss.aux_factor",
                                           "model.sharing", "model.coupling"}


@pytest.mark.parametrize("spec_name, key", ABLATED, ids=[f"{s}-{k}" for s, k in ABLATED])
def test_every_ablated_field_reaches_the_object_it_configures(spec_name, key):
    section, field = key.split(".")
    planned = expand(SPECS[spec_name], "tiny", datasets=["RSTPReid"], seeds=[1], runtime={"data_root": "."})
    seen = {}
    for plan in planned:
        point = next(p for p in SPECS[spec_name].points if p.label == plan.row_label)
        wanted = as_built(point.values[key])
        objects = built_objects(plan.config)
        assert getattr(objects[section], field) == wanted, (plan.row_label, key)
        if section == "loss":
            assert getattr(objects["loss_config"], field) == wanted
        seen[repr(wanted)] = plan.config_hash
    # Each value is its own experiment: no two grid values train the same recipe.
    assert len(set(seen.values())) == len(seen) == len({repr(as_built(p.values[key])) for p in SPECS[spec_name].points})


def test_a_loss_or_train_field_set_in_a_spec_reaches_the_settings(tmp_path):
    """Beyond the shipped grids: every loss and train field a spec may set arrives in the settings."""
    spec = SPECS["headline"]
    config = expand(spec, "tiny", datasets=["RSTPReid"], seeds=[3], runtime={"data_root": "."})[0].config
    changed = copy.deepcopy(config)
    changed["loss"].update(aux_factor=1.75, temperature=0.07, itc_weight=2.5)
    changed["train"].update(lr=3.5e-6, epochs=7)
    objects = built_objects(changed)
    assert (objects["loss"].aux_factor, objects["loss"].temperature, objects["loss"].itc_weight) == (1.75, 0.07, 2.5)
    assert (objects["train"].lr, objects["train"].epochs, objects["train"].seed) == (3.5e-6, 7, 3)


# ---- the config hash, field by field -----------------------------------------------------------------

def leaves(value, path=()):
    if isinstance(value, dict):
        for key, child in value.items():
            yield from leaves(child, (*path, key))
    else:
        yield path


def schema_fields(model: type[BaseModel], path=()):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from schema_fields(annotation, (*path, name))
        else:
            yield (*path, name)


def changed_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, value[0] if value else 1]
    return "set"  # None


def set_path(config: dict, path: tuple, value) -> dict:
    changed = copy.deepcopy(config)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


RESOLVED = expand(SPECS["headline"], "tiny", datasets=["RSTPReid"], seeds=[1], runtime={"data_root": "."})[0].config
# runtime.overrides is written only when the command line set some (provenance, outside the hash).
OVERRIDES = ("runtime", "overrides")
FIELDS = [path for path in schema_fields(RunConfig) if path != OVERRIDES]


def test_recorded_overrides_leave_the_hash_unchanged():
    with_overrides = copy.deepcopy(RESOLVED)
    with_overrides["runtime"]["overrides"] = {"train.lr": 1e-5}
    assert config_hash(with_overrides) == config_hash(RESOLVED)


def test_the_resolved_config_holds_every_field_of_the_schema():
    assert sorted(leaves(RESOLVED)) == sorted(FIELDS)


@pytest.mark.parametrize("path", FIELDS, ids=[".".join(p) for p in FIELDS])
def test_each_hashed_field_changes_the_hash_and_no_runtime_field_does(path):
    original = config_hash(RESOLVED)
    changed = config_hash(set_path(RESOLVED, path, changed_value(_get(RESOLVED, path))))
    if path[0] == "runtime":
        assert changed == original, f"{'.'.join(path)} is a runtime field and must not change the hash"
    else:
        assert changed != original, f"{'.'.join(path)} must change the hash"


def _get(config: dict, path: tuple):
    for key in path:
        config = config[key]
    return config


# ---- a finished run is never claimed again ---------------------------------------------------------------

def _planned(seed: int) -> PlannedRun:
    config = {"model": {"cnum": 9}, "train": {"seed": seed}, "data": {"dataset": "CUHK-PEDES"},
              "runtime": {"data_root": "data"}}
    return PlannedRun(config=config, config_hash=f"{seed:02d}" + "cd" * 31, spec_name="cnum", table="cnum",
                      row_label="9", dataset="CUHK-PEDES", seed=seed, preset="paper")


def test_a_done_run_is_never_claimed_again(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", stale_after=0.0)
    run = registry.plan_run(_planned(1))
    assert registry.claim_run(run.id, "w1")
    registry.mark_done(run.id)
    time.sleep(0.01)  # every heartbeat is now older than stale_after
    assert not registry.claim_run(run.id, "w2")
    assert not registry.claim_run(run.id, "w2", stale_after=0.0)
    assert registry.claim_next("w2") is None
    assert registry.claim_next("w2", stale_after=0.0) is None
    assert registry.claim_next("w2", run_ids=[run.id]) is None
    assert registry.get_run(run.id).status == "done" and registry.get_run(run.id).worker == "w1"
    registry.close()
