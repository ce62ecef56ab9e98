"""One process per run: starting a run's child process on a device slot and turning its exit into an outcome.

The child is ``python -m php_runner.execute.child RUN_ID``; its stderr (and, with several slots, its
stdout prefixed by the run id) is pumped to this process; a child that dies without recording its
failure (SIGKILL, a CUDA abort) is recorded as failed with the last line it printed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from php_runner.execute.child import EXIT_BAD_DATA, EXIT_NOT_CLAIMED
from php_runner.store.heartbeat import HEARTBEAT_INTERVAL_S
from php_runner.store.registry import Registry
from php_runner.store.records import RunRecord

if TYPE_CHECKING:
    pass


@dataclass
class RunOutcome:
    """What happened to one planned run in this invocation."""

    run_id: int
    config_hash: str
    row_label: str
    dataset: str
    seed: int
    status: str  # done | failed | skipped (done before) | busy (another process runs it)
    error: str | None = None
    bad_data: bool = False  # failed because its dataset was refused (an unreadable image): bad input


def outcome_of(run: RunRecord, status: str, error: str | None = None, bad_data: bool = False) -> RunOutcome:
    return RunOutcome(run.id, run.config_hash, run.row_label, run.dataset, run.seed, status, error, bad_data)


@dataclass
class ExecutionSummary:
    outcomes: list[RunOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def bad_input_only(self) -> bool:
        """Some run failed, and every failure was its dataset refused: the command's exit is bad input (2)."""
        return bool(self.failed) and all(o.bad_data for o in self.failed)


@dataclass
class ActiveRun:
    run: RunRecord
    process: subprocess.Popen
    stderr_tail: deque
    threads: list[threading.Thread]
    gpu: str | None
    owner: str | None = None  # the worker id the run was claimed under, when the parent claimed it


def pump_lines(stream, sink, prefix: str, tail: deque | None) -> None:
    for line in iter(stream.readline, ""):
        sink.write(prefix + line)
        sink.flush()
        if tail is not None and line.strip():
            tail.append(line.rstrip())
    stream.close()


def spawn_run(run: RunRecord, db_url: str, gpu: str | None, parallel: bool, command: str | None,
           claimed_by: str | None = None, heartbeat: float = HEARTBEAT_INTERVAL_S) -> ActiveRun:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    argv = [sys.executable, "-m", "php_runner.execute.child", str(run.id), "--db", db_url, "--heartbeat", str(heartbeat)]
    if command:
        argv.append(f"--command={command}")  # one token: a command line may start with "-"
    if claimed_by:
        argv += ["--claimed-by", claimed_by]
    process = subprocess.Popen(
        argv, env=env, text=True, bufsize=1, stdout=subprocess.PIPE if parallel else None, stderr=subprocess.PIPE
    )
    prefix = f"[run {run.id}] " if parallel else ""
    tail: deque = deque(maxlen=20)
    threads = [threading.Thread(target=pump_lines, args=(process.stderr, sys.stderr, prefix, tail), daemon=True)]
    if parallel:
        threads.append(threading.Thread(target=pump_lines, args=(process.stdout, sys.stdout, prefix, None), daemon=True))
    for thread in threads:
        thread.start()
    return ActiveRun(run, process, tail, threads, gpu, claimed_by)


def finish_run(registry: Registry, active: ActiveRun) -> RunOutcome:
    """Turn a finished worker into an outcome, recording deaths the worker could not record itself."""
    code = active.process.returncode
    for thread in active.threads:
        thread.join()
    run = registry.get_run(active.run.id)
    if code == 0 and run.status == "done":
        return outcome_of(run, "done")
    if code == EXIT_NOT_CLAIMED:
        return outcome_of(run, "skipped" if run.status == "done" else "busy")
    if code == EXIT_BAD_DATA and run.status == "failed":  # recorded by the worker with its one-line reason
        return outcome_of(run, "failed", run.error, bad_data=True)
    worker = active.owner or f"{socket.gethostname()}:{active.process.pid}"
    if run.status == "running" and run.worker == worker:
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        last_line = active.stderr_tail[-1] if active.stderr_tail else "no error output"
        registry.mark_failed(run.id, f"worker {how}: {last_line}", worker=worker)
        run = registry.get_run(run.id)
    return outcome_of(run, "failed", run.error or f"worker exited with code {code}")
