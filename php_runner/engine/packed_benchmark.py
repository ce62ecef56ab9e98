"""Packed runs: the aggregate training samples/s of N runs training at once on one device, each its own process.

``php-run worker --runs-per-gpu N`` packs N runs on a device, each its own Python process; this measures
what that buys. N processes are spawned (multiprocessing ``spawn``: fresh interpreters, as the worker's
runs are), each builds the regime's model at the bench's batch on random inputs, warms up, waits at a
barrier until every process is warm, then times ``sizes.steps`` training steps. Each reports its
wall-clock start and end (``time.time()``: one clock shared by the processes, so their intervals can be
compared) and its samples/s over that interval.

The aggregate is the total samples of all processes over the wall time in which they ran, from the
first start to the last end; ``overlap_s`` is the time all of them ran at once (the last start to the
first end; positive when they overlapped).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import traceback

import torch

from php_runner.engine.bench_regime import REGIMES, BenchRegime, BenchSizes, synchronize
from php_runner.model.config import PHPConfig

BARRIER_TIMEOUT_S = 1800  # longest a warm process waits for the others (a compile of the paper model included)


def _packed_process(config: PHPConfig, regime: str, sizes: BenchSizes, device: str, compile: bool, threads: int,
                    ready, results) -> None:
    """One packed run, in its own process: warm up, wait for the others, time the steps, report (or the error)."""
    try:
        torch.set_num_threads(threads)
        trial = BenchRegime(config, regime, sizes.batch_size, torch.device(device), compile)
        batch = trial.device_batch(config, sizes.batch_size)
        for _ in range(max(sizes.warmup, 1)):
            trial.step(batch)
        synchronize(trial.device)
        ready.wait(BARRIER_TIMEOUT_S)
        started = time.time()
        for _ in range(sizes.steps):
            trial.step(batch)
        synchronize(trial.device)
        ended = time.time()
        samples = sizes.steps * sizes.batch_size
        results.put({"pid": os.getpid(), "samples": samples, "start": started, "end": ended,
                     "samples_per_s": samples / (ended - started)})
    except BaseException:  # reported to the parent, which stops the other processes
        results.put({"error": traceback.format_exc()})


def summarize_packed(processes: list[dict]) -> dict:
    """The aggregate of per-process records (``samples``, ``start``, ``end``): total samples over the wall time
    from the first start to the last end, and the time all of them ran at once."""
    first_start = min(process["start"] for process in processes)
    last_end = max(process["end"] for process in processes)
    total = sum(process["samples"] for process in processes)
    return {
        "samples": total, "wall_s": last_end - first_start, "aggregate_samples_per_s": total / (last_end - first_start),
        "overlap_s": min(process["end"] for process in processes) - max(process["start"] for process in processes),
    }


def _collect(children: list, results, ready, timeout: float) -> list[dict]:
    """One record per child; the first error (or a child that died silently) stops the others and raises."""
    deadline, records = time.monotonic() + timeout, []
    while len(records) < len(children):
        try:
            record = results.get(timeout=1)
        except queue.Empty:
            dead = [child.exitcode for child in children if child.exitcode not in (None, 0)]
            if not dead and time.monotonic() < deadline:
                continue
            record = {"error": f"a packed process exited with code {dead[0]}" if dead
                      else f"no result after {timeout} s"}
        if "error" in record:
            ready.abort()
            for child in children:
                child.terminate()
            raise RuntimeError(f"packed training failed:\n{record['error']}")
        records.append(record)
    return records


def packed_training(config: PHPConfig, sizes: BenchSizes, device: torch.device, compile: bool = False,
                    timeout: float = 3600) -> dict:
    """``sizes.packed_runs`` processes training the ``sizes.packed_regime`` regime at ``sizes.batch_size`` at once
    on ``device``: each process's samples/s, start and end (sorted by start), and the aggregate."""
    runs, regime = sizes.packed_runs, sizes.packed_regime
    if runs < 1 or regime not in REGIMES:
        raise ValueError(f"packed training needs runs >= 1 and a regime in {sorted(REGIMES)}, got {runs}, {regime!r}")
    context = multiprocessing.get_context("spawn")
    ready, results = context.Barrier(runs), context.Queue()
    threads = max(1, torch.get_num_threads() // runs)  # the processes share the host's cores
    children = [context.Process(target=_packed_process, daemon=True,
                                args=(config, regime, sizes, str(device), compile, threads, ready, results))
                for _ in range(runs)]
    for child in children:
        child.start()
    try:
        processes = sorted(_collect(children, results, ready, timeout), key=lambda process: process["start"])
    finally:
        for child in children:
            child.join(timeout=60)
    return {"runs": runs, "regime": regime, "precision": REGIMES[regime], "compile": compile,
            "batch_size": sizes.batch_size, "steps": sizes.steps, "threads_per_process": threads,
            "processes": processes, **summarize_packed(processes)}
