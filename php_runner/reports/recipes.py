"""Which recorded runs fill a table's cells.

A cell is defined by its recipe: the resolved config of the table's spec row under a preset, on a
dataset. Only runs of that config (the seed aside) fill it, so a user's variant labelled with the
same table (``extends = "headline"`` with another ``aux_factor``) never changes a paper table; it is
counted and named as left out instead. Imported runs (released checkpoints) are not planned from a
spec and keep their cells.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from php_runner.data.datasets import DATASET_NAMES
from php_runner.experiment.expand import config_hash

if TYPE_CHECKING:
    from php_runner.experiment.schema import Spec
    from php_runner.store.records import RunRecord


def recipe_hash(config: Mapping[str, Any]) -> str:
    """The config hash with the training seed left out: the same for every seed of one recipe."""
    train = {key: value for key, value in config.get("train", {}).items() if key != "seed"}
    return config_hash({**config, "train": train})


def cell_recipes(spec: "Spec", preset: str) -> dict[tuple[str, str], dict]:
    """(row label, dataset) -> the resolved config of that cell under ``preset`` (seed: the spec's first)."""
    from php_runner.experiment.specs import expand

    placeholders = {"data_root": ".", "clip_weights": "."}  # runtime: not part of the recipe
    runs = expand(spec, preset, list(DATASET_NAMES), list(spec.seeds[:1]), placeholders)
    return {(run.row_label, run.dataset): run.config for run in runs}


@dataclass
class CellFilter:
    """``accept(run, row_label)`` for ``Registry.result_rows``: keeps the runs whose config (seed aside) is
    one of the table's recipes on their dataset, and remembers the others (with the fields that differ
    from their row's recipe), for the note ``table`` prints."""

    recipes: dict[tuple[str, str], dict]
    label: str = ""                        # what the rows are: the table's or a spec's name
    matched: set[int] = field(default_factory=set)
    left_out: dict[int, str] = field(default_factory=dict)   # run id -> why
    _hashes: dict[str, set[str]] = field(default_factory=dict, repr=False)

    def accept(self, run: "RunRecord", row_label: str) -> bool:
        if run.kind == "imported":
            self.matched.add(run.id)
            return True
        expected = self.recipes.get((row_label, run.dataset))
        if recipe_hash(run.config) in self.hashes(run.dataset):  # a recipe of the table, whatever its label
            self.matched.add(run.id)
            return True
        reference = expected or next((config for (_, dataset), config in self.recipes.items()
                                      if dataset == run.dataset), None)
        differences = config_differences(reference or {}, run.config)
        self.left_out[run.id] = f"{run.spec_name} ({differences or f'row {row_label!r} is not in the table'})"
        return False

    def hashes(self, dataset: str) -> set[str]:
        if dataset not in self._hashes:
            self._hashes[dataset] = {recipe_hash(config) for (_, on), config in self.recipes.items() if on == dataset}
        return self._hashes[dataset]

    def summary(self) -> list[str]:
        """One line: runs matched, and the runs left out with why."""
        left = [why for run_id, why in sorted(self.left_out.items()) if run_id not in self.matched]
        line = f"{self.label}: {len(self.matched)} recorded run(s) of this table's recipes"
        if left:
            line += (f"; {len(left)} run(s) of another recipe left out: " + "; ".join(left)
                     + " (php-run table --spec SPEC shows a spec's own runs)")
        return [line]


def config_differences(expected: Mapping[str, Any], actual: Mapping[str, Any], limit: int = 4) -> str:
    """``loss.aux_factor 0.3, train.lr 1e-05``: the recipe fields (seed aside) where ``actual`` differs."""
    differences = []
    for section, values in actual.items():
        if section == "runtime" or not isinstance(values, Mapping):
            continue
        for key, value in values.items():
            if (section, key) != ("train", "seed") and expected.get(section, {}).get(key) != value:
                differences.append(f"{section}.{key} {value}")
    shown = ", ".join(differences[:limit])
    return shown + (f" and {len(differences) - limit} more" if len(differences) > limit else "")
