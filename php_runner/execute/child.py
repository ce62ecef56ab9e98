"""Executing planned runs: one worker process per run, claimed atomically in the registry, resumable.

The parent (``execute_planned``) records each planned run in the registry, skips the done ones and
starts a worker process for each of the others, one at a time or one per GPU. The worker
(``python -m php_runner.execute.child RUN_ID --db URL``, entry point ``execute_run``) claims the run, builds
the library objects from the run's resolved config, trains with a callback that writes every epoch to
the registry, and records the selected results, checkpoints and provenance. A crash, a CUDA error or a
SIGKILL ends one worker only; its run stays resumable from its last checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from php_runner.errors import InputError
from php_runner.store.registry import Registry, RunRecord, resolve_url, this_worker

if TYPE_CHECKING:
    from php_runner.experiment.specs import PlannedRun

# Worker exit codes beyond 0 (done) and 1 (failed).
EXIT_NOT_CLAIMED = 3  # done already, or another live process owns the run
EXIT_INTERRUPTED = 130
HEARTBEAT_INTERVAL_S = 15.0
# Test-only: seconds to wait after each epoch is recorded, so that interruption tests (scancel, preemption,
# SIGKILL) can land between epochs however fast the machine trains.
EPOCH_PAUSE_ENV = "PHP_RUN_TEST_EPOCH_PAUSE_S"
CHECKPOINT_ROOT = Path("checkpoints")
CLIP_NAMES = ("ViT-B/16", "tiny")


class LostClaim(Exception):
    """Another process took over this run (our heartbeat went stale); stop without recording."""


# --------------------------------------------------------------------------------------------
# Building library objects from a resolved config
# --------------------------------------------------------------------------------------------


def build_php_config(model_section: dict, num_classes: int = 0):
    """``PHPConfig`` from the ``model`` section of a resolved config."""
    from php_runner.model.config import ClipConfig, PHPConfig

    fields = dict(model_section)
    clip_name = fields.pop("clip", "ViT-B/16")
    image_size = tuple(fields.pop("image_size", ClipConfig().image_size))
    if clip_name == "tiny":
        clip = PHPConfig.tiny().clip
    elif clip_name == "ViT-B/16":
        clip = ClipConfig()
    else:
        raise InputError(f"model.clip: expected one of {', '.join(CLIP_NAMES)}, got {clip_name!r}")
    try:
        return PHPConfig(clip=replace(clip, image_size=image_size), num_classes=num_classes, **fields)
    except (TypeError, ValueError) as err:
        raise InputError(f"model: {err}") from None


def build_loss_config(loss_section: dict):
    from php_runner.model.losses import LossConfig

    values = dict(loss_section)
    if "names" in values:
        values["names"] = tuple(values["names"])
    return LossConfig(**values)


def build_train_settings(config: dict):
    """``TrainSettings`` from the ``train``, ``loss`` and ``runtime`` sections and ``data.pipeline``."""
    from php_runner.engine.train import TrainSettings

    values = dict(config["train"])
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    runtime = config.get("runtime", {})
    try:
        return TrainSettings(
            **values,
            loss=build_loss_config(config["loss"]),
            device=runtime.get("device", "auto"),
            num_workers=runtime.get("num_workers", 0),
            compile=runtime.get("compile", False),
            # Runs recorded before data.pipeline existed were trained with the per-sample PIL loader.
            pipeline=config.get("data", {}).get("pipeline", "pil"),
        )
    except TypeError as err:  # an unknown key in the train or loss section
        raise InputError(f"train/loss: {err}") from None


def ensure_data(config: dict) -> None:
    """Write the synthetic dataset a run needs when it is missing; real data must already exist.

    A named synthetic variant (``data.source = "synthetic-NAME"``) is checked to be that variant when
    its folder exists, so a run never trains on a default set written under the same root.
    """
    data, runtime = config["data"], config.get("runtime", {})
    root = Path(runtime.get("data_root") or ".")
    source = data.get("source")
    if source == "synthetic":
        if not (root / data["dataset"]).exists():
            from php_runner.data import write_synthetic

            write_synthetic(root, data["dataset"])
    elif source is not None and source.startswith("synthetic-"):
        from php_runner.data.synthetic import VARIANTS, variant_problem, write_variant

        variant = source.removeprefix("synthetic-")
        if VARIANTS[variant].dataset != data["dataset"]:
            raise InputError(f"data.source {source!r}: written in the {VARIANTS[variant].dataset} format only; "
                             f"run it with --dataset {VARIANTS[variant].dataset}")
        if not (root / data["dataset"]).exists():
            write_variant(root, variant)
        problem = variant_problem(root, variant)
        if problem is not None:
            raise InputError(f"--data-root {root}: {problem}; give an empty folder or one written by "
                             f"php-run synth --variant {variant}")
    elif not (root / data["dataset"]).is_dir():
        raise InputError(f"--data-root {root}: no {data['dataset']} folder there (give the folder that holds it)")


def preflight(config: dict, local: bool = True) -> None:
    """Cheap checks of bad input before any worker starts: data folders, weight files and, for runs
    that execute on this machine (``local``), the device; queued runs may run on other nodes."""
    ensure_data(config)
    runtime = config.get("runtime", {})
    if local:
        check_device(runtime.get("device", "auto"))
    weights = runtime.get("clip_weights")
    if config["model"].get("clip") == "ViT-B/16":
        if not weights:
            raise InputError("--clip-weights: the ViT-B/16 preset needs the OpenAI weights file (ViT-B-16.pt)")
        if not Path(weights).is_file():
            raise InputError(f"--clip-weights {weights}: file not found")


def check_device(device: str) -> None:
    """A CUDA device must exist here (the workers run on this machine); ``auto`` falls back to the CPU."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def load_training_data(config: dict):
    from php_runner.data import read_dataset
    from php_runner.data.splits import hold_out_validation

    data = config["data"]
    dataset = read_dataset(config.get("runtime", {}).get("data_root") or ".", data["dataset"])
    if data.get("val_from_train", 0.0):
        dataset = hold_out_validation(dataset, data["val_from_train"], data.get("val_seed", 0))
    return dataset


