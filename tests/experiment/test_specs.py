"""Spec loading: inheritance, validation errors, grids, presets, expansion and config hashing."""

import dataclasses
import shutil
from pathlib import Path

import pytest

from php_runner.engine.train import TrainSettings
from php_runner.errors import InputError
from php_runner.model.config import PHPConfig
from php_runner.model.losses import LossConfig
from php_runner.experiment.schema import DataSection, ModelSection, LossSection, RunConfig, RuntimeSection, TrainSection
from php_runner.experiment.build import build_train_settings
from php_runner.experiment.expand import config_hash, override
from php_runner.experiment.specs import (
    expand,
    find_spec,
    load_all_specs,
    load_spec,
    shipped_folder,
    shipped_spec_names,
    with_overrides,
)

EXPERIMENTS = shipped_folder()
RUNTIME = {"data_root": "/data", "clip_weights": "/w/ViT-B-16.pt", "device": None, "num_workers": None}

# A fixed resolved config and its hash: the hash must never change for the same experiment.
GOLDEN_CONFIG = {
    "model": {"clip": "tiny", "image_size": [48, 24], "cnum": 3, "num_experts": 4, "topk": 2, "reduction": 4,
              "efp_layers": 2, "efp_heads": 2, "variant": "full", "sharing": "shared", "coupling": "official"},
    "loss": {"names": ["sdm", "itc", "aux"], "temperature": 0.02, "itc_weight": 5.0, "aux_factor": 0.5},
    "train": {"epochs": 4, "batch_size": 16, "lr": 0.001, "seed": 1},
    "data": {"dataset": "CUHK-PEDES", "source": "synthetic", "val_from_train": 0.0, "val_seed": 0, "pipeline": "cache"},
    "runtime": {"data_root": "data", "clip_weights": None, "device": "auto", "num_workers": 0},
}
GOLDEN_HASH = "cb5b9a90b88e910aef5e077f16fd8eb829707f0ae20167d673e30830d1ae8391"  # data.pipeline added (issue 11)


@pytest.fixture
def folder(tmp_path):
    """A spec folder with the shipped base recipe and presets, for specs written by each test."""
    for name in ("base.toml", "presets.toml"):
        shutil.copy(EXPERIMENTS / name, tmp_path / name)
    return tmp_path


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def error_of(call) -> str:
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- sections match the library's dataclasses -------------------------------------------------------

def test_sections_have_exactly_the_library_fields():
    runtime_fields = {"device", "num_workers", "compile", "cuda_graphs"}  # where and how fast: the runtime section
    # pipeline comes from the data section (data.pipeline)
    train_fields = {f.name for f in dataclasses.fields(TrainSettings)} - {"loss", "pipeline"} - runtime_fields
    assert set(TrainSection.model_fields) == train_fields
    assert runtime_fields <= set(RuntimeSection.model_fields)
    assert "pipeline" in DataSection.model_fields
    assert set(LossSection.model_fields) == {f.name for f in dataclasses.fields(LossConfig)}
    model_fields = {f.name for f in dataclasses.fields(PHPConfig)} - {"clip", "num_classes"}
    assert set(ModelSection.model_fields) == model_fields | {"clip", "image_size"}
    assert list(RunConfig.model_fields) == ["model", "loss", "train", "data", "runtime"]


# ---- inheritance ---------------------------------------------------------------------------------------

def test_extends_deep_merges_and_chains(folder):
    write(folder, "parent", 'extends = "base"\ntable = "cnum"\n[model]\ncnum = 6\n[train]\nepochs = 10\n')
    path = write(folder, "child", 'extends = "parent"\n[train]\nepochs = 20\n')
    spec = load_spec(path)
    assert [p.stem for p in spec.chain] == ["base", "parent", "child"]
    assert spec.table == "cnum"
    assert spec.sections["model"]["cnum"] == 6 and spec.sections["model"]["num_experts"] == 4
    assert spec.sections["train"]["epochs"] == 20 and spec.sections["train"]["lr"] == 3e-6


