"""Every shipped spec validates, expands, fills its paper table and pins the paper recipe."""


import pytest

from php_runner.model.config import PHPConfig
from php_runner.experiment.paper import load_paper_results
from php_runner.experiment.specs import expand, load_all_specs, load_presets, shipped_folder

EXPERIMENTS = shipped_folder()
PAPER_RUNTIME = {"data_root": "/data", "clip_weights": "/weights/ViT-B-16.pt"}
TABLE_SPECS = {"headline": "headline", "module": "module", "loss": "loss", "cnum": "cnum", "beta": "beta",
               "sharing": "sharing", "coupling": "coupling"}
# The paper command and the defaults it relies on (spec section 5).
PAPER_RECIPE = {
    "model": {"clip": "ViT-B/16", "image_size": [384, 128], "cnum": 9, "num_experts": 4, "topk": 2, "reduction": 8,
              "efp_layers": 4, "efp_heads": 8, "variant": "full", "sharing": "shared", "coupling": "official"},
    "loss": {"names": ["sdm", "itc", "aux"], "temperature": 0.02, "itc_weight": 5.0, "aux_factor": 0.5},
    "train": {"epochs": 60, "batch_size": 64, "lr": 3e-6, "optimizer": "adam", "adam_eps": 1e-3, "betas": [0.9, 0.999],
              "momentum": 0.9, "weight_decay": 4e-5, "weight_decay_bias": 0.0, "bias_lr_factor": 2.0, "lr_factor": 5.0,
              "solver": "head", "transformer_lr_factor": 1.0, "moe_lr_factor": 2.0, "warmup_epochs": 5,
              "warmup_factor": 0.1, "img_aug": True, "precision": "official", "selection": "test", "evaluate_test": True, "eval_period": 1,
              "test_batch_size": 64, "seed": 1, "deterministic": False},
    "data": {"dataset": "CUHK-PEDES", "source": "real", "val_from_train": 0.0, "val_seed": 0, "pipeline": "cache"},
}


@pytest.fixture(scope="module")
def specs():
    return load_all_specs(EXPERIMENTS)


def test_all_shipped_specs_load(specs):
    assert {"base", *TABLE_SPECS.values()} <= set(specs)
    assert all(spec.table is None for name, spec in specs.items() if name not in TABLE_SPECS.values())
    assert set(load_presets(EXPERIMENTS)) == {"paper", "tiny", "tiny-icfg-scale"}


@pytest.mark.parametrize("preset", ["paper", "tiny", "tiny-icfg-scale"])
def test_every_spec_expands_under_every_preset(specs, preset):
    for spec in specs.values():
        runs = expand(spec, preset, None, [1, 2], PAPER_RUNTIME if preset == "paper" else {})
        assert len(runs) == len(spec.datasets) * len(spec.points) * 2
        assert len({r.config_hash for r in runs}) == len(runs)


@pytest.mark.parametrize(("table", "spec_name"), TABLE_SPECS.items())
def test_each_table_spec_fills_exactly_its_table(specs, table, spec_name):
    spec = specs[spec_name]
    paper_table = load_paper_results().table(table)
    assert spec.table == table
    reproducible = [row.key for row in paper_table.rows if not row.reference]
    assert [point.label for point in spec.points] == reproducible
    assert list(spec.datasets) == list(paper_table.datasets)


def test_icfg_scale_preset_is_the_tiny_recipe_longer_on_the_icfg_scale_set(specs):
    tiny = expand(specs["coupling"], "tiny", ["ICFG-PEDES"], [1])[0].config
    scale = expand(specs["coupling"], "tiny-icfg-scale", ["ICFG-PEDES"], [1])[0].config
    changed = {(section, key) for section in tiny for key in tiny[section] if tiny[section][key] != scale[section][key]}
    assert changed == {("train", "epochs"), ("train", "eval_period"), ("data", "source"), ("runtime", "data_root")}
    assert scale["data"]["source"] == "synthetic-icfg-scale" and scale["train"]["epochs"] > tiny["train"]["epochs"]


def test_headline_under_paper_preset_is_the_paper_recipe(specs):
    run = expand(specs["headline"], "paper", ["CUHK-PEDES"], None, PAPER_RUNTIME)[0]
    assert {key: value for key, value in run.config.items() if key != "runtime"} == PAPER_RECIPE
    assert run.row_label == "PHP" and run.table == "headline"


def test_grid_points_change_only_their_own_field(specs):
    headline = expand(specs["headline"], "paper", ["RSTPReid"], None, PAPER_RUNTIME)[0].config
    changed = {"module": ("model", "variant"), "loss": ("loss", "names"), "cnum": ("model", "cnum"),
               "beta": ("loss", "aux_factor"), "sharing": ("model", "sharing"), "coupling": ("model", "coupling")}
    for name, (section, field) in changed.items():
        for run in expand(specs[name], "paper", ["RSTPReid"], None, PAPER_RUNTIME):
            expected = {**headline, section: {**headline[section], field: run.config[section][field]}}
            assert run.config == expected, (name, run.row_label)


def test_the_headline_configuration_is_one_run_shared_by_every_table(specs):
    """At paper scale the registry sees one config hash for the headline cell of every table."""
    headline_label = {"module": "full", "loss": "sdm+itc+aux", "cnum": "9", "beta": "0.5", "sharing": "shared",
                      "coupling": "official"}
    (headline,) = expand(specs["headline"], "paper", ["ICFG-PEDES"], None, PAPER_RUNTIME)
    for name, label in headline_label.items():
        (run,) = [r for r in expand(specs[name], "paper", ["ICFG-PEDES"], None, PAPER_RUNTIME) if r.row_label == label]
        assert run.config_hash == headline.config_hash


def test_tiny_preset_is_the_tiny_model(specs):
    model = expand(specs["headline"], "tiny", ["CUHK-PEDES"], None, {})[0].config["model"]
    tiny = PHPConfig.tiny()
    assert model["image_size"] == list(tiny.clip.image_size) and model["clip"] == "tiny"
    for field in ("cnum", "num_experts", "topk", "reduction", "efp_layers", "efp_heads"):
        assert model[field] == getattr(tiny, field), field


@pytest.mark.parametrize("path", sorted(p for p in EXPERIMENTS.glob("*.toml") if p.name != "presets.toml"))
def test_every_spec_header_says_how_to_run_it_what_it_fills_and_its_cost(path):
    header = path.read_text().split("\n\n")[0]
    assert header.startswith(f"# {path.stem}:")
    for marker in ("# Runs:  php-run ", "# Fills: ", "# Cost:  ", "estimated"):
        assert marker in header, marker