def build_model(config: dict, num_classes: int):
    """The PHP model of ``config``; ViT-B/16 starts from the OpenAI weights in ``runtime.clip_weights``."""
    from php_runner.model.php import PHPModel

    uses_id_loss = "id" in config["loss"].get("names", ())
    php_config = build_php_config(config["model"], num_classes if uses_id_loss else 0)
    weights = config.get("runtime", {}).get("clip_weights")
    if config["model"].get("clip") != "ViT-B/16":
        return PHPModel(php_config)
    if not weights:
        raise InputError("runtime.clip_weights: the ViT-B/16 model needs the OpenAI weights (--clip-weights)")
    return PHPModel(php_config, clip_weights=weights)


# --------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(path: str | Path, sha256: str) -> str | None:
    """None when the checkpoint file still has its recorded sha256, else what is wrong with it."""
    if not Path(path).is_file():
        return "file missing"
    if file_sha256(path) != sha256:
        return "file changed since it was recorded (sha256 differs)"
    return None


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


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the source tree php-run runs from, or (None, None) outside a git checkout."""
    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(changes)


def provenance_info(device: str, command: str | None) -> dict[str, Any]:
    import torch
    import torchvision

    import php_runner

    commit, dirty = _git_state()
    if device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "php_run": php_runner.__version__,
        "device": device_name, "host": socket.gethostname(), "command": command,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


class _Heartbeat:
    """Refreshes the run's heartbeat from a background thread; notices when the claim is lost."""

    def __init__(self, registry: Registry, run_id: int, worker: str, interval: float = HEARTBEAT_INTERVAL_S):
        self.registry, self.run_id, self.worker, self.interval = registry, run_id, worker, interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="php-run-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        if not self.registry.heartbeat(self.run_id, self.worker):
            self.lost.set()

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _record_training(registry: Registry, run_id: int, settings, result) -> None:
    from php_runner.engine.train import RULE_OF_SELECTION

    for rule, (epoch, split, metrics) in result.selected.items():
        registry.record_result(run_id, rule, epoch, split, metrics)
    chosen = result.selected.get(RULE_OF_SELECTION[settings.selection])
    roles = (
        ("best", result.best_checkpoint, chosen[0] if chosen else None),
        ("last", result.last_checkpoint, result.history[-1].epoch if result.history else None),
    )
    for role, path, epoch in roles:
        if Path(path).is_file():
            registry.record_checkpoint(run_id, str(Path(path).resolve()), file_sha256(path), epoch, role)


