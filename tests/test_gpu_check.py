"""scripts/gpu_check.sh rehearsed on the CPU: every step runs and the summary reads what they wrote.

A GPU slot is 15 minutes, start-up included; a script that breaks on a renamed function or a changed
option wastes it. The rehearsal runs the same steps with the tiny model at small sizes, with
TorchDynamo disabled (compiling the two variants at two batches costs minutes on a CPU; the compiled
steps are tested in tests/engine/test_cuda_graphs.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["machine", "gpu_tests", "bench_eager", "compiled_fast", "packed", "run_2_epochs"]


def _run_outputs_in_checkout() -> set[Path]:
    return {path for folder in ("checkpoints", "logs") for path in (REPO / folder).rglob("*")}


@pytest.mark.slow
def test_the_tiny_rehearsal_runs_every_step_and_leaves_at_most_eight_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_SCALE": "tiny", "GPU_CHECK_DEVICE": "cpu",
           "TORCHDYNAMO_DISABLE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    before = _run_outputs_in_checkout()
    finished = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert _run_outputs_in_checkout() == before  # the 2-epoch run wrote its checkpoints and run folder elsewhere
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["summary.json", "bench.json", *(f"{step}.log" for step in STEPS)])
    summary = json.loads((out / "summary.json").read_text())
    assert [step["step"] for step in summary["steps"]] == STEPS
    assert summary["ok"] and all(step["exit"] == "0" for step in summary["steps"])
    best = summary["train"]["fast"]["largest_batch"]
    assert summary["train"]["fast"]["samples_per_s"] > 0 and summary["projection"]["fast"]["batch_size"] == 8
    assert sorted((entry["variant"], entry["batch"]) for entry in summary["compiled_fast"]) == sorted(
        (variant, batch) for variant in ("cuda_graphs", "compile") for batch in {8, best})
    assert summary["packed"]["runs"] == 2 and summary["packed"]["aggregate_samples_per_s"] > 0
    assert "1 done" in (out / "run_2_epochs.log").read_text()


def test_an_unknown_scale_is_refused_in_one_line(tmp_path):
    finished = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OUT": str(tmp_path), "GPU_CHECK_SCALE": "huge"})
    assert finished.returncode == 2
    assert finished.stderr.strip() == "GPU_CHECK_SCALE: expected paper or tiny, got huge"
