"""Bad input through the real command line: exit 2, one stderr line naming the file or field, no
traceback, and every file the command was given left byte for byte as it was (issue 16).

Training is stubbed at the process boundary: the worker's ``spawn_run`` runs the real child code
(``execute_run``) in-process instead of in a child process, and ``engine.train.train`` is replaced
by a stub that writes the two checkpoints at once, so a spec that passes validation costs a
registry round trip, not an epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from inprocess_runs import FinishedWorker, stub_train
from typer.testing import CliRunner

from php_runner.execute import child, pool, worker
from php_runner.cli import app
from php_runner.engine import train as train_module
from php_runner.model.checkpoint import config_to_dict, save_atomic
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel
from php_runner.store.registry import Registry

PROPERTY_EXAMPLES = 30
REAL_TRAIN = train_module.train


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def assert_refused(code: int, stderr: str, expected: str, given: list[Path], before: dict[Path, str]) -> None:
    """The bad-input contract: exit 2, exactly one stderr line naming ``expected``, files unchanged."""
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and expected in lines[0], lines[0]
    assert {path: sha256(path) for path in given if path.exists()} == before




@pytest.fixture
def workspace(tmp_path, monkeypatch, spec_dir, tiny_data_root):
    """A fresh working directory with the test specs, the tiny data and a stubbed worker process."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PHP_RUN_DB", raising=False)

    def spawn_in_process(run, db_url, gpu, parallel, command, claimed_by=None, heartbeat=None):
        code = child.execute_run(run.id, db_url, command, claimed_by=claimed_by)
        return pool.ActiveRun(run, FinishedWorker(code), deque(), [], gpu, claimed_by)

    monkeypatch.setattr(worker, "spawn_run", spawn_in_process)
    monkeypatch.setattr(train_module, "train", stub_train)
    specs = tmp_path / "specs"
    shutil.copytree(spec_dir, specs)
    return SimpleNamespace(root=tmp_path, specs=specs, data=tiny_data_root, db=f"sqlite:///{tmp_path / 'r.db'}")


# ---- specs (items 1-4) and the command line (items 5-9) ------------------------------------------

SPEC_CASES = {
    # name: (file contents, extra arguments, what the line must name)
    "lr-inf": (b'extends = "base"\n[train]\nlr = inf\n', [], "lr-inf.toml: train.lr"),
    "temperature-inf": (b'extends = "base"\n[loss]\ntemperature = inf\n', [], "temperature-inf.toml: loss.temperature"),
    "grid-inf": (b'extends = "base"\n[grid]\n"train.lr" = [1e-3, inf]\n', [], "grid-inf.toml: grid.train.lr"),
    "lr-nan": (b'extends = "base"\n[train]\nlr = nan\n', [], "lr-nan.toml: train.lr"),
    "not-utf8": (b"\xff\xfe\x00garbage", [], "not-utf8.toml: not UTF-8"),
    "empty": (b"", [], "empty.toml: model"),
    "lost-extends": (b'[train]\nlr = 1e-4\n', [], "lost-extends.toml: model"),
    "huge-seed": (b'extends = "base"\nseeds = [99999999999999999999]\n', [], "huge-seed.toml: seeds[0]"),
    "huge-seed-option": (b'extends = "base"\n', ["--seeds", "99999999999999999999"], "--seeds"),
    "huge-cnum": (b'extends = "base"\n[model]\ncnum = 99999999999999999999\n', [], "huge-cnum.toml: model.cnum"),
    "huge-epochs": (b'extends = "base"\n[train]\nepochs = 3000000000\n', [], "huge-epochs.toml: train.epochs"),
    "held-out-val-beside-a-val-split": (b'extends = "base"\ndatasets = ["RSTPReid"]\n[data]\nval_from_train = 0.25\n',
                                        [], "held-out-val-beside-a-val-split.toml: data.val_from_train"),
    "device": (b'extends = "base"\n', ["--device", "banana"], "--device"),
    "gpus-arabic-digits": (b'extends = "base"\n', ["--gpus", "\u0661,\u0660"], "--gpus"),
    "seeds-arabic-digits": (b'extends = "base"\n', ["--seeds", "\u0661,\u0662"], "--seeds"),
    "empty-db": (b'extends = "base"\n', ["--db", ""], "--db"),
    "extra-argument": (b'extends = "base"\n', ["surplus"], "surplus: expected an override SECTION.FIELD=VALUE"),  # run takes key=value overrides
}


