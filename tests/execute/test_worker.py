"""Queue workers: a SIGKILLed worker's run goes stale and the next worker resumes it; 1,000 no-op runs
drained by 8 workers on PostgreSQL, each executed exactly once."""

from __future__ import annotations

import os
import re
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from launch_helpers import EPOCH_PAUSE, JOB_TIMEOUT_S, php_run, php_run_env, plan, wait_for

from php_runner.errors import InputError
from php_runner.execute.worker import Worker, WorkerSettings
from php_runner.store.registry import Registry
from php_runner.experiment.expand import config_hash


STALE_AFTER_S = 3


def trainers_of(owner: str) -> list[Path]:
    """The live processes training a run claimed by worker ``owner`` (their command line names it)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--claimed-by" in argv and owner.encode() in argv:
            found.append(cmdline.parent)
    return found


@pytest.mark.slow
def test_a_sigkilled_worker_s_run_goes_stale_and_the_next_worker_resumes_it(
        spec_dir, tiny_data_root, tmp_path, registry_url, local_reference):
    [planned] = plan(spec_dir, "two_epochs", tiny_data_root)
    registry = Registry(registry_url)
    run = registry.plan_run(planned)
    worker_args = ("worker", "--idle-exit", 0, "--stale-after", STALE_AFTER_S, "--db", registry_url)
    first = php_run(*worker_args, cwd=tmp_path, env=php_run_env(**EPOCH_PAUSE))
    wait_for(lambda: list(tmp_path.glob("checkpoints/*/last.pth")), "epoch 1's checkpoint", first)
    owner = f"{os.uname().nodename}:{first.pid}"
    assert trainers_of(owner)  # the run's own process, started by the worker
    first.send_signal(signal.SIGKILL)  # the worker only: its run's process dies with it
    first.communicate(timeout=60)
    wait_for(lambda: not trainers_of(owner), "the run's process to die with its worker", timeout=30)
    killed = registry.get_run(run.id)
    assert killed.status == "running" and killed.worker == owner
    wait_for(lambda: registry.is_claimable(registry.get_run(run.id), stale_after=STALE_AFTER_S), "a stale lease")

    second = php_run(*worker_args, cwd=tmp_path)
    output, _ = second.communicate(timeout=JOB_TIMEOUT_S)
    assert second.returncode == 0, output
    resumed = registry.get_run(run.id)
    assert resumed.status == "done" and resumed.attempts == 2 and resumed.worker != killed.worker
    assert re.search(r"resuming .* after epoch 1", output)
    assert "epoch 2/2" in output and "epoch 1/2" not in output  # epoch 1 was not trained again
    assert registry.results(run.id) == local_reference[planned.config_hash]


@pytest.mark.pg
@pytest.mark.slow
def test_eight_workers_drain_1000_noop_runs_on_postgresql_each_exactly_once(pg_url, spec_dir, tmp_path):
    [base] = plan(spec_dir, "two_seeds", tmp_path)[:1]
    registry = Registry(pg_url)
    for index in range(1000):  # distinct configs (hashes); the no-op workload never reads them
        config = {**base.config, "train": {**base.config["train"], "seed": 1000 + index}}
        registry.plan_run(replace(base, config=config, config_hash=config_hash(config), seed=1000 + index))
    assert len(registry.list_runs(status="queued")) == 1000

    env = php_run_env(PHP_RUN_NOOP_TRAINING="1")
    workers = [php_run("worker", "--idle-exit", 2, "--db", pg_url, cwd=tmp_path, env=env) for _ in range(8)]
    outputs = [worker.communicate(timeout=JOB_TIMEOUT_S)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 8, outputs

    runs = registry.list_runs()
    assert len(runs) == 1000 and {run.status for run in runs} == {"done"}
    assert {run.attempts for run in runs} == {1}  # nobody claimed a run twice
    claims = [int(re.search(r"(\d+) claimed", text).group(1)) for text in outputs]
    assert sum(claims) == 1000  # every claim is one run: none lost, none executed twice
    assert len({run.worker for run in runs}) > 1 and len([c for c in claims if c]) > 1
    seconds = max(run.finished_at for run in runs) - min(run.started_at for run in runs)
    print(f"\ndrain: 1000 runs by 8 workers in {seconds:.2f} s = {1000 / seconds:.0f} claims/s "
          f"(per worker: {sorted(claims)})")


def test_a_worker_that_cannot_see_a_run_s_folder_fails_clearly_and_queues_it_again(registry_url, spec_dir,
                                                                                  tiny_data_root, tmp_path):
    [planned] = plan(spec_dir, "two_epochs", tiny_data_root)
    registry = Registry(registry_url)
    run = registry.plan_run(planned)
    missing = tmp_path / "another-node-only" / run.short_hash
    registry.set_run_dir(run.id, str(missing))  # started elsewhere; its last.pth is not on this node
    worker = Worker(WorkerSettings(db_url=registry_url, idle_exit=0))
    with pytest.raises(InputError, match=f"run folder {missing} is not visible on .*every node shares"):
        worker.run()
    after = registry.get_run(run.id)
    assert after.status == "queued" and after.attempts == 1 and not worker.active
    with pytest.raises(InputError, match="working folder .* is not visible"):
        Worker(WorkerSettings(db_url=registry_url, workdir=str(tmp_path / "nowhere"))).run()


@pytest.mark.slow
def test_two_runs_share_one_gpu_slot_set_at_once_with_the_metrics_of_each_run_alone(
        spec_dir, tiny_data_root, tmp_path, local_reference):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    packed = php_run("run", spec_dir / "two_seeds.toml", "--preset", "tiny", "--data-root", tiny_data_root,
                     "--device", "cpu", "--db", url, "--gpus", "0", "--runs-per-gpu", 2, cwd=tmp_path)
    output, _ = packed.communicate(timeout=JOB_TIMEOUT_S)
    assert packed.returncode == 0, output
    registry = Registry(url)
    runs = registry.list_runs()
    assert len(runs) == 2 and {run.status for run in runs} == {"done"}
    assert max(run.started_at for run in runs) < min(run.finished_at for run in runs)  # both in flight at once
    assert {registry.provenance(run.id)["cuda_visible_devices"] for run in runs} == {"0"}  # the one "GPU"
    for run in runs:  # the same metrics as the run executed alone, one after another
        assert registry.results(run.id) == local_reference[run.config_hash]
