"""SIGKILL at ten moments of php-run's writes, then the same command again: the result equals an
uninterrupted command's exactly, no temporary is left behind, and nothing half written is read.

The moments (``kill_hook/sitecustomize.py`` replaces the function at each one, in every process of the
command, and kills the whole process group there, as a power cut would):

- during ``php-run run`` (the tiny preset, two epochs, deterministic on the CPU): the image cache build,
  epoch 2's ``last.pth`` write, epoch 1's ``best.pth`` write, epoch 2's evaluation, a registry write
  (mid-transaction), the queue claim (before the worker process starts), and between the end of training
  and the recording of its results;
- ``php-run synth`` writing the images, ``php-run table`` writing reports/, and ``php-run evaluate
  --save-embeddings`` writing its archive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from php_runner.files import file_sha256
from php_runner.store.registry import Registry

HOOK = Path(__file__).with_name("kill_hook")
KILL_ENV = "PHP_RUN_TEST_KILL_AT"
COMMAND_TIMEOUT_S = 300
RUN_MOMENTS = ("cache-build", "last-checkpoint-write", "best-checkpoint-write", "evaluation", "registry-write",
               "queue-claim", "before-results")

pytestmark = pytest.mark.slow


def php_run(*args: str, cwd: Path, cache: Path, moment: str | None = None) -> subprocess.CompletedProcess:
    """php-run in a process group of its own (so the hook's kill takes its worker too), with the kill hook."""
    env = {**os.environ, "PHP_RUN_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")]))}
    env.pop(KILL_ENV, None)
    if moment is not None:
        env[KILL_ENV] = moment
    return subprocess.run([sys.executable, "-m", "php_runner", *map(str, args)], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=COMMAND_TIMEOUT_S, start_new_session=True)