def test_extends_cycles_and_missing_parents_are_rejected(folder):
    write(folder, "a", 'extends = "b"\n')
    write(folder, "b", 'extends = "a"\n')
    assert "extends: cycle a -> b -> a" in error_of(lambda: load_spec(folder / "a.toml"))
    path = write(folder, "orphan", 'extends = "nowhere"\n')
    assert error_of(lambda: load_spec(path)).startswith(f"{path}: extends: no spec 'nowhere'")


# ---- validation errors name the file and the field ----------------------------------------------------

@pytest.mark.parametrize(("text", "field"), [
    ('extends = "base"\n[model]\ncnumm = 3\n', "model.cnumm: Extra inputs are not permitted"),
    ('extends = "base"\ncolour = "red"\n', "colour: Extra inputs are not permitted"),
    ('extends = "base"\n[model]\ncnum = "nine"\n', "model.cnum: Input should be a valid integer"),
    ('extends = "base"\n[model]\nvariant = "half"\n', "model.variant: Input should be"),
    ('extends = "base"\n[model]\ntopk = 5\n', "model: topk must be between 1 and num_experts"),
    ('extends = "base"\n[loss]\nnames = ["sdm", "mlm"]\n', "loss.names[1]: Input should be"),
    ('extends = "base"\n[train]\nbetas = [0.9]\n', "train.betas: List should have at least 2 items"),
    ('extends = "base"\n[train]\nlr = -1.0\n', "train.lr: Input should be greater than 0"),
    ('extends = "base"\n[data]\ndataset = "CUHK-PEDES"\n', "data.dataset: set per run"),
    ('extends = "base"\ntable = "tabel"\n', "table: unknown table 'tabel'"),
    ('extends = "base"\ndatasets = ["Market-1501"]\n', "datasets[0]: Input should be"),
    ('extends = "base"\n[grid]\n"model.cnumm" = [3]\n', "grid.model.cnumm: unknown field 'cnumm' of [model]"),
    ('extends = "base"\n[grid]\n"cnum" = [3]\n', "grid.cnum: expected SECTION.FIELD"),
    ('extends = "base"\n[grid]\n"model.cnum" = [3, "x"]\n', "grid.model.cnum: Input should be a valid integer"),
    ('extends = "base"\n[grid]\n"model.cnum" = []\n', "grid.model.cnum: List should have at least 1 item"),
    ('[model]\ncnum = 3\n', "model.clip: Field required"),
])
def test_errors_are_one_line_naming_file_and_dotted_field(folder, text, field):
    path = write(folder, "bad", text)
    assert error_of(lambda: load_spec(path)) .startswith(f"{path}: {field}")


def test_error_in_a_parent_names_the_parent(folder):
    parent = write(folder, "parent", 'extends = "base"\n[train]\nepochs = 0\n')
    child = write(folder, "child", 'extends = "parent"\n[model]\ncnum = 6\n')
    assert error_of(lambda: load_spec(child)).startswith(f"{parent}: train.epochs: Input should be greater than 0")


def test_invalid_toml_names_the_file(folder):
    path = write(folder, "broken", "extends = \n")
    assert error_of(lambda: load_spec(path)).startswith(f"{path}: not valid TOML")


# ---- grids, presets, expansion -------------------------------------------------------------------------

def test_grid_is_cartesian_and_runs_nest_dataset_point_seed(folder):
    path = write(folder, "two", 'extends = "base"\n[grid]\n"model.cnum" = [3, 6]\n'
                                '"loss.names" = [["itc", "aux"], ["sdm", "itc", "aux"]]\n')
    spec = load_spec(path)
    assert [p.label for p in spec.points] == ["3, itc+aux", "3, sdm+itc+aux", "6, itc+aux", "6, sdm+itc+aux"]
    runs = expand(spec, "tiny", ["RSTPReid", "ICFG-PEDES"], [1, 2], {})
    assert len(runs) == 2 * 4 * 2
    assert [(r.dataset, r.row_label, r.seed) for r in runs[:3]] == [
        ("RSTPReid", "3, itc+aux", 1), ("RSTPReid", "3, itc+aux", 2), ("RSTPReid", "3, sdm+itc+aux", 1)]
    last = runs[-1]
    assert last.config["model"]["cnum"] == 6 and last.config["loss"]["names"] == ["sdm", "itc", "aux"]
    assert last.config["data"]["dataset"] == "ICFG-PEDES" and last.config["train"]["seed"] == 2
    assert len({r.config_hash for r in runs}) == len(runs)


