"""Importing released checkpoints: folder names, checks, solver era, registry rows, re-import, tables, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from php_runner.studies import importer
from php_runner.reports import tables as reports
from php_runner.studies.importer import ImportOptions
from php_runner.studies.released import HEADLINE_CELLS, Cell, ReleasedRun, UnknownFolderError, assign_headline, discover, interpret_folder
from php_runner.studies.released_checks import disagreements, infer_released_config, parameter_names, solver_era
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel
from php_runner.model.precision import apply_precision
from php_runner.store.registry import Registry

LR = 3e-6
MOE_FACTOR = 2.0
BIAS_FACTOR = 2.0
TEST_BATCH_SIZE = 3  # smaller than the test split, so batches are partial and batch-mates matter
NS_FOLDER = "20260113_101010_php_ns"


# ---- building an official-format tree ------------------------------------------------------------

def official_state_dict(config: PHPConfig, *, counters: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official key order and fp16/fp32 layout, R1 counter buffers on request."""
    torch.manual_seed(seed)
    model = apply_precision(PHPModel(config), "official")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "experts" in name and name.endswith("up.weight"):  # released experts are not the identity
                parameter.normal_(0, 0.02)
    state_dict = {}
    for key, value in model.state_dict().items():
        state_dict[key] = value.clone()
        if counters and key.endswith("feed_forward.alpha"):  # buffers sit right after alpha (spec 3.1)
            prefix = key[: -len("alpha")]
            state_dict[prefix + "expert_count_accum"] = torch.arange(config.num_experts, dtype=torch.int64)
            state_dict[prefix + "token_count_accum"] = torch.tensor([7], dtype=torch.int64)
    return state_dict


def naive_base_lrs(names: list[str], solver: str) -> list[float]:
    """The learning rate of each group written out by hand from spec 5 (paper factors)."""
    lrs = []
    for name in names:
        lr = LR
        if solver == "v1" and ("feed_forward.experts" in name or "input_gate" in name or "task_gate" in name):
            lr = LR * MOE_FACTOR
        if "bias" in name:
            lr = LR * BIAS_FACTOR
        lrs.append(lr)
    return lrs


def official_yaml(dataset: str, config: PHPConfig, loss_names: str, **changes) -> dict:
    values = {
        "MLM": False, "alpha": 0.9, "aux_factor": 0.5, "batch_size": 8, "beta": 0.999, "bias_lr_factor": BIAS_FACTOR,
        "cmt_depth": 4, "cnum": config.cnum, "dataset_name": dataset, "distributed": False, "eval_period": 1,
        "gamma": 0.1, "id_loss_weight": 1.0, "img_aug": True, "img_size": tuple(config.clip.image_size),
        "local_rank": 0, "log_period": 100, "loss_names": loss_names, "lr": LR, "lr_factor": 5.0,
        "lrscheduler": "cosine", "masked_token_rate": 0.8, "masked_token_unchanged_rate": 0.1,
        "milestones": (20, 50), "mlm_loss_weight": 1.0, "moe_heads": config.efp_heads,
        "moe_layers": config.efp_layers, "moe_lr_factor": MOE_FACTOR, "momentum": 0.9, "name": "php",
        "num_epoch": 60, "num_experts": config.num_experts, "num_instance": 4, "num_workers": 8,
        "optimizer": "Adam", "output_dir": f"/authors/logs/{dataset}/run", "power": 0.9,
        "pretrain_choice": "ViT-B/16", "reduction": config.reduction, "resume": False, "resume_ckpt_file": "",
        "root_dir": "/authors/data", "sampler": "random", "stride_size": config.clip.stride, "target_lr": 0,
        "temperature": 0.02, "test_batch_size": TEST_BATCH_SIZE, "text_length": 77, "topk": config.topk,
        "training": True, "transformer_lr_factor": 1.0, "val_dataset": "test", "vocab_size": 49408,
        "warmup_epochs": 5, "warmup_factor": 0.1, "warmup_method": "linear", "weight_decay": 4e-5,
        "weight_decay_bias": 0.0,
    }
    values.update(changes)
    return values


