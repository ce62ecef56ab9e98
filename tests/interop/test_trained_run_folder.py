"""A real tiny ``php-run run`` writes its official run folder ``logs/<dataset>/<name>/``: best.pth linked to the
hash-addressed store, a configs.yaml the official test.py and ``php-run import`` read, the official
train_log.txt and TensorBoard events holding what the registry recorded. A killed run resumes into the
same folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_log_layout import eval_blocks, official_block, stamped
from test_run_folder import OFFICIAL_KEYS

from php_runner.interop.official_config import php_run_identity
from php_runner.model.checkpoint import extract_state_dict, load_checkpoint_file, load_model, read_official_yaml
from php_runner.store.registry import Registry
from php_runner.studies.imported_config import model_section
from php_runner.studies.released_checks import infer_released_config

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
LOSSES = {"total": "loss", "sdm_loss": "sdm_loss", "itc_loss": "itc_loss", "aux_loss": "aux_loss"}


def php_run(*args: str, cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "php_runner", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def run_args(spec_dir: Path, data_root: Path, url: str) -> tuple[str, ...]:
    return ("run", str(spec_dir / "two_epochs.toml"), "--preset", "tiny", "--data-root", str(data_root), "--db", url)


@pytest.fixture(scope="module")
def step_spec_dir(spec_dir, tmp_path_factory) -> Path:
    """The test specs with a per-iteration record every iteration (a tiny epoch has fewer than log_period)."""
    import shutil

    folder = tmp_path_factory.mktemp("step_specs")
    for path in spec_dir.iterdir():
        shutil.copy(path, folder / path.name)
    presets = folder / "presets.toml"
    presets.write_text(presets.read_text().replace("log_period = 10 ", "log_period = 1 "))
    assert "log_period = 1 " in presets.read_text()
    return folder


@pytest.fixture(scope="module")
def trained(step_spec_dir, tiny_data_root, tmp_path_factory):
    """One uninterrupted two-epoch tiny run, trained through the real CLI in a fresh folder."""
    spec_dir = step_spec_dir
    workdir = tmp_path_factory.mktemp("trained")
    url = f"sqlite:///{workdir / 'registry.db'}"
    output, _ = php_run(*run_args(spec_dir, tiny_data_root, url), cwd=workdir).communicate(timeout=300)
    registry = Registry(url)
    [run] = registry.list_runs()
    assert run.status == "done", output
    [folder] = (workdir / "logs" / "CUHK-PEDES").iterdir()
    yield {"workdir": workdir, "registry": registry, "run": run, "folder": folder, "url": url}
    registry.close()


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_the_run_folder_holds_the_official_files_and_links_the_stored_checkpoint(trained):
    folder, run, registry = trained["folder"], trained["run"], trained["registry"]
    assert folder.name.endswith(f"_two_epochs-{run.row_label}_seed1")
    names = sorted(path.name for path in folder.iterdir() if not path.name.startswith("events.out.tfevents."))
    assert names == ["best.pth", "configs.yaml", "train_log.txt"]
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    best = {c.role: c for c in registry.checkpoints(run.id)}["best"]
    assert (folder / "best.pth").is_symlink() and not os.path.isabs(os.readlink(folder / "best.pth"))
    assert (folder / "best.pth").resolve() == Path(best.path).resolve()
    assert not (Path(run.run_dir) / "train_log.txt").exists()  # one train_log: the official one, here
    assert registry.provenance(run.id)["run_folder"] == str(folder)


def test_official_evaluation_path_reads_the_folder(trained):
    """What test.py reads (FullLoader yaml, output_dir/best.pth) and what import reads (read_official_yaml)."""
    folder, run = trained["folder"], trained["run"]
    path = folder / "configs.yaml"
    ours = read_official_yaml(path)
    assert yaml.load(path.read_text(), Loader=yaml.FullLoader) == ours
    assert [key for key in OFFICIAL_KEYS if key not in ours] == []
    assert Path(ours["output_dir"]) == folder.absolute() and ours["dataset_name"] == "CUHK-PEDES"
    state_dict = extract_state_dict(load_checkpoint_file(Path(ours["output_dir"]) / "best.pth"))
    inferred = infer_released_config(state_dict, ours)
    assert model_section(inferred) == {**run.config["model"], "variant": "full", "coupling": "official"}
    model, info = load_model(folder / "best.pth", path)
    assert model.config.cnum == ours["cnum"] == run.config["model"]["cnum"]
    identity = php_run_identity(ours)
    assert identity["config_hash"] == run.config_hash and identity["run_id"] == run.id
    assert identity["preset"] == "tiny" and identity["config"]["train"] == run.config["train"]


def test_train_log_is_the_official_log_of_what_the_registry_recorded(trained):
    folder, run, registry = trained["folder"], trained["run"], trained["registry"]
    text = stamped((folder / "train_log.txt").read_text())
    assert text.startswith("<stamp> IRRA INFO: Using 0 GPUs\n<stamp> IRRA INFO: Namespace(")
    assert text.count("IRRA.train INFO: start training") == 1
    assert "<stamp> IRRA.dataset INFO: CUHKPEDES Dataset statistics:\n+--------+" in text
    expected = {}
    for entry in registry.epochs(run.id):
        if entry.split in ("test", "val"):
            header = f"Validation Results - Epoch: {entry.epoch}" + ("" if entry.split == "test" else " (val split)")
            expected[header] = official_block(header, [entry.metrics[m] for m in METRICS])
    assert len(expected) == 4 and eval_blocks(text) == expected  # two epochs, test and val each
    assert text.count(" done. Time per batch: ") == 2
    best = registry.results(run.id)["best-on-test"]
    assert text.endswith(f"<stamp> IRRA.train INFO: best R1: {best['metrics']['R1']} at epoch {best['epoch']}\n")


def test_tensorboard_events_hold_the_recorded_losses_lr_and_metrics(trained):
    run, registry = trained["run"], trained["registry"]
    found = scalars(trained["folder"])
    checked = 0
    for entry in registry.epochs(run.id):
        if entry.split == "train":
            for key, meter in LOSSES.items():
                assert found[f"epoch/{meter}"][entry.epoch] == pytest.approx(entry.metrics[key], rel=1e-6)
            assert found["epoch/lr"][entry.epoch] == pytest.approx(entry.metrics["lr"], rel=1e-6)
        else:
            for metric in METRICS:
                assert found[f"{entry.split}/{metric}"][entry.epoch] == pytest.approx(entry.metrics[metric], rel=1e-6)
        checked += 1
    assert checked == 6 and sorted(found["test/R1"]) == [1, 2]


def test_tensorboard_events_hold_per_iteration_losses(trained):
    found = scalars(trained["folder"])
    assert found["train/loss"] and found["train/lr"] and min(found["train/loss"]) >= 1


@pytest.mark.slow
def test_a_killed_run_resumes_into_the_same_folder(spec_dir, tiny_data_root, tmp_path, trained):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    args = run_args(spec_dir, tiny_data_root, url)
    first = php_run(*args, cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 240
    while not list(tmp_path.glob("checkpoints/*/last.pth")):  # epoch 1 is saved; epoch 2 is training
        assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.poll() else "timeout"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    second = php_run(*args, cwd=tmp_path)
    output, _ = second.communicate(timeout=240)
    assert second.returncode == 0 and "resuming" in output, output
    [folder] = (tmp_path / "logs" / "CUHK-PEDES").iterdir()
    text = stamped((folder / "train_log.txt").read_text())
    assert text.count("start training") == 1  # one header: the resumed run continued the log
    assert eval_blocks(text) == eval_blocks(stamped((trained["folder"] / "train_log.txt").read_text()))
    assert scalars(folder)["test/R1"] == scalars(trained["folder"])["test/R1"]
    assert (folder / "best.pth").resolve().is_file()


# ---- php-run export mlflow ------------------------------------------------------------------------

def test_export_mlflow_through_the_cli_reads_back_from_a_local_store(cli, trained, tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'php-runner[mlflow]')")
    from mlflow.tracking import MlflowClient

    run, registry = trained["run"], trained["registry"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = cli("export", "mlflow", "--tracking-uri", uri, "--db", trained["url"], str(run.id))
    assert code == 0, err
    assert f"exported run {run.id} -> MLflow run " in out and "1 exported, 0 unchanged" in out
    client = MlflowClient(tracking_uri=uri)
    [found] = client.search_runs([client.get_experiment_by_name("php-run").experiment_id])
    assert found.info.run_name == trained["folder"].name and found.info.status == "FINISHED"
    assert found.data.params["model.cnum"] == str(run.config["model"]["cnum"])
    assert found.data.tags["php_run.config_hash"] == run.config_hash
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "test/R1")}
    assert history == {e.epoch: e.metrics["R1"] for e in registry.epochs(run.id) if e.split == "test"}
    losses = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "epoch/loss")}
    assert losses == {e.epoch: e.metrics["total"] for e in registry.epochs(run.id) if e.split == "train"}
    assert found.data.metrics["best-on-test/R1"] == registry.results(run.id)["best-on-test"]["metrics"]["R1"]
    assert sorted(a.path for a in client.list_artifacts(found.info.run_id)) == ["configs.yaml", "train_log.txt"]
    code, out, _ = cli("export", "mlflow", "--tracking-uri", uri, "--db", trained["url"])
    assert code == 0 and "0 exported, 1 unchanged" in out


def test_export_mlflow_without_the_extra_is_a_one_line_error(cli, trained, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    code, out, err = cli("export", "mlflow", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--db", trained["url"])
    assert code == 2 and out == ""
    assert err == "error: MLflow export needs the mlflow extra: pip install 'php-runner[mlflow]'\n"


# ---- php-run import of a php-run logs/ tree -------------------------------------------------------

def test_import_of_the_logs_tree_round_trips_config_hash_and_metrics(cli, trained, tiny_data_root, tmp_path):
    run, registry = trained["run"], trained["registry"]
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code, out, err = cli("import", trained["workdir"] / "logs", "--data-root", tiny_data_root, "--no-audit",
                         "--device", "cpu", "--db", url, "--json")
    assert code == 0, err
    [outcome] = json.loads(out)
    assert outcome["status"] == "imported", outcome
    fresh = Registry(url)
    try:
        [imported] = fresh.list_runs()
        assert imported.kind == "imported" and imported.config_hash == run.config_hash
        best = registry.results(run.id)["best-on-test"]
        assert fresh.results(imported.id)["best-on-test"]["metrics"] == best["metrics"]
        assert fresh.results(imported.id)["best-on-test"]["epoch"] == best["epoch"]
    finally:
        fresh.close()
