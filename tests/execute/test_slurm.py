"""Slurm through submitit on the real single-node cluster: a job array runs every run once with the
local metrics; scancel then resubmission, and a preemption requeued by submitit's checkpointing hook,
both resume from last.pth to the metrics of an uninterrupted run (deterministic CPU mode)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from launch_helpers import EPOCH_PAUSE, JOB_TIMEOUT_S, php_run, php_run_env, plan, wait_for

from php_runner.errors import InputError
from php_runner.execute import slurm as slurm_launch
from php_runner.execute.jobs import slurm_states
from php_runner.store.registry import Registry

JOB_TIME = "00:15:00"


def submit_args(spec_dir: Path, name: str, data_root: Path, url: str, *extra) -> tuple:
    return ("submit", spec_dir / f"{name}.toml", "--executor", "slurm", "--preset", "tiny", "--data-root", data_root,
            "--time", JOB_TIME, "--gpus-per-run", 1, "--db", url, *extra)


def finish(process) -> str:
    output, _ = process.communicate(timeout=JOB_TIMEOUT_S)
    assert process.returncode == 0, output
    return output


def job_logs(folder: Path) -> str:
    return "\n".join(path.read_text() for path in sorted(folder.glob("checkpoints/submitit/*/*_log.out")))


def pending_reason(job_id: str) -> str:
    done = subprocess.run(["squeue", "-h", "-j", job_id, "-t", "PD", "-o", "%r"], capture_output=True, text=True,
                          timeout=30)
    return done.stdout.strip()


def test_time_and_slurm_options_parse_or_fail_naming_the_option():
    assert slurm_launch.parse_time("01:00:00") == 60 and slurm_launch.parse_time("00:00:30") == 1
    for bad in ("90", "1:60:00", "00:00:00"):
        with pytest.raises(InputError, match="--time"):
            slurm_launch.parse_time(bad)
    assert slurm_launch.parse_slurm_options(["qos=high", "--account=lab"]) == {"qos": "high", "account": "lab"}
    with pytest.raises(InputError, match="--slurm-option"):
        slurm_launch.parse_slurm_options(["qos"])


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_array_runs_every_run_once_with_the_local_metrics(slurm, spec_dir, tiny_data_root, tmp_path,
                                                                 local_reference):
    output = finish(php_run(*submit_args(spec_dir, "two_seeds", tiny_data_root, slurm, "--wait"), cwd=tmp_path))
    assert "submitted 2 slurm worker job(s)" in output and "2 done, 0 not done" in output
    registry = Registry(slurm)
    runs = registry.list_runs()
    assert [(r.status, r.attempts, r.executor) for r in runs] == [("done", 1, "slurm")] * 2
    arrays = {r.job_id.split("_")[0] for r in runs}
    assert len(arrays) == 1 and len({r.job_id for r in runs}) == 2  # two elements of one array
    for run in runs:
        assert registry.results(run.id) == local_reference[run.config_hash]

    status = php_run("status", "--json", "--db", slurm, cwd=tmp_path)
    entries = json.loads(finish(status))
    assert [e["job_state"] for e in entries] == ["COMPLETED", "COMPLETED"]


@pytest.mark.slurm
@pytest.mark.slow
def test_scancel_mid_run_then_resubmission_resumes_to_the_uninterrupted_metrics(slurm, spec_dir, tiny_data_root,
                                                                                 tmp_path, local_reference):
    args = submit_args(spec_dir, "two_epochs", tiny_data_root, slurm)
    finish(php_run(*args, cwd=tmp_path, env=php_run_env(**EPOCH_PAUSE)))  # the resubmission runs unpaused
    registry = Registry(slurm)
    [run] = registry.list_runs()
    wait_for(lambda: list(tmp_path.glob("checkpoints/*/last.pth")), "epoch 1's checkpoint")
    element = registry.get_run(run.id).job_id  # submitit submits a one-run array as a plain job
    assert element and re.fullmatch(r"\d+(_0)?", element)

    cancelled = finish(php_run("cancel", run.id, "--db", slurm, cwd=tmp_path))
    assert f"cancelled job {element} of run {run.id}" in cancelled
    assert registry.get_run(run.id).status == "queued"
    wait_for(lambda: slurm_states([element]).get(element) == "CANCELLED", "the cancelled job in sacct")

    output = finish(php_run(*args, "--wait", cwd=tmp_path))
    assert "1 done, 0 not done" in output
    resumed = registry.get_run(run.id)
    assert resumed.status == "done" and resumed.attempts == 2 and resumed.job_id != element
    assert re.search(r"resuming .* after epoch 1", job_logs(tmp_path))
    assert registry.results(run.id) == local_reference[run.config_hash]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_preempted_element_is_requeued_by_submitit_and_resumes(slurm, spec_dir, tiny_data_root, tmp_path,
                                                                 local_reference, monkeypatch):
    monkeypatch.chdir(tmp_path)
    planned = plan(spec_dir, "two_epochs", tiny_data_root)
    submission = slurm_launch.submit(planned, executor="slurm", db_url=slurm,
                                     options=slurm_launch.JobOptions(time=JOB_TIME))
    [job] = submission.jobs
    registry = Registry(slurm)
    [run] = submission.pending
    wait_for(lambda: list(tmp_path.glob("checkpoints/*/last.pth")), "epoch 1's checkpoint")
    job._interrupt()  # what Slurm does on preemption: SIGTERM, then submitit's USR2
    wait_for(lambda: pending_reason(job.job_id) == "BeginTime", "the requeued job")
    # slurmctld holds a requeued job for about 2 minutes; this test need not wait that long.
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True, timeout=30)
    wait_for(job.done, "the requeued element to finish")
    summary = job.result()  # the requeued element's return value
    resumed = registry.get_run(run.id)
    assert resumed.status == "done" and resumed.attempts == 2
    assert summary["claimed"] == [run.id] and summary["outcomes"] == {run.id: "done"}
    logs = job_logs(tmp_path)
    assert "Requeued job" in logs and re.search(r"resuming .* after epoch 1", logs)
    assert registry.results(run.id) == local_reference[run.config_hash]
