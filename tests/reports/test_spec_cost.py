"""A spec's GPU-hours: each run at the bench projection of the regime it trains in, scaled by dataset."""

from __future__ import annotations

import pytest

from php_runner.experiment.specs import load_spec, shipped_folder
from php_runner.reports.spec_cost import NO_BENCH, spec_cost

# Training pairs per epoch, from php_spec.md's dataset sizes.
CUHK, ICFG, RSTP = 68_126, 34_674, 37_010
BENCH = {"recorded": "today", "device_name": "a GPU",
         "projection": {"official": {"hours_60_epochs_cuhk": 2.0}, "fast": {"hours_60_epochs_cuhk": 0.5}},
         "packed": {"runs": 4, "regime": "fast", "batch_size": 64, "aggregate_samples_per_s": 2600.0,
                    "gpu_hours_per_run_60_epochs_cuhk": 0.25}}


@pytest.fixture
def mixed_spec(tmp_path):
    """Two grid points, one per regime, on two datasets and two seeds."""
    for name in ("base.toml", "presets.toml"):
        (tmp_path / name).write_text((shipped_folder() / name).read_text())
    path = tmp_path / "mixed.toml"
    path.write_text('description = "both regimes"\nextends = "base"\ndatasets = ["CUHK-PEDES", "RSTPReid"]\n'
                    'seeds = [1, 2]\n[grid]\n"train.precision" = ["official", "amp"]\n')
    return load_spec(path)


def test_each_run_is_costed_at_its_own_regime(mixed_spec):
    cost = spec_cost(mixed_spec, BENCH)
    seeds = 2
    assert cost.gpu_hours == pytest.approx(seeds * (2.0 + 0.5) * (CUHK + RSTP) / CUHK)
    assert "official 2.00 h" in cost.gpu_hours_basis and "fast 0.50 h" in cost.gpu_hours_basis
    # The packed measurement trained the fast regime only: it cannot cost the official runs.
    assert cost.gpu_hours_packed is None
    assert "train in the amp regime" not in cost.gpu_hours_packed_basis
    assert "these runs train in the fast, official regime" in cost.gpu_hours_packed_basis


def test_a_spec_of_the_fast_regime_is_costed_packed(mixed_spec, tmp_path):
    (tmp_path / "fast.toml").write_text('description = "fast"\nextends = "base"\ndatasets = ["ICFG-PEDES"]\n'
                                        'seeds = [1, 2, 3]\n[train]\nprecision = "amp"\n')
    cost = spec_cost(load_spec(tmp_path / "fast.toml"), BENCH)
    assert cost.gpu_hours == pytest.approx(3 * 0.5 * ICFG / CUHK)
    assert cost.gpu_hours_packed == pytest.approx(3 * 0.25 * ICFG / CUHK)
    assert "4 runs of the fast regime" in cost.gpu_hours_packed_basis


def test_a_missing_projection_or_bench_is_said_not_guessed(mixed_spec):
    official_only = {**BENCH, "projection": {"official": {"hours_60_epochs_cuhk": 2.0}}}
    cost = spec_cost(mixed_spec, official_only)
    assert cost.gpu_hours is None and "no projection of the fast regime" in cost.gpu_hours_basis
    assert spec_cost(mixed_spec, None) == (spec_cost(mixed_spec, None).__class__(None, NO_BENCH, None, NO_BENCH))