def execute_run(run_id: int, db_url: str | None = None, command: str | None = None,
                on_epoch: Callable[[Any], None] | None = None, claimed_by: str | None = None,
                heartbeat_interval: float = HEARTBEAT_INTERVAL_S) -> int:
    """Claim run ``run_id`` and train it; returns the worker exit code (0 done, 1 failed, 3 not claimed).

    ``on_epoch`` is called with each ``EpochRecord`` after it is recorded; it may raise
    ``engine.train.StopTraining`` to end the run early (tuning trials run this in-process to prune).
    ``claimed_by`` trains a run that this worker id claimed already (a queue worker, ``launch.worker``),
    heartbeating and recording failures under that id.
    """
    registry = Registry(db_url)
    try:
        return _claim_and_train(registry, run_id, command, on_epoch, claimed_by, heartbeat_interval)
    finally:
        registry.close()


def _claim_and_train(registry: Registry, run_id: int, command: str | None,
                     on_epoch: Callable[[Any], None] | None, claimed_by: str | None = None,
                     heartbeat_interval: float = HEARTBEAT_INTERVAL_S) -> int:
    worker = claimed_by or this_worker()
    if claimed_by is None and not registry.claim_run(run_id, worker):
        run = registry.get_run(run_id)
        print(f"run {run_id} ({run.short_hash}) is {run.status} (worker {run.worker}); not executing it", file=sys.stderr)
        return EXIT_NOT_CLAIMED
    run = registry.get_run(run_id)
    if run.status != "running" or run.worker != worker:
        print(f"run {run_id} ({run.short_hash}) is {run.status} (worker {run.worker}), not held by {worker}; "
              "not executing it", file=sys.stderr)
        return EXIT_NOT_CLAIMED
    heartbeat = _Heartbeat(registry, run_id, worker, heartbeat_interval)
    try:
        with heartbeat:
            _train_claimed(registry, run, heartbeat, command, on_epoch)
    except LostClaim:
        print(f"run {run_id}: another process took over this run; stopping", file=sys.stderr)
        return EXIT_NOT_CLAIMED
    except KeyboardInterrupt:
        registry.mark_failed(run_id, "interrupted (resumes from its last checkpoint)", worker=worker)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - every failure is recorded on the run, then reported
        if not isinstance(err, InputError):
            traceback.print_exc()
        message = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        from php_runner.engine.train import LAST_CHECKPOINT

        if str(run_dir_of(run) / LAST_CHECKPOINT) in message:  # its resume state is unusable
            message += f"; {restart_hint(run)}"
        registry.mark_failed(run_id, f"{type(err).__name__}: {message}", worker=worker)
        print(f"run {run_id} failed: {type(err).__name__}: {message}", file=sys.stderr)
        return 1
    registry.mark_done(run_id)
    return 0


