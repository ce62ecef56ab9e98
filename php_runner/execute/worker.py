"""A queue worker: claims queued runs from the registry and trains each in its own process.

One worker serves one slot per GPU (or one slot without ``gpus``). For a free slot it claims the
oldest claimable run with ``Registry.claim_next`` under its own id (``host:pid``) and starts the
runner's worker process for it (``runner._spawn`` with ``claimed_by``): the process heartbeats
under that id while it trains and dies with the worker, so a killed worker's runs go stale and
the next worker resumes them from ``last.pth``. A worker told to stop (SIGTERM, or a Slurm
preemption through ``launch.slurm``) stops its processes and puts their runs back in the queue.

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
from php_runner.store.registry import DEFAULT_STALE_AFTER_S, Registry, RunRecord, resolve_url, this_worker
from php_runner.execute.child import HEARTBEAT_INTERVAL_S, RunOutcome, _Active, _finish, _outcome, _spawn

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
    max_runs: int | None = None  # stop after claiming this many runs
    idle_exit: float | None = None  # stop after this many seconds with nothing to claim; None: never
    stale_after: float | None = None  # a running run without a heartbeat for this long is claimable
    run_ids: tuple[int, ...] | None = None  # claim only these runs (a submission's); None: any
    workdir: str | None = None  # where checkpoints/ goes; must be the same shared folder on every node
    executor: str = "worker"  # recorded on each claimed run with job_id
    job_id: str | None = None
    command: str | None = None


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
        self.active: list[_Active] = []
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
        slots: list[str | None] = list(self.settings.gpus) if self.settings.gpus else [None]
        idle_since = time.monotonic()
        try:
            while True:
                for item in [a for a in self.active if a.process.poll() is not None]:
                    self.active.remove(item)
                    self._finished(registry, item)
                claimed_now = self._fill(registry, slots)
                if self.active or claimed_now:
                    idle_since = time.monotonic()
                elif self.stopping or self._budget_spent():
                    break
                elif self.settings.idle_exit is not None and time.monotonic() - idle_since >= self.settings.idle_exit:
                    break
                time.sleep(POLL_S)
        finally:
            self.release_all(registry)
            registry.close()
        return self.summary

    def _budget_spent(self) -> bool:
        return self.settings.max_runs is not None and len(self.summary.claimed) >= self.settings.max_runs

    def _fill(self, registry: Registry, slots: Sequence[str | None]) -> bool:
        """Claim runs for the free slots; True when at least one was claimed."""
        claimed_any = False
        busy = {a.gpu for a in self.active}
        free = [slot for slot in slots if slot not in busy]
        while free and not self.stopping and not self._budget_spent():
            run = registry.claim_next(self.id, self.settings.stale_after, self._scope(registry))
            if run is None:
                break
            claimed_any = True
            self.summary.claimed.append(run.id)
            if (run.executor, run.job_id) != (self.settings.executor, self.settings.job_id):
                registry.set_job(run.id, self.settings.executor, self.settings.job_id)
            if noop_training():
                registry.mark_done(run.id)
                self._report(_outcome(run, "done"))
                continue
            try:
                check_visible(run)
            except InputError:
                registry.requeue(run.id, self.id)
                raise
            parallel = len(slots) > 1
            self.active.append(_spawn(run, self.url, free.pop(0), parallel, self.settings.command,
                                      claimed_by=self.id, heartbeat=self.heartbeat))
        return claimed_any

    def _scope(self, registry: Registry) -> tuple[int, ...] | None:
        """The run ids this worker may claim: its settings' (None: any) without the ones it saw fail."""
        if not self.failed_here:
            return self.settings.run_ids
        scope = self.settings.run_ids
        if scope is None:
            scope = tuple(run.id for run in registry.list_runs(status=("queued", "running", "failed")))
        return tuple(run_id for run_id in scope if run_id not in self.failed_here)

    def _finished(self, registry: Registry, item: _Active) -> None:
        if self.stopping and registry.requeue(item.run.id, self.id):
            for thread in item.threads:
                thread.join()
            self.summary.requeued.append(item.run.id)
            return
        outcome = _finish(registry, item)
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
