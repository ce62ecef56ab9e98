"""php-run ls / cat against the shipped files, and the package installed from a wheel used from an empty folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from php_runner.cli import app
from php_runner.cli.catalog import machine_device_name, spec_header
from php_runner.experiment.specs import expand, load_spec, shipped_folder

CHECKOUT = Path(__file__).resolve().parents[2]
SHIPPED = shipped_folder()
SPEC_FILES = sorted(path for path in SHIPPED.glob("*.toml") if path.name != "presets.toml")


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    return result.stdout


def _header_entry(path: Path, key: str) -> str:
    """The entry ``# KEY: ...`` and its indented continuation lines, read with plain string operations."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"# {key}:"))
    parts = [lines[start][len(f"# {key}:"):].strip()]
    for line in lines[start + 1:]:
        if not line.startswith("#  ") or not line[1:].strip():
            break
        parts.append(line[1:].strip())
    return " ".join(parts)


def test_spec_header_reads_the_runs_fills_and_cost_entries(tmp_path):
    text = "# x: a title\n#\n# Runs:  php-run a\n#        --flag\n# Fills: table t\n# Cost:  3 hours\n#\n# other\nk = 1\n"
    path = tmp_path / "x.toml"
    path.write_text(text)
    assert spec_header(path) == {"Runs": "php-run a --flag", "Fills": "table t", "Cost": "3 hours"}


def test_ls_lists_every_shipped_spec_with_its_table_and_cost_line():
    entries = json.loads(invoke("ls", "--json"))
    assert [entry["spec"] for entry in entries] == [path.stem for path in SPEC_FILES]
    for entry, path in zip(entries, SPEC_FILES):
        raw = tomllib.loads(path.read_text())
        assert entry["table"] == raw.get("table")
        assert entry["description"] == raw["description"]
        assert entry["cost"] == _header_entry(path, "Cost") and entry["cost"]
        assert entry["fills"] == _header_entry(path, "Fills")
    table_view = invoke("ls")
    for path in SPEC_FILES:
        assert re.search(rf"│ {path.stem} +│", table_view)


