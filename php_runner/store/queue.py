"""The run queue's side of the registry: claiming runs, heartbeats, requeueing and status changes.

``RunQueue`` is a mixin of ``store.registry.Registry``: its methods use the registry's sessions, URL,
``stale_after`` and ``get_run``. Claims are single UPDATEs whose WHERE clause holds the claimable
condition (``store.claims``), so exactly one concurrent caller wins a run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import or_, select, update

from php_runner.store.claims import claim_values, claimable_condition, pid_is_dead
from php_runner.store.records import RunRecord
from php_runner.store.rows import run_record
from php_runner.store.tables import RESUMABLE_STATUSES, Run


class RunQueue:
    """Claims and status changes of runs; mixed into ``Registry``, which provides the session and ``get_run``."""

    def claim_run(self, run_id: int, worker: str, stale_after: float | None = None) -> bool:
        """Atomically make ``worker`` the owner of a queued, failed or abandoned running run.

        A running run is abandoned when its heartbeat is older than ``stale_after`` seconds, or when
        its worker was a process on this host that no longer exists (killed, crashed). One UPDATE
        with the claimable condition in its WHERE clause decides; exactly one concurrent caller sees
        a changed row.
        """
        stale_after = self.stale_after if stale_after is None else stale_after
        now = time.time()
        claimable = claimable_condition(now, stale_after)
        current = self.get_run(run_id)
        if current.status == "running" and pid_is_dead(current.worker):
            # Compare-and-swap on the dead owner's identity: a concurrent claimer changes it first.
            claimable = or_(
                claimable,
                (Run.status == "running") & (Run.worker == current.worker)
                & (Run.heartbeat_at == current.heartbeat_at),
            )
        with self._session() as s:
            result = s.execute(
                update(Run).where(Run.id == run_id, claimable).values(**claim_values(worker, now))
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1

    def claim_next(
        self, worker: str, stale_after: float | None = None, run_ids: Sequence[int] | None = None
    ) -> RunRecord | None:
        """Atomically claim the oldest claimable run (the rule of ``claim_run``) among ``run_ids``.

        ``run_ids=None`` means any run; imported runs are never claimed (they never train). On PostgreSQL
        the candidate row is selected ``FOR UPDATE SKIP LOCKED``, so concurrent workers take
        different runs without waiting on each other; on SQLite the transaction is ``BEGIN
        IMMEDIATE`` (see ``make_engine``), which serialises claimers. Runs held by a dead local
        process are claimed through ``claim_run``'s compare-and-swap. Returns the claimed run, or
        None when nothing is claimable.
        """
        if run_ids is not None and not run_ids:
            return None
        stale_after = self.stale_after if stale_after is None else stale_after
        scope = [Run.kind.in_(("trained", "trial"))] + ([] if run_ids is None else [Run.id.in_(list(run_ids))])
        now = time.time()
        with self._session() as s:
            candidate = s.scalars(
                select(Run.id).where(*scope, claimable_condition(now, stale_after)).order_by(Run.id).limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if candidate is not None:
                s.execute(update(Run).where(Run.id == candidate).values(**claim_values(worker, now))
                          .execution_options(synchronize_session=False))
                return run_record(s.get(Run, candidate), self.url)
            orphans = s.execute(
                select(Run.id, Run.worker).where(*scope, Run.status == "running").order_by(Run.id)
            ).all()
        for run_id, owner in orphans:
            if pid_is_dead(owner) and self.claim_run(run_id, worker, stale_after):
                return self.get_run(run_id)
        return None

    def set_job(self, run_id: int, executor: str | None, job_id: str | None) -> None:
        """Record the executor (``local``, ``slurm``) and job id that will run, or runs, ``run_id``."""
        with self._session() as s:
            s.execute(update(Run).where(Run.id == run_id).values(executor=executor, job_id=job_id))

    def requeue(self, run_id: int, worker: str | None = None) -> bool:
        """Put a running run back in the queue (preempted, cancelled); with ``worker``, only its own.

        The run directory stays, so the next claimer resumes from its last checkpoint.
        """
        condition = [Run.id == run_id, Run.status == "running"]
        if worker is not None:
            condition.append(Run.worker == worker)
        with self._session() as s:
            result = s.execute(
                update(Run).where(*condition).values(status="queued", worker=None, heartbeat_at=None)
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1

    def is_claimable(self, run: RunRecord, stale_after: float | None = None) -> bool:
        """Whether ``claim_run`` would currently succeed for ``run`` (a hint; claim_run decides)."""
        stale_after = self.stale_after if stale_after is None else stale_after
        if run.status in RESUMABLE_STATUSES:
            return True
        if run.status != "running":
            return False
        stale = run.heartbeat_at is None or run.heartbeat_at < time.time() - stale_after
        return stale or pid_is_dead(run.worker)

    def heartbeat(self, run_id: int, worker: str) -> bool:
        """Refresh the heartbeat; False when ``worker`` no longer owns the running run."""
        with self._session() as s:
            result = s.execute(
                update(Run)
                .where(Run.id == run_id, Run.worker == worker, Run.status == "running")
                .values(heartbeat_at=time.time())
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1

    def set_run_dir(self, run_id: int, run_dir: str) -> None:
        with self._session() as s:
            s.execute(update(Run).where(Run.id == run_id).values(run_dir=run_dir))

    def mark_done(self, run_id: int) -> None:
        with self._session() as s:
            s.execute(
                update(Run).where(Run.id == run_id).values(status="done", error=None, finished_at=time.time())
            )

    def mark_failed(self, run_id: int, error: str, worker: str | None = None) -> bool:
        """Record a failure. With ``worker``, only while that worker still owns the running run."""
        condition = [Run.id == run_id]
        if worker is not None:
            condition += [Run.worker == worker, Run.status == "running"]
        with self._session() as s:
            result = s.execute(
                update(Run).where(*condition).values(status="failed", error=error, finished_at=time.time())
            )
            return result.rowcount == 1

    def mark_interrupted(self, run_id: int, worker: str) -> bool:
        """A run stopped by Ctrl-C or SIGTERM while ``worker`` held it: resumable, not failed."""
        with self._session() as s:
            result = s.execute(
                update(Run).where(Run.id == run_id, Run.worker == worker, Run.status == "running")
                .values(status="interrupted", error="interrupted (resumes from its last checkpoint)",
                        finished_at=time.time())
            )
            return result.rowcount > 0