def _train_claimed(registry: Registry, run: RunRecord, heartbeat: _Heartbeat, command: str | None,
                   then: Callable[[Any], None] | None) -> None:
    from php_runner.data.datasets import dataset_statistics
    from php_runner.engine.train import resolve_device, seed_everything, train
    from php_runner.execute.run_log import TrainLog

    config = run.config
    settings = build_train_settings(config)
    registry.record_provenance(run.id, provenance_info(str(resolve_device(settings.device)), command))
    ensure_data(config)
    dataset = load_training_data(config)
    seed_everything(settings.seed)  # the initial weights are a function of the run's seed, as officially
    model = build_model(config, dataset.num_classes)
    run_dir = run_dir_of(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    registry.set_run_dir(run.id, str(run_dir))
    log = TrainLog(run_dir)  # the official-format train_log.txt beside the checkpoints
    epoch_pause = float(os.environ.get(EPOCH_PAUSE_ENV) or 0)
    log.dataset_statistics(config["data"]["dataset"], dataset_statistics(dataset))

    def on_epoch(record) -> None:
        if heartbeat.lost.is_set():
            raise LostClaim()
        train_values = {**{k: float(v) for k, v in record.losses.items()}, "lr": float(record.lr),
                        "seconds": float(record.seconds)}
        registry.record_epoch(run.id, record.epoch, "train", train_values)
        for split, metrics in record.metrics.items():
            registry.record_epoch(run.id, record.epoch, split, {k: float(v) for k, v in metrics.items()})
        log.epoch(record.epoch, record.losses, record.lr, record.metrics)
        heartbeat.beat()
        if then is not None:
            then(record)
        time.sleep(epoch_pause)

    try:
        result = train(model, dataset, settings, run_dir, on_epoch=on_epoch)
        if "best-on-test" in result.selected:
            epoch, _split, metrics = result.selected["best-on-test"]
            log.best(metrics["R1"], epoch)
    finally:
        log.close()
    if heartbeat.lost.is_set():
        raise LostClaim()
    _record_training(registry, run.id, settings, result)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m php_runner.execute.child", description="Execute one registry run (the php-run worker process)."
    )
    parser.add_argument("run_id", type=int)
    parser.add_argument("--db", default=None, help="registry URL (default: $PHP_RUN_DB or sqlite:///registry.db)")
    parser.add_argument("--command", default=None, help="the php-run command line, for provenance")
    parser.add_argument("--claimed-by", default=None,
                        help="the worker id (host:pid of the parent) that claimed the run for this process")
    parser.add_argument("--heartbeat", type=float, default=HEARTBEAT_INTERVAL_S, help="seconds between heartbeats")
    args = parser.parse_args(argv)
    if args.claimed_by:
        die_with_parent(args.claimed_by)
    try:
        return execute_run(args.run_id, args.db, args.command, claimed_by=args.claimed_by,
                           heartbeat_interval=args.heartbeat)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def die_with_parent(owner: str) -> None:
    """End this process when the worker that claimed its run dies (Linux), so that a killed worker's
    runs go stale instead of training on unowned; exits at once when that worker is gone already."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and os.getppid() != int(pid):
        sys.exit(EXIT_NOT_CLAIMED)


# --------------------------------------------------------------------------------------------
# The parent: planning and scheduling workers
# --------------------------------------------------------------------------------------------


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


def _outcome(run: RunRecord, status: str, error: str | None = None) -> RunOutcome:
    return RunOutcome(run.id, run.config_hash, run.row_label, run.dataset, run.seed, status, error)


@dataclass
class ExecutionSummary:
    outcomes: list[RunOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


@dataclass
class _Active:
    run: RunRecord
    process: subprocess.Popen
    stderr_tail: deque
    threads: list[threading.Thread]
    gpu: str | None
    owner: str | None = None  # the worker id the run was claimed under, when the parent claimed it


def _pump(stream, sink, prefix: str, tail: deque | None) -> None:
    for line in iter(stream.readline, ""):
        sink.write(prefix + line)
        sink.flush()
        if tail is not None and line.strip():
            tail.append(line.rstrip())
    stream.close()


def _spawn(run: RunRecord, db_url: str, gpu: str | None, parallel: bool, command: str | None,
           claimed_by: str | None = None, heartbeat: float = HEARTBEAT_INTERVAL_S) -> _Active:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    argv = [sys.executable, "-m", "php_runner.execute.child", str(run.id), "--db", db_url, "--heartbeat", str(heartbeat)]
    if command:
        argv += ["--command", command]
    if claimed_by:
        argv += ["--claimed-by", claimed_by]
    process = subprocess.Popen(
        argv, env=env, text=True, bufsize=1, stdout=subprocess.PIPE if parallel else None, stderr=subprocess.PIPE
    )
    prefix = f"[run {run.id}] " if parallel else ""
    tail: deque = deque(maxlen=20)
    threads = [threading.Thread(target=_pump, args=(process.stderr, sys.stderr, prefix, tail), daemon=True)]
    if parallel:
        threads.append(threading.Thread(target=_pump, args=(process.stdout, sys.stdout, prefix, None), daemon=True))
    for thread in threads:
        thread.start()
    return _Active(run, process, tail, threads, gpu, claimed_by)


def _finish(registry: Registry, active: _Active) -> RunOutcome:
    """Turn a finished worker into an outcome, recording deaths the worker could not record itself."""
    code = active.process.returncode
    for thread in active.threads:
        thread.join()
    run = registry.get_run(active.run.id)
    if code == 0 and run.status == "done":
        return _outcome(run, "done")
    if code == EXIT_NOT_CLAIMED:
        return _outcome(run, "skipped" if run.status == "done" else "busy")
    worker = active.owner or f"{socket.gethostname()}:{active.process.pid}"
    if run.status == "running" and run.worker == worker:
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        last_line = active.stderr_tail[-1] if active.stderr_tail else "no error output"
        registry.mark_failed(run.id, f"worker {how}: {last_line}", worker=worker)
        run = registry.get_run(run.id)
    return _outcome(run, "failed", run.error or f"worker exited with code {code}")


def preflight_all(registry: Registry, planned: Sequence["PlannedRun"], local: bool = True) -> None:
    """``preflight`` each planned run that is not done yet (once per distinct data/weights/device); reads only."""
    done = {run.config_hash for run in registry.list_runs(status="done",
                                                          config_hashes=[p.config_hash for p in planned])}
    checked: set[str] = set()
    for plan in planned:
        runtime = plan.config.get("runtime", {})
        key = repr((runtime.get("data_root"), plan.config["data"], plan.config["model"].get("clip"),
                    runtime.get("clip_weights"), runtime.get("device")))
        if plan.config_hash not in done and key not in checked:
            checked.add(key)
            preflight(plan.config, local=local)


def plan_all(registry: Registry, planned: Sequence["PlannedRun"], kind: str = "trained") -> list[RunRecord]:
    """Record every planned run (new hashes become queued runs); the same order as ``planned``."""
    return [registry.plan_run(p, kind=kind) for p in planned]


def execute_planned(
    planned: Sequence["PlannedRun"],
    db_url: str | None = None,
    gpus: Sequence[str] | None = None,
    command: str | None = None,
    on_outcome: Callable[[RunOutcome], None] | None = None,
    restart: Sequence[str] = (),
) -> ExecutionSummary:
    """Plan every run, then execute the runs that are not done, each in its own worker process.

    With ``gpus`` (e.g. ``["0", "1"]``) up to one worker per GPU runs at a time, each seeing only its
    GPU through ``CUDA_VISIBLE_DEVICES``; otherwise runs execute one after another. A failed run is
    recorded and the others go on. Bad input found before any training raises ``InputError``.
    ``restart`` names runs (ids or hash prefixes) to start again from scratch (``restart_runs``).
    """
    db_url = resolve_url(db_url)
    registry = Registry(db_url)
    try:
        preflight_all(registry, planned)  # every check before anything is recorded
        restart_runs(registry, planned, restart)
    except BaseException:
        registry.close()
        raise
    runs = plan_all(registry, planned)
    summary = ExecutionSummary()

    def report(outcome: RunOutcome) -> None:
        summary.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    pending: deque[RunRecord] = deque()
    for run in runs:
        if run.status == "done":
            report(_outcome(run, "skipped"))
        else:
            pending.append(run)

    slots: list[str | None] = list(gpus) if gpus else [None]
    parallel = len(slots) > 1
    active: list[_Active] = []
    try:
        while pending or active:
            free = [slot for slot in slots if slot not in {a.gpu for a in active}]
            while pending and free:
                run = registry.get_run(pending.popleft().id)
                if run.status == "done":
                    report(_outcome(run, "skipped"))
                elif not registry.is_claimable(run):
                    report(_outcome(run, "busy"))
                else:
                    active.append(_spawn(run, db_url, free.pop(0), parallel, command))
            for item in [a for a in active if a.process.poll() is not None]:
                active.remove(item)
                report(_finish(registry, item))
            if active:
                time.sleep(0.2)
    except KeyboardInterrupt:
        # The workers got the same SIGINT and save a resumable state; wait for them to record it.
        for item in active:
            item.process.wait()
        raise
    finally:
        registry.close()
    return summary


def command_line() -> str:
    """The invoking command line, quoted, for provenance."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
