"""The php-run command line: help examples, JSON shapes, exit codes 0/1/2 and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer

from php_runner.cli import app
from php_runner.data import read_dataset
from php_runner.store.registry import Registry
from php_runner.experiment.specs import expand, load_spec, shipped_folder

EXPERIMENTS = shipped_folder()
METRIC_NAMES = ["R1", "R5", "R10", "mAP", "mINP"]


def _commands(group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a sub-group such as ``data``
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,)


def test_every_command_has_help_with_an_example(cli):
    paths = list(_commands(typer.main.get_command(app)))
    assert ("data", "check") in paths and ("run",) in paths and len(paths) >= 12
    for path in paths:
        code, out, _ = cli(*path, "--help")
        assert code == 0 and "Example" in out, path


def record_done_run(registry: Registry, planned, metrics: dict, rule: str = "best-on-test"):
    run = registry.plan_run(planned)
    registry.record_epoch(run.id, 1, "train", {"total": 1.0, "lr": 1e-3})
    registry.record_epoch(run.id, 1, "test", metrics)
    registry.record_result(run.id, rule, 1, "test", metrics)
    registry.record_checkpoint(run.id, "/x/best.pth", "0" * 64, 1, "best")
    registry.record_provenance(run.id, {"git_commit": "abc", "host": "h"})
    registry.mark_done(run.id)
    return run


def test_status_and_show_json(cli, registry_url, spec_dir, tiny_data_root):
    planned = expand(load_spec(spec_dir / "two_seeds.toml"), "tiny", runtime={"data_root": str(tiny_data_root)})
    registry = Registry(registry_url)
    metrics = dict(zip(METRIC_NAMES, [50.0, 75.0, 100.0, 60.5, 40.25]))
    done = record_done_run(registry, planned[0], metrics)
    registry.record_audit(done.id, {"batch_dependent": True})
    queued = registry.plan_run(planned[1])

    code, out, _ = cli("status", "--json", "--db", registry_url)
    assert code == 0
    entries = json.loads(out)
    assert [e["id"] for e in entries] == [done.id, queued.id]
    for entry in entries:
        assert {"id", "config_hash", "dataset", "status", "metrics"} <= set(entry)
    assert entries[0]["config_hash"] == done.config_hash and entries[0]["dataset"] == "CUHK-PEDES"
    assert entries[0]["status"] == "done" and entries[0]["metrics"] == metrics
    assert entries[1]["status"] == "queued" and entries[1]["metrics"] is None

    code, out, _ = cli("show", done.config_hash[:10], "--json", "--db", registry_url)
    details = json.loads(out)
    assert code == 0 and set(details) == {"run", "epochs", "results", "checkpoints", "provenance", "audit"}
    assert details["run"]["config"] == done.config and details["results"]["best-on-test"]["metrics"] == metrics
    assert details["audit"]["report"] == {"batch_dependent": True} and details["provenance"]["git_commit"] == "abc"

    code, out, _ = cli("status", "--db", registry_url)
    assert code == 0 and "50.00" in out and "queued" in out
    code, out, _ = cli("show", str(done.id), "--db", registry_url)
    assert code == 0 and "best-on-test" in out and "/x/best.pth" in out


def test_the_environment_variable_selects_the_registry(cli, tmp_path, monkeypatch, spec_dir, tiny_data_root):
    planned = expand(load_spec(spec_dir / "two_seeds.toml"), "tiny", runtime={"data_root": str(tiny_data_root)})
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    Registry(url).plan_run(planned[0])
    monkeypatch.setenv("PHP_RUN_DB", url)
    code, out, _ = cli("status", "--json")
    assert code == 0 and len(json.loads(out)) == 1
    assert not Path("registry.db").exists()


def test_demo_with_every_run_done_trains_nothing_and_prints_the_table(cli, registry_url, tiny_data_root):
    planned = expand(load_spec(EXPERIMENTS / "headline.toml"), "tiny", runtime={"data_root": str(tiny_data_root)})
    registry = Registry(registry_url)
    for index, run in enumerate(planned):
        record_done_run(registry, run, dict(zip(METRIC_NAMES, [10.0 + index, 20.0, 30.0, 40.0, 50.0])))
    code, out, err = cli("demo", "--data-root", tiny_data_root, "--db", registry_url)
    assert code == 0, out
    assert f"{len(planned)} skipped" in err and "done run" not in out + err  # progress: stderr when piped
    assert "PHP" in out and "10.00" in out
    assert Path("reports/headline_tiny.md").is_file() and Path("reports/headline_tiny.csv").is_file()


def test_table_all_on_an_empty_registry_lists_what_to_run(cli, registry_url):
    code, out, _ = cli("table", "--all", "--json", "--db", registry_url)
    assert code == 0
    views = json.loads(out)
    assert {v["name"] for v in views} >= {"headline", "module", "loss", "cnum", "beta", "sharing", "coupling"}
    fills = {line["fill_command"] for v in views for line in v["lines"] if line["fill_command"]}
    assert "php-run ablate cnum --dataset CUHK-PEDES" in fills
    code, out, err = cli("table", "--db", registry_url)
    assert code == 0 and "No results recorded yet" in err and not out.strip()


def test_validate_loads_the_shipped_specs(cli):
    code, out, _ = cli("validate")
    assert code == 0 and "headline" in out and "cnum" in out


def test_synth_and_data_check(cli, tmp_path):
    code, out, _ = cli("synth", "--root", tmp_path / "d", "--dataset", "RSTPReid", "--ids", "3", "--seed", "2")
    assert code == 0 and (tmp_path / "d" / "RSTPReid" / "data_captions.json").is_file()
    code, out, err = cli("data", "check", "--data-root", tmp_path / "d", "--dataset", "RSTPReid")
    assert code == 0 and "train" in out and "no problems" in out and err == ""
    next((tmp_path / "d" / "RSTPReid" / "imgs").rglob("*.jpg")).unlink()
    code, out, err = cli("data", "check", "--data-root", tmp_path / "d", "--dataset", "RSTPReid")
    assert code == 2 and "problem" in err


def test_synth_test_split_options_and_variant_check(cli, tmp_path):
    code, out, _ = cli("synth", "--root", tmp_path / "d", "--dataset", "ICFG-PEDES", "--ids", "2", "--test-ids", "3",
                       "--test-images-per-id", "4", "--test-captions-per-image", "1")
    assert code == 0
    test = read_dataset(tmp_path / "d", "ICFG-PEDES").test
    assert (len(set(test.image_pids)), len(test.img_paths), len(test.captions)) == (3, 12, 12)
    code, _, err = cli("synth", "--root", tmp_path / "e", "--variant", "icfg-scale", "--ids", "3")
    assert code == 2 and "--variant" in err
    code, _, err = cli("synth", "--root", tmp_path / "e", "--variant", "nope")
    assert code == 2 and "nope" in err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny PHP model saved as a php-run checkpoint (weights + config)."""
    import torch

    from php_runner.model.checkpoint import CONFIG_KEY, config_to_dict, save_atomic
    from php_runner.model.config import PHPConfig
    from php_runner.model.php import PHPModel

    torch.manual_seed(0)
    model = PHPModel(PHPConfig.tiny())
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    save_atomic({"model": model.state_dict(), CONFIG_KEY: config_to_dict(model.config), "epoch": 1}, path)
    return path, model


