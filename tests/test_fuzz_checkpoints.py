"""Property-based fuzzing of damaged and hostile checkpoints through the real CLI (issue 24): every command
that loads a ``.pth`` (``evaluate --checkpoint``, ``audit --checkpoint``, ``import`` of a released folder and
the resume of a run from its ``last.pth``) gets a damaged copy of a small valid checkpoint, a zip with the
wrong members, a valid pickle of unexpected types, a state dict of another model size, or a pickle that
would run code. Each must end in exit 0 or a clean exit 2 (resume: exit 1 with the run failed by one
InputError line naming ``last.pth``), execute nothing, and leave its inputs unchanged.

``HYPOTHESIS_PROFILE=local`` runs many more cases than the CI default (tests/fuzz_profiles.py).
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from fuzz_damage import BYTE_DAMAGES, assert_clean, damaged, snapshot
from fuzz_profiles import load
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from inprocess_runs import FinishedWorker

from php_runner.data import write_synthetic
from php_runner.execute import child, pool, worker
from php_runner.model.checkpoint import config_to_dict
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel

PROFILE = load()
DATASET = "RSTPReid"
RELEASE = f"{DATASET}/sdm+itc+aux"  # import maps this folder to the headline cell, whose cnum is 9
CONFIG = PHPConfig.tiny(cnum=9)
OTHER_SIZES = [PHPConfig.tiny(cnum=4, num_experts=2), PHPConfig.tiny(efp_layers=1, cnum=9)]


class Trap:
    """Unpickled, it would create ``marker``: a loader that executes pickled code leaves the folder behind."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@dataclass
class Base:
    data: Path
    payload: dict
    raw: bytes  # the valid checkpoint file
    members: dict[str, bytes]  # its zip members by name
    other_sizes: list[dict]


def torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    root = tmp_path_factory.mktemp("fuzz_checkpoints")
    write_synthetic(root / "data", DATASET, num_ids=2, seed=5)
    torch.manual_seed(0)
    model = PHPModel(CONFIG)
    payload = {"model": model.state_dict(), "config": config_to_dict(CONFIG), "epoch": 1, "num_epoch": 1,
               "settings": {"precision": "amp", "test_batch_size": 8}}
    raw = torch_bytes(payload)
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    others = [{**payload, "model": PHPModel(config).state_dict(), "config": config_to_dict(config)}
              for config in OTHER_SIZES]
    return Base(root / "data", payload, raw, members, others)


# ---- the checkpoints -----------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8,
          torch.bool, torch.complex64]
FILLS = st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), 1e30])
TENSORS = st.builds(lambda dtype, shape, fill: torch.full(shape, fill).to(dtype),
                    st.sampled_from(DTYPES), st.lists(st.integers(0, 3), max_size=3), FILLS)
PLAIN = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6),
                  st.binary(max_size=6))
VALUES = st.recursive(st.one_of(PLAIN, TENSORS), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner),
    st.dictionaries(st.one_of(st.text(max_size=12), st.integers(), st.sampled_from(["model", "config", "clip"])),
                    inner, max_size=3)), max_leaves=8)
