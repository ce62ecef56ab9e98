"""The paper's reported numbers: ``paper_results.toml`` (package data), loaded and validated once.

Answers "what does the paper report for table T, row R, dataset D, metric M" and which footnotes
(known inconsistencies of the paper's own tables, provenance remarks) belong to a table, a row or a
cell. The tables listed here are also the tables ``php-run table`` renders, including php-run's own
ones (``in_paper = false``: rows, no values).
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from php_runner.data.datasets import DATASET_NAMES
from php_runner.engine.metrics import METRIC_NAMES
from php_runner.errors import InputError
from php_runner.experiment.layers import first_problem

PAPER_RESULTS_FILE = Path(__file__).with_name("paper_results.toml")

DatasetName = Literal[DATASET_NAMES]
MetricName = Literal[METRIC_NAMES]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CellRef(_Strict):
    """A place in a table: a whole table, a row, a row's dataset, or one metric of it."""

    table: str
    row: str | None = None
    dataset: DatasetName | None = None
    metric: MetricName | None = None


class Footnote(_Strict):
    text: str = Field(min_length=1)
    cells: list[CellRef] = Field(min_length=1)

    def applies_to(self, table: str, row: str | None = None, dataset: str | None = None,
                   metric: str | None = None) -> bool:
        """True when one of the note's references is exactly this place (same granularity)."""
        return CellRef(table=table, row=row, dataset=dataset, metric=metric) in self.cells


class PaperRow(_Strict):
    key: str = Field(min_length=1)
    label: str | None = None
    reference: bool = False  # a published competitor method: shown for context, never reproduced
    values: dict[DatasetName, list[float]] = Field(default_factory=dict)

    @property
    def display(self) -> str:
        return self.label or self.key


class PaperTable(_Strict):
    title: str
    source: str
    row_header: str
    in_paper: bool = True
    datasets: list[DatasetName] = Field(min_length=1)
    metrics: list[MetricName] = Field(min_length=1)
    rows: list[PaperRow] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "PaperTable":
        keys = [row.key for row in self.rows]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise ValueError(f"duplicate row keys {', '.join(duplicates)}")
        for row in self.rows:
            if not self.in_paper and row.values:
                raise ValueError(f"row {row.key!r} has values but the table is not in the paper")
            if self.in_paper and set(row.values) != set(self.datasets):
                raise ValueError(f"row {row.key!r} must give values for exactly {', '.join(self.datasets)}")
            for dataset, values in row.values.items():
                if len(values) != len(self.metrics):
                    raise ValueError(f"row {row.key!r}, {dataset}: {len(values)} values for "
                                     f"{len(self.metrics)} metrics ({', '.join(self.metrics)})")
        return self

    def row(self, key: str) -> PaperRow | None:
        return next((row for row in self.rows if row.key == key), None)

    def value(self, row: str, dataset: str, metric: str) -> float | None:
        """The reported value, or None when the paper gives none for this cell."""
        paper_row = self.row(row)
        if paper_row is None or dataset not in paper_row.values or metric not in self.metrics:
            return None
        return paper_row.values[dataset][self.metrics.index(metric)]


class PaperResults(_Strict):
    tables: dict[str, PaperTable] = Field(min_length=1)
    footnotes: list[Footnote] = Field(default_factory=list)

    @model_validator(mode="after")
    def _footnotes_point_somewhere(self) -> "PaperResults":
        for index, note in enumerate(self.footnotes):
            for ref in note.cells:
                table = self.tables.get(ref.table)
                where = f"footnotes[{index}].cells"
                if table is None:
                    raise ValueError(f"{where}: unknown table {ref.table!r}")
                if ref.row is not None and table.row(ref.row) is None:
                    raise ValueError(f"{where}: table {ref.table!r} has no row {ref.row!r}")
                if ref.dataset is not None and ref.dataset not in table.datasets:
                    raise ValueError(f"{where}: table {ref.table!r} has no dataset {ref.dataset!r}")
                if ref.metric is not None and ref.metric not in table.metrics:
                    raise ValueError(f"{where}: table {ref.table!r} has no metric {ref.metric!r}")
        return self

    def table(self, name: str) -> PaperTable:
        if name not in self.tables:
            raise InputError(f"unknown table {name!r}; known tables: {', '.join(self.tables)}")
        return self.tables[name]

    def value(self, table: str, row: str, dataset: str, metric: str) -> float | None:
        """The paper's value for one cell (None where it reports none); unknown table: InputError."""
        return self.table(table).value(row, dataset, metric)

    def footnotes_for(self, table: str, row: str | None = None, dataset: str | None = None,
                      metric: str | None = None) -> list[Footnote]:
        """Footnotes attached exactly at this granularity (table, row, row x dataset, or cell)."""
        return [note for note in self.footnotes if note.applies_to(table, row, dataset, metric)]


def load_paper_results(path: str | Path | None = None) -> PaperResults:
    """Read and validate a paper-results file; None reads the packaged one (cached)."""
    if path is None:
        return _packaged()
    return _load(Path(path), PaperResults)


def paper_value(table: str, row: str, dataset: str, metric: str) -> float | None:
    """The packaged paper value for one cell, or None where the paper reports none."""
    return _packaged().value(table, row, dataset, metric)


def table_names() -> list[str]:
    """Every table php-run renders, in file order (the paper's tables, then php-run's own)."""
    return list(_packaged().tables)


SchemaT = TypeVar("SchemaT", bound=BaseModel)


@lru_cache(maxsize=1)
def _packaged() -> PaperResults:
    return _load(PAPER_RESULTS_FILE, PaperResults)


def _load(path: Path, schema: type[SchemaT]) -> SchemaT:
    """Read the TOML file ``path`` and validate it as ``schema``; bad input is one line naming the field."""
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from None
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        field, message = first_problem(err)
        raise InputError(f"{path}: {field}: {message}" if field else f"{path}: {message}") from None


# ---- the paper's claims (paper_claims.toml) ---------------------------------------------------------

PAPER_CLAIMS_FILE = Path(__file__).with_name("paper_claims.toml")


class ClaimedValues(_Strict):
    row: float
    reference: float


class Claim(_Strict):
    """The paper's claim that ``row`` beats (direction) ``reference`` in ``table`` on ``dataset`` and ``metric``."""

    table: str
    row: str
    reference: str
    dataset: DatasetName
    metric: MetricName
    direction: Literal["higher", "lower"]
    against: Literal["reproduced", "published"]  # published: the reference is another method's number
    paper: ClaimedValues

    @property
    def paper_difference(self) -> float:
        return self.paper.row - self.paper.reference


class PaperClaims(_Strict):
    baselines: dict[str, str]  # table -> its reference row
    claims: list[Claim] = Field(default_factory=list)


def load_paper_claims(path: str | Path | None = None) -> PaperClaims:
    """Read and validate a claims file (None: the packaged ``paper_claims.toml``); bad input names the field."""
    return _load(PAPER_CLAIMS_FILE if path is None else Path(path), PaperClaims)
