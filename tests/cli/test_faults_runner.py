"""Faults around the runner through the real command line (issue 24, runner items 1, 9, 10, 12, 14, 15,
16, 18): exit 2, one stderr line naming the file or field, no traceback, inputs unchanged.

Full-disk and read-only cases run on a real small tmpfs where the test may mount one (root), and are
skipped with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from php_runner.experiment.specs import expand, load_spec, shipped_folder
from php_runner.model.checkpoint import config_to_dict, save_atomic
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel
from php_runner.store.registry import Registry

CHECKOUT = Path(__file__).resolve().parents[2]
METRICS = {"R1": 12.345, "R5": 23.456, "R10": 34.567, "mAP": 5.678, "mINP": 1.234}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_refused(code: int, stderr: str, expected: str, given: dict[Path, str] | None = None) -> str:
    """Exit 2, exactly one ``error:`` line naming ``expected``, no traceback, the given files unchanged."""
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and expected in lines[0], lines[0]
    for path, digest in (given or {}).items():
        assert sha256(path) == digest, f"{path} was changed"
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh 2 MiB tmpfs; ``tmpfs.remount(read_only=True)`` makes it read-only."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("needs to mount a tmpfs (root and mount(8)) for a real full or read-only file system")

    class Mount(type(mount)):
        def remount(self, read_only: bool) -> None:
            option = "remount,ro" if read_only else "remount,rw"
            subprocess.run(["mount", "-o", option, str(self)], check=True)

        def fill(self) -> None:
            """Use up every free byte."""
            try:
                with open(self / "filler", "wb") as handle:
                    while True:
                        handle.write(b"\0" * 4096)
                        handle.flush()
            except OSError:
                pass

    yield Mount(mount)
    subprocess.run(["umount", "-l", str(mount)], check=False)


def tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = PHPModel(PHPConfig.tiny())
    save_atomic({"model": model.state_dict(), "config": config_to_dict(model.config), "epoch": 1,
                 "settings": {"precision": "amp", "test_batch_size": 8}}, path)
    return path


def registry_with_a_run(url: str, spec_dir: Path, data_root: Path, status: str = "done",
                        checkpoint: Path | None = None) -> int:
    planned = expand(load_spec(shipped_folder() / "headline.toml"), "tiny", runtime={"data_root": str(data_root)})
    registry = Registry(url)
    run = registry.plan_run(planned[0])
    registry.record_epoch(run.id, 1, "train", {"total": 1.0})
    registry.record_epoch(run.id, 1, "test", METRICS)
    registry.record_result(run.id, "best-on-test", 1, "test", METRICS)
    if checkpoint is not None:
        registry.record_checkpoint(run.id, str(checkpoint), sha256(checkpoint), 1, "best")
    if status == "done":
        registry.mark_done(run.id)
    registry.close()
    return run.id


# ---- 1: no command writes over its own input, the registry or a recorded checkpoint ---------------

def test_evaluate_refuses_to_save_embeddings_over_its_checkpoint(cli, tmp_path, tiny_data_root):
    checkpoint = tiny_checkpoint(tmp_path / "X" / "best.pth")
    before = {checkpoint: sha256(checkpoint)}
    code, _, err = cli("evaluate", "--checkpoint", checkpoint, "--data-root", tiny_data_root, "--dataset",
                       "RSTPReid", "--device", "cpu", "--save-embeddings", checkpoint)
    assert_refused(code, err, f"--save-embeddings {checkpoint}", before)


def test_evaluate_refuses_to_save_embeddings_over_a_recorded_checkpoint(cli, tmp_path, tiny_data_root, spec_dir):
    theirs = tiny_checkpoint(tmp_path / "run1" / "best.pth")
    registry_with_a_run(f"sqlite:///{tmp_path / 'registry.db'}", spec_dir, tiny_data_root, checkpoint=theirs)
    mine = tiny_checkpoint(tmp_path / "mine.pth")
    before = {theirs: sha256(theirs), mine: sha256(mine)}
    code, _, err = cli("evaluate", "--checkpoint", mine, "--data-root", tiny_data_root, "--dataset", "RSTPReid",
                       "--device", "cpu", "--save-embeddings", theirs)
    assert_refused(code, err, f"{theirs}", before)
    assert "run 1" in err


def test_plot_refuses_to_write_over_the_registry(cli, tmp_path, tiny_data_root, spec_dir):
    database = tmp_path / "registry.db"
    run_id = registry_with_a_run(f"sqlite:///{database}", spec_dir, tiny_data_root)
    before = {database: sha256(database)}
    code, _, err = cli("plot", str(run_id), "--out", database)
    assert_refused(code, err, f"--out {database}", before)
    assert "registry" in err


def test_plot_refuses_the_registry_s_write_ahead_log_and_a_hard_link_to_a_recorded_checkpoint(cli, tmp_path,
                                                                                              tiny_data_root, spec_dir):
    database = tmp_path / "registry.db"
    theirs = tiny_checkpoint(tmp_path / "run1" / "best.pth")
    run_id = registry_with_a_run(f"sqlite:///{database}", spec_dir, tiny_data_root, checkpoint=theirs)
    alias = tmp_path / "alias.pth"
    os.link(theirs, alias)  # another name of the same file: resolve() alone does not see it
    before = {database: sha256(database), theirs: sha256(theirs)}
    for target, named in ((tmp_path / "registry.db-wal", "registry"), (alias, "checkpoint of run 1")):
        code, _, err = cli("plot", str(run_id), "--out", target, "--db", f"sqlite:///{database}")
        assert_refused(code, err, f"--out {target}", before)
        assert named in err


def test_table_refuses_a_registry_inside_its_report_files(cli, tmp_path, tiny_data_root, spec_dir):
    database = tmp_path / "reports" / "headline_tiny.md"
    database.parent.mkdir()
    registry_with_a_run(f"sqlite:///{database}", spec_dir, tiny_data_root)
    before = {database: sha256(database)}
    code, _, err = cli("table", "headline", "--preset", "tiny", "--db", f"sqlite:///{database}")
    assert_refused(code, err, "reports/headline_tiny.md", before)


# ---- 9: full file systems ------------------------------------------------------------------------

def test_synth_onto_a_full_file_system_names_the_path_and_the_space(cli, tmpfs):
    tmpfs.fill()
    code, _, err = cli("synth", "--root", tmpfs / "data", "--ids", "4")
    line = assert_refused(code, err, str(tmpfs))
    assert "no space" in line.lower() and "bytes" in line


def test_table_onto_a_full_file_system_names_the_path_and_the_space(cli, tmp_path, tmpfs, tiny_data_root,
                                                                     spec_dir, monkeypatch):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry_with_a_run(url, spec_dir, tiny_data_root)
    monkeypatch.chdir(tmpfs)
    tmpfs.fill()
    code, _, err = cli("table", "headline", "--preset", "tiny", "--db", url)
    line = assert_refused(code, err, "reports")
    assert "no space" in line.lower() and "bytes" in line


# ---- 10: output paths that cannot be written --------------------------------------------------------

def test_plot_out_a_directory_is_refused(cli, tmp_path, tiny_data_root, spec_dir):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    run_id = registry_with_a_run(url, spec_dir, tiny_data_root)
    folder = tmp_path / "figures"
    folder.mkdir()
    code, _, err = cli("plot", str(run_id), "--out", folder, "--db", url)
    assert_refused(code, err, f"--out {folder}")
    assert list(folder.iterdir()) == []


def test_plot_out_on_a_read_only_file_system_is_refused(cli, tmp_path, tmpfs, tiny_data_root, spec_dir):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    run_id = registry_with_a_run(url, spec_dir, tiny_data_root)
    tmpfs.remount(read_only=True)
    code, _, err = cli("plot", str(run_id), "--out", tmpfs / "curves.png", "--db", url)
    assert_refused(code, err, f"{tmpfs / 'curves.png'}")
    assert "read-only" in err


# ---- 12: a grid too large to expand ----------------------------------------------------------------

def test_a_million_run_grid_is_refused_before_expanding(tmp_path):
    spec = tmp_path / "huge.toml"
    spec.write_text('extends = "base"\ndatasets = ["RSTPReid"]\nseeds = [1]\n[grid]\n'
                    f'"train.lr" = {[round(1e-6 * (i + 1), 9) for i in range(1000)]}\n'
                    f'"loss.aux_factor" = {[i / 1000 for i in range(1000)]}\n')
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT), "PHP_RUN_DB": f"sqlite:///{tmp_path / 'r.db'}"}
    env.pop("PHP_RUN_MAX_RUNS", None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "php_runner", "cat", str(spec), "--preset", "tiny"],
                            capture_output=True, text=True, check=False, env=env, timeout=120, cwd=tmp_path)
    line = assert_refused(result.returncode, result.stderr, f"{spec}")
    assert "1,000,000 runs" in line and "1,000" in line and "PHP_RUN_MAX_RUNS" in line
    assert time.monotonic() - started < 60


def test_the_grid_limit_can_be_raised(cli, tmp_path, monkeypatch):
    spec = tmp_path / "wide.toml"
    spec.write_text('extends = "base"\ndatasets = ["RSTPReid"]\nseeds = [1, 2, 3]\n[grid]\n'
                    '"model.cnum" = [1, 2, 3, 4, 5]\n')
    monkeypatch.setenv("PHP_RUN_MAX_RUNS", "10")
    code, _, err = cli("cat", spec, "--preset", "tiny")
    assert_refused(code, err, "15 runs")
    monkeypatch.setenv("PHP_RUN_MAX_RUNS", "15")
    code, _, err = cli("cat", spec, "--preset", "tiny")
    assert code == 0, err


# ---- 14: a registry on a read-only file system; read-only commands create no file -----------------

def test_a_read_only_registry_is_readable_and_refuses_writes(cli, tmp_path, tmpfs, tiny_data_root, spec_dir):
    database = tmpfs / "registry.db"
    url = f"sqlite:///{database}"
    run_id = registry_with_a_run(url, spec_dir, tiny_data_root)
    tmpfs.remount(read_only=True)
    before = {database: sha256(database)}
    code, out, err = cli("status", "--json", "--db", url)
    assert code == 0, err
    assert [entry["id"] for entry in json.loads(out)] == [run_id]
    code, out, err = cli("show", str(run_id), "--json", "--db", url)
    assert code == 0 and json.loads(out)["run"]["id"] == run_id, err
    code, out, err = cli("table", "headline", "--preset", "tiny", "--json", "--db", url)
    assert code == 0, err
    code, _, err = cli("enqueue", spec_dir / "two_seeds.toml", "--preset", "tiny", "--data-root", tiny_data_root,
                       "--db", url)
    assert_refused(code, err, f"{database}", before)
    assert "read-only" in err


def test_read_only_commands_create_no_registry(cli, tmp_path):
    for command in (("status",), ("status", "--json"), ("show", "1"), ("table", "headline"), ("ls",)):
        code, out, err = cli(*command)
        assert not (tmp_path / "registry.db").exists(), command
        assert "Traceback" not in err
    code, out, _ = cli("status")
    assert code == 0 and "No registry at" in out and "registry.db" in out
    code, out, _ = cli("status", "--json")
    assert code == 0 and json.loads(out) == []
    code, _, err = cli("show", "1")
    assert code == 2 and "1" in err and not (tmp_path / "registry.db").exists()


# ---- 15: --clip-weights that are not CLIP weights ----------------------------------------------------

@pytest.mark.parametrize("content", ["pickled-object", "random-bytes", "no-visual-keys"])
def test_clip_weights_that_are_not_clip_weights_are_refused_before_recording(cli, tmp_path, tiny_data_root,
                                                                              content):
    weights = tmp_path / "ViT-B-16.pt"
    if content == "pickled-object":
        torch.save({"x": pathlib.PurePosixPath("a")}, weights)
    elif content == "random-bytes":
        weights.write_bytes(os.urandom(4096))
    else:
        torch.save({"layer.weight": torch.zeros(2)}, weights)
    before = {weights: sha256(weights)}
    url = f"sqlite:///{tmp_path / 'r.db'}"
    code, _, err = cli("run", "headline", "--dataset", "RSTPReid", "--seeds", "1", "--data-root", tiny_data_root,
                       "--clip-weights", weights, "--device", "cpu", "--db", url)
    line = assert_refused(code, err, f"--clip-weights {weights}", before)
    assert "weights_only" not in line and "not" in line
    code, out, _ = cli("status", "--json", "--db", url)
    assert code == 0 and json.loads(out) == []


# ---- 16: an empty item in a list option ----------------------------------------------------------

def test_an_empty_seed_is_an_error(cli, tmp_path, spec_dir, tiny_data_root):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    code, _, err = cli("enqueue", spec_dir / "two_seeds.toml", "--preset", "tiny", "--data-root", tiny_data_root,
                       "--seeds", "1,,2", "--db", url)
    assert_refused(code, err, "--seeds")
    assert "empty" in err


def test_an_empty_gpu_is_an_error(cli, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    code, _, err = cli("worker", "--gpus", "0,,1", "--idle-exit", "0", "--db", url)
    assert_refused(code, err, "--gpus")


# ---- 18: failed and interrupted runs fill no table cell -----------------------------------------------

@pytest.mark.parametrize("status", ["failed", "running", "queued"])
def test_results_of_unfinished_runs_are_not_counted_in_table_cells(cli, tmp_path, tiny_data_root, spec_dir,
                                                                    status):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    run_id = registry_with_a_run(url, spec_dir, tiny_data_root, status="queued")
    registry = Registry(url)
    if status == "failed":
        registry.claim_run(run_id, "w")
        registry.mark_failed(run_id, "boom", worker="w")
    elif status == "running":
        registry.claim_run(run_id, "w")
    assert registry.get_run(run_id).status == status
    assert registry.result_rows() == []
    registry.close()
    code, out, err = cli("table", "headline", "--preset", "tiny", "--json", "--db", url)
    assert code == 0, err
    assert "12.345" not in out  # the run's R1 is in no cell