@pytest.mark.parametrize("name", list(SPEC_CASES))
def test_bad_spec_or_option_is_one_line_exit_2(name, workspace):
    body, extra, expected = SPEC_CASES[name]
    spec = workspace.specs / f"{name}.toml"
    spec.write_bytes(body)
    weights = workspace.root / "ViT-B-16.pt"
    weights.write_bytes(b"weights")
    given = [spec, weights, *workspace.specs.iterdir()]
    before = {path: sha256(path) for path in given}
    args = ["run", spec, "--preset", "paper", "--data-root", workspace.data, "--clip-weights", weights, *extra]
    if "--db" not in extra:
        args += ["--db", workspace.db]
    code, _, err = invoke(*args)
    assert_refused(code, err, expected, given, before)
    assert not (workspace.root / "registry.db").exists()  # --db "" is refused, not ./registry.db


def test_usage_errors_of_every_kind_are_one_line(workspace):
    for args, expected in ((["evaluate", "--checkpoint", "x.pth", "--test-batch-size", "0"], "--test-batch-size"),
                           (["synth", "--root", "out", "--ids", "0"], "--ids"),
                           (["status", "surplus"], "unexpected extra argument"),
                           (["--no-such-option"], "--no-such-option"),
                           (["no-such-command"], "no-such-command"),
                           (["data", "check", "--bogus"], "--bogus"),
                           (["show", "999999999999999999999999", "--db", workspace.db], "999999999999999999999999"),
                           (["show", "\u0663", "--db", workspace.db], "0-9"),
                           (["synth", "--root", "out", "--ids", "\u0663"], "0-9"),
                           (["evaluate", "--checkpoint", "x.pth", "--test-batch-size=\u0663"], "0-9")):
        code, _, err = invoke(*args)
        assert_refused(code, err, expected, [], {})


def test_a_path_too_long_for_the_file_system_is_one_line(workspace):
    """Found by the local fuzz profile: Path.is_file raises ENAMETOOLONG instead of answering False."""
    long_name = workspace.root / ("x" * 300)
    for args in (["evaluate", "--checkpoint", long_name, "--data-root", workspace.data, "--dataset", "RSTPReid"],
                 ["cache", "check", "--data-root", long_name, "--dataset", "RSTPReid"],
                 ["synth", "--root", long_name / "data", "--ids", "1"]):
        code, _, err = invoke(*args)
        assert_refused(code, err, str(long_name), [], {})


def test_synth_refuses_a_file_as_root(workspace):
    regular = workspace.root / "a-file"
    regular.write_bytes(b"keep me")
    before = {regular: sha256(regular)}
    for root in (regular, regular / "below"):
        code, _, err = invoke("synth", "--root", root, "--ids", "1")
        assert_refused(code, err, f"{root}: not a folder", [regular], before)


def test_failed_preflight_records_nothing(workspace):
    """Item 18: the data root is checked for every planned run before any run is recorded."""
    weights = workspace.root / "ViT-B-16.pt"
    weights.write_bytes(b"weights")
    code, _, err = invoke("ablate", "cnum", "--preset", "paper", "--data-root", workspace.root / "missing",
                          "--clip-weights", weights, "--db", workspace.db)
    assert_refused(code, err, "--data-root", [weights], {weights: sha256(weights)})
    code, out, _ = invoke("status", "--json", "--db", workspace.db)
    assert code == 0 and json.loads(out) == []


# ---- checkpoints (items 10-14) and configs.yaml (item 15) ----------------------------------------

def _good_payload() -> dict:
    torch.manual_seed(0)
    model = PHPModel(PHPConfig.tiny())
    return {"model": model.state_dict(), "config": config_to_dict(model.config), "epoch": 1,
            "settings": {"precision": "amp", "test_batch_size": 8}}


def _nan_weights(payload: dict) -> None:
    for value in payload["model"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))