def write_released(folder: Path, config: PHPConfig, yaml_values: dict, *, solver: str | None, counters: bool = False,
                   module_prefix: bool = False, fp32: bool = False, epoch: int = 7) -> None:
    """best.pth as the official trainer saves it, and configs.yaml as yaml.dump(vars(args)) writes it."""
    folder.mkdir(parents=True)
    state_dict = official_state_dict(config, counters=counters, seed=epoch)
    names = parameter_names(state_dict)
    if fp32:
        state_dict = {key: value.float() if value.is_floating_point() else value for key, value in state_dict.items()}
    if module_prefix:
        state_dict = {f"module.{key}": value for key, value in state_dict.items()}
    payload = {"model": state_dict, "num_epoch": 60, "iteration": 0, "epoch": epoch}
    if solver is not None:
        base_lrs = naive_base_lrs(names, solver)
        payload["optimizer"] = {"state": {}, "param_groups": [
            {"lr": lr, "weight_decay": 4e-5, "betas": (0.9, 0.999), "eps": 1e-3, "params": [i]}
            for i, lr in enumerate(base_lrs)
        ]}
        payload["scheduler"] = {"base_lrs": base_lrs, "last_epoch": epoch, "milestones": (20, 50), "mode": "cosine",
                                "warmup_epochs": 5, "total_epochs": 60, "_last_lr": base_lrs}
    torch.save(payload, folder / "best.pth")
    (folder / "configs.yaml").write_text(yaml.dump(yaml_values))  # the default Dumper tags tuples
    assert "!!python/tuple" in (folder / "configs.yaml").read_text()


def tiny(**changes) -> PHPConfig:
    return PHPConfig.tiny(**changes)


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("released") / "logs"
    rstp, icfg = root / "RSTPReid", root / "ICFG-PEDES"
    cnum9, cnum6 = tiny(cnum=9), tiny(cnum=6)
    write_released(rstp / "sdm+itc+aux_cnum9", cnum9, official_yaml("RSTPReid", cnum9, "sdm+itc+aux"),
                   solver="v1", counters=True)
    write_released(rstp / "sdm+itc+aux", cnum9, official_yaml("RSTPReid", cnum9, "sdm+itc+aux"), solver="head")
    write_released(rstp / "itc+aux", cnum9, official_yaml("RSTPReid", cnum9, "itc+aux"), solver=None,
                   module_prefix=True)
    for variant in ("base", "crfm", "efp"):
        write_released(rstp / f"ablation_{variant}", tiny(), official_yaml("RSTPReid", tiny(), "sdm+itc+aux"),
                       solver="head", counters=variant == "efp")
    ns = tiny(sharing="separate")
    write_released(rstp / NS_FOLDER, ns, official_yaml("RSTPReid", ns, "sdm+itc+aux"), solver="head", fp32=True)
    # The checkpoint has 6 slots, its yaml says 9.
    write_released(rstp / "sdm+itc+aux_cnum6", cnum6, official_yaml("RSTPReid", cnum6, "sdm+itc+aux", cnum=9),
                   solver="head")
    write_released(rstp / "php_training_reproduce_on_IRRA", cnum9, official_yaml("RSTPReid", cnum9, "sdm+itc+aux"),
                   solver="head")
    write_released(icfg / "sdm+itc+aux", cnum9, official_yaml("ICFG-PEDES", cnum9, "sdm+itc+aux"), solver="head")
    return root


