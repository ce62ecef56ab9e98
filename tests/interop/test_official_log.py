"""train_log.txt in the official format: header, per-iteration lines, epoch lines, evaluation, best R1."""

from __future__ import annotations

import re

from interop_records import Epoch, Step

from php_runner.interop.official_log import OfficialTrainLog, args_dump, step_line, total_params_line

STAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} ")
ARGS = {"batch_size": 8, "dataset_name": "RSTPReid", "img_size": [48, 24], "lr": 3e-06, "name": "php",
        "php_run": {"config": {}}}
STATISTICS = [{"subset": "train", "ids": 4, "images": 8, "captions": 16},
              {"subset": "test", "ids": 2, "images": 4, "captions": 8}]
METRICS = {"R1": 12.5, "R5": 50.0, "R10": 100.0, "mAP": 30.25, "mINP": 20.125}


def records(path) -> list[str]:
    """The log's lines with the timestamp cut off (every record starts with one)."""
    lines = path.read_text().splitlines()
    return [STAMP.sub("", line) for line in lines]


def test_step_line_has_the_official_meters_in_order_and_skips_zero_terms():
    step = Step(epoch=2, iteration=100, iterations_per_epoch=532, lr=3e-6,
                losses={"sdm_loss": 1.23456, "itc_loss": 0.0, "aux_loss": 0.5, "total": 1.73456})
    assert step_line(step) == "Epoch[2] Iteration[100/532], loss: 1.7346, sdm_loss: 1.2346, aux_loss: 0.5000, Base Lr: 3.00e-06"


def test_args_dump_is_the_namespace_with_commas_broken_into_lines():
    assert args_dump(ARGS) == ("Namespace(batch_size=8\n dataset_name='RSTPReid'\n img_size=(48\n 24)\n lr=3e-06\n"
                               " name='php')")


def test_total_params_is_rounded_to_millions():
    assert total_params_line(195_432_100) == "Total params: 195M"
    assert total_params_line(1_600_000) == "Total params:  2M"


def test_the_log_reads_as_the_official_one(tmp_path):
    with OfficialTrainLog(tmp_path, batch_size=8) as log:
        log.header(ARGS, total_params=2_400_000, num_gpus=1, statistics=STATISTICS)
        log.step(Step(1, 2, 4, 5e-4, {"sdm_loss": 2.0, "total": 2.0}))
        log.step(Step(1, 4, 4, 5e-4, {"sdm_loss": 1.5, "total": 1.5}))
        log.epoch(Epoch(1, 5e-4, {"sdm_loss": 1.75, "total": 1.75}, {"test": METRICS, "val": METRICS}, seconds=2.0))
        log.epoch(Epoch(2, 5e-4, {"sdm_loss": 1.0, "total": 1.0}, {}, seconds=1.0))  # no step records: no timing
        log.best(12.5, 1)
    lines = records(tmp_path / "train_log.txt")
    assert lines[:2] == ["IRRA INFO: Using 1 GPUs", "IRRA INFO: Namespace(batch_size=8"]
    assert lines[6] == " name='php')"
    assert lines[7] == "IRRA.dataset INFO: RSTPReid Dataset statistics:"
    table_end = lines.index("IRRA INFO: Total params:  2M")
    assert lines[8].startswith("+") and lines[table_end - 1].startswith("+")
    assert lines[table_end + 1:table_end + 5] == [
        "IRRA.train INFO: start training",
        "IRRA.train INFO: Epoch[1] Iteration[2/4], loss: 2.0000, sdm_loss: 2.0000, Base Lr: 5.00e-04",
        "IRRA.train INFO: Epoch[1] Iteration[4/4], loss: 1.5000, sdm_loss: 1.5000, Base Lr: 5.00e-04",
        "IRRA.train INFO: Epoch 1 done. Time per batch: 0.500[s] Speed: 16.0[samples/s]",
    ]
    assert lines[table_end + 5] == "IRRA.train INFO: Validation Results - Epoch: 1"
    assert lines[table_end + 6] == "IRRA.eval INFO: "
    table = lines[table_end + 7:table_end + 12]
    assert [cell.strip() for cell in table[1].strip("|").split("|")] == ["task", "R1", "R5", "R10", "mAP", "mINP"]
    assert [cell.strip() for cell in table[3].strip("|").split("|")] == ["t2i", "12.500", "50.000", "100.000",
                                                                         "30.250", "20.125"]
    assert lines[table_end + 12] == "IRRA.train INFO: Validation Results - Epoch: 1 (val split)"
    assert lines[-1] == "IRRA.train INFO: best R1: 12.5 at epoch 1"
    assert not any(line.startswith("IRRA.train INFO: Epoch 2 done") for line in lines)


def test_a_resumed_run_appends(tmp_path):
    for epoch in (1, 2):
        with OfficialTrainLog(tmp_path, batch_size=8) as log:
            log.step(Step(epoch, 1, 1, 1e-3, {"total": 1.0}))
    assert [line.split("], ")[0] for line in records(tmp_path / "train_log.txt")] == [
        "IRRA.train INFO: Epoch[1] Iteration[1/1", "IRRA.train INFO: Epoch[2] Iteration[1/1"]
