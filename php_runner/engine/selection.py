"""Checkpoint selection: which epoch each rule picks (best-on-test, best-on-val, last)."""

from __future__ import annotations

SELECTIONS = ("test", "val", "last")
RULE_OF_SELECTION = {"test": "best-on-test", "val": "best-on-val", "last": "last"}


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