def killed(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == -signal.SIGKILL


def leftovers(*folders: Path) -> list[Path]:
    """Temporaries of atomic writes (``.NAME.HOST-pidN.XXXX.tmp``) and cache staging folders (``.NAME.XXXX``)
    anywhere under ``folders``; build lock files are not leftovers."""
    found = []
    for folder in folders:
        for path in folder.rglob(".*"):
            if path.name.endswith(".tmp") or (path.is_dir() and not path.name.endswith(".lock")):
                found.append(path)
    return found


def epoch_values(registry: Registry, run_id: int) -> list:
    """Every recorded epoch value but the wall-clock seconds."""
    return [(row.epoch, row.split, {k: v for k, v in row.metrics.items() if k != "seconds"})
            for row in registry.epochs(run_id)]


def run_args(spec_dir: Path, data_root: Path, url: str) -> tuple:
    return ("run", spec_dir / "two_epochs.toml", "--preset", "tiny", "--data-root", data_root, "--db", url)


@pytest.fixture(scope="module")
def baseline(spec_dir, tiny_data_root, tmp_path_factory):
    """One uninterrupted run of the command every run moment kills: its registry, results and epochs."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    url = f"sqlite:///{workdir / 'registry.db'}"
    done = php_run(*run_args(spec_dir, tiny_data_root, url), cwd=workdir, cache=workdir / "cache")
    assert done.returncode == 0, done.stdout + done.stderr
    registry = Registry(url)
    [run] = registry.list_runs()
    checkpoints = {c.role: c.path for c in registry.checkpoints(run.id)}
    facts = {"url": url, "results": registry.results(run.id), "epochs": epoch_values(registry, run.id),
             "best": Path(checkpoints["best"])}
    registry.close()
    return facts


def evidence_of(moment: str, registry: Registry, workdir: Path, cache: Path) -> bool:
    """What the killed command left shows that it died at ``moment`` (and no later)."""
    runs = registry.list_runs()
    run = runs[0] if runs else None
    splits = {(row.epoch, row.split) for row in registry.epochs(run.id)} if run else set()
    checkpoints = list(workdir.glob("checkpoints/*/*"))
    names = {path.name for path in checkpoints}
    if moment == "cache-build":
        return any(path.is_dir() for path in cache.glob(".*")) and not splits
    if moment == "last-checkpoint-write":
        return "last.pth" in names and any(n.startswith(".last.pth.") for n in names) and (1, "test") in splits
    if moment == "best-checkpoint-write":
        return any(n.startswith(".best.pth.") for n in names) and not {"last.pth", "best.pth"} & names
    if moment == "evaluation":
        return "last.pth" in names and max(epoch for epoch, _ in splits) == 1
    if moment == "registry-write":  # the killed transaction is not read: epoch 2 has its train values only
        return (2, "train") in splits and (2, "test") not in splits
    if moment == "queue-claim":
        return run.status == "running" and run.run_dir is None and not checkpoints
    if moment == "before-results":
        return (2, "test") in splits and registry.results(run.id) == {}
    raise AssertionError(moment)


@pytest.mark.parametrize("moment", RUN_MOMENTS)
def test_a_run_killed_at_a_moment_reruns_to_the_uninterrupted_metrics(moment, baseline, spec_dir, tiny_data_root,
                                                                       tmp_path):
    url, cache = f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "cache"
    args = run_args(spec_dir, tiny_data_root, url)
    first = php_run(*args, cwd=tmp_path, cache=cache, moment=moment)
    assert killed(first), first.stdout + first.stderr
    registry = Registry(url)
    assert evidence_of(moment, registry, tmp_path, cache), first.stderr

    again = php_run(*args, cwd=tmp_path, cache=cache)
    assert again.returncode == 0, again.stdout + again.stderr
    [run] = registry.list_runs()
    assert run.status == "done"
    assert registry.results(run.id) == baseline["results"]
    assert epoch_values(registry, run.id) == baseline["epochs"]
    checkpoints = registry.checkpoints(run.id)
    assert {c.role for c in checkpoints} == {"best", "last"}
    assert all(file_sha256(c.path) == c.sha256 for c in checkpoints)  # the files recorded are the files there
    assert leftovers(tmp_path, cache) == []
    registry.close()


def test_synth_killed_while_writing_images_rewrites_the_same_files(tiny_data_root, tmp_path):
    args = ("synth", "--root", tmp_path / "data", "--dataset", "CUHK-PEDES", "--ids", "4", "--seed", "0")
    assert killed(php_run(*args, cwd=tmp_path, cache=tmp_path / "cache", moment="synth"))
    assert leftovers(tmp_path / "data")  # the image being written when it died
    again = php_run(*args, cwd=tmp_path, cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr
    written, expected = tmp_path / "data" / "CUHK-PEDES", tiny_data_root / "CUHK-PEDES"  # the same seed and size
    files = sorted(path.relative_to(written) for path in written.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(expected) for path in expected.rglob("*") if path.is_file())
    assert all((written / name).read_bytes() == (expected / name).read_bytes() for name in files)


def test_table_killed_while_writing_reports_rewrites_the_same_reports(baseline, tmp_path):
    args = ("table", "headline", "--preset", "tiny", "--db", baseline["url"])
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    for folder in (reference, interrupted):
        folder.mkdir()
    assert php_run(*args, cwd=reference, cache=tmp_path / "cache").returncode == 0
    assert killed(php_run(*args, cwd=interrupted, cache=tmp_path / "cache", moment="table-write"))
    assert leftovers(interrupted)
    again = php_run(*args, cwd=interrupted, cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr
    files = sorted(path.name for path in (reference / "reports").iterdir())
    assert files and sorted(path.name for path in (interrupted / "reports").iterdir()) == files
    assert all((interrupted / "reports" / name).read_bytes() == (reference / "reports" / name).read_bytes()
               for name in files)


def test_evaluate_killed_while_saving_embeddings_saves_the_same_embeddings(baseline, tiny_data_root, tmp_path):
    def evaluate(out: Path, moment: str | None = None) -> subprocess.CompletedProcess:
        return php_run("evaluate", "--checkpoint", baseline["best"], "--data-root", tiny_data_root, "--dataset",
                       "CUHK-PEDES", "--save-embeddings", out, cwd=tmp_path, cache=tmp_path / "cache", moment=moment)

    reference, interrupted = tmp_path / "reference" / "embeddings.npz", tmp_path / "out" / "embeddings.npz"
    reference.parent.mkdir()
    interrupted.parent.mkdir()
    assert evaluate(reference).returncode == 0
    assert killed(evaluate(interrupted, "embeddings-save"))
    assert leftovers(interrupted.parent) and not interrupted.exists()
    again = evaluate(interrupted)
    assert again.returncode == 0, again.stderr
    assert leftovers(interrupted.parent) == []
    with np.load(reference) as expected, np.load(interrupted) as got:
        assert sorted(got.files) == sorted(expected.files)
        assert all(np.array_equal(got[name], expected[name]) for name in expected.files)


def test_a_run_killed_while_writing_its_synthetic_data_writes_it_again(tmp_path):
    """``php-run run`` on a synthetic source writes the data first (``ensure_data``); killed there, the
    next run must finish the write, not take the folder without an annotation file for a written one."""
    from php_runner.data import write_synthetic
    from php_runner.execute.preflight import ensure_data

    config = {"data": {"source": "synthetic", "dataset": "RSTPReid"}, "runtime": {"data_root": str(tmp_path / "data")}}
    env = {**os.environ, KILL_ENV: "synth",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")]))}
    first = subprocess.run([sys.executable, "-c", "from php_runner.execute.preflight import ensure_data; "
                            f"ensure_data({config!r})"], env=env, capture_output=True, text=True,
                           timeout=COMMAND_TIMEOUT_S, start_new_session=True)
    assert killed(first), first.stderr
    written = tmp_path / "data" / "RSTPReid"
    assert leftovers(written) and written.is_dir()
    ensure_data(config)
    write_synthetic(tmp_path / "clean", "RSTPReid")
    expected = tmp_path / "clean" / "RSTPReid"
    files = sorted(path.relative_to(written) for path in written.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(expected) for path in expected.rglob("*") if path.is_file())
    assert all((written / name).read_bytes() == (expected / name).read_bytes() for name in files)
