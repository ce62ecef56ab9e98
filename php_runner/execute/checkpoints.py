"""Where a run's checkpoints live, checking them before use, and restarting runs from scratch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from php_runner.errors import InputError
from php_runner.store.checksums import checkpoint_problem
from php_runner.store.registry import Registry
from php_runner.store.records import RunRecord

if TYPE_CHECKING:
    from php_runner.experiment.schema import PlannedRun


CHECKPOINT_ROOT = Path("checkpoints")


def verified_checkpoint(registry: Registry, run: RunRecord, path: str) -> str:
    """``path``, a checkpoint recorded for ``run``, after checking it still has its recorded sha256."""
    for record in registry.checkpoints(run.id):
        if record.path == path:
            problem = checkpoint_problem(path, record.sha256)
            if problem is not None:
                raise InputError(f"run {run.id}: checkpoint {path}: {problem}; {restart_hint(run)}")
    return path


def restart_hint(run: RunRecord) -> str:
    return (f"to train it again from scratch: php-run run SPEC --restart {run.id} "
            f"(SPEC: the spec file of '{run.spec_name}')")


def restart_runs(registry: Registry, planned: Sequence["PlannedRun"], refs: Sequence[str]) -> None:
    """Make the runs ``refs`` (ids or hash prefixes, each one of ``planned``) start again from scratch.

    Their resume state and best checkpoint are deleted and the run is marked failed (so claimable)
    with the reason; epochs, results and checkpoint records are overwritten by the new training.
    A run that a live worker holds is refused.
    """
    from php_runner.engine.train import BEST_CHECKPOINT, LAST_CHECKPOINT

    hashes = {p.config_hash for p in planned}
    runs = [registry.get_run(ref) for ref in refs]
    for ref, run in zip(refs, runs):
        if run.config_hash not in hashes:
            raise InputError(f"--restart {ref}: run {run.id} is not one of this command's planned runs")
        if run.status == "running" and not registry.is_claimable(run):
            raise InputError(f"--restart {ref}: run {run.id} is running (worker {run.worker}); stop it first")
    for run in runs:
        for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
            (run_dir_of(run) / name).unlink(missing_ok=True)
        registry.mark_failed(run.id, "restarted from scratch (--restart): its checkpoints were removed")


def run_dir_of(run: RunRecord) -> Path:
    """Where a run's checkpoints live (recorded on first training, else the default under checkpoints/)."""
    return Path(run.run_dir) if run.run_dir else (CHECKPOINT_ROOT / run.short_hash).resolve()