def test_own_values_beat_the_preset_and_grid_beats_both(folder):
    path = write(folder, "cn", 'extends = "base"\n[train]\nepochs = 7\n[grid]\n"model.cnum" = [12]\n')
    (run,) = expand(load_spec(path), "tiny", ["CUHK-PEDES"], [1], {})
    assert run.config["model"]["cnum"] == 12                      # grid beats the tiny preset's 3
    assert run.config["train"]["epochs"] == 7                     # the user's own value beats the preset's 4
    assert run.config["train"]["lr"] == 5e-4                      # the recipe's value is scaled by the preset
    assert run.config["model"]["clip"] == "tiny" and run.config["data"]["source"] == "synthetic"
    assert run.config["runtime"]["num_workers"] == 0 and run.preset == "tiny"


def test_expand_defaults_and_runtime(folder):
    spec = load_spec(write(folder, "plain", 'extends = "base"\nrow_label = "PHP"\nseeds = [3, 4]\n'))
    runs = expand(spec, "paper", None, None, RUNTIME)
    assert [(r.dataset, r.seed) for r in runs] == [(d, s) for d in ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid") for s in (3, 4)]
    assert {r.row_label for r in runs} == {"PHP"} and runs[0].table is None and runs[0].spec_name == "plain"
    assert runs[0].config["runtime"] == {"data_root": "/data", "clip_weights": "/w/ViT-B-16.pt", "device": "auto",
                                         "num_workers": 8, "compile": False, "cuda_graphs": False,
                                         "log_period": 100}
    moved = expand(spec, "paper", None, None, {**RUNTIME, "data_root": "/elsewhere", "device": "cuda:1"})
    assert [r.config_hash for r in moved] == [r.config_hash for r in runs]  # runtime is not hashed


def test_cuda_graphs_is_a_runtime_field_of_the_fast_regime_outside_the_hash(folder):
    spec = load_spec(write(folder, "fast", 'extends = "base"\n[train]\nprecision = "amp"\n'))
    eager = expand(spec, "paper", None, None, RUNTIME)
    graphed = expand(spec, "paper", None, None, {**RUNTIME, "cuda_graphs": True})
    assert [r.config["runtime"]["cuda_graphs"] for r in graphed] == [True] * len(eager)
    assert [r.config_hash for r in graphed] == [r.config_hash for r in eager]
    assert [{**r.config, "runtime": {}} for r in graphed] == [{**r.config, "runtime": {}} for r in eager]
    assert build_train_settings(graphed[0].config).cuda_graphs and not build_train_settings(eager[0].config).cuda_graphs


def test_cuda_graphs_with_the_official_precision_is_a_one_line_error(folder):
    spec = load_spec(write(folder, "plain", 'extends = "base"\n'))
    assert expand(spec, "paper", None, [1], RUNTIME)[0].config["train"]["precision"] == "official"
    assert error_of(lambda: expand(spec, "paper", None, [1], {**RUNTIME, "cuda_graphs": True})) == (
        "command line: runtime: cuda_graphs = true needs train.precision = 'amp' (the fast regime), got 'official'")


def test_expand_input_errors(folder):
    spec = load_spec(write(folder, "plain", 'extends = "base"\n'))
    assert error_of(lambda: expand(spec, "huge", None, None, RUNTIME)).startswith("--preset: unknown preset 'huge'")
    assert error_of(lambda: expand(spec, "paper", ["Market"], None, RUNTIME)).startswith("--dataset: unknown dataset")
    no_weights = {**RUNTIME, "clip_weights": None}
    assert error_of(lambda: expand(spec, "paper", None, None, no_weights)) == "--clip-weights: required by preset 'paper'"
    bad_workers = {**RUNTIME, "num_workers": -1}
    assert error_of(lambda: expand(spec, "paper", None, None, bad_workers)).startswith(
        "command line: runtime.num_workers: Input should be greater than or equal to 0")


def test_bad_preset_values_name_presets_file(folder):
    presets = folder / "presets.toml"
    presets.write_text(presets.read_text().replace("lr = 5e-4", 'lr = "fast"'))
    write(folder, "plain", 'extends = "base"\n')
    assert error_of(lambda: load_all_specs(folder)).startswith(f"{presets}: tiny.train.lr: Input should be a valid number")
    presets.write_text(presets.read_text().replace('lr = "fast"', "lrr = 5e-4"))
    assert error_of(lambda: load_all_specs(folder)).startswith(f"{presets}: tiny.train.lrr: unknown field")


# ---- tune section ----------------------------------------------------------------------------------------

TUNE = '''extends = "base"
[tune]
objective = "val.R1"
direction = "maximize"
trials = 20
pruner = "median"
[tune.space."train.lr"]
type = "float"
low = 1e-6
high = 1e-4
log = true
[tune.space."model.cnum"]
type = "int"
low = 3
high = 12
step = 3
[tune.space."model.num_experts"]
type = "categorical"
choices = [2, 4, 6]
'''


def test_tune_section_is_parsed(folder):
    tune = load_spec(write(folder, "tune", TUNE)).tune
    assert tune.trials == 20 and tune.objective == "val.R1" and tune.pruner == "median"
    assert tune.space["train.lr"].log and tune.space["model.cnum"].step == 3
    assert tune.space["model.num_experts"].choices == [2, 4, 6]


@pytest.mark.parametrize(("old", "new", "field"), [
    ("low = 1e-6", "low = 0.0", "tune.space.train.lr.float: a log-scale range needs low > 0"),
    ('objective = "val.R1"', 'objective = "val.top1"', "tune.objective: String should match pattern"),
    ("trials = 20", "trials = 0", "tune.trials: Input should be greater than 0"),
    ('[tune.space."model.cnum"]', '[tune.space."model.cnumm"]', "tune.space.model.cnumm: unknown field"),
    ('type = "int"', 'type = "integer"', "tune.space.model.cnum: Input tag 'integer' found"),
    ('pruner = "median"', 'pruner = "median"\nsampler = "tpe"', "tune.sampler: Extra inputs are not permitted"),
])
def test_tune_errors_name_the_field(folder, old, new, field):
    path = write(folder, "tune", TUNE.replace(old, new))
    assert error_of(lambda: load_spec(path)).startswith(f"{path}: {field}")


# ---- config hashing and overrides ----------------------------------------------------------------------

def test_config_hash_golden_value_and_key_order():
    assert config_hash(GOLDEN_CONFIG) == GOLDEN_HASH
    reordered = {key: dict(reversed(list(value.items()))) for key, value in reversed(list(GOLDEN_CONFIG.items()))}
    assert config_hash(reordered) == GOLDEN_HASH
    assert config_hash({k: v for k, v in GOLDEN_CONFIG.items() if k != "runtime"}) == GOLDEN_HASH
    changed = {**GOLDEN_CONFIG, "train": {**GOLDEN_CONFIG["train"], "lr": 0.002}}
    assert config_hash(changed) != GOLDEN_HASH


def test_expanded_hash_is_stable_across_loads(folder):
    spec_text = 'extends = "base"\n[grid]\n"model.cnum" = [3, 6]\n'
    first = [r.config_hash for r in expand(load_spec(write(folder, "x", spec_text)), "tiny", None, None, {})]
    second = [r.config_hash for r in expand(load_spec(write(folder, "y", spec_text)), "tiny", None, None, {})]
    assert first == second


def test_override_sets_dotted_values_and_revalidates(folder):
    (run,) = expand(load_spec(write(folder, "p", 'extends = "base"\n')), "tiny", ["CUHK-PEDES"], [1], {})
    trial = override(run.config, {"train.lr": 5e-5, "model.cnum": 6})
    assert trial["train"]["lr"] == 5e-5 and trial["model"]["cnum"] == 6
    assert trial["model"]["topk"] == run.config["model"]["topk"] and config_hash(trial) != run.config_hash
    assert error_of(lambda: override(run.config, {"train.lr": -1.0})).startswith("override: train.lr:")
    assert error_of(lambda: override(run.config, {"train.speed": 1})).startswith("override: train.speed: unknown field")


def test_an_override_of_a_grid_key_leaves_that_key_out_of_the_row_label(folder):
    """The grid's points collapse into one config per override value, labelled by the override (not by
    the first grid value they happened to start from)."""
    spec = load_spec(write(folder, "g", 'extends = "base"\n[grid]\n"model.cnum" = [3, 6]\n"model.topk" = [1, 2]\n'))
    labels = lambda tokens: [run.row_label for run in expand(with_overrides(spec, tokens), "tiny", ["CUHK-PEDES"], [1], {})]
    assert labels(["model.cnum=9"]) == ["1 [model.cnum=9]", "2 [model.cnum=9]"]
    assert labels(["model.cnum=9", "model.topk=1"]) == ["[model.cnum=9, model.topk=1]"]
    assert labels(["train.lr=1e-4"]) == [f"{c}, {k} [train.lr=0.0001]" for c in (3, 6) for k in (1, 2)]


def test_audit_flag_defaults_off_is_inherited_and_must_be_a_bool(folder):
    write(folder, "audited", 'extends = "base"\naudit = true\n')
    write(folder, "child", 'extends = "audited"\n')
    assert load_spec(folder / "base.toml").audit is False
    assert load_spec(folder / "audited.toml").audit is True and load_spec(folder / "child.toml").audit is True
    write(folder, "bad", 'extends = "base"\naudit = "yes"\n')
    assert "audit" in error_of(lambda: load_spec(folder / "bad.toml"))


# ---- shipped specs: found by name from anywhere ----------------------------------------------------

def test_a_lone_spec_file_anywhere_extends_the_shipped_base_and_uses_the_shipped_presets(tmp_path, monkeypatch):
    elsewhere = tmp_path / "my" / "specs"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    path = write(elsewhere, "beta2", 'extends = "base"\n[loss]\naux_factor = 2.0\n')
    spec = load_spec(path)
    assert spec.chain == (EXPERIMENTS / "base.toml", path)
    (run,) = expand(spec, "tiny", ["CUHK-PEDES"], [1], RUNTIME)
    assert run.config["loss"]["aux_factor"] == 2.0     # the spec's own value
    assert run.config["model"]["clip"] == "tiny"       # the shipped tiny preset
    assert run.config["train"]["weight_decay"] == 4e-5  # the shipped base recipe


def test_a_sibling_of_the_parent_name_wins_over_the_shipped_spec(folder):
    base = (folder / "base.toml").read_text().replace("cnum = 9", "cnum = 7")
    assert base != (folder / "base.toml").read_text()
    (folder / "base.toml").write_text(base)
    spec = load_spec(write(folder, "child", 'extends = "base"\n'))
    assert spec.chain[0] == folder / "base.toml"
    assert spec.sections["model"]["cnum"] == 7


def test_find_spec_takes_an_existing_file_or_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_spec("cnum") == EXPERIMENTS / "cnum.toml"
    mine = write(tmp_path, "mine", 'extends = "cnum"\n')
    assert find_spec(mine) == mine and find_spec("mine.toml") == Path("mine.toml")
    assert "presets" not in shipped_spec_names() and "base" in shipped_spec_names()
    message = error_of(lambda: find_spec("cnumm"))
    assert message.startswith("cnumm: no such spec file") and "cnum, coupling" in message
    assert error_of(lambda: find_spec("presets")).startswith("presets: no such spec file")