CHECKPOINT_CASES = {
    "negative-cnum": (lambda p: p["config"].update(cnum=-5), "config.cnum"),
    "bad-precision": (lambda p: p.update(settings={"precision": "zzz"}), "settings.precision"),
    "settings-list": (lambda p: p.update(settings=["x"]), "settings: expected a mapping"),
    "zero-test-batch": (lambda p: p.update(settings={"test_batch_size": 0}), "settings.test_batch_size"),
    "integer-key": (lambda p: p["model"].update({5: torch.zeros(1)}), "keys are not strings"),
    "config-garbage": (lambda p: p.update(config="garbage"), "config: expected a mapping"),
    "image-size": (lambda p: p["config"]["clip"].update(image_size=[48]), "config.clip.image_size"),
    "nan-weights": (_nan_weights, "weights are not finite"),
    "inf-weight": (lambda p: p["model"]["logit_scale"].fill_(float("inf")) if "logit_scale" in p["model"]
                   else next(v for v in p["model"].values() if v.is_floating_point()).view(-1)[0].fill_(float("inf")),
                   "weights are not finite"),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_damaged_checkpoint_is_refused(name, workspace):
    change, expected = CHECKPOINT_CASES[name]
    payload = _good_payload()
    change(payload)
    path = workspace.root / f"{name}.pth"
    save_atomic(payload, path)
    before = {path: sha256(path)}
    code, _, err = invoke("evaluate", "--checkpoint", path, "--data-root", workspace.data, "--dataset", "RSTPReid")
    assert_refused(code, err, f"{path}: ", [path], before)
    assert expected in err


@pytest.mark.parametrize("body, expected", [("topk: abc\n", "topk"), ("cnum: [1, 2]\n", "cnum"),
                                            ("img_size: [384]\n", "img_size"), ("lr: .inf\n", "lr"),
                                            ("test_batch_size: true\n", "test_batch_size")])
def test_bad_configs_yaml_is_refused(body, expected, workspace):
    checkpoint = workspace.root / "best.pth"
    save_atomic(_good_payload(), checkpoint)
    config = workspace.root / "configs.yaml"
    config.write_text(body)
    before = {checkpoint: sha256(checkpoint), config: sha256(config)}
    code, _, err = invoke("evaluate", "--checkpoint", checkpoint, "--config", config, "--data-root", workspace.data,
                          "--dataset", "RSTPReid")
    assert_refused(code, err, f"{config}: {expected}", [checkpoint, config], before)


# ---- recovery (items 14 and 19) ------------------------------------------------------------------

def _one_run_spec(workspace) -> Path:
    spec = workspace.specs / "one.toml"
    spec.write_text('extends = "base"\ntable = "headline"\nrow_label = "PHP (ours)"\ndatasets = ["RSTPReid"]\n')
    return spec


def _run(workspace, spec: Path, *extra) -> tuple[int, str, str]:
    return invoke("run", spec, "--preset", "tiny", "--data-root", workspace.data, "--db", workspace.db, *extra)


def test_truncated_last_checkpoint_says_how_to_recover_and_restart_retrains(workspace, monkeypatch):
    spec = _one_run_spec(workspace)
    assert _run(workspace, spec)[0] == 0
    registry = Registry(workspace.db)
    run = registry.list_runs()[0]
    last = Path(run.run_dir) / "last.pth"
    last.write_bytes(last.read_bytes()[:1000])  # an interrupted copy, as a full disk leaves it
    registry.mark_failed(run.id, "interrupted")  # so the next invocation resumes it

    monkeypatch.setattr(train_module, "train", REAL_TRAIN)  # it fails reading last.pth, before any epoch
    code, out, _ = _run(workspace, spec)
    monkeypatch.setattr(train_module, "train", stub_train)
    failed = registry.get_run(run.id)
    assert code == 1 and failed.status == "failed"
    assert str(last) in failed.error and f"--restart {run.id}" in failed.error

    code, out, _ = _run(workspace, spec, "--restart", str(run.id))
    restarted = registry.get_run(run.id)
    assert code == 0 and restarted.status == "done" and restarted.attempts == failed.attempts + 1
    assert sha256(last) == {c.role: c.sha256 for c in registry.checkpoints(run.id)}["last"]
    registry.close()

    code, _, err = _run(workspace, spec, "--restart", "999")
    assert_refused(code, err, "999", [spec], {spec: sha256(spec)})


def test_show_table_and_audit_flag_a_checkpoint_that_changed(workspace):
    spec = _one_run_spec(workspace)
    assert _run(workspace, spec)[0] == 0
    registry = Registry(workspace.db)
    run = registry.list_runs()[0]
    best = Path(next(c.path for c in registry.checkpoints(run.id) if c.role == "best"))
    registry.close()
    code, out, err = invoke("show", run.id, "--db", workspace.db, "--json")
    assert code == 0 and [c["problem"] for c in json.loads(out)["checkpoints"]] == [None, None]

    best.write_bytes(best.read_bytes()[:-10])  # truncated after the run was done
    code, out, _ = invoke("show", run.id, "--db", workspace.db, "--json")
    assert code == 0 and "sha256 differs" in json.loads(out)["checkpoints"][0]["problem"]
    code, out, _ = invoke("show", run.id, "--db", workspace.db)
    assert code == 0 and "sha256 differs" in out
    code, _, err = invoke("table", "headline", "--preset", "tiny", "--db", workspace.db)
    assert code == 0 and f"run {run.id}: checkpoint best {best}" in err and "sha256 differs" in err
    before = {best: sha256(best)}
    code, _, err = invoke("audit", run.id, "--db", workspace.db)
    assert_refused(code, err, "sha256 differs", [best], before)


# ---- the property: any generated spec file is either run or refused by the contract --------------

FIELDS = {
    "model": ["cnum", "num_experts", "topk", "variant", "coupling", "image_size", "bogus"],
    "loss": ["names", "temperature", "itc_weight", "aux_factor"],
    "train": ["epochs", "batch_size", "lr", "betas", "warmup_factor", "selection", "seed", "precision"],
    "data": ["val_from_train", "source", "dataset", "val_seed"],
}
# Changes a valid spec may make, so that some generated specs pass validation and reach the worker.
VALID_SECTIONS = [{"train": {"lr": 1e-4}}, {"model": {"coupling": "per-sample"}}, {"loss": {"names": ["sdm", "itc"]}},
                  {"train": {"selection": "val", "betas": [0.5, 0.9]}}, {"data": {"val_seed": 3}},
                  {"loss": {"temperature": 0.05}, "train": {"warmup_factor": 1.0}}]
scalars = st.one_of(
    st.sampled_from([math.inf, -math.inf, math.nan, 2**64, -1, 0]),  # the edges, drawn often
    st.integers(min_value=-2**70, max_value=2**70), st.integers(min_value=0, max_value=12),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.sampled_from(["official", "per-sample", "full", "sdm", "itc", "test", "val", "amp", "tiny", "RSTPReid", ""]),
    st.text(max_size=8),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3))


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


