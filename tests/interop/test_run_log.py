"""train_log.txt: the official IRRA-family logger layout (php_spec.md section 8), block by block."""

from __future__ import annotations

import re

import pytest

from php_runner.store.registry import Registry
from php_runner.interop.run_log import TRAIN_LOG, TrainLog
from php_runner.execute.child import execute_run
from php_runner.execute.queue import plan_all
from php_runner.experiment.specs import expand, load_spec

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"

# Written out by hand from the documented official layout: formatter
# "%(asctime)s %(name)s %(levelname)s: %(message)s", a PrettyTable of task | R1 | R5 | R10 | mAP | mINP
# with row t2i and every number .3f, in the default style (+---+ borders, centred cells).
OFFICIAL_EVAL_BLOCK = """\
<stamp> IRRA.train INFO: Validation Results - Epoch: 7
<stamp> IRRA.eval INFO: 
+------+--------+--------+--------+--------+--------+
| task |   R1   |   R5   |  R10   |  mAP   |  mINP  |
+------+--------+--------+--------+--------+--------+
| t2i  | 73.123 | 89.000 | 93.457 | 66.100 | 52.009 |
+------+--------+--------+--------+--------+--------+
"""
OFFICIAL_STATISTICS_BLOCK = """\
<stamp> IRRA.dataset INFO: CUHKPEDES Dataset statistics:
+--------+-------+--------+----------+
| subset |  ids  | images | captions |
+--------+-------+--------+----------+
| train  | 11003 | 34054  |  68126   |
|  test  |  1000 |  3074  |   6156   |
|  val   |  1000 |  3078  |   6158   |
+--------+-------+--------+----------+
"""


def stamped(text: str) -> str:
    """Timestamps replaced by <stamp>, after checking they have the logging module's default form."""
    for line in text.splitlines():
        if " INFO: " in line:
            assert re.match(rf"^{STAMP} IRRA\.(dataset|train|eval) INFO: ", line), line
    return re.sub(rf"^{STAMP} ", "<stamp> ", text, flags=re.MULTILINE)


def test_the_log_blocks_match_the_official_layout_written_by_hand(tmp_path):
    with TrainLog(tmp_path) as log:
        log.dataset_statistics("CUHK-PEDES", [
            {"subset": "train", "ids": 11003, "images": 34054, "captions": 68126},
            {"subset": "test", "ids": 1000, "images": 3074, "captions": 6156},
            {"subset": "val", "ids": 1000, "images": 3078, "captions": 6158},
        ])
        log.epoch(7, {"sdm_loss": 1.5, "itc_loss": 0.25, "aux_loss": 0.0, "total": 1.75}, 3e-6,
                  {"test": {"R1": 73.1234, "R5": 89.0, "R10": 93.4567, "mAP": 66.1, "mINP": 52.0091}})
        log.best(73.1234, 7)
    text = stamped((tmp_path / TRAIN_LOG).read_text())
    meters = "<stamp> IRRA.train INFO: Epoch[7] mean, loss: 1.7500, sdm_loss: 1.5000, itc_loss: 0.2500, Base Lr: 3.00e-06\n"
    best = "<stamp> IRRA.train INFO: best R1: 73.1234 at epoch 7\n"
    assert text == OFFICIAL_STATISTICS_BLOCK + meters + OFFICIAL_EVAL_BLOCK + best


def _eval_blocks(text: str) -> dict[str, str]:
    """Each 'Validation Results' line with the 6 lines of its table, keyed by that line's message."""
    lines = text.splitlines(keepends=True)
    return {line.split("INFO: ", 1)[1].strip(): "".join(lines[i:i + 7])
            for i, line in enumerate(lines) if "Validation Results - Epoch" in line}


def official_block(header: str, values: list[float]) -> str:
    """The official block for any values, by hand: each column as wide as its widest cell plus one space
    each side, cells centred (str.center), numbers .3f."""
    cells = [["task", "R1", "R5", "R10", "mAP", "mINP"], ["t2i", *(f"{value:.3f}" for value in values)]]
    widths = [max(len(row[column]) for row in cells) for column in range(6)]
    rule = "+" + "+".join("-" * (width + 2) for width in widths) + "+\n"
    row = lambda items: "|" + "|".join(f" {item.center(width)} " for item, width in zip(items, widths)) + "|\n"
    return (f"<stamp> IRRA.train INFO: {header}\n<stamp> IRRA.eval INFO: \n"
            + rule + row(cells[0]) + rule + row(cells[1]) + rule)


def test_the_hand_formatter_reproduces_the_hand_written_block():
    assert official_block("Validation Results - Epoch: 7", [73.1234, 89.0, 93.4567, 66.1, 52.0091]) == OFFICIAL_EVAL_BLOCK


@pytest.mark.slow
def test_a_trained_run_writes_train_log_beside_its_checkpoints(spec_dir, tiny_data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    (planned,) = expand(load_spec(spec_dir / "two_epochs.toml"), "tiny", runtime={"data_root": str(tiny_data_root)})
    registry = Registry(url)
    (run,) = plan_all(registry, [planned])
    assert execute_run(run.id, url) == 0
    run = registry.get_run(run.id)
    log = tmp_path / run.run_dir / TRAIN_LOG
    assert (log.parent / "best.pth").is_file()
    text = stamped(log.read_text())
    assert text.startswith("<stamp> IRRA.dataset INFO: CUHKPEDES Dataset statistics:\n+--------+")
    blocks = _eval_blocks(text)
    expected = {}
    for entry in registry.epochs(run.id):
        if entry.split in ("test", "val"):
            header = f"Validation Results - Epoch: {entry.epoch}" + ("" if entry.split == "test" else " (val split)")
            expected[header] = official_block(header, [entry.metrics[m] for m in ("R1", "R5", "R10", "mAP", "mINP")])
    assert len(expected) == 4 and blocks == expected  # two epochs, test and val each
    best = registry.results(run.id)["best-on-test"]
    assert text.endswith(f"<stamp> IRRA.train INFO: best R1: {best['metrics']['R1']} at epoch {best['epoch']}\n")
    registry.close()
