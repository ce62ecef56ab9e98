"""Run execution: config building, pre-flight checks, failures, resume after SIGKILL, concurrent invocations.

The end-to-end tests train the tiny preset (deterministic) for one or two epochs on a synthetic
CUHK-PEDES set with four identities.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest

from php_runner.errors import InputError
from php_runner.model.config import ClipConfig, PHPConfig
from php_runner.store.registry import Registry
from php_runner.execute.pool import ActiveRun, finish_run, pump_lines
from php_runner.experiment.build import build_model, build_php_config, build_train_settings
from php_runner.execute.local import execute_planned
from php_runner.execute.preflight import preflight
from php_runner.experiment.specs import expand, load_spec


def plan(spec_dir: Path, name: str, data_root: Path):
    return expand(load_spec(spec_dir / f"{name}.toml"), "tiny", runtime={"data_root": str(data_root)})


def php_run(*args: str, cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "php_runner", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def tiny_config(spec_dir: Path, data_root: Path) -> dict:
    return plan(spec_dir, "two_epochs", data_root)[0].config


# ---- building library objects ---------------------------------------------------------------------

def test_model_section_builds_the_named_clip_with_the_configured_image_size(spec_dir, tmp_path):
    model = dict(tiny_config(spec_dir, tmp_path)["model"])
    tiny = build_php_config(model)
    assert tiny.clip == PHPConfig.tiny().clip and tiny.cnum == 3 and tiny.num_classes == 0
    paper = build_php_config({**model, "clip": "ViT-B/16", "image_size": [384, 128], "efp_heads": 8}, num_classes=7)
    assert paper.clip == ClipConfig() and paper.num_classes == 7
    assert build_php_config({**model, "image_size": [64, 32]}).clip.image_size == (64, 32)
    with pytest.raises(InputError, match="model.clip"):
        build_php_config({**model, "clip": "ViT-L/14"})


def test_the_vit_b16_model_starts_from_the_clip_weights_file(spec_dir, tmp_path):
    import torch

    from php_runner.model.clip import CLIP, resize_visual_positional_embedding

    tiny_clip = dataclasses.replace(PHPConfig.tiny().clip, image_size=(32, 32))  # a square 4x4 table, as OpenAI's
    torch.manual_seed(3)
    weights = CLIP(tiny_clip).state_dict()
    path = tmp_path / "clip.pt"
    torch.save(weights, path)
    config = tiny_config(spec_dir, tmp_path)
    config = {**config, "model": {**config["model"], "clip": "ViT-B/16"},
              "runtime": {**config["runtime"], "clip_weights": str(path)}}
    model = build_model(config, num_classes=0)
    assert model.config.clip.embed_dim == tiny_clip.embed_dim  # dimensions come from the weights
    loaded = model.base_model.state_dict()
    table = "visual.positional_embedding"
    assert all(torch.equal(loaded[key], value) for key, value in weights.items() if key != table)
    assert torch.equal(loaded[table], resize_visual_positional_embedding(weights[table], model.base_model.visual.grid))
    without = {**config, "runtime": {**config["runtime"], "clip_weights": None}}
    with pytest.raises(InputError, match="runtime.clip_weights"):
        build_model(without, num_classes=0)


def test_train_settings_take_train_loss_and_runtime_sections(spec_dir, tmp_path):
    config = tiny_config(spec_dir, tmp_path)
    settings = build_train_settings(config)
    assert settings.epochs == 2 and settings.deterministic and settings.betas == (0.9, 0.999)
    assert settings.loss.names == ("sdm", "itc", "aux") and settings.num_workers == 0
    with pytest.raises(InputError, match="train/loss"):
        build_train_settings({**config, "train": {**config["train"], "epochz": 3}})


def test_preflight_rejects_missing_real_data_and_weights(spec_dir, tmp_path):
    config = tiny_config(spec_dir, tmp_path)
    real = {**config, "data": {**config["data"], "source": "real"}}
    with pytest.raises(InputError, match="--data-root"):
        preflight(real)
    (tmp_path / "CUHK-PEDES").mkdir()
    paper = {**real, "model": {**real["model"], "clip": "ViT-B/16"}}
    with pytest.raises(InputError, match="--clip-weights"):
        preflight(paper)
    paper["runtime"] = {**paper["runtime"], "clip_weights": str(tmp_path / "missing.pt")}
    with pytest.raises(InputError, match="not found"):
        preflight(paper)


# ---- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(spec_dir, tiny_data_root, tmp_path_factory):
    """A failing run planned before an uninterrupted two-epoch run, executed by one invocation."""
    workdir = tmp_path_factory.mktemp("reference")
    url = f"sqlite:///{workdir / 'registry.db'}"
    planned = plan(spec_dir, "bad_selection", tiny_data_root) + plan(spec_dir, "two_epochs", tiny_data_root)
    cwd = os.getcwd()
    os.chdir(workdir)  # checkpoints/ goes under the working directory
    try:
        summary = execute_planned(planned, url)
    finally:
        os.chdir(cwd)
    registry = Registry(url)
    good = registry.get_run(planned[1].config_hash)
    return {"summary": summary, "registry": registry, "bad": registry.get_run(planned[0].config_hash), "good": good,
            "results": registry.results(good.id), "workdir": workdir}


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_next_one_still_runs(reference):
    summary, registry, bad, good = (reference[k] for k in ("summary", "registry", "bad", "good"))
    assert [o.status for o in summary.outcomes] == ["failed", "done"]
    assert bad.status == "failed" and "selection" in bad.error and bad.error == summary.outcomes[0].error
    assert good.status == "done" and good.attempts == 1
    assert set(reference["results"]) == {"best-on-test", "best-on-val", "last"}
    assert {(e.epoch, e.split) for e in registry.epochs(good.id)} == {
        (epoch, split) for epoch in (1, 2) for split in ("train", "test", "val")}
    checkpoints = {c.role: c for c in registry.checkpoints(good.id)}
    assert set(checkpoints) == {"best", "last"} and checkpoints["last"].epoch == 2
    for checkpoint in checkpoints.values():
        assert Path(checkpoint.path).is_file() and len(checkpoint.sha256) == 64
    assert Path(good.run_dir) == reference["workdir"] / "checkpoints" / good.config_hash[:12]
    provenance = registry.provenance(good.id)
    assert provenance["torch"] and provenance["python"] and provenance["device"].startswith("cpu")
    assert registry.provenance(bad.id) is not None  # recorded before the failure


@pytest.mark.slow
def test_evaluate_on_a_trained_checkpoint_reproduces_the_recorded_metrics(reference, tiny_data_root):
    registry, good = reference["registry"], reference["good"]
    best = next(c for c in registry.checkpoints(good.id) if c.role == "best")
    done = subprocess.run([sys.executable, "-m", "php_runner", "evaluate", "--checkpoint", best.path, "--data-root",
                           str(tiny_data_root), "--dataset", good.dataset, "--json"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == reference["results"]["best-on-test"]["metrics"]


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_metrics(spec_dir, tiny_data_root, tmp_path, reference):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    args = ("run", str(spec_dir / "two_epochs.toml"), "--preset", "tiny", "--data-root", str(tiny_data_root),
            "--db", url)
    first = php_run(*args, cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 240
    while not list(tmp_path.glob("checkpoints/*/last.pth")):  # epoch 1 is saved; epoch 2 is training
        assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.poll() else "timeout"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # php-run and its worker die at once: nobody records anything
    first.communicate(timeout=60)
    registry = Registry(url)
    [run] = registry.list_runs()
    assert run.status == "running" and registry.is_claimable(run)

    second = php_run(*args, cwd=tmp_path)
    output, _ = second.communicate(timeout=240)
    assert second.returncode == 0, output
    assert "resuming" in output
    resumed = registry.get_run(run.id)
    assert resumed.status == "done" and resumed.attempts == 2
    assert resumed.config_hash == reference["good"].config_hash
    assert registry.results(run.id) == reference["results"]


def test_the_parent_records_a_worker_that_died_without_recording(registry_url, spec_dir, tmp_path):
    registry = Registry(registry_url)
    run = registry.plan_run(plan(spec_dir, "two_epochs", tmp_path)[0])
    suicide = (
        "import os, signal, sys\n"
        "from php_runner.store.claims import this_worker\n"
        "from php_runner.store.registry import Registry\n"
        f"assert Registry({registry_url!r}).claim_run({run.id}, this_worker())\n"
        "print('CUDA error: an illegal memory access was encountered', file=sys.stderr, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", suicide], stderr=subprocess.PIPE, text=True)
    tail = deque(maxlen=20)
    pump = threading.Thread(target=pump_lines, args=(process.stderr, io.StringIO(), "", tail))
    pump.start()
    process.wait()
    outcome = finish_run(registry, ActiveRun(run, process, tail, [pump], None))
    assert outcome.status == "failed"
    assert outcome.error == "worker killed by signal 9: CUDA error: an illegal memory access was encountered"
    assert registry.get_run(run.id).status == "failed"
    assert registry.claim_run(run.id, "next")  # resumable by the next invocation


@pytest.mark.slow
def test_two_concurrent_invocations_execute_each_run_once(spec_dir, tiny_data_root, tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    args = ("run", str(spec_dir / "two_seeds.toml"), "--preset", "tiny", "--data-root", str(tiny_data_root),
            "--db", url)
    # The second invocation also exercises the parallel scheduler (GPU ids only set CUDA_VISIBLE_DEVICES).
    invocations = [php_run(*args, cwd=tmp_path), php_run(*args, "--gpus", "0,1", cwd=tmp_path)]
    outputs = [p.communicate(timeout=300)[0] for p in invocations]
    assert [p.returncode for p in invocations] == [0, 0], outputs
    runs = Registry(url).list_runs()
    assert len(runs) == 2
    assert [(r.status, r.attempts) for r in runs] == [("done", 1), ("done", 1)]
    done_lines = [line for text in outputs for line in text.splitlines() if line.strip().startswith("done run")]
    assert sorted(line.split()[2] for line in done_lines) == sorted(str(r.id) for r in runs)