def _engine_embeddings(model, split, batch_size, precision):
    from php_runner.engine.evaluate import EvalSettings, extract_embeddings
    from php_runner.model.precision import apply_precision

    settings = EvalSettings(batch_size=batch_size, precision=precision, image_size=model.config.clip.image_size)
    return extract_embeddings(apply_precision(model, precision), split, settings)


def test_evaluate_matches_the_engine_and_saves_embeddings(cli, tmp_path, tiny_checkpoint, batching_data_root):
    import torch

    from php_runner.data import read_dataset
    from php_runner.engine.evaluate import score_embeddings

    path, model = tiny_checkpoint
    split = read_dataset(batching_data_root, "CUHK-PEDES").test
    expected = _engine_embeddings(model, split, 3, "amp")
    other_batch = _engine_embeddings(model, split, 64, "amp")
    assert (other_batch.text - expected.text).abs().max() > 1e-3  # the split is large enough to see batching
    assert score_embeddings(other_batch) != score_embeddings(expected)
    npz = tmp_path / "emb.npz"
    code, out, _ = cli("evaluate", "--checkpoint", path, "--data-root", batching_data_root, "--dataset", "CUHK-PEDES",
                       "--precision", "amp", "--device", "cpu", "--test-batch-size", "3", "--json",
                       "--save-embeddings", npz)
    assert code == 0
    metrics = score_embeddings(expected)
    assert json.loads(out) == {k: metrics[k] for k in METRIC_NAMES}
    arrays = np.load(npz)
    assert set(arrays.files) == {"text", "image", "text_pids", "image_pids"}
    assert torch.equal(torch.from_numpy(arrays["text"]), expected.text)
    assert torch.equal(torch.from_numpy(arrays["image"]), expected.image)
    assert arrays["image_pids"].tolist() == list(split.image_pids)


