"""What a released tree of the PHP authors' checkpoints holds (spec 8).

A released tree is laid out as ``logs/<dataset>/<folder>/{best.pth, configs.yaml}``; the folder name
says which paper table cell the checkpoint fills (``interpret_folder``). ``discover`` lists the run
folders of a tree, ``assign_headline`` gives one run per dataset the headline cells.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from php_runner.data import DATASET_NAMES
from php_runner.errors import InputError

CHECKPOINT_NAME = "best.pth"
YAML_NAME = "configs.yaml"
PAPER_CNUM = 9

# Folder-name patterns of spec 8. NS runs come from Correction's train_ns.py, which names its output
# <YYYYmmdd_HHMMSS>_<name>_ns; the README shortens that to <date>_php_ns, so the time is optional.
LOSS_FOLDERS = ("itc+aux", "sdm+aux", "sdm+itc+aux")
CNUM_FOLDER = re.compile(r"^sdm\+itc\+aux_cnum(\d+)$")
MODULE_FOLDER = re.compile(r"^ablation_(base|crfm|efp)$")
NS_FOLDER = re.compile(r"^\d{8}(_\d{6})?_.+_ns$")


@dataclass(frozen=True)
class Cell:
    """One row of one table, with the table and row keys of ``paper_results.toml``."""

    table: str
    row: str


# Every table's headline row is the paper configuration (sdm+itc+aux, cnum 9, beta 0.5, shared); one
# released checkpoint per dataset fills the rows that have no folder of their own.
HEADLINE_CELLS = (Cell("headline", "PHP"), Cell("module", "full"), Cell("sharing", "shared"), Cell("beta", "0.5"))


class UnknownFolderError(InputError):
    """A run folder whose name follows none of the released naming conventions."""


@dataclass(frozen=True)
class FolderMeaning:
    """What a released folder name says about its checkpoint."""

    encoder: str  # full | base | crfm | efp: the encoder pair the official evaluation used
    sharing: str  # shared | separate
    cells: tuple[Cell, ...]  # the cells of the folder's own table
    loss_names: frozenset[str] | None = None  # None where the name says nothing about the losses
    cnum: int | None = None  # None where the name says nothing about cnum
    headline_rank: int | None = None  # lower wins the headline cells; None: never the headline
    php_run: dict | None = field(default=None, compare=False)  # a php-run folder's identity (its yaml's php_run)


def interpret_folder(name: str) -> FolderMeaning:
    """The cell, encoder and implied settings of a released folder name (spec 8); unknown names raise."""
    if name in LOSS_FOLDERS:
        losses = frozenset(name.split("+"))
        # The unsuffixed sdm+itc+aux run is the headline only where no _cnum9 run exists (spec 8:
        # _cnum9 is the SOTA-table model).
        rank = 1 if name == "sdm+itc+aux" else None
        return FolderMeaning("full", "shared", (Cell("loss", name),), losses, PAPER_CNUM, rank)
    match = CNUM_FOLDER.match(name)
    if match:
        cnum = int(match.group(1))
        return FolderMeaning(
            "full", "shared", (Cell("cnum", str(cnum)),), frozenset({"sdm", "itc", "aux"}), cnum,
            0 if cnum == PAPER_CNUM else None,
        )
    match = MODULE_FOLDER.match(name)
    if match:
        return FolderMeaning(match.group(1), "shared", (Cell("module", match.group(1)),))
    if NS_FOLDER.match(name):
        return FolderMeaning("full", "separate", (Cell("sharing", "separate"),))
    raise UnknownFolderError(
        f"folder {name!r}: not a released run name (itc+aux, sdm+aux, sdm+itc+aux, sdm+itc+aux_cnumN, "
        "ablation_base|crfm|efp, <date>[_<time>]_<name>_ns)"
    )


# ----------------------------------------------------------------------------------------------
# Discovery



def interpret_run_folder(folder: Path) -> FolderMeaning:
    """A php-run run folder by the ``php_run`` section of its configs.yaml (its name is free), else a
    released one by its name (``interpret_folder``)."""
    from php_runner.interop.official_config import php_run_identity
    from php_runner.model.checkpoint import read_official_yaml

    try:
        identity = php_run_identity(read_official_yaml(folder / YAML_NAME))
    except InputError:  # a broken yaml is reported when the folder is imported, as for released folders
        identity = None
    if identity is None:
        return interpret_folder(folder.name)
    model = identity["config"]["model"]
    cell = Cell(str(identity.get("table") or identity["spec"]), str(identity["row"]))
    return FolderMeaning(model["variant"], model["sharing"], (cell,), php_run=identity)

@dataclass(frozen=True)
class ReleasedRun:
    """One run folder of a released tree."""

    dataset: str
    folder: Path
    meaning: FolderMeaning

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.folder.name}"


@dataclass(frozen=True)
class Skipped:
    """A folder that was not imported, and why."""

    label: str
    reason: str


def discover(
    logs_dir: str | Path, datasets: Sequence[str] | None = None
) -> tuple[list[ReleasedRun], list[Skipped]]:
    """Every ``<dataset>/<folder>`` below ``logs_dir`` holding a ``best.pth`` or a ``configs.yaml``.

    Folders outside ``datasets`` (when given) are left out silently; folders under a parent that is
    not a dataset name, without both files, or with an unknown name are returned as skipped.
    """
    root = Path(logs_dir)
    if not root.is_dir():
        raise InputError(f"LOGS_DIR {root}: not a folder")
    for name in datasets or ():
        if name not in DATASET_NAMES:
            raise InputError(f"--datasets: unknown dataset {name!r}; expected {', '.join(DATASET_NAMES)}")
    folders = sorted({path.parent for marker in (CHECKPOINT_NAME, YAML_NAME) for path in root.rglob(marker)})
    if not folders:
        raise InputError(f"LOGS_DIR {root}: no {CHECKPOINT_NAME} or {YAML_NAME} anywhere below it")
    found, skipped = [], []
    for folder in folders:
        dataset = folder.parent.name
        label = f"{dataset}/{folder.name}"
        if datasets and dataset not in datasets:
            continue
        if dataset not in DATASET_NAMES:
            skipped.append(Skipped(str(folder), f"parent folder {dataset!r} is not a dataset name "
                                                f"({', '.join(DATASET_NAMES)})"))
            continue
        missing = [name for name in (CHECKPOINT_NAME, YAML_NAME) if not (folder / name).is_file()]
        if missing:
            skipped.append(Skipped(label, f"no {' and no '.join(missing)}"))
            continue
        try:
            found.append(ReleasedRun(dataset, folder, interpret_run_folder(folder)))
        except UnknownFolderError as err:
            skipped.append(Skipped(label, str(err)))
    return found, skipped


def assign_headline(runs: Sequence[ReleasedRun]) -> dict[ReleasedRun, tuple[Cell, ...]]:
    """The cells each run fills: its own, plus the headline cells for one run per dataset."""
    cells = {run: run.meaning.cells for run in runs}
    by_dataset: dict[str, list[ReleasedRun]] = {}
    for run in runs:
        if run.meaning.headline_rank is not None:
            by_dataset.setdefault(run.dataset, []).append(run)
    for candidates in by_dataset.values():
        chosen = min(candidates, key=lambda run: run.meaning.headline_rank)
        cells[chosen] = chosen.meaning.cells + HEADLINE_CELLS
    return cells
