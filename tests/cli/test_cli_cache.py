"""``php-run cache build|check|clear`` end to end on a synthetic dataset."""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from php_runner.cli import app
from php_runner.data import write_synthetic


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_cache_build_check_damage_rebuild_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("PHP_RUN_CACHE", str(tmp_path / "cache"))
    write_synthetic(tmp_path / "data", "RSTPReid", num_ids=2, seed=0)
    where = ("--data-root", tmp_path / "data", "--dataset", "RSTPReid", "--image-size", "48x24")
    code, out, _ = invoke("cache", "check", *where)
    assert code == 2
    code, out, _ = invoke("cache", "build", *where, "--workers", "2")
    assert code == 0 and "verified" in out
    code, out, _ = invoke("cache", "check", *where, "--json")
    assert code == 0 and json.loads(out)["problems"] == []
    folder = next(path for path in (tmp_path / "cache").iterdir() if not path.name.startswith("."))
    with open(folder / "images.npy", "r+b") as handle:
        handle.truncate(os.path.getsize(folder / "images.npy") - 1)
    code, out, _ = invoke("cache", "check", *where, "--json")
    assert code == 2 and "truncated" in json.loads(out)["problems"][0]
    assert invoke("cache", "build", *where)[0] == 0 and invoke("cache", "check", *where)[0] == 0
    code, _, err = invoke("cache", "build", *where[:4], "--image-size", "big")
    assert code == 2 and "--image-size" in err
    code, out, _ = invoke("cache", "clear")
    assert code == 0 and "RSTPReid-48x24" in out and not any((tmp_path / "cache").iterdir())
