"""One Optuna study on PostgreSQL tuned from two submitit workers at once."""

from __future__ import annotations

import shutil

import optuna
import pytest
from launch_helpers import JOB_TIMEOUT_S, php_run

from php_runner.store.registry import Registry

SPEC = """extends = "base"
datasets = ["CUHK-PEDES"]

[tune]
objective = "val.R1"
trials = 2
pruner = "none"

[tune.space."train.lr"]
type = "float"
low = 1e-4
high = 1e-2
log = true
"""


@pytest.mark.pg
@pytest.mark.slow
def test_two_local_workers_share_one_study_on_postgresql(pg_url, spec_dir, tiny_data_root, tmp_path):
    folder = tmp_path / "specs"
    folder.mkdir()
    shutil.copy(spec_dir / "base.toml", folder)
    presets = (spec_dir / "presets.toml").read_text()
    (folder / "presets.toml").write_text(presets.replace("[tiny.train]\nepochs = 4\n", "[tiny.train]\nepochs = 1\n"))
    (folder / "tune_two.toml").write_text(SPEC)
    process = php_run("tune", folder / "tune_two.toml", "--dataset", "CUHK-PEDES", "--preset", "tiny", "--data-root",
                      tiny_data_root, "--study", "shared", "--executor", "local", "--workers", 2, "--db", pg_url,
                      cwd=tmp_path)
    output, _ = process.communicate(timeout=JOB_TIMEOUT_S)
    assert process.returncode == 0, output
    assert "submitted 2 local tuning worker(s)" in output

    study = optuna.load_study(study_name="shared", storage=pg_url)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(finished) >= 2 and len({t.number for t in finished}) == len(finished)
    runs = Registry(pg_url).list_runs(kind="trial")
    assert {run.status for run in runs} == {"done"}
    assert len({run.worker.partition(":")[0] for run in runs}) == 1  # one host, here
    assert len({run.worker for run in runs}) == 2  # the trials ran in the two workers
    assert sorted(run.id for run in runs) == sorted(t.user_attrs["run_id"] for t in finished)