spec_files = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda extends, top, sections, grid: "\n".join(
            ([f'extends = "{extends}"'] if extends else []) + ['datasets = ["RSTPReid"]']
            + [f"{key} = {toml_value(value)}" for key, value in top.items()]
            + [f"[{section}]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in fields.items())
               for section, fields in sections.items()]
            + ([f'[grid]\n"{grid[0]}" = {toml_value(grid[1])}'] if grid else [])
        ).encode("utf-8", "surrogatepass"),
        st.sampled_from(["base", "base", "base", None, "missing", "../base"]),
        st.one_of(st.just({}), st.just({"seeds": [1, 2]}),
                  st.dictionaries(st.sampled_from(["seeds", "table", "row_label", "description"]), values, max_size=2)),
        st.one_of(st.just({}), st.sampled_from(VALID_SECTIONS), st.dictionaries(st.sampled_from(list(FIELDS)), st.dictionaries(
            st.sampled_from(sorted({f for fields in FIELDS.values() for f in fields})), values, max_size=2),
            max_size=2)),
        st.one_of(st.none(), st.tuples(st.sampled_from(["train.lr", "model.cnum", "loss.names", "bogus", "train.seed"]),
                                       st.lists(scalars, min_size=1, max_size=2))),
    ),
)


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=spec_files)
def test_generated_specs_run_or_are_refused_by_the_contract(body, workspace):
    with tempfile.TemporaryDirectory(dir=workspace.root) as folder:
        specs = Path(folder)
        for name in ("base.toml", "presets.toml"):
            shutil.copy(workspace.specs / name, specs / name)
        spec = specs / "generated.toml"
        spec.write_bytes(body)
        given = [spec, specs / "base.toml", specs / "presets.toml"]
        before = {path: sha256(path) for path in given}
        db = f"sqlite:///{specs / 'r.db'}"
        code, _, err = invoke("run", spec, "--preset", "tiny", "--data-root", workspace.data, "--db", db)
        event(f"exit {code}")
        if code == 0:
            assert {path: sha256(path) for path in given} == before
            registry = Registry(db)
            assert {run.status for run in registry.list_runs()} == {"done"}
            registry.close()
        else:
            assert_refused(code, err, "", given, before)
            assert any(str(path) in err for path in given), err  # names the spec chain's file
