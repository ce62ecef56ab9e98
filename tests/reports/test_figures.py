"""Figures from the registry: a run's learning curves (php-run plot) and the cnum/beta sensitivity figures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from php_runner.cli import app
from php_runner.store.registry import Registry
from php_runner.experiment.specs import expand, find_spec, load_spec

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PHP_RUN_DB", raising=False)

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.stdout + result.stderr
        return result.stdout

    return invoke


def check_png(path: Path) -> bytes:
    """The PNG decodes, has a figure's size and is not one flat colour; returns its bytes."""
    data = path.read_bytes()
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.width >= 400 and image.height >= 300
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 20
    return data


def record_epoch(registry: Registry, run_id: int, epoch: int, r1_test: float, r1_val: float) -> None:
    registry.record_epoch(run_id, epoch, "train", {"sdm_loss": 5.0 / epoch, "itc_loss": 2.0 / epoch,
                                                   "aux_loss": 0.1, "total": 7.1 / epoch + 0.1, "lr": 1e-3})
    registry.record_epoch(run_id, epoch, "test", {m: r1_test for m in METRICS})
    registry.record_epoch(run_id, epoch, "val", {m: r1_val for m in METRICS})


def test_plot_draws_the_curves_of_a_run_and_follows_the_registry(cli, registry_url, spec_dir, tiny_data_root):
    (planned,) = expand(load_spec(spec_dir / "two_epochs.toml"), "tiny", runtime={"data_root": str(tiny_data_root)})
    registry = Registry(registry_url)
    run = registry.plan_run(planned)
    for epoch, (test, val) in enumerate([(10.0, 12.0), (30.0, 20.0), (25.0, 28.0)], 1):
        record_epoch(registry, run.id, epoch, test, val)
    for rule, epoch, r1 in (("best-on-test", 2, 30.0), ("best-on-val", 3, 25.0), ("last", 3, 25.0)):
        registry.record_result(run.id, rule, epoch, "test", {m: r1 for m in METRICS})
    out = cli("plot", run.id, "--db", registry_url)
    path = Path(f"reports/curves/run{run.id}_{run.short_hash}.png")
    assert str(path) in out
    first = check_png(path)
    record_epoch(registry, run.id, 4, 40.0, 41.0)
    registry.record_result(run.id, "last", 4, "test", {m: 40.0 for m in METRICS})
    cli("plot", run.short_hash, "--db", registry_url, "--out", "elsewhere/curves.png")
    assert check_png(Path("elsewhere/curves.png")) != first
    registry.close()


def record_done(registry: Registry, planned, r1: float) -> None:
    run = registry.plan_run(planned)
    metrics = {m: r1 for m in METRICS}
    registry.record_epoch(run.id, 1, "test", metrics)
    registry.record_result(run.id, "best-on-test", 1, "test", metrics)
    registry.mark_done(run.id)


@pytest.mark.parametrize("table", ["cnum", "beta"])
def test_sensitivity_figures_are_written_embedded_and_regenerated(cli, registry_url, tiny_data_root, table):
    runtime = {"data_root": str(tiny_data_root)}
    planned = expand(load_spec(find_spec(table)), "tiny", ["CUHK-PEDES"], [1, 2], runtime=runtime)
    registry = Registry(registry_url)
    for index, run in enumerate(planned[:4]):
        record_done(registry, run, 20.0 + index)
    cli("table", table, "--preset", "tiny", "--db", registry_url)
    figure = Path(f"reports/{table}_tiny.png")
    first = check_png(figure)
    markdown = Path(f"reports/{table}_tiny.md").read_text()
    assert f"]({table}_tiny.png)" in markdown
    record_done(registry, planned[4], 60.0)   # a new run: the figure follows the registry
    cli("table", table, "--preset", "tiny", "--db", registry_url)
    assert check_png(figure) != first
    registry.close()


def test_the_module_table_embeds_its_chart_and_others_embed_nothing(cli, registry_url):
    cli("table", "module", "--preset", "tiny", "--db", registry_url)
    assert "](module_tiny.png)" in Path("reports/module_tiny.md").read_text()
    cli("table", "loss", "--preset", "tiny", "--db", registry_url)
    assert "![" not in Path("reports/loss_tiny.md").read_text() and not Path("reports/loss_tiny.png").exists()


def test_table_all_regenerates_the_index_and_a_single_table_leaves_it(cli, registry_url, tiny_data_root):
    cli("table", "cnum", "--preset", "tiny", "--db", registry_url)
    assert not Path("reports/index_tiny.md").exists()
    cli("table", "--all", "--preset", "tiny", "--db", registry_url)
    before = Path("reports/index_tiny.md").read_text()
    assert "[cnum_tiny.png](cnum_tiny.png)" in before and "| 0 / 24 |" in before
    (planned, *_) = expand(load_spec(find_spec("cnum")), "tiny", ["CUHK-PEDES"], [1],
                           runtime={"data_root": str(tiny_data_root)})
    registry = Registry(registry_url)
    record_done(registry, planned, 30.0)
    registry.close()
    cli("table", "--all", "--preset", "tiny", "--db", registry_url)
    assert "| 2 / 24 |" in Path("reports/index_tiny.md").read_text()   # R1 and mAP of one line