@pytest.fixture(scope="module")
def imported(logs_dir, tiny_data_root, tmp_path_factory):
    """The tree imported once without the audit, shared by the tests below (the audit test adds one)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'registry.db'}"
    registry = Registry(url)
    options = ImportOptions(data_root=tiny_data_root, audit=False, data_source="synthetic")
    outcomes = {outcome.label: outcome for outcome in importer.import_logs(logs_dir, registry, options)}
    yield registry, outcomes, options
    registry.close()


# ---- folder names ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "encoder", "sharing", "cells", "cnum"),
    [
        ("itc+aux", "full", "shared", [Cell("loss", "itc+aux")], 9),
        ("sdm+aux", "full", "shared", [Cell("loss", "sdm+aux")], 9),
        ("sdm+itc+aux", "full", "shared", [Cell("loss", "sdm+itc+aux")], 9),
        ("sdm+itc+aux_cnum3", "full", "shared", [Cell("cnum", "3")], 3),
        ("sdm+itc+aux_cnum12", "full", "shared", [Cell("cnum", "12")], 12),
        ("ablation_base", "base", "shared", [Cell("module", "base")], None),
        ("ablation_crfm", "crfm", "shared", [Cell("module", "crfm")], None),
        ("ablation_efp", "efp", "shared", [Cell("module", "efp")], None),
        ("20260113_154501_php_ns", "full", "separate", [Cell("sharing", "separate")], None),
    ],
)
def test_released_folder_names_map_to_their_cell_and_encoder(name, encoder, sharing, cells, cnum):
    meaning = interpret_folder(name)
    assert (meaning.encoder, meaning.sharing, list(meaning.cells), meaning.cnum) == (encoder, sharing, cells, cnum)


@pytest.mark.parametrize("name", ["php_training_reproduce_on_IRRA", "irra_icfg", "sdm+itc", "ablation_full",
                                  "php_3.0", "sdm+itc+aux_cnum", "2026_php_ns", "SDM+ITC+AUX"])
def test_unknown_folder_names_are_refused_never_guessed(name):
    with pytest.raises(UnknownFolderError, match="not a released run name"):
        interpret_folder(name)


def test_every_cell_the_importer_fills_is_a_row_of_paper_results():
    from php_runner.experiment.paper import load_paper_results

    paper = load_paper_results()
    released = ["itc+aux", "sdm+aux", "sdm+itc+aux", "sdm+itc+aux_cnum3", "sdm+itc+aux_cnum6", "sdm+itc+aux_cnum9",
                "sdm+itc+aux_cnum12", "ablation_base", "ablation_crfm", "ablation_efp", NS_FOLDER]
    cells = [cell for name in released for cell in interpret_folder(name).cells] + list(HEADLINE_CELLS)
    for cell in cells:
        assert paper.table(cell.table).row(cell.row) is not None, cell


def test_headline_goes_to_the_cnum9_run_else_to_the_plain_sdm_itc_aux_run(tmp_path):
    def run(dataset, name):
        return ReleasedRun(dataset, tmp_path / dataset / name, interpret_folder(name))

    both = [run("CUHK-PEDES", "sdm+itc+aux"), run("CUHK-PEDES", "sdm+itc+aux_cnum9"), run("RSTPReid", "sdm+itc+aux"),
            run("RSTPReid", "ablation_base")]
    cells = assign_headline(both)
    assert cells[both[1]] == (Cell("cnum", "9"), *HEADLINE_CELLS)
    assert cells[both[0]] == (Cell("loss", "sdm+itc+aux"),)
    assert cells[both[2]] == (Cell("loss", "sdm+itc+aux"), *HEADLINE_CELLS)
    assert cells[both[3]] == (Cell("module", "base"),)


def test_discover_lists_what_it_cannot_import(tmp_path):
    for relative in ("RSTPReid/ablation_crfm/best.pth", "RSTPReid/ablation_crfm/configs.yaml",
                     "RSTPReid/sdm+aux/best.pth", "Checking/irra_icfg/best.pth", "Checking/irra_icfg/configs.yaml",
                     "CUHK-PEDES/ablation_base/best.pth", "CUHK-PEDES/ablation_base/configs.yaml"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).touch()
    found, skipped = discover(tmp_path)
    assert [run.label for run in found] == ["CUHK-PEDES/ablation_base", "RSTPReid/ablation_crfm"]
    assert [run.meaning.encoder for run in found] == ["base", "crfm"]
    chosen, left = discover(tmp_path, datasets=["RSTPReid"])
    assert [run.label for run in chosen] == ["RSTPReid/ablation_crfm"] and [item.label for item in left] == \
        ["RSTPReid/sdm+aux"]
    reasons = {item.label: item.reason for item in skipped}
    assert reasons == {
        str(tmp_path / "Checking" / "irra_icfg"): "parent folder 'Checking' is not a dataset name "
                                                 "(CUHK-PEDES, ICFG-PEDES, RSTPReid)",
        "RSTPReid/sdm+aux": "no configs.yaml",
    }


def test_a_missing_dataset_skips_its_folders_with_the_reason(logs_dir, tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    outcomes = importer.import_logs(logs_dir, registry, ImportOptions(data_root=tmp_path / "nowhere", audit=False),
                                    datasets=["ICFG-PEDES"])
    assert [(o.label, o.status) for o in outcomes] == [("ICFG-PEDES/sdm+itc+aux", "skipped")]
    assert outcomes[0].reason.startswith("dataset: ") and registry.list_runs() == []
    registry.close()


# ---- checks and solver era --------------------------------------------------------------------------

def test_disagreements_name_each_contradiction():
    inferred = infer_released_config(official_state_dict(tiny(cnum=9)), official_yaml("RSTPReid", tiny(cnum=9), "x"))
    meaning = interpret_folder("sdm+itc+aux_cnum9")
    good = official_yaml("RSTPReid", tiny(cnum=9), "sdm+itc+aux")
    assert disagreements(meaning, "RSTPReid", good, inferred) == []
    bad = {**good, "num_experts": 6, "moe_layers": 4, "loss_names": "sdm+id", "dataset_name": "ICFG-PEDES"}
    problems = disagreements(meaning, "RSTPReid", bad, inferred)
    assert any("num_experts 6" in p and "has 4" in p for p in problems)
    assert any("moe_layers 4" in p and "has 2" in p for p in problems)
    assert any("losses" in p for p in problems) and any("dataset_name" in p for p in problems)
    ns = disagreements(interpret_folder(NS_FOLDER), "RSTPReid", good, inferred)
    assert ns == ["the folder name means separate CRFM/EFP but the checkpoint's keys are shared"]


@pytest.fixture(scope="module")
def names() -> list[str]:
    return parameter_names(official_state_dict(tiny(), counters=True))


def test_parameter_names_leave_out_the_counter_buffers(names):
    assert len(names) == len(list(PHPModel(tiny()).named_parameters()))
    assert not any("count_accum" in name for name in names)


@pytest.mark.parametrize("solver", ["v1", "head"])
def test_solver_era_is_read_from_the_scheduler_base_lrs(names, solver):
    yaml_values = official_yaml("RSTPReid", tiny(), "sdm+itc+aux")
    era = solver_era({"base_lrs": naive_base_lrs(names, solver)}, names, yaml_values)
    assert era.era == solver
    expected = "2" if solver == "v1" else "1"
    assert era.evidence.startswith(f"MoE weight groups at {expected} x lr")
    assert era.evidence.endswith(f"all {len(names)} groups follow its rules")


def test_solver_era_counts_the_groups_that_break_the_rules(names):
    yaml_values = official_yaml("RSTPReid", tiny(), "sdm+itc+aux")
    base_lrs = naive_base_lrs(names, "v1")
    base_lrs[0] *= 10  # a backbone weight at an odd rate: the MoE groups still say V1
    era = solver_era({"base_lrs": base_lrs}, names, yaml_values)
    assert era.era == "v1" and era.evidence.endswith(f"1 of {len(names)} groups differ from its rules")


def test_solver_era_is_unknown_without_evidence(names):
    yaml_values = official_yaml("RSTPReid", tiny(), "sdm+itc+aux")
    assert solver_era(None, names, yaml_values).era == "unknown"
    assert solver_era({"last_epoch": 3}, names, yaml_values).evidence == "the checkpoint has no scheduler base_lrs"
    short = solver_era({"base_lrs": naive_base_lrs(names, "v1")[:-1]}, names, yaml_values)
    assert short.era == "unknown" and f"for {len(names)} parameters" in short.evidence
    ones = {**yaml_values, "moe_lr_factor": 1.0}
    same = solver_era({"base_lrs": naive_base_lrs(names, "head")}, names, ones)
    assert same.era == "unknown" and "both solvers" in same.evidence
    odd = solver_era({"base_lrs": [LR * 3] * len(names)}, names, yaml_values)
    assert odd.era == "unknown" and "neither lr nor lr x moe_lr_factor" in odd.evidence
    no_lr = {key: value for key, value in yaml_values.items() if key != "lr"}
    assert solver_era({"base_lrs": naive_base_lrs(names, "v1")}, names, no_lr).evidence == "configs.yaml has no lr"


# ---- importing a tree ------------------------------------------------------------------------------

EXPECTED = {  # folder -> (status, encoder, sharing, solver era, cells)
    "RSTPReid/sdm+itc+aux_cnum9": ("imported", "full", "shared", "v1",
                                   {("cnum", "9"), ("headline", "PHP"), ("module", "full"), ("sharing", "shared"),
                                    ("beta", "0.5")}),
    "RSTPReid/sdm+itc+aux": ("imported", "full", "shared", "head", {("loss", "sdm+itc+aux")}),
    "RSTPReid/itc+aux": ("imported", "full", "shared", "unknown", {("loss", "itc+aux")}),
    "RSTPReid/ablation_base": ("imported", "base", "shared", "head", {("module", "base")}),
    "RSTPReid/ablation_crfm": ("imported", "crfm", "shared", "head", {("module", "crfm")}),
    "RSTPReid/ablation_efp": ("imported", "efp", "shared", "head", {("module", "efp")}),
    f"RSTPReid/{NS_FOLDER}": ("imported", "full", "separate", "head", {("sharing", "separate")}),
    "ICFG-PEDES/sdm+itc+aux": ("imported", "full", "shared", "head",
                               {("loss", "sdm+itc+aux"), ("headline", "PHP"), ("module", "full"),
                                ("sharing", "shared"), ("beta", "0.5")}),
}


def test_import_records_one_imported_run_per_cell(imported, logs_dir):
    registry, outcomes, _ = imported
    for label, (status, encoder, sharing, era, cells) in EXPECTED.items():
        outcome = outcomes[label]
        sha256 = hashlib.sha256((logs_dir / label / "best.pth").read_bytes()).hexdigest()
        assert (outcome.status, outcome.encoder, outcome.sharing, outcome.solver.era) == (status, encoder, sharing, era)
        runs = [registry.get_run(run_id) for run_id in outcome.run_ids]
        assert {(run.table, run.row_label) for run in runs} == cells
        for run in runs:
            assert run.kind == "imported" and run.status == "done" and run.dataset == label.split("/")[0]
            assert run.config["model"]["variant"] == encoder and run.config["model"]["sharing"] == sharing
            assert run.config["imported"]["evaluation"] == {
                "batch_size": TEST_BATCH_SIZE, "encoder": encoder, "image_size": [48, 24], "order": "annotation",
                "precision": "official"}
            assert run.config["train"]["solver"] == era and run.config["data"]["source"] == "synthetic"
            assert registry.results(run.id)["best-on-test"]["metrics"] == outcome.metrics
            (checkpoint,) = registry.checkpoints(run.id)
            assert checkpoint.sha256 == sha256 == run.config["imported"]["sha256"] == outcome.sha256
            assert checkpoint.epoch == 7
            provenance = registry.provenance(run.id)
            assert provenance["solver_era"] == era and provenance["yaml"]["img_size"] == [48, 24]
            assert provenance["yaml"]["root_dir"] == "/authors/data"
    assert len(registry.list_runs(kind="imported")) == sum(len(cells) for *_, cells in EXPECTED.values())


def test_imported_runs_keep_outcomes_that_reproduce_their_results_and_fill_claims(imported, cli):
    from php_runner.engine.metrics import metrics_from_outcomes
    from php_runner.reports.claims import check_claims

    registry, _, _ = imported
    rows = [row for row in registry.result_rows() if row.kind == "imported"]
    assert rows and all(metrics_from_outcomes(row.outcomes) == row.metrics for row in rows)
    checked = [result for result in check_claims(rows) if result.kind == "imported"]
    module = [r for r in checked if (r.claim.table, r.claim.row, r.claim.dataset) == ("module", "base", "RSTPReid")]
    assert module and module[0].ours.value is not None and module[0].seeds == (rows[0].seed,)
    code, out, _ = cli("report", "claims", "--db", registry.url)
    assert code == 0, out
    from pathlib import Path

    assert "| module | base vs full | RSTPReid | R1 | imported |" in Path("reports/claims.md").read_text()


def test_skipped_folders_carry_their_reason(imported):
    _, outcomes, _ = imported
    mismatch = outcomes["RSTPReid/sdm+itc+aux_cnum6"]
    assert mismatch.status == "skipped" and mismatch.run_ids == ()
    assert "configs.yaml cnum 9 but the checkpoint has 6" in mismatch.reason
    assert "the folder name means cnum 6 but configs.yaml has 9" in mismatch.reason
    unknown = outcomes["RSTPReid/php_training_reproduce_on_IRRA"]
    assert unknown.status == "skipped" and "not a released run name" in unknown.reason
    assert set(outcomes) == set(EXPECTED) | {"RSTPReid/sdm+itc+aux_cnum6", "RSTPReid/php_training_reproduce_on_IRRA"}


def test_counter_buffers_are_reported_and_accepted(imported):
    _, outcomes, _ = imported
    assert outcomes["RSTPReid/sdm+itc+aux_cnum9"].counter_buffers
    assert outcomes["RSTPReid/ablation_efp"].counter_buffers
    assert not outcomes["RSTPReid/ablation_base"].counter_buffers


def test_metrics_are_the_official_batching_evaluation_of_the_checkpoint(imported, logs_dir, tiny_data_root):
    from php_runner.data import read_dataset
    from php_runner.engine.evaluate import EvalSettings, evaluate
    from php_runner.model.checkpoint import load_model

    _, outcomes, _ = imported
    split = read_dataset(tiny_data_root, "RSTPReid").test
    assert len(split.img_paths) % TEST_BATCH_SIZE  # a partial last batch is part of the protocol
    for folder, encoder in (("ablation_efp", "efp"), (NS_FOLDER, "full")):
        path = logs_dir / "RSTPReid" / folder
        heads = {"vision_heads": tiny().clip.vision_heads, "text_heads": tiny().clip.text_heads}
        model, _ = load_model(path / "best.pth", path / "configs.yaml", **heads)
        apply_precision(model, "official")
        settings = EvalSettings(batch_size=TEST_BATCH_SIZE, encoder=encoder, image_size=(48, 24))
        assert outcomes[f"RSTPReid/{folder}"].metrics == pytest.approx(evaluate(model, split, settings))


def test_imported_embeddings_are_the_fp16_models_at_the_yaml_batch(tmp_path, batching_data_root, monkeypatch):
    from php_runner.data import read_dataset
    from php_runner.engine.evaluate import EvalSettings, extract_embeddings, score_embeddings
    from php_runner.model.checkpoint import load_model

    folder = tmp_path / "logs" / "RSTPReid" / "sdm+itc+aux"
    cnum9 = tiny(cnum=9)
    write_released(folder, cnum9, official_yaml("RSTPReid", cnum9, "sdm+itc+aux"), solver="head")
    seen = []
    original = importer._evaluate

    def spy(model, dataset, settings):
        seen.append(extract_embeddings(model, dataset.test, settings))
        return original(model, dataset, settings)

    monkeypatch.setattr(importer, "_evaluate", spy)
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    options = ImportOptions(data_root=batching_data_root, audit=False, data_source="synthetic")
    [outcome] = importer.import_logs(tmp_path / "logs", registry, options)
    registry.close()
    assert outcome.status == "imported" and len(seen) == 1, outcome.reason

    split = read_dataset(batching_data_root, "RSTPReid").test
    heads = {"vision_heads": tiny().clip.vision_heads, "text_heads": tiny().clip.text_heads}

    def direct(precision, batch_size=TEST_BATCH_SIZE):
        model, _ = load_model(folder / "best.pth", folder / "configs.yaml", **heads)
        settings = EvalSettings(batch_size=batch_size, precision=precision, image_size=(48, 24))
        return extract_embeddings(apply_precision(model, precision).eval(), split, settings)

    fp16, fp32, batch64 = direct("official"), direct("amp"), direct("official", 64)
    assert (fp32.text - fp16.text).abs().max() > 1e-4 and (batch64.text - fp16.text).abs().max() > 1e-3
    assert torch.equal(seen[0].text, fp16.text) and torch.equal(seen[0].image, fp16.image)
    assert outcome.metrics == score_embeddings(fp16)


def test_reimporting_evaluates_nothing(imported, logs_dir, monkeypatch):
    registry, outcomes, options = imported
    before = [(run.id, run.config_hash, run.status, run.finished_at) for run in registry.list_runs()]
    monkeypatch.setattr(importer, "_evaluate", lambda *a, **k: pytest.fail("evaluated a recorded checkpoint"))
    monkeypatch.setattr(importer, "_build_model", lambda *a, **k: pytest.fail("built a model for a recorded run"))
    again = {outcome.label: outcome for outcome in importer.import_logs(logs_dir, registry, options)}
    for label in EXPECTED:
        assert again[label].status == "unchanged"
        assert (again[label].run_ids, again[label].metrics) == (outcomes[label].run_ids, outcomes[label].metrics)
    assert again["RSTPReid/sdm+itc+aux_cnum6"].status == "skipped"
    assert [(run.id, run.config_hash, run.status, run.finished_at) for run in registry.list_runs()] == before


def test_auditing_later_adds_the_audit_without_evaluating_again(imported, logs_dir, monkeypatch):
    registry, outcomes, options = imported
    monkeypatch.setattr(importer, "_evaluate", lambda *a, **k: pytest.fail("evaluated a recorded checkpoint"))
    audit_options = dataclasses.replace(options, audit=True, audit_seeds=2)
    (outcome,) = importer.import_logs(logs_dir, registry, audit_options, datasets=["ICFG-PEDES"])
    first = outcomes["ICFG-PEDES/sdm+itc+aux"]
    assert outcome.status == "audited" and outcome.run_ids == first.run_ids and outcome.metrics == first.metrics
    assert set(outcome.audit) == {"batch_dependent", "r1_ordered", "r1_shuffled", "r1_shuffled_std", "r1_gap"}
    assert outcome.audit["r1_ordered"] == first.metrics["R1"]  # the audit's ordered pass is the official one
    for run_id in outcome.run_ids:
        report = registry.latest_audit(run_id).report
        assert report["selection"]["selected_by"] == "test"
        assert report["selection"]["rules"]["best-on-test"] == {"epoch": 7, "test": report["ordered"]}
        assert report["eval_batch_size"] == TEST_BATCH_SIZE and report["encoder"] == "full"
    headline = reports.build_table("headline", registry.result_rows("headline"))
    verdict = headline.line("PHP", "ICFG-PEDES", kind="imported").audit
    assert verdict is not None and verdict.r1_ordered == first.metrics["R1"]
    assert headline.line("PHP", "RSTPReid", kind="imported").audit is None  # not audited


def test_the_imported_rows_fill_the_table_cells(imported):
    registry, outcomes, _ = imported
    module = reports.build_table("module", registry.result_rows("module"))
    for row, folder in (("base", "ablation_base"), ("crfm", "ablation_crfm"), ("efp", "ablation_efp"),
                        ("full", "sdm+itc+aux_cnum9")):
        line = module.line(row, "RSTPReid", kind="imported")
        assert line is not None and line.source == "imported"
        assert line.cell("R1").mean == outcomes[f"RSTPReid/{folder}"].metrics["R1"]
        assert line.cell("R1").paper == {"base": 55.95, "crfm": 57.35, "efp": 71.30, "full": 76.70}[row]
    assert module.line("full", "ICFG-PEDES", kind="imported").cell("mAP").mean == \
        outcomes["ICFG-PEDES/sdm+itc+aux"].metrics["mAP"]
    assert module.line("base", "ICFG-PEDES", kind="imported") is None
    sharing = reports.build_table("sharing", registry.result_rows("sharing"))
    assert sharing.line("separate", "RSTPReid", kind="imported").cell("R1").mean == \
        outcomes[f"RSTPReid/{NS_FOLDER}"].metrics["R1"]
    headline = reports.build_table("headline", registry.result_rows("headline"))
    assert headline.line("PHP", "RSTPReid", kind="imported").cell("R10").mean == \
        outcomes["RSTPReid/sdm+itc+aux_cnum9"].metrics["R10"]
    loss = reports.build_table("loss", registry.result_rows("loss"))
    assert {line.row_key for line in loss.lines if line.kind == "imported" and line.dataset == "RSTPReid"} == \
        {"itc+aux", "sdm+itc+aux"}
    cnum = reports.build_table("cnum", registry.result_rows("cnum"))
    assert cnum.line("6", "RSTPReid", kind="imported") is None  # its yaml disagreed


# ---- the command line ---------------------------------------------------------------------------------

def test_cli_imports_once_and_lists_what_it_did(logs_dir, tiny_data_root, tmp_path):
    from php_runner.cli import app

    command = ["import", str(logs_dir), "--data-root", str(tiny_data_root), "--datasets", "ICFG-PEDES", "--no-audit",
               "--device", "cpu", "--db", f"sqlite:///{tmp_path / 'cli.db'}", "--data-source", "synthetic"]
    result = CliRunner().invoke(app, [*command, "--json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.output)
    assert entry["folder"] == "ICFG-PEDES/sdm+itc+aux" and entry["status"] == "imported"
    assert entry["audit"] is None and entry["solver_era"] == "head" and math.isfinite(entry["metrics"]["R1"])
    assert "headline/PHP" in entry["cells"] and len(entry["run_ids"]) == len(entry["cells"])

    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, again.output
    assert "unchanged ICFG-PEDES/sdm+itc+aux" in " ".join(again.output.split())


def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, tiny_data_root):
    from php_runner.cli import app

    empty = tmp_path / "logs"
    empty.mkdir()
    result = CliRunner().invoke(app, ["import", str(empty), "--data-root", str(tiny_data_root),
                                      "--db", f"sqlite:///{tmp_path / 'r.db'}"])
    assert result.exit_code == 2
    assert "no best.pth or configs.yaml" in result.output
    result = CliRunner().invoke(app, ["import", str(empty), "--data-root", str(tiny_data_root), "--datasets", "Market",
                                      "--db", f"sqlite:///{tmp_path / 'm.db'}"])  # never ./registry.db of the checkout
    assert result.exit_code == 2 and "unknown dataset 'Market'" in result.output
    assert not (tmp_path / "m.db").exists()  # refused before the registry is opened