OFFICIAL_TEST_BATCH = 3


@pytest.fixture(scope="module")
def official_release(tmp_path_factory, batching_data_root):
    """An official-format best.pth (fp16 layout, no php-run config) with its configs.yaml naming the data.

    Tower widths are multiples of 64, so head counts follow OpenAI's width // 64 rule as for ViT-B/16.
    """
    import torch
    import yaml

    from php_runner.model.config import ClipConfig, PHPConfig
    from php_runner.model.php import PHPModel
    from php_runner.model.precision import apply_precision

    clip = ClipConfig(embed_dim=64, vision_width=64, vision_layers=1, vision_heads=1, patch_size=8, stride=8,
                      image_size=(48, 24), text_width=64, text_heads=1, text_layers=1)
    config = PHPConfig(clip=clip, cnum=3, num_experts=4, topk=2, reduction=4, efp_layers=1, efp_heads=2)
    torch.manual_seed(0)
    model = apply_precision(PHPModel(config), "official")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name and name.endswith("up.weight"):
                param.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("release")
    torch.save({"model": model.state_dict(), "epoch": 5}, folder / "best.pth")
    values = {"dataset_name": "RSTPReid", "root_dir": str(batching_data_root), "test_batch_size": OFFICIAL_TEST_BATCH,
              "batch_size": 8, "img_size": (48, 24), "stride_size": 8, "cnum": 3, "num_experts": 4, "topk": 2,
              "moe_heads": 2, "moe_layers": 1, "val_dataset": "test", "loss_names": "sdm+itc+aux"}
    (folder / "configs.yaml").write_text(yaml.dump(values))
    assert "!!python/tuple" in (folder / "configs.yaml").read_text()
    return folder


def _official_model(folder):
    from php_runner.model.checkpoint import load_model

    return load_model(folder / "best.pth", folder / "configs.yaml")[0]