TOP_KEYS = ["model", "config", "epoch", "num_epoch", "settings", "scheduler", "optimizer", "surplus"]
STATE_EDITS = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 10**6)),
    st.tuples(st.just("rename"), st.integers(0, 10**6), st.text(max_size=20)),
    st.tuples(st.just("dtype"), st.integers(0, 10**6), st.sampled_from(DTYPES)),
    st.tuples(st.just("value"), st.integers(0, 10**6), st.one_of(TENSORS, PLAIN)),
    st.tuples(st.just("extra"), st.text(max_size=30), st.one_of(TENSORS, PLAIN)),
    st.tuples(st.just("huge"), st.integers(0, 10**6)),  # a stride-0 view: one stored float, 2**40 elements
    st.tuples(st.just("sparse"), st.integers(0, 10**6)),
)
MEMBER_CONTENTS = st.one_of(st.binary(max_size=64), VALUES.map(pickle.dumps), st.just("trap"))
CHECKPOINTS = st.one_of(
    st.tuples(st.just("bytes"), BYTE_DAMAGES),
    st.tuples(st.just("pickle-flip"), st.integers(0, 20_000), st.integers(1, 255)),  # flips within data.pkl
    st.tuples(st.just("member"), st.sampled_from(["archive/data.pkl", "archive/byteorder", "archive/version",
                                                  "archive/.format_version", "archive/data/0", "archive/data/7"]),
              st.one_of(BYTE_DAMAGES, st.just(("drop",)))),
    st.tuples(st.just("zip"), st.lists(st.tuples(st.sampled_from(["archive/data.pkl", "data.pkl", "x/y/data.pkl",
                                                                  "archive/version", "archive/data/0", "notes.txt"]),
                                                 MEMBER_CONTENTS), max_size=3)),
    st.tuples(st.just("payload"), VALUES),
    st.tuples(st.just("top"), st.sampled_from(TOP_KEYS), st.one_of(st.just("delete"), VALUES)),
    st.tuples(st.just("state"), st.lists(STATE_EDITS, min_size=1, max_size=3)),
    st.tuples(st.just("other-size"), st.integers(0, len(OTHER_SIZES) - 1), st.booleans()),
    st.tuples(st.just("trap"), st.sampled_from(["torch.save", "zip", "legacy", "in-state-dict"])),
)


def edit_state(state: dict, edit: tuple) -> None:
    keys = sorted(state)
    kind, key = edit[0], keys[edit[1] % len(keys)] if isinstance(edit[1], int) and keys else None
    if kind == "drop" and key:
        del state[key]
    elif kind == "rename" and key:
        state[edit[2]] = state.pop(key)
    elif kind == "dtype" and key and isinstance(state[key], torch.Tensor):
        state[key] = state[key].to(edit[2])
    elif kind == "value" and key:
        state[key] = edit[2]
    elif kind == "extra":
        state[edit[1]] = edit[2]
    elif kind == "huge" and key:
        state[key] = torch.zeros(1).expand(2**20, 2**20)
    elif kind == "sparse" and key and isinstance(state[key], torch.Tensor) and state[key].dim():
        state[key] = state[key].to_sparse()


def write_zip(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, content in members:
            archive.writestr(name, content)
    return buffer.getvalue()


def trap_bytes(container: str, trap: Trap, base: Base) -> bytes:
    if container == "torch.save":
        return torch_bytes({"model": trap})
    if container == "in-state-dict":
        return torch_bytes({**base.payload, "model": {**base.payload["model"], "logit_scale": trap}})
    evil = pickle.dumps(trap, protocol=2)
    if container == "zip":
        return write_zip([(name, evil if name.endswith("data.pkl") else content) for name, content in base.members.items()])
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)  # the legacy format: magic, protocol, sys info, object
    return magic + pickle.dumps(1001, protocol=2) + pickle.dumps({}, protocol=2) + evil


def checkpoint_bytes(case: tuple, base: Base, trap: Trap) -> bytes:
    """The file ``case`` (one of CHECKPOINTS) describes."""
    kind = case[0]
    event(f"checkpoint {kind}")
    if kind == "bytes":
        return damaged(base.raw, case[1])
    if kind == "pickle-flip":
        pickled = base.members["archive/data.pkl"]
        at = case[1] % len(pickled)
        members = {**base.members, "archive/data.pkl": pickled[:at] + bytes([pickled[at] ^ case[2]]) + pickled[at + 1:]}
        return write_zip(list(members.items()))
    if kind == "member":
        members = dict(base.members)
        if case[2][0] == "drop":
            members.pop(case[1], None)
        else:
            members[case[1]] = damaged(members.get(case[1], b""), case[2])
        return write_zip(list(members.items()))
    if kind == "zip":
        return write_zip([(name, pickle.dumps(trap, protocol=2) if content == "trap" else content)
                          for name, content in case[1]])
    if kind == "payload":
        return torch_bytes(case[1])
    if kind == "top":
        payload = dict(base.payload)
        if case[2] == "delete":
            payload.pop(case[1], None)
        else:
            payload[case[1]] = case[2]
        return torch_bytes(payload)
    if kind == "state":
        state = dict(base.payload["model"])
        for edit in case[1]:
            edit_state(state, edit)
        return torch_bytes({**base.payload, "model": state})
    if kind == "other-size":
        other = base.other_sizes[case[1]]
        return torch_bytes(other if case[2] else {**base.payload, "model": other["model"]})
    return trap_bytes(case[1], trap, base)


