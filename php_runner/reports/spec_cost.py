"""What a spec costs on this machine's device: its runs' GPU-hours at the last ``php-run bench`` recorded there.

Each run is costed at the regime it trains in (``train.precision`` at the paper preset: ``official`` or
``amp``, the bench's fast regime), one run at a time on the device (the bench's projection of that
regime) and packed as the bench's ``--packed`` measurement ran, when that measurement trained the same
regime. The bench projects a 60-epoch CUHK-PEDES run with per-epoch evaluation; runs on the other
datasets are scaled by their training set size (their smaller or larger test split is neglected).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from php_runner.errors import InputError
from php_runner.experiment.specs import expand
from php_runner.reports.bench import BENCHMARK_LOG

# Training pairs per epoch (php_spec.md, dataset sizes).
TRAIN_PAIRS = {"CUHK-PEDES": 68_126, "ICFG-PEDES": 34_674, "RSTPReid": 37_010}
NO_BENCH = "no bench recorded"
# The paper preset requires these; their values do not change what a run costs.
PLACEHOLDER_RUNTIME = {"data_root": ".", "clip_weights": "ViT-B-16.pt"}


@dataclass(frozen=True)
class SpecCost:
    """GPU-hours of every run of a spec (all datasets, grid points and seeds), each with what it rests on."""

    gpu_hours: float | None
    gpu_hours_basis: str
    gpu_hours_packed: float | None
    gpu_hours_packed_basis: str


def latest_bench(device_name: str, log: Path = Path("reports") / BENCHMARK_LOG) -> dict | None:
    """The last record of ``log`` measured on ``device_name`` that has a projection; None when there is none."""
    if not log.exists():
        return None
    latest = None
    for number, line in enumerate(log.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{log}:{number}: not a JSON record ({err.msg})") from None
        if isinstance(record, dict) and record.get("device_name") == device_name and "projection" in record:
            latest = record
    return latest


def spec_cost(spec, bench: dict | None) -> SpecCost:
    """``spec``'s runs costed at ``bench`` (see the module docstring); a None figure says why in its basis."""
    runs = run_regimes(spec)
    if bench is None:
        return SpecCost(None, NO_BENCH, None, NO_BENCH)
    unpacked = _unpacked(runs, bench)
    packed = _packed(runs, bench)
    return SpecCost(*unpacked, *packed)


def run_regimes(spec) -> list[tuple[str, str]]:
    """(dataset, bench regime) of each run of ``spec`` at the paper preset."""
    from php_runner.engine.bench_regime import REGIMES

    regime_of = {precision: regime for regime, precision in REGIMES.items()}
    return [(run.dataset, regime_of[run.config["train"]["precision"]])
            for run in expand(spec, "paper", runtime=PLACEHOLDER_RUNTIME)]


def _unpacked(runs: list[tuple[str, str]], bench: dict) -> tuple[float | None, str]:
    projection = bench.get("projection", {})
    hours = {regime: (projection.get(regime) or {}).get("hours_60_epochs_cuhk") for _, regime in runs}
    missing = sorted(regime for regime, value in hours.items() if value is None)
    if missing:
        return None, f"the bench of {bench.get('recorded')} has no projection of the {', '.join(missing)} regime"
    per_regime = ", ".join(f"{regime} {value:.2f} h" for regime, value in sorted(hours.items()))
    return _total(runs, hours), (f"each run at its regime's projected CUHK-PEDES run ({per_regime}), bench of "
                                 f"{bench.get('recorded')} on {bench.get('device_name')}; runs on ICFG-PEDES and "
                                 "RSTPReid scaled by training set size")


def _packed(runs: list[tuple[str, str]], bench: dict) -> tuple[float | None, str]:
    """A packed run's device hours (recorded by the bench, ``packed.gpu_hours_per_run_60_epochs_cuhk``): its
    training at the measured aggregate rate A of the N processes, i.e. N x 68,126 / A seconds an epoch of
    wall time (each process trains at A / N) holding 1/N of the device, so 68,126 / A device seconds an
    epoch; its evaluation at the unpacked rates, whole (packing's effect on evaluation is not measured)."""
    packed = bench.get("packed")
    if not packed:
        return None, "no packed measurement in that bench (php-run bench --packed N)"
    regimes = sorted({regime for _, regime in runs})
    if regimes != [packed["regime"]]:
        return None, (f"the bench of {bench.get('recorded')} packed the {packed['regime']} regime and these runs "
                      f"train in the {', '.join(regimes)} regime (php-run bench --packed {packed['runs']} "
                      f"--packed-regime {regimes[0]})")
    hours = {packed["regime"]: packed["gpu_hours_per_run_60_epochs_cuhk"]}
    return _total(runs, hours), (
        f"{packed['runs']} runs of the {packed['regime']} regime at once at batch {packed['batch_size']}, "
        f"{packed['aggregate_samples_per_s']:.1f} samples/s together, bench of {bench.get('recorded')}; per run: "
        "training at that aggregate rate, evaluation at the unpacked rates")


def _total(runs: list[tuple[str, str]], hours_per_cuhk_run: dict[str, float]) -> float:
    return sum(hours_per_cuhk_run[regime] * TRAIN_PAIRS[dataset] / TRAIN_PAIRS["CUHK-PEDES"]
               for dataset, regime in runs)
