"""Tests of php_runner/studies/audit.py: the whole audit on tiny models (official coupling batch-dependent,
per-sample not), the batch-size-1 pass, and the CLI on checkpoint files and registry runs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from php_runner.data import read_dataset, write_synthetic
from php_runner.engine import audit_measures
from php_runner.engine.audit_measures import AuditSettings
from php_runner.engine.evaluate import EvalSettings
from php_runner.engine.metrics import METRIC_NAMES
from php_runner.studies import audit


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# acceptance: official coupling is batch-dependent, per-sample coupling is not


@pytest.fixture(scope="module")
def icfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("icfg")
    write_synthetic(root, "ICFG-PEDES", num_ids=8, seed=0)
    return read_dataset(root, "ICFG-PEDES")


def _model_with_trained_experts(config):
    from php_runner.model.php import PHPModel

    torch.manual_seed(0)
    model = PHPModel(config)
    # Trained experts are not the identity: give the EFP branch weight so it moves the embeddings.
    for block in model.shared_transformer.resblocks:
        for expert in block.feed_forward.experts:
            torch.nn.init.normal_(expert.up.weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def tiny_model():
    from php_runner.model.config import PHPConfig

    return _model_with_trained_experts(PHPConfig.tiny())


def _settings(model):
    return AuditSettings(
        eval=EvalSettings(batch_size=4, precision="amp", image_size=model.config.clip.image_size),
        train_batch_size=8,
        seeds=3,
        sample_size=6,
        hash_workers=2,
    )


def test_official_coupling_is_reported_batch_dependent_and_order_sensitive(icfg, tiny_model):
    tiny_model.coupling = "official"
    report = audit.run_audit(tiny_model, icfg, _settings(tiny_model))
    assert report["batch_dependent"] is True
    for modality in ("text", "image"):
        probe = report["batch_independence"][modality]
        assert probe["batch_dependent"] and probe["alone"]["max"] > 100 * report["batch_independence"]["threshold"]
    assert report["order_sensitive"] and report["max_metric_change"] > 0
    assert any(run != report["ordered"] for run in report["shuffled"]["runs"])
    assert report["r1_gap"] == report["ordered"]["R1"] - report["shuffled"]["R1"]
    # In the ICFG layout text batch k and image batch k hold the same people.
    assert report["alignment"]["identical_batches"] == 1.0
    sweep = report["batch_size_sweep"]
    assert sweep["batch_sizes"] == list(audit_measures.SWEEP_BATCH_SIZES) == [1, 8, 64, 256]
    assert set(sweep["ordered"]) == set(sweep["shuffled"]) == set(sweep["r1_gap"]) == {"1", "8", "64", "256"}
    for size, gap in sweep["r1_gap"].items():
        assert gap == sweep["ordered"][size]["R1"] - sweep["shuffled"][size]["R1"]
    # The sweep and the order section share evaluations: the same batch sizes give the same numbers.
    assert sweep["ordered"]["8"] == report["batch_sizes"]["8"] and sweep["ordered"]["1"] == report["batch_sizes"]["1"]
    assert sweep["shuffled"]["1"]["runs"] == [sweep["ordered"]["1"]]
    assert report["chance_r1"]["gallery"] == pytest.approx(100 / 4)  # 4 test identities with 2 images each
    json.dumps(report)  # the report is JSON-able as it stands


def test_per_sample_coupling_is_batch_independent_with_equal_metrics(icfg, tiny_model):
    tiny_model.coupling = "per-sample"
    report = audit.run_audit(tiny_model, icfg, _settings(tiny_model))
    assert report["batch_dependent"] is False
    probes = report["batch_independence"]
    assert max(probes[m][k]["max"] for m in ("text", "image") for k in ("alone", "other_batch")) < probes["threshold"]
    assert all(run == report["ordered"] for run in report["shuffled"]["runs"])
    assert all(metrics == report["ordered"] for metrics in report["batch_sizes"].values())
    assert set(report["batch_sizes"]) == {"4", "1", "8"}
    sweep = report["batch_size_sweep"]
    assert all(sweep["shuffled"][size]["runs"] == [sweep["ordered"][size]] for size in sweep["ordered"])
    assert set(sweep["r1_gap"].values()) == {0.0}
    assert report["r1_gap"] == 0.0 and report["order_sensitive"] is False
    assert {k: report["shuffled"][k] for k in METRIC_NAMES} == pytest.approx(report["ordered"])
    assert audit.audit_summary(report) == {
        "batch_dependent": False, "r1_ordered": report["ordered"]["R1"], "r1_shuffled": report["shuffled"]["R1"],
        "r1_shuffled_std": 0.0, "r1_gap": 0.0}


def test_the_batch_size_one_pass_is_one_batched_alone_pass_equal_to_one_forward_per_sample(icfg, tiny_model):
    from php_runner.data.loaders import ImageSet, TextSet
    from php_runner.data.transforms import build_transform
    from php_runner.engine.evaluate import Embeddings, score_embeddings

    tiny_model.coupling = "official"
    split, sizes = icfg.test, []
    original_text, original_image = tiny_model.encode_text, tiny_model.encode_image
    tiny_model.encode_text = lambda inputs, encoder=None: sizes.append(len(inputs)) or original_text(inputs, encoder)
    tiny_model.encode_image = lambda inputs, encoder=None: sizes.append(len(inputs)) or original_image(inputs, encoder)
    try:
        report = audit_measures.order_sensitivity(tiny_model, split, _settings(tiny_model))
    finally:
        del tiny_model.encode_text, tiny_model.encode_image
    assert 1 not in sizes  # no single-sample forwards: batch size 1 ran as the batched alone pass
    tokens = TextSet(split.caption_pids, split.captions).token_ids
    images = ImageSet(split.image_pids, split.img_paths, build_transform(tiny_model.config.clip.image_size))
    tiny_model.eval()
    with torch.no_grad():
        one_at_a_time = Embeddings(
            text=torch.cat([tiny_model.encode_text(tokens[i:i + 1]) for i in range(len(tokens))]),
            image=torch.cat([tiny_model.encode_image(images[i][1][None]) for i in range(len(images))]),
            text_pids=torch.tensor(split.caption_pids), image_pids=torch.tensor(split.image_pids))
    expected = {name: score_embeddings(one_at_a_time)[name] for name in METRIC_NAMES}
    assert report["batch_sizes"]["1"] == expected


# ----------------------------------------------------------------------------------------------
# the command line: a checkpoint file and a registry run


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory, tiny_model):
    """The tiny preset's weights as a training run saves them (its config lives in the registry)."""
    from php_runner.model.checkpoint import save_atomic

    path = tmp_path_factory.mktemp("run") / "best.pth"
    save_atomic({"model": tiny_model.state_dict(), "epoch": 2}, path)
    return path


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A self-describing checkpoint file; tower widths of 64 let the loader infer head counts (width // 64)."""
    from php_runner.model.checkpoint import CONFIG_KEY, config_to_dict, save_atomic
    from php_runner.model.config import PHPConfig

    tiny = PHPConfig.tiny()
    model = _model_with_trained_experts(
        replace(tiny, clip=replace(tiny.clip, vision_width=64, vision_heads=1, text_width=64, text_heads=1)))
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    save_atomic({"model": model.state_dict(), CONFIG_KEY: config_to_dict(model.config), "epoch": 3}, path)
    return path


def _cli(*args):
    from typer.testing import CliRunner

    import php_runner.cli.audit  # noqa: F401  (registers the command, also when run alone)
    from php_runner.cli import app

    return CliRunner().invoke(app, ["audit", *map(str, args)])


@pytest.mark.parametrize("coupling,dependent", [("official", True), ("per-sample", False)])
def test_cli_audits_a_checkpoint_file_as_json(icfg, saved_checkpoint, coupling, dependent):
    result = _cli("--checkpoint", saved_checkpoint, "--data-root", icfg.root.parent, "--dataset", "ICFG-PEDES",
                  "--coupling", coupling, "--precision", "amp", "--batch-size", 4, "--seeds", 2, "--sample", 3,
                  "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["batch_dependent"] is dependent and report["coupling"] == coupling
    assert set(report["ordered"]) == set(METRIC_NAMES)
    assert set(report["shuffled"]) >= {*METRIC_NAMES, "std"} and report["shuffled"]["seeds"] == [0, 1]
    assert report["selection"]["selected_by"] == "test" and report["selection"]["epoch"] == 3


def test_cli_rejects_bad_input_with_one_line(saved_checkpoint):
    for args, field in ((["--checkpoint", saved_checkpoint], "--data-root"),
                        ([], "RUN or --checkpoint"),
                        (["--checkpoint", "missing.pth", "--data-root", "."], "--checkpoint missing.pth"),
                        (["--checkpoint", saved_checkpoint, "--data-root", ".", "--coupling", "both"], "--coupling")):
        result = _cli(*args)
        assert result.exit_code == 2 and field in result.output
        assert len(result.output.strip().splitlines()) == 1


def _tiny_run_config(model, data_root) -> dict:
    from dataclasses import asdict

    model_section = {k: v for k, v in asdict(model.config).items() if k not in ("clip", "num_classes")}
    model_section.update(clip="tiny", image_size=list(model.config.clip.image_size), coupling="official")
    return {
        "model": model_section,
        "loss": {"names": ["sdm", "itc", "aux"]},
        "train": {"batch_size": 8, "test_batch_size": 4, "precision": "amp", "selection": "test"},
        "data": {"dataset": "ICFG-PEDES", "source": "synthetic", "val_from_train": 0.0, "val_seed": 0},
        "runtime": {"data_root": str(data_root), "clip_weights": None, "device": "cpu", "num_workers": 0},
    }


def test_cli_audits_a_registry_run_and_stores_the_report(tmp_path, icfg, tiny_model, run_checkpoint):
    from types import SimpleNamespace

    from php_runner.files import file_sha256
    from php_runner.store.registry import Registry

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(url)
    config = _tiny_run_config(tiny_model, icfg.root.parent)
    planned = SimpleNamespace(config=config, config_hash="ab" * 32, spec_name="coupling", table="coupling",
                              row_label="official", dataset="ICFG-PEDES", seed=1, preset="tiny")
    run = registry.plan_run(planned)
    registry.record_checkpoint(run.id, str(run_checkpoint), file_sha256(run_checkpoint), 2, "best")
    for epoch, r1 in ((1, 20.0), (2, 50.0), (3, 40.0)):
        registry.record_epoch(run.id, epoch, "test", dict.fromkeys(METRIC_NAMES, r1))
    registry.close()

    result = _cli(str(run.id), "--db", url, "--seeds", 2, "--sample", 3, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["batch_dependent"] is True and report["eval_batch_size"] == 4
    assert set(report["batch_sizes"]) == {"4", "1", "8"}
    selection = report["selection"]
    assert selection["selected_by"] == "test" and selection["rules"]["best-on-test"]["epoch"] == 2
    assert selection["r1_gaps"] == {"test_minus_val": None, "test_minus_last": 10.0}

    stored = Registry(url).latest_audit(run.id)
    assert stored is not None and audit.audit_summary(stored.report) == audit.audit_summary(report)
    text = _cli(str(run.id), "--db", url, "--seeds", 2, "--sample", 3, "--device", "cpu", "--coupling", "per-sample")
    assert text.exit_code == 0, text.output
    assert "batch-independent" in text.output