# ---- the commands --------------------------------------------------------------------------------

def released_yaml() -> str:
    return yaml.safe_dump({"dataset_name": DATASET, "loss_names": "sdm+itc+aux", "test_batch_size": 8,
                           "img_size": list(CONFIG.clip.image_size), "stride_size": CONFIG.clip.stride,
                           "cnum": CONFIG.cnum, "num_experts": CONFIG.num_experts, "moe_layers": CONFIG.efp_layers,
                           "topk": CONFIG.topk, "moe_heads": CONFIG.efp_heads})


def command_line(command: str, inputs: Path, base: Base, db: str) -> list:
    """Write the checkpoint's companions under ``inputs``; the arguments that make ``command`` load it."""
    cheap = ["--data-root", base.data, "--device", "cpu"]
    if command == "import":
        (inputs / RELEASE / "configs.yaml").write_text(released_yaml())
        return ["import", inputs, *cheap, "--no-audit", "--db", db]
    checkpoint = inputs / RELEASE / "best.pth"
    if command == "audit":
        return ["audit", "--checkpoint", checkpoint, "--dataset", DATASET, "--seeds", "1", "--sample", "1", *cheap]
    return ["evaluate", "--checkpoint", checkpoint, "--dataset", DATASET, *cheap]


@given(case=CHECKPOINTS, command=st.sampled_from(["evaluate"] * 4 + ["audit", "import"]))
@example(case=("state", [("drop", 0)]), command="import")  # was recorded as a failed run (exit 1), not skipped
@example(case=("state", [("huge", 5)]), command="evaluate")  # the finite check allocated 4 TiB (RuntimeError)
@example(case=("state", [("sparse", 5)]), command="evaluate")  # NotImplementedError, after a torch UserWarning
@example(case=("state", [("dtype", 5, torch.complex64)]), command="evaluate")  # loaded with a casting warning
@example(case=("top", "model", {"safl.part_tokens": torch.zeros(3)}), command="evaluate")  # IndexError inferring the size
def test_damaged_or_hostile_checkpoint(cli, base, case, command):
    with tempfile.TemporaryDirectory() as folder:
        inputs, trap = Path(folder) / "inputs", Trap(Path(folder) / "trap")
        (inputs / RELEASE).mkdir(parents=True)
        (inputs / RELEASE / "best.pth").write_bytes(checkpoint_bytes(case, base, trap))
        args = command_line(command, inputs, base, f"sqlite:///{folder}/registry.db")
        before = snapshot(inputs)
        code, _, err = cli(*args)
        event(f"{command} exit {code}")
        assert_clean(code, err)
        assert snapshot(inputs) == before
        assert not Path(trap.marker).exists()  # the pickled call never ran


# ---- resume from last.pth --------------------------------------------------------------------------

