"""Checkpoint selection: which epoch each rule picks (best-on-test, best-on-val, last), and the audit of
how far the rules' picks lie apart on the test metrics (``selection_audit``)."""

from __future__ import annotations

from php_runner.engine.metrics import metric_values

SELECTIONS = ("test", "val", "last")
RULE_OF_SELECTION = {"test": "best-on-test", "val": "best-on-val", "last": "last"}
# The split that chose the checkpoint under each training selection, as the audit report names it.
SELECTING_SPLIT = {"test": "test", "val": "val", "last": "none (last epoch)"}


class Selection:
    """Best-so-far bookkeeping for the three rules; ``best-on-*`` move only on a strict R1 improvement.

    Each pick reports the test metrics at its epoch, or the val metrics when test is not evaluated.
    """

    def __init__(self, state: dict | None = None) -> None:
        # rule -> [epoch, score R1 on the selecting split, reported split, its metrics at that epoch]
        self.state: dict[str, list] = state or {}

    def update(self, epoch: int, metrics: dict[str, dict]) -> set[str]:
        """Feed an evaluated epoch; returns the rules whose pick changed."""
        changed = set()
        reported = "test" if "test" in metrics else "val"
        candidates = {"best-on-test": metrics.get("test"), "best-on-val": metrics.get("val"),
                      "last": metrics.get(reported)}
        for rule, scored in candidates.items():
            if scored is None:
                continue
            current = self.state.get(rule)
            if rule == "last" or current is None or scored["R1"] > current[1]:
                self.state[rule] = [epoch, scored["R1"], reported, dict(metrics[reported])]
                changed.add(rule)
        return changed

    def selected(self) -> dict[str, tuple[int, str, dict]]:
        return {rule: (epoch, split, metrics) for rule, (epoch, _, split, metrics) in self.state.items()}


def best_epoch(by_epoch: dict[int, dict]) -> int | None:
    """Earliest epoch with the highest R1 (the official rule writes best.pth only on strict improvement)."""
    best = None
    for epoch in sorted(by_epoch):
        if best is None or by_epoch[epoch]["R1"] > by_epoch[best]["R1"]:
            best = epoch
    return best


def selection_audit(test_by_epoch: dict[int, dict], val_by_epoch: dict[int, dict] | None, selection: str) -> dict:
    """Which split chose the checkpoint, and the test metrics of each selection rule.

    ``selection`` is the training rule (``test`` | ``val`` | ``last``). Gaps are test R1 differences:
    ``test_minus_last`` and ``test_minus_val`` measure how much choosing the epoch on the test split
    itself flatters the reported number.
    """
    rules: dict[str, dict | None] = {"best-on-test": None, "best-on-val": None, "last": None}
    if test_by_epoch:
        best = best_epoch(test_by_epoch)
        rules["best-on-test"] = {"epoch": best, "test": metric_values(test_by_epoch[best])}
        last = max(test_by_epoch)
        rules["last"] = {"epoch": last, "test": metric_values(test_by_epoch[last])}
    if val_by_epoch:
        best = best_epoch(val_by_epoch)
        rules["best-on-val"] = {
            "epoch": best,
            "val": metric_values(val_by_epoch[best]),
            "test": metric_values(test_by_epoch[best]) if best in test_by_epoch else None,
        }

    def gap(rule: str) -> float | None:
        chosen, other = rules["best-on-test"], rules[rule]
        if chosen is None or other is None or other.get("test") is None:
            return None
        return chosen["test"]["R1"] - other["test"]["R1"]

    return {
        "selected_by": SELECTING_SPLIT.get(selection, selection),
        "epochs": len(test_by_epoch),
        "rules": rules,
        "r1_gaps": {"test_minus_val": gap("best-on-val"), "test_minus_last": gap("last")},
    }
