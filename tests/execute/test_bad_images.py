"""An unreadable image found while a run reads its dataset: a clean refusal (exit 2, one line naming the
image, no traceback) and a run recorded as failed with that reason, through the real command line.

Preflight reads only the annotation file (decoding 40k+ images on every run is too slow); the image cache
build (or the loader) decodes every image and raises ``ImageFileError``, which the worker turns into the
run's input error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from php_runner.execute.child import one_line
from php_runner.execute.pool import ExecutionSummary, RunOutcome
from php_runner.data.images import ImageFileError
from php_runner.store.registry import Registry


def truncated_copy(tiny_data_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny CUHK-PEDES set whose first training image lost its second half (a cut download)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data_root / "CUHK-PEDES", root / "CUHK-PEDES")
    image = sorted((root / "CUHK-PEDES" / "imgs" / "train").glob("*.jpg"))[0]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return root, image


def test_a_truncated_image_refuses_the_run_with_one_line_and_exit_2(spec_dir, tiny_data_root, tmp_path):
    root, image = truncated_copy(tiny_data_root, tmp_path)
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    done = subprocess.run([sys.executable, "-m", "php_runner", "run", str(spec_dir / "two_epochs.toml"), "--preset",
                           "tiny", "--data-root", str(root), "--db", url], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PHP_RUN_CACHE": str(tmp_path / "cache")})
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    naming = [line for line in output.splitlines() if str(image) in line]
    assert len(naming) == 1 and "image file is truncated" in naming[0], output

    registry = Registry(url)
    [run] = registry.list_runs()
    assert run.status == "failed"
    assert run.error.startswith(f"ImageFileError: {image}: cannot be read as an image (image file is truncated")
    assert "\n" not in run.error and registry.is_claimable(run)  # fixed data: the next invocation trains it
    assert registry.epochs(run.id) == [] and registry.results(run.id) == {} and registry.checkpoints(run.id) == []
    assert all(p.name.endswith(".lock") for p in (tmp_path / "cache").iterdir())  # no staging folder left
    registry.close()


def test_data_check_still_names_the_truncated_image(cli, tiny_data_root, tmp_path):
    root, image = truncated_copy(tiny_data_root, tmp_path)
    code, out, err = cli("data", "check", "--data-root", root, "--dataset", "CUHK-PEDES")
    assert code == 2
    assert f"{image.relative_to(tmp_path)}: cannot be read as an image (image file is truncated" in out + err


def test_a_dataset_refused_by_every_failed_run_is_bad_input():
    def outcome(status: str, bad_data: bool = False) -> RunOutcome:
        return RunOutcome(1, "h" * 64, "row", "CUHK-PEDES", 1, status, bad_data=bad_data)

    assert not ExecutionSummary([outcome("done")]).bad_input_only
    assert ExecutionSummary([outcome("done"), outcome("failed", bad_data=True)]).bad_input_only
    assert not ExecutionSummary([outcome("failed", bad_data=True), outcome("failed")]).bad_input_only


def test_an_image_error_reraised_by_a_loader_worker_is_one_line():
    # torch's ExceptionWrapper re-raises ImageFileError(message) with the worker's traceback as the message.
    reraised = ImageFileError("Caught ImageFileError in DataLoader worker process 0.\nOriginal Traceback (most "
                              "recent call last):\n  File \"x.py\", line 1\nphp_runner.data.images.ImageFileError: "
                              "/d/a.jpg: cannot be read as an image (broken data stream)\n")
    assert one_line(reraised) == "/d/a.jpg: cannot be read as an image (broken data stream)"
    assert one_line(ImageFileError("/d/a.jpg: cannot be read")) == "/d/a.jpg: cannot be read"


@pytest.mark.parametrize("code, bad_data", [(2, True), (1, False)])
def test_a_worker_exiting_2_after_recording_its_failure_is_a_refused_dataset(registry_url, spec_dir, tmp_path,
                                                                              code, bad_data):
    from collections import deque

    from php_runner.execute.pool import ActiveRun, finish_run
    from php_runner.experiment.specs import expand, load_spec

    registry = Registry(registry_url)
    run = registry.plan_run(expand(load_spec(spec_dir / "two_epochs.toml"), "tiny",
                                   runtime={"data_root": str(tmp_path)})[0])
    assert registry.claim_run(run.id, "host:1")
    registry.mark_failed(run.id, "ImageFileError: /d/a.jpg: cannot be read as an image", worker="host:1")

    class Exited:
        returncode, pid = code, 1

    outcome = finish_run(registry, ActiveRun(run, Exited(), deque(), [], None, "host:1"))
    assert (outcome.status, outcome.bad_data) == ("failed", bad_data)
    assert outcome.error == "ImageFileError: /d/a.jpg: cannot be read as an image"
    registry.close()