def test_evaluate_with_config_takes_dataset_root_and_batch_from_the_yaml_in_fp16(cli, tmp_path, official_release,
                                                                                  batching_data_root):
    import torch

    from php_runner.data import read_dataset
    from php_runner.engine.evaluate import score_embeddings

    split = read_dataset(batching_data_root, "RSTPReid").test
    fp16 = _engine_embeddings(_official_model(official_release), split, OFFICIAL_TEST_BATCH, "official")
    fp32 = _engine_embeddings(_official_model(official_release), split, OFFICIAL_TEST_BATCH, "amp")
    batch64 = _engine_embeddings(_official_model(official_release), split, 64, "official")
    assert (fp32.text - fp16.text).abs().max() > 1e-4 and (batch64.text - fp16.text).abs().max() > 1e-3
    npz = tmp_path / "emb.npz"
    code, out, err = cli("evaluate", "--checkpoint", official_release / "best.pth", "--config",
                         official_release / "configs.yaml", "--device", "cpu", "--json", "--save-embeddings", npz)
    assert code == 0, err
    arrays = np.load(npz)
    assert torch.equal(torch.from_numpy(arrays["text"]), fp16.text)
    assert torch.equal(torch.from_numpy(arrays["image"]), fp16.image)
    metrics = score_embeddings(fp16)
    assert json.loads(out) == {k: metrics[k] for k in METRIC_NAMES}

    code, out, err = cli("audit", "--checkpoint", official_release / "best.pth", "--config",
                         official_release / "configs.yaml", "--data-root", batching_data_root, "--device", "cpu",
                         "--seeds", "1", "--sample", "4", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["dataset"] == "RSTPReid" and report["eval_batch_size"] == OFFICIAL_TEST_BATCH
    assert report["batch_dependent"] is True
    assert {k: report["ordered"][k] for k in METRIC_NAMES} == {k: metrics[k] for k in METRIC_NAMES}


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_gives_one_line_and_exit_code_2(cli, tmp_path, registry_url, tiny_data_root):
    bad_spec = tmp_path / "bad.toml"
    bad_spec.write_text('extends = "base"\n[model]\ncnumm = 3\n')
    shutil.copy(EXPERIMENTS / "base.toml", tmp_path / "base.toml")
    shutil.copy(EXPERIMENTS / "presets.toml", tmp_path / "presets.toml")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    db = ("--db", registry_url)
    cases = [
        (("run", tmp_path / "missing.toml", *db), "missing.toml"),
        (("run", bad_spec, "--preset", "tiny", *db), "cnumm"),
        (("run", bad_spec.with_name("base.toml"), "--preset", "nope", *db), "--preset"),
        (("reproduce", "--dataset", "Market-1501", *db), "--dataset"),
        (("reproduce", "--preset", "paper", *db), "--data-root"),
        (("ablate", "depth", *db), "depth"),
        (("ablate", "cnum", "--preset", "tiny", "--seeds", "1,x", *db), "--seeds"),
        (("ablate", "cnum", "--preset", "tiny", "--gpus", "0,0", *db), "--gpus"),
        (("evaluate", "--checkpoint", junk, "--data-root", tiny_data_root, "--dataset", "CUHK-PEDES"), "junk.pth"),
        (("evaluate", "--checkpoint", junk, "--data-root", tiny_data_root, "--dataset", "Nope"), "--dataset"),
        (("show", "999", *db), "999"),
        (("table", "nope", *db), "nope"),
        (("status", "--db", f"sqlite:///{tmp_path}/no/such/dir/r.db"), "registry"),
        (("synth", "--root", tmp_path, "--dataset", "Nope"), "Nope"),
    ]
    for args, named in cases:
        code, _, err = cli(*args)
        assert named in one_line_error(code, err), args


def test_evaluate_on_a_file_that_is_not_a_checkpoint_says_so(cli, tmp_path, tiny_data_root):
    text_file = tmp_path / "passwd"
    text_file.write_text("root:x:0:0:root:/root:/bin/bash\n")
    for path in (text_file, Path("/etc/passwd")):
        if not path.is_file():
            continue
        code, _, err = cli("evaluate", "--checkpoint", path, "--data-root", tiny_data_root, "--dataset", "CUHK-PEDES")
        assert one_line_error(code, err) == f"error: {path}: not a PyTorch checkpoint " \
            "(neither a torch.save zip archive nor a legacy torch file)"


@pytest.mark.slow
def test_a_failed_run_exits_1(cli, registry_url, spec_dir, tiny_data_root):
    code, out, err = cli("run", spec_dir / "bad_selection.toml", "--preset", "tiny", "--data-root", tiny_data_root,
                       "--db", registry_url)
    assert code == 1
    assert "1 failed" in err  # progress goes to stderr when stdout is not a terminal
    [run] = Registry(registry_url).list_runs()
    assert run.status == "failed" and "selection" in run.error


@pytest.mark.slow
def test_a_spec_with_audit_true_audits_each_run_after_training(cli, registry_url, spec_dir, tiny_data_root):
    code, out, _ = cli("run", spec_dir / "audited.toml", "--preset", "tiny", "--data-root", tiny_data_root,
                       "--db", registry_url)
    assert code == 0, out
    registry = Registry(registry_url)
    verdicts = {}
    for run in registry.list_runs():
        report = registry.latest_audit(run.id).report
        verdicts[run.config["model"]["coupling"]] = report["batch_dependent"]
        assert set(report["ordered"]) >= set(METRIC_NAMES) and set(report["shuffled"]) >= set(METRIC_NAMES)
    assert verdicts == {"official": True, "per-sample": False}
    audits_before = [registry.latest_audit(run.id).id for run in registry.list_runs()]
    code, out, _ = cli("run", spec_dir / "audited.toml", "--preset", "tiny", "--data-root", tiny_data_root,
                       "--db", registry_url)
    assert code == 0 and "auditing" not in out  # done and audited: nothing to do again
    assert [registry.latest_audit(run.id).id for run in registry.list_runs()] == audits_before



@pytest.mark.slow
def test_bench_json_has_the_keys_and_records_every_call(cli):
    small = ("--clip", "tiny", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "0",
             "--max-batch", "2", "--workers", "0", "--pipeline-images", "4", "--scoring-queries", "40",
             "--scoring-gallery", "30", "--no-compile")
    code, out, _ = cli("bench", *small, "--packed", "2", "--json")
    assert code == 0, out
    record = json.loads(out)
    for path in ("train.official.samples_per_s", "train.fast.samples_per_s", "pipeline.pil_images_per_s",
                 "pipeline.cache_images_per_s", "scoring.seconds", "eval.images_per_s", "eval.texts_per_s",
                 "peak_memory_bytes", "mfu"):
        value = record
        for key in path.split("."):
            value = value[key]
        assert value is None if path == "mfu" else value > 0, path
    assert record["clip"] == "tiny" and record["git_commit"] and record["torchvision"]
    packed = record["packed"]
    assert (packed["runs"], packed["regime"], len(packed["processes"])) == (2, "fast", 2)
    assert packed["aggregate_samples_per_s"] > 0 and packed["gpu_hours_per_run_60_epochs_cuhk"] > 0
    from php_runner.reports.bench import record_benchmark

    record_benchmark({**record, "recorded": "later"}, "reports")  # a second call re-renders from every record
    records = [json.loads(line) for line in Path("reports/benchmarks.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["scoring"]["queries"] == 40 for r in records)
    table = Path("reports/benchmarks.md").read_text()
    assert table.count("## ") == 2
    section = table.split("## ")[1]
    assert section.index("fast / official") < section.index("official training samples/s")  # ratios first
    assert "| packed runs / regime / batch | 2 / fast / 2 |" in section
    views, kernels = ([record["train"][regime]["dispatch_per_step"][key] for regime in ("official", "fast")]
                      for key in ("views", "kernels"))
    assert f"| of which views, no kernel (official / fast) | {views[0]} / {views[1]} |" in section
    assert f"| of which kernels, about the launches on CUDA (official / fast) | {kernels[0]} / {kernels[1]} |" in section
    code, out, err = cli("bench", *small, "--packed", "0")  # the same counts in the text (they are deterministic)
    text = " ".join((out + err).split())
    assert code == 0 and all(f"a step dispatches {record['train'][regime]['dispatch_per_step']['aten_ops']} aten ops "
                             f"({views[i]} views, {kernels[i]} kernels" in text for i, regime in enumerate(("official", "fast")))
    code, _, err = cli("bench", "--clip", "huge", "--device", "cpu")
    assert code == 2 and "--clip" in err
    code, _, err = cli("bench", "--device", "cpu", "--packed-regime", "slow")
    assert code == 2 and "--packed-regime" in err