RESUME_KEYS = ["model", "optimizer", "scheduler", "rng", "history", "selection", "epoch", "stopped", "settings"]
RESUME_CASES = st.one_of(
    st.tuples(st.just("bytes"), BYTE_DAMAGES),
    st.tuples(st.just("top"), st.sampled_from(RESUME_KEYS), st.one_of(st.just("delete"), VALUES)),
    st.tuples(st.just("rng"), st.sampled_from(["torch", "cuda", "python", "numpy", "loader"]), VALUES),
    st.tuples(st.just("state"), st.lists(STATE_EDITS, min_size=1, max_size=2)),
    st.tuples(st.just("trap"), st.sampled_from(["torch.save", "in-state-dict"])),
)


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, spec_dir):
    """A run trained for one epoch (real training, once): its registry, run folder and valid ``last.pth``."""
    from typer.testing import CliRunner

    from php_runner.cli import app
    from php_runner.store.registry import Registry

    root = tmp_path_factory.mktemp("fuzz_resume")
    write_synthetic(root / "data", DATASET, num_ids=2, seed=5)
    spec = root / "specs" / "one.toml"
    shutil.copytree(spec_dir, spec.parent)
    spec.write_text(f'extends = "base"\ndatasets = ["{DATASET}"]\nseeds = [1]\n[train]\nepochs = 1\n')
    db = f"sqlite:///{root / 'registry.db'}"
    args = ["run", str(spec), "--preset", "tiny", "--data-root", str(root / "data"), "--db", db, "--device", "cpu"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(worker, "spawn_run", spawn_in_process)
        result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    registry = Registry(db)
    (run,) = registry.list_runs()
    registry.close()
    last = Path(run.run_dir) / "last.pth"
    return SimpleNamespace(root=root, args=args, db=db, run_id=run.id, last=last, raw=last.read_bytes(),
                           payload=torch.load(last, weights_only=True))


def resume_bytes(case: tuple, resumable, trap: Trap) -> bytes:
    kind = case[0]
    event(f"last.pth {kind}")
    if kind == "bytes":
        return damaged(resumable.raw, case[1])
    payload = dict(resumable.payload)
    if kind == "top":
        if case[2] == "delete":
            payload.pop(case[1], None)
        else:
            payload[case[1]] = case[2]
    elif kind == "rng":
        payload["rng"] = {**payload["rng"], case[1]: case[2]}
    elif kind == "state":
        payload["model"] = dict(payload["model"])
        for edit in case[1]:
            edit_state(payload["model"], edit)
    elif case[1] == "torch.save":
        payload = {"model": trap}
    else:
        payload["model"] = {**payload["model"], "logit_scale": trap}
    return torch_bytes(payload)


def spawn_in_process(run, db_url, gpu, parallel, command, claimed_by=None, heartbeat=None):
    """The worker's child process, run in this process (so a traceback would surface here)."""
    code = child.execute_run(run.id, db_url, command, claimed_by=claimed_by)
    return pool.ActiveRun(run, FinishedWorker(code), deque(), [], gpu, claimed_by)



@settings(max_examples=max(settings.default.max_examples // 3, 10))
@given(case=RESUME_CASES)
@example(case=("top", "rng", "delete"))  # KeyError: 'rng' with a traceback
@example(case=("top", "settings", "x"))  # AttributeError: 'str' object has no attribute 'get'
@example(case=("top", "history", ["x"]))  # TypeError from EpochRecord(**record)
@example(case=("top", "model", None))  # TypeError from load_state_dict
@example(case=("top", "selection", {"last": None}))  # TypeError: cannot unpack non-iterable NoneType object
@example(case=("state", [("extra", 0, torch.zeros(1))]))  # AttributeError: 'int' object has no attribute 'startswith'
def test_damaged_or_hostile_last_checkpoint_on_resume(cli, resumable, monkeypatch, case):
    """Exit 0 (resumed), or the run failed (exit 1) by one InputError line naming last.pth, its file unchanged."""
    from php_runner.store.registry import Registry

    monkeypatch.setattr(worker, "spawn_run", spawn_in_process)
    trap = Trap(resumable.root / "trap")
    resumable.last.write_bytes(resume_bytes(case, resumable, trap))
    before = snapshot(resumable.last.parent)
    registry = Registry(resumable.db)
    registry.mark_failed(resumable.run_id, "interrupted")  # so the next invocation resumes it
    code, _, err = cli(*resumable.args)
    run = registry.get_run(resumable.run_id)
    registry.close()
    event(f"resume exit {code}")
    assert not Path(trap.marker).exists()
    assert "Traceback" not in err, err
    if code != 0:
        assert code == 1 and run.status == "failed", err
        assert run.error.startswith(("InputError: ", "CheckpointError: ")) and str(resumable.last) in run.error, run.error
        assert snapshot(resumable.last.parent) == before
