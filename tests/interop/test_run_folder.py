"""The official run folder: configs.yaml read by the same readers ``php-run import`` and the official
``test.py`` use, best.pth linked to the hash-addressed store, readable unique names."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml

from php_runner.errors import InputError
from php_runner.studies.imported_config import loss_section, model_section, train_section
from php_runner.studies.released_checks import infer_released_config
from php_runner.interop import run_folder
from php_runner.interop.official_config import php_run_identity
from php_runner.interop.run_folder import OfficialRunFolder, link_checkpoint, readable_name
from php_runner.model.checkpoint import extract_state_dict, load_checkpoint_file, load_model, read_official_yaml

# php_spec.md section 8: every key of the official configs.yaml (yaml.dump(vars(args))), written out here
# independently of the module's own list. test.py reads output_dir, root_dir, dataset_name, test_batch_size,
# and builds the model from the architecture options; the file holds all of them.
SPEC_KEYS = """MLM, alpha, aux_factor, batch_size, beta, bias_lr_factor, cmt_depth, cnum, dataset_name, distributed,
eval_period, gamma, id_loss_weight, img_aug, img_size, local_rank, log_period, loss_names, lr, lr_factor,
lrscheduler, masked_token_rate, masked_token_unchanged_rate, milestones, mlm_loss_weight, moe_heads, moe_layers,
moe_lr_factor, momentum, name, num_epoch, num_experts, num_instance, num_workers, optimizer, output_dir, power,
pretrain_choice, reduction, resume, resume_ckpt_file, root_dir, sampler, stride_size, target_lr, temperature,
test_batch_size, text_length, topk, training, transformer_lr_factor, val_dataset, vocab_size, warmup_epochs,
warmup_factor, warmup_method, weight_decay, weight_decay_bias"""
OFFICIAL_KEYS = [key.strip() for key in SPEC_KEYS.replace("\n", " ").split(",")]
STARTED = datetime(2026, 3, 1, 12, 30, 5)


def make_folder(tmp_path: Path, planned_run, checkpoint: Path) -> Path:
    logs = tmp_path / "logs"
    with OfficialRunFolder.create(logs, planned_run.config, spec=planned_run.spec_name, row=planned_run.row_label,
                                  seed=planned_run.seed, started=STARTED,
                                  identity={"config_hash": planned_run.config_hash}) as folder:
        folder.finish(checkpoint)
    return folder.path


def test_folder_is_logs_dataset_readable_name_with_the_three_files(tmp_path, planned_run, stored_checkpoint):
    folder = make_folder(tmp_path, planned_run, stored_checkpoint)
    assert folder == tmp_path / "logs" / "RSTPReid" / "20260301_123005_headline-PHP_seed1"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pth", "configs.yaml", "train_log.txt"]


def test_yaml_has_every_key_the_official_code_writes_and_all_readers_accept_it(tmp_path, planned_run,
                                                                              stored_checkpoint):
    path = make_folder(tmp_path, planned_run, stored_checkpoint) / "configs.yaml"
    ours = read_official_yaml(path)  # php-run import / evaluate --config
    official = yaml.load(path.read_text(), Loader=yaml.FullLoader)  # the official test.py's reader
    assert yaml.safe_load(path.read_text()) == official == ours
    missing = [key for key in OFFICIAL_KEYS if key not in ours]
    assert not missing
    assert ours["output_dir"] == str(path.parent.absolute())  # test.py loads <output_dir>/best.pth
    assert Path(ours["root_dir"]) == Path(planned_run.config["runtime"]["data_root"]).absolute()
    assert ours["dataset_name"] == "RSTPReid" and ours["name"] == "headline-PHP_seed1"
    assert ours["img_size"] == [48, 24] and ours["stride_size"] == 8  # the tiny backbone's patch stride


def test_config_round_trips_through_the_import_readers(tmp_path, planned_run, stored_checkpoint):
    folder = make_folder(tmp_path, planned_run, stored_checkpoint)
    config = planned_run.config
    yaml_values = read_official_yaml(folder / "configs.yaml")
    state_dict = extract_state_dict(load_checkpoint_file(folder / "best.pth"))
    inferred = infer_released_config(state_dict, yaml_values)
    # import infers the architecture from the weights and the yaml; variant and coupling come from elsewhere
    assert model_section(inferred) == {**config["model"], "variant": "full", "coupling": "official"}
    assert loss_section(yaml_values) == config["loss"]
    imported_train = train_section(yaml_values, era=config["train"]["solver"])
    mapped = ("epochs", "batch_size", "lr", "optimizer", "betas", "momentum", "weight_decay", "weight_decay_bias",
              "bias_lr_factor", "lr_factor", "transformer_lr_factor", "moe_lr_factor", "warmup_epochs",
              "warmup_factor", "img_aug", "selection", "eval_period", "test_batch_size", "solver")
    assert {k: imported_train[k] for k in mapped} == {k: config["train"][k] for k in mapped}
    identity = php_run_identity(yaml_values)
    assert identity["config"] == json.loads(json.dumps(config))  # everything else, exactly
    assert identity["config_hash"] == planned_run.config_hash and identity["row"] == "PHP"


def test_best_pth_loads_as_the_stored_checkpoint(tmp_path, planned_run, stored_checkpoint):
    folder = make_folder(tmp_path, planned_run, stored_checkpoint)
    model, info = load_model(folder / "best.pth", folder / "configs.yaml")
    stored = load_checkpoint_file(stored_checkpoint)["model"]
    assert info["yaml"]["cnum"] == model.config.cnum == 5
    for key, value in model.state_dict().items():
        assert torch.equal(value, stored[key].to(value.dtype)), key


def test_best_pth_is_a_relative_symlink_into_the_store(tmp_path, planned_run, stored_checkpoint):
    best = make_folder(tmp_path, planned_run, stored_checkpoint) / "best.pth"
    assert best.is_symlink() and not os.path.isabs(os.readlink(best))
    assert best.resolve() == stored_checkpoint.resolve()
    moved = tmp_path.rename(tmp_path.with_name(tmp_path.name + "_moved"))  # the project folder moves as a whole
    assert (moved / best.relative_to(tmp_path)).read_bytes() == (moved / stored_checkpoint.relative_to(tmp_path)).read_bytes()


def test_link_falls_back_to_a_hard_link_then_a_copy(tmp_path, stored_checkpoint, monkeypatch):
    def refuse(*args):
        raise OSError("not supported here")

    monkeypatch.setattr(os, "symlink", refuse)
    assert link_checkpoint(stored_checkpoint, tmp_path / "a" / "best.pth") == "hardlink"
    assert (tmp_path / "a" / "best.pth").stat().st_ino == stored_checkpoint.stat().st_ino
    monkeypatch.setattr(os, "link", refuse)
    assert link_checkpoint(stored_checkpoint, tmp_path / "b" / "best.pth") == "copy"
    copied = tmp_path / "b" / "best.pth"
    assert not copied.is_symlink() and copied.read_bytes() == stored_checkpoint.read_bytes()
    assert sorted(p.name for p in copied.parent.iterdir()) == ["best.pth"]  # no temporaries left


def test_relinking_replaces_the_link(tmp_path, stored_checkpoint):
    other = tmp_path / "other.pth"
    other.write_bytes(stored_checkpoint.read_bytes())
    best = tmp_path / "run" / "best.pth"
    link_checkpoint(stored_checkpoint, best)
    link_checkpoint(other, best)
    assert best.resolve() == other.resolve()
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.pth"]


def test_missing_checkpoint_is_a_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="checkpoint file not found"):
        link_checkpoint(tmp_path / "nope.pth", tmp_path / "run" / "best.pth")


def test_names_are_safe_and_unique(tmp_path, planned_run):
    assert readable_name("my spec/v2", "cnum=9 (a)", 3, STARTED) == "20260301_123005_my-spec-v2-cnum-9-a_seed3"
    names = []
    for _ in range(3):
        with OfficialRunFolder.create(tmp_path, planned_run.config, spec="s", row="r", seed=1, started=STARTED) as f:
            names.append(f.path.name)
    assert names == ["20260301_123005_s-r_seed1", "20260301_123005_s-r_seed1_2", "20260301_123005_s-r_seed1_3"]


def test_configs_yaml_write_is_atomic(tmp_path, planned_run, monkeypatch):
    calls = []
    original = run_folder.write_configs_yaml

    def spy(folder, args):
        calls.append(folder)
        return original(folder, args)

    monkeypatch.setattr(run_folder, "write_configs_yaml", spy)
    with OfficialRunFolder.create(tmp_path, planned_run.config, spec="s", row="r", seed=1, started=STARTED) as f:
        pass
    assert calls == [f.path] and not [p for p in f.path.iterdir() if p.name.startswith(".")]


def test_config_without_a_section_is_an_input_error(tmp_path, planned_run):
    broken = {key: value for key, value in planned_run.config.items() if key != "train"}
    with pytest.raises(InputError, match="no 'train' section"):
        OfficialRunFolder.create(tmp_path, broken, spec="s", row="r", seed=1, started=STARTED)


def test_evaluate_accepts_the_folder(cli, tmp_path, planned_run, stored_checkpoint):
    """``php-run evaluate --config`` on the folder alone: dataset, data root and batch come from the yaml."""
    folder = make_folder(tmp_path, planned_run, stored_checkpoint)
    code, out, err = cli("evaluate", "--checkpoint", folder / "best.pth", "--config", folder / "configs.yaml",
                         "--device", "cpu", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert set(metrics) == {"R1", "R5", "R10", "mAP", "mINP"}
    assert 0 <= metrics["R1"] <= metrics["R5"] <= metrics["R10"] <= 100