def test_ls_costs_every_run_at_the_last_bench_of_this_device(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {entry["gpu_hours"] for entry in json.loads(invoke("ls", "--json"))} == {None}
    shown = CliRunner().invoke(app, ["ls"])
    assert "not measured" in shown.stdout and "GPU-h: all seeds, no bench recorded" in shown.stderr
    here = machine_device_name()
    records = [
        {"device_name": here, "recorded": "first", "projection": {"official": {"hours_60_epochs_cuhk": 9.0}}},
        {"device_name": here, "recorded": "latest", "projection": {"official": {"hours_60_epochs_cuhk": 2.5},
                                                                  "fast": {"hours_60_epochs_cuhk": 1.0}}},
        {"device_name": "another GPU", "recorded": "later", "projection": {"official": {"hours_60_epochs_cuhk": 7.0}}},
        {"device_name": here, "recorded": "no projection (an older bench)"},
    ]
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "benchmarks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = {"CUHK-PEDES": 68126, "ICFG-PEDES": 34674, "RSTPReid": 37010}  # training pairs, php_spec.md
    runtime = {"data_root": "/data", "clip_weights": "/w.pt"}
    entries = json.loads(invoke("ls", "--json"))
    for entry, path in zip(entries, SPEC_FILES):
        runs = expand(load_spec(path), "paper", runtime=runtime)
        expected = sum(2.5 * pairs[run.dataset] / pairs["CUHK-PEDES"] for run in runs)
        assert entry["gpu_hours"] == pytest.approx(expected)
        assert "latest" in entry["gpu_hours_basis"] and "official" in entry["gpu_hours_basis"]
    assert re.search(rf"│ headline .*│ {entries[[e['spec'] for e in entries].index('headline')]['gpu_hours']:.1f} +│",
                     invoke("ls").replace("\n", " "))


def test_ls_costs_every_run_packed_at_the_last_bench_of_this_device(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = machine_device_name()
    packed = {"runs": 4, "regime": "official", "batch_size": 64, "aggregate_samples_per_s": 2600.0,
              "gpu_hours_per_run_60_epochs_cuhk": 0.75}
    records = [
        {"device_name": here, "recorded": "first", "projection": {"official": {"hours_60_epochs_cuhk": 9.0}},
         "packed": {**packed, "gpu_hours_per_run_60_epochs_cuhk": 5.0}},
        {"device_name": here, "recorded": "latest", "projection": {"official": {"hours_60_epochs_cuhk": 2.5}},
         "packed": packed},
    ]
    (tmp_path / "reports").mkdir()
    log = tmp_path / "reports" / "benchmarks.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = {"CUHK-PEDES": 68126, "ICFG-PEDES": 34674, "RSTPReid": 37010}  # training pairs, php_spec.md
    runtime = {"data_root": "/data", "clip_weights": "/w.pt"}
    entries = json.loads(invoke("ls", "--json"))
    for entry, path in zip(entries, SPEC_FILES):
        runs = expand(load_spec(path), "paper", runtime=runtime)
        assert entry["gpu_hours_packed"] == pytest.approx(sum(0.75 * pairs[run.dataset] / pairs["CUHK-PEDES"]
                                                              for run in runs))
        assert entry["gpu_hours"] == pytest.approx(entry["gpu_hours_packed"] * 2.5 / 0.75)
        basis = entry["gpu_hours_packed_basis"]
        assert "4 runs of the official regime" in basis and "2600.0" in basis and "latest" in basis
    headline = entries[[e["spec"] for e in entries].index("headline")]
    view = invoke("ls").replace("\n", " ")
    assert re.search(rf"│ {headline['gpu_hours']:.1f} +│ {headline['gpu_hours_packed']:.1f} +│", view)
    # Packing measured for the fast regime does not cost the shipped specs, which train in the official one.
    log.write_text(json.dumps({**records[1], "packed": {**packed, "regime": "fast"}}) + "\n")
    entries = json.loads(invoke("ls", "--json"))
    assert {entry["gpu_hours_packed"] for entry in entries} == {None}
    assert "packed the fast regime and these runs train in the official regime" in entries[0]["gpu_hours_packed_basis"]
    without_packed = {key: value for key, value in records[1].items() if key != "packed"}
    log.write_text(json.dumps(without_packed) + "\n")  # a bench run without --packed
    assert {entry["gpu_hours_packed"] for entry in json.loads(invoke("ls", "--json"))} == {None}
    assert "not measured" in invoke("ls")


def test_cat_prints_the_chain_and_preset_merged_by_hand():
    shown = tomllib.loads(invoke("cat", "cnum", "--preset", "tiny"))
    base = tomllib.loads((SHIPPED / "base.toml").read_text())
    cnum = tomllib.loads((SHIPPED / "cnum.toml").read_text())
    tiny = tomllib.loads((SHIPPED / "presets.toml").read_text())["tiny"]
    for section in ("model", "loss", "train", "data"):
        assert shown[section] == {**base.get(section, {}), **cnum.get(section, {}), **tiny.get(section, {})}
    assert shown["grid"] == cnum["grid"]
    assert shown["table"] == "cnum" and shown["datasets"] == base["datasets"] and "extends" not in shown


@pytest.mark.parametrize("preset", [None, "tiny", "paper"])
@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_cat_output_is_a_spec_with_the_same_runs(tmp_path, path, preset):
    args = ["cat", path.stem] + (["--preset", preset] if preset else [])
    copy = tmp_path / f"{path.stem}.toml"
    copy.write_text(invoke(*args))
    runtime = {"data_root": "/data", "clip_weights": "/w.pt"}
    for name in [preset] if preset else ["tiny", "paper"]:
        original = [run.config_hash for run in expand(load_spec(path), name, runtime=runtime)]
        assert [run.config_hash for run in expand(load_spec(copy), name, runtime=runtime)] == original


@pytest.mark.slow
def test_the_built_wheel_installed_in_a_fresh_venv_runs_the_demo_from_an_empty_folder(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    shutil.copytree(CHECKOUT / "php_runner", source / "php_runner", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CHECKOUT / name, source / name)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PHP_RUN_DB")}

    def run(*args, cwd=tmp_path):
        done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr  # messages go to stderr when stdout is a pipe

    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", tmp_path / "dist", source)
    (wheel,) = (tmp_path / "dist").glob("php_runner-*.whl")
    run(sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv")
    python, php_run = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin" / "php-run"
    # The dependencies come from this interpreter's site-packages (a venv of a venv sees only the base's
    # with --system-site-packages); a plain path line processes no .pth there, so no editable install leaks in.
    venv_site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    (venv_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "--ignore-installed", wheel)
    empty = tmp_path / "empty"
    empty.mkdir()
    # The venv's php-run imports the wheel's copy, not this checkout nor the editable install.
    location = Path(run(python, "-c", "import php_runner; print(php_runner.__file__)", cwd=empty).strip())
    assert location.is_relative_to(tmp_path / "venv"), location
    assert "php_runner" in php_run.read_text() and php_run.read_text().startswith(f"#!{python}")

    names = [entry["spec"] for entry in json.loads(run(php_run, "ls", "--json", cwd=empty))]  # nothing on stderr
    assert names == [path.stem for path in SPEC_FILES]
    (empty / "mine.toml").write_text('extends = "base"\n[loss]\naux_factor = 2.0\n')
    mine = tomllib.loads(run(php_run, "cat", "mine.toml", "--preset", "tiny", cwd=empty))  # no preset conflict: no note
    assert mine["loss"]["aux_factor"] == 2.0 and mine["model"]["clip"] == "tiny"
    (empty / "mine.toml").unlink()

    data_root = tmp_path / "data"
    run(php_run, "synth", "--root", data_root, "--ids", "4", cwd=empty)
    out = run(php_run, "demo", "--data-root", data_root, cwd=empty)
    assert "3 planned run(s): 3 done" in out, out[-3000:]
    assert (empty / "registry.db").is_file() and (empty / "reports" / "headline_tiny.md").is_file()


@pytest.mark.parametrize("args, named", [
    (("cat", "cnumm"), "cnumm: no such spec file"),
    (("cat", "cnum", "--preset", "huge"), "--preset: unknown preset 'huge'"),
    (("run", "cnumm"), "cnumm: no such spec file"),
    (("table", "cnum", "--format", "word"), "--format"),
    (("plot", "999"), "999"),
])
def test_bad_names_give_one_line_and_exit_code_2(tmp_path, monkeypatch, args, named):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*args, "--db", f"sqlite:///{tmp_path / 'r.db'}"] if args[0] in ("table", "plot")
                                else list(args), catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and named in result.stderr and result.stderr.count("\n") == 1
