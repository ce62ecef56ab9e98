"""Property-based fuzzing of option values through the real CLI (issue 24): generated strings and numbers
(empty, negative, huge, NaN, unicode, path-like) for the options of the main commands, one or two at a time
in an otherwise valid command line. Each must end in exit 0 or a clean exit 2 (Typer's usage errors
included), never a traceback, and write nothing outside the test's temporary folder.

Cheap by construction: training is stubbed at the process boundary (as in tests/cli/test_bad_input.py),
evaluation uses a tiny checkpoint on two identities, and ``bench`` is left out (a valid value would time
a model for seconds).
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fuzz_damage import ERROR_PREFIXES
from fuzz_profiles import load
from hypothesis import event, example, given
from hypothesis import strategies as st
from inprocess_runs import FinishedWorker, stub_train

from php_runner.data import write_synthetic
from php_runner.engine import train as train_module
from php_runner.execute import child, pool, worker
from php_runner.model.checkpoint import config_to_dict, save_atomic
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel

PROFILE = load()
DATASET = "RSTPReid"
REPO = Path(__file__).resolve().parents[1]

NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.integers(-2, 70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["nan", "-inf", "1e400", "0x10", "1_000", " 3", "3 ", "+4", "٣", "²"])).map(str)
PATHS = st.sampled_from(["", ".", "..", "out/", "a/b/c.png", "x" * 300, "nul\x00byte", "~", "~/x", "-", "--",
                         "/dev/null", "/nonexistent/x", "/proc/self/x", "é/ü.npz", "CON", "-v", "--help-me",
                         "registry.db", "sqlite:///", "sqlite:///:memory:", "postgresql://x@/", "sqlite:////nonexistent/r.db"])
TEXTS = st.one_of(st.text(max_size=12), st.text(st.characters(codec="utf-8"), max_size=6),
                  st.sampled_from(["cpu", "cuda", "cuda:99", "mps", "auto", "meta", "cpu:0", "RSTPReid", "all",
                                   "CUHK-PEDES,RSTPReid", "tiny", "paper", "384x128", "0x0", "48x24", "1x1",
                                   "99999x99999", "-1x5", "nanxnan", "1,2", "0", "-1", "1,1,1", "headline"]))
VALUES = st.one_of(NUMBERS, PATHS, TEXTS)




@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("fuzz_options")
    write_synthetic(root / "data", DATASET, num_ids=2, seed=5)
    torch.manual_seed(0)
    model = PHPModel(PHPConfig.tiny())
    save_atomic({"model": model.state_dict(), "config": config_to_dict(model.config), "epoch": 1,
                 "settings": {"precision": "amp", "test_batch_size": 8}}, root / "best.pth")
    spec = root / "one.toml"
    spec.write_text('extends = "base"\ntable = "headline"\nrow_label = "PHP (ours)"\ndatasets = ["RSTPReid"]\n')
    return SimpleNamespace(root=root, data=root / "data", checkpoint=root / "best.pth", spec=spec)


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    """Training replaced by a stub that writes the two checkpoints; the worker runs in-process."""
    def spawn_in_process(run, db_url, gpu, parallel, command, claimed_by=None, heartbeat=None):
        code = child.execute_run(run.id, db_url, command, claimed_by=claimed_by)
        return pool.ActiveRun(run, FinishedWorker(code), deque(), [], gpu, claimed_by)

    monkeypatch.setattr(worker, "spawn_run", spawn_in_process)
    monkeypatch.setattr(train_module, "train", stub_train)
    monkeypatch.setenv("PHP_RUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # "~" paths stay inside the test's folder


def command_lines(inputs) -> dict[str, tuple[list, dict]]:
    """Per command: a valid, cheap command line and the options whose values are fuzzed (with a valid value)."""
    data, spec, checkpoint = str(inputs.data), str(inputs.spec), str(inputs.checkpoint)
    return {
        "evaluate": (["evaluate", "--checkpoint", checkpoint],
                     {"--dataset": DATASET, "--data-root": data, "--device": "cpu", "--test-batch-size": "8",
                      "--encoder": "full", "--coupling": "official", "--order": "annotation", "--precision": "amp",
                      "--save-embeddings": "emb.npz"}),
        "run": (["run", spec, "--preset", "tiny"],
                {"--data-root": data, "--db": "sqlite:///r.db", "--device": "cpu", "--dataset": DATASET,
                 "--seeds": "1", "--runs-per-gpu": "1", "--restart": None, "--gpus": None, "train.lr": "0.001",
                 "model.cnum": "3", "train.epochs": "1"}),
        "table": (["table", "headline"], {"--preset": "tiny", "--format": "csv", "--db": "sqlite:///r.db",
                                          "--spec": None, "--reference": None}),
        "plot": (["plot", "1"], {"--out": "curves.png", "--db": "sqlite:///r.db"}),
        "cache build": (["cache", "build"], {"--data-root": data, "--dataset": DATASET, "--image-size": "32x16",
                                             "--workers": "1"}),
        "data check": (["data", "check"], {"--data-root": data, "--dataset": DATASET}),
        "cat": (["cat", spec], {"--preset": "tiny", "train.lr": "0.001", "model.image_size": "[48, 24]"}),
        "ls": (["ls"], {"--json": None}),
    }


def assemble(base: list, options: dict, fuzzed: dict) -> list:
    args = list(base)
    for name, value in {**options, **fuzzed}.items():
        if value is None:
            continue  # an option left out unless fuzzed
        if not name.startswith("--"):
            args.append(f"{name}={value}")  # a key=value override
        else:  # "--name=-1": a value that starts with a dash is a value, not an option
            args += [f"{name}={value}"] if value.startswith("-") else [name, value]
    return args


@given(command=st.sampled_from(["evaluate", "run", "table", "plot", "cache build", "data check", "cat", "ls"]),
       fuzz=st.lists(st.tuples(st.integers(0, 20), VALUES), min_size=1, max_size=2))
@example(command="plot", fuzz=[(0, "0")])  # --db 0: sqlalchemy's ArgumentError escaped as a traceback
@example(command="evaluate", fuzz=[(1, "x" * 300)])  # --data-root too long: ENAMETOOLONG escaped (local profile)
@example(command="data check", fuzz=[(0, "\n")])  # a newline in the path split the problem line (local profile)
def test_generated_option_values(cli, inputs, stubbed, command, fuzz):
    """``fuzz``: (which option, its value) pairs; the option is the command's ``which``-th, cyclically."""
    base, options = command_lines(inputs)[command]
    names = sorted(options)
    fuzzed = {names[which % len(names)]: value for which, value in fuzz}
    event(f"{command} {' '.join(fuzzed)}")
    outside = sorted(os.listdir(REPO)), sorted(os.listdir(inputs.root))
    code, _, err = cli(*assemble(base, options, fuzzed))
    event(f"{command} exit {code}")
    assert code in (0, 2) and "Traceback" not in err, err  # exit 0 may print notes, a refusal only errors
    if code == 2:
        lines = err.strip().splitlines()
        assert all(line.startswith((*ERROR_PREFIXES, "note: ")) for line in lines), err
        assert any(line.startswith(ERROR_PREFIXES) for line in lines), err
    assert (sorted(os.listdir(REPO)), sorted(os.listdir(inputs.root))) == outside

