"""The one scheduling loop: a worker claims runs from the registry and trains each in its own process.

Local runs (``php-run run``, ``execute.local``), queued runs (``php-run worker``) and Slurm jobs
(``execute.slurm``) all execute here. A worker serves ``runs_per_gpu`` slots per GPU (or that many
slots on the default device without ``gpus``). For a free slot it claims the oldest claimable run
with ``Registry.claim_next`` under its own id (``host:pid``) and starts the run's child process on
that slot's GPU (``pool.spawn_run`` with ``claimed_by``): the child heartbeats under that id while
it trains and dies with the worker, so a killed worker's runs go stale and the next worker resumes
them from ``last.pth``. A worker told to stop (SIGTERM, or a Slurm preemption through
``execute.slurm``) stops its processes and puts their runs back in the queue; a local worker
interrupted by Ctrl-C waits for its children, which record the interruption themselves.

``PHP_RUN_NOOP_TRAINING=1`` (test-only) skips training: each claimed run is marked done at once,
without a process, results or checkpoints; it measures the queue itself (claims per second).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from php_runner.errors import InputError
from php_runner.execute.pool import (
    ActiveRun,
    RunOutcome,
    finish_run,
    outcome_of,
    spawn_run,
)
from php_runner.store.heartbeat import HEARTBEAT_INTERVAL_S
from php_runner.store.claims import DEFAULT_STALE_AFTER_S, this_worker
from php_runner.store.registry import Registry
from php_runner.store.records import RunRecord
from php_runner.store.database import resolve_url
from php_runner.store.tables import RESUMABLE_STATUSES

NOOP_ENV = "PHP_RUN_NOOP_TRAINING"
# A claimed run's process heartbeats this many times per stale period, so one late beat is no death.
BEATS_PER_STALE_PERIOD = 4
POLL_S = 0.2


def noop_training() -> bool:
    """Whether the test-only no-op workload is on (``PHP_RUN_NOOP_TRAINING=1``)."""
    return os.environ.get(NOOP_ENV, "") == "1"


@dataclass(frozen=True)
class WorkerSettings:
    """What one worker does; the fields of ``php-run worker`` plus what a Slurm job adds."""

    db_url: str | None = None
    gpus: tuple[str, ...] | None = None
    runs_per_gpu: int = 1  # slots per GPU (or on the default device): runs in flight at once, each its own process
    max_runs: int | None = None  # stop after claiming this many runs
    idle_exit: float | None = None  # stop after this many seconds with nothing to claim; None: never
    stale_after: float | None = None  # a running run without a heartbeat for this long is claimable
    run_ids: tuple[int, ...] | None = None  # claim only these runs (a submission's); None: any
    workdir: str | None = None  # where checkpoints/ goes; must be the same shared folder on every node
    executor: str | None = "worker"  # recorded on each claimed run with job_id; None: leave the run's as it is
    job_id: str | None = None
    command: str | None = None
    local: bool = False  # draining the runs this invocation planned (php-run run): no visibility checks,
    # and Ctrl-C waits for the children to record their interruption instead of queueing the runs again

    def slots(self) -> list[str | None]:
        """One entry per slot, the GPU it runs on: each GPU ``runs_per_gpu`` times, GPUs interleaved."""
        gpus: list[str | None] = list(self.gpus) if self.gpus else [None]
        return [gpu for _ in range(self.runs_per_gpu) for gpu in gpus]


@dataclass
class WorkerSummary:
    worker: str
    claimed: list[int] = field(default_factory=list)
    outcomes: list[RunOutcome] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def check_visible(run: RunRecord) -> None:
    """Fail with one line naming the path when this node cannot see what ``run`` needs.

    Real data, the CLIP weights and the run folder of a started run (its ``last.pth``) must be on a
    filesystem every node shares; a node that cannot see them would train from scratch or on nothing.
    """
    runtime = run.config.get("runtime", {})
    needed: list[tuple[str, Path]] = []
    if run.config["data"].get("source") != "synthetic":
        needed.append(("data", Path(runtime.get("data_root") or ".") / run.config["data"]["dataset"]))
    if runtime.get("clip_weights"):
        needed.append(("CLIP weights", Path(runtime["clip_weights"])))
    if run.run_dir:
        needed.append(("run folder", Path(run.run_dir)))
    for what, path in needed:
        if not path.exists():
            raise InputError(f"run {run.id}: {what} {path} is not visible on {socket.gethostname()}; checkpoints, "
                             "data and weights must be on a filesystem every node shares")


class Worker:
    """Claims and executes queued runs until told to stop, out of runs, or idle too long."""

    def __init__(self, settings: WorkerSettings, on_outcome: Callable[[RunOutcome], None] | None = None):
        self.settings = settings
        self.url = resolve_url(settings.db_url)
        self.id = this_worker()
        self.on_outcome = on_outcome
        self.summary = WorkerSummary(self.id)
        self.stopping = False
        self.active: list[ActiveRun] = []
        self.failed_here: set[int] = set()  # not claimed again by this worker (a failure would repeat)
        stale_after = settings.stale_after or DEFAULT_STALE_AFTER_S
        self.heartbeat = min(HEARTBEAT_INTERVAL_S, stale_after / BEATS_PER_STALE_PERIOD)

    def run(self) -> WorkerSummary:
        if self.settings.workdir is not None:
            if not Path(self.settings.workdir).is_dir():
                raise InputError(f"working folder {self.settings.workdir} is not visible on {socket.gethostname()}; "
                                 "submit from a folder every node shares")
            os.chdir(self.settings.workdir)
        registry = Registry(self.url, stale_after=self.settings.stale_after or DEFAULT_STALE_AFTER_S)
        try:
            self._loop(registry, self.settings.slots())
        except KeyboardInterrupt:
            if self.settings.local:  # the children got the same SIGINT and save a resumable state
                for item in self.active:
                    item.process.wait()
            raise
        finally:
            self.release_all(registry)
            registry.close()
        return self.summary

    def _loop(self, registry: Registry, slots: list[str | None]) -> None:
        idle_since = time.monotonic()
        while True:
            for item in [a for a in self.active if a.process.poll() is not None]:
                self.active.remove(item)
                self._finished(registry, item)
            claimed_now = self._fill(registry, slots)
            if self.active or claimed_now:
                idle_since = time.monotonic()
            elif self.stopping or self._budget_spent():
                return
            elif self.settings.idle_exit is not None and time.monotonic() - idle_since >= self.settings.idle_exit:
                return
            time.sleep(POLL_S)

    def _free_slots(self, slots: list[str | None]) -> list[str | None]:
        """The GPUs of the slots no running process holds, in slot order."""
        free = list(slots)
        for item in self.active:
            free.remove(item.gpu)
        return free

    def _budget_spent(self) -> bool:
        return self.settings.max_runs is not None and len(self.summary.claimed) >= self.settings.max_runs

    def _fill(self, registry: Registry, slots: Sequence[str | None]) -> bool:
        """Claim runs for the free slots; True when at least one was claimed."""
        claimed_any = False
        free = self._free_slots(list(slots))
        while free and not self.stopping and not self._budget_spent():
            run = registry.claim_next(self.id, self.settings.stale_after, self._scope(registry))
            if run is None:
                break
            claimed_any = True
            self.summary.claimed.append(run.id)
            settings = self.settings
            if settings.executor is not None and (run.executor, run.job_id) != (settings.executor, settings.job_id):
                registry.set_job(run.id, settings.executor, settings.job_id)
            if noop_training():
                registry.mark_done(run.id)
                self._report(outcome_of(run, "done"))
                continue
            try:
                if not settings.local:
                    check_visible(run)
            except InputError:
                registry.requeue(run.id, self.id)
                raise
            parallel = len(slots) > 1
            self.active.append(spawn_run(run, self.url, free.pop(0), parallel, self.settings.command,
                                      claimed_by=self.id, heartbeat=self.heartbeat))
        return claimed_any

    def _scope(self, registry: Registry) -> tuple[int, ...] | None:
        """The run ids this worker may claim: its settings' (None: any) without the ones it saw fail."""
        if not self.failed_here:
            return self.settings.run_ids
        scope = self.settings.run_ids
        if scope is None:
            scope = tuple(run.id for run in registry.list_runs(status=("queued", "running", *RESUMABLE_STATUSES)))
        return tuple(run_id for run_id in scope if run_id not in self.failed_here)

    def _finished(self, registry: Registry, item: ActiveRun) -> None:
        if self.stopping and registry.requeue(item.run.id, self.id):
            for thread in item.threads:
                thread.join()
            self.summary.requeued.append(item.run.id)
            return
        outcome = finish_run(registry, item)
        if outcome.status == "failed":
            self.failed_here.add(outcome.run_id)
        self._report(outcome)

    def _report(self, outcome: RunOutcome) -> None:
        self.summary.outcomes.append(outcome)
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def stop(self, *_signal_args) -> None:
        """Claim nothing more; running processes are stopped and their runs queued again."""
        self.stopping = True
        self._terminate_active()

    def _terminate_active(self) -> None:
        for item in self.active:
            if item.process.poll() is None:
                item.process.terminate()

    def release_all(self, registry: Registry | None = None) -> list[int]:
        """Stop every running process and put its run back in the queue (it resumes from last.pth)."""
        if not self.active:
            return self.summary.requeued
        self._terminate_active()
        own = registry is None
        registry = registry or Registry(self.url)
        try:
            for item in list(self.active):
                item.process.wait()
                for thread in item.threads:
                    thread.join()
                self.active.remove(item)
                if registry.requeue(item.run.id, self.id):
                    self.summary.requeued.append(item.run.id)
        finally:
            if own:
                registry.close()
        return self.summary.requeued

    def stop_on(self, *signals: int) -> None:
        """Stop gracefully on these signals (the process must be the main thread's)."""
        for number in signals:
            signal.signal(number, self.stop)
