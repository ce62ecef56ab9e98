"""Checkpoint selection rules (issue 24 item 19): best-on-* move only on a strict R1 improvement."""

from __future__ import annotations

from php_runner.engine.selection import Selection


def metrics(test_r1: float, val_r1: float) -> dict[str, dict]:
    return {"test": {"R1": test_r1, "mAP": test_r1 / 2}, "val": {"R1": val_r1, "mAP": val_r1 / 2}}


def test_an_exact_tie_keeps_the_earlier_epoch():
    selection = Selection()
    selection.update(1, metrics(50.0, 40.0))
    changed = selection.update(2, metrics(50.0, 40.0))  # both R1 tie exactly
    picks = selection.selected()
    assert picks["best-on-test"][0] == 1 and picks["best-on-val"][0] == 1
    assert picks["last"][0] == 2 and changed == {"last"}


def test_a_strict_improvement_moves_each_rule_on_its_own_split():
    selection = Selection()
    selection.update(1, metrics(50.0, 40.0))
    selection.update(2, metrics(50.5, 39.0))
    selection.update(3, metrics(49.0, 40.25))
    picks = selection.selected()
    assert picks["best-on-test"][0] == 2 and picks["best-on-val"][0] == 3
    assert picks["best-on-val"][2]["R1"] == 49.0  # reports test metrics at the val-selected epoch
