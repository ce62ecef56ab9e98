"""Tests of php_runner/engine/selection.py: selection_audit, the test metrics of each selection rule."""

from __future__ import annotations

from php_runner.engine import selection


def test_selection_audit_golden_values():
    def m(r1):
        return {"R1": r1, "R5": r1 + 1, "R10": r1 + 2, "mAP": r1 - 1, "mINP": r1 - 2}

    test = {1: m(10.0), 2: m(30.0), 3: m(30.0), 4: m(20.0)}
    val = {1: m(5.0), 2: m(6.0), 3: m(9.0), 4: m(7.0)}
    result = selection.selection_audit(test, val, "test")
    assert result["selected_by"] == "test"
    assert result["rules"]["best-on-test"]["epoch"] == 2  # earliest of the tied best epochs
    assert result["rules"]["best-on-val"]["epoch"] == 3
    assert result["rules"]["last"]["epoch"] == 4
    assert result["r1_gaps"] == {"test_minus_val": 0.0, "test_minus_last": 10.0}
    no_val = selection.selection_audit(test, None, "last")
    assert no_val["rules"]["best-on-val"] is None and no_val["r1_gaps"]["test_minus_val"] is None
