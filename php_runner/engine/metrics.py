"""Retrieval metrics R1/R5/R10, mAP and mINP with the official definitions (spec 7), via per-query outcomes.

Every metric is a mean over queries of a per-query value, so the metrics are computed in two steps:
``query_outcomes`` ranks the gallery for each query and keeps, per query, the 1-based rank of the
first correct match, the average precision and the inverse negative penalty (INP, whose mean is
mINP), with the query's identity; ``metrics_from_outcomes`` averages them. ``retrieval_metrics`` is
the composition of the two, so a run's stored outcomes reproduce its recorded metrics exactly, and
statistics over resampled queries (``engine/significance.py``) start from the same numbers.

Ranking is vectorised on the similarity matrix's device and chunked over queries, so memory is bounded
by ``chunk_size x gallery`` whatever the number of queries. It uses a *stable* descending sort: among
equal similarities the lower gallery index ranks first. The official code uses torch's default
(non-stable) sort, which leaves the order of ties to the sort implementation; a stable sort makes ties
deterministic and agrees with it whenever there are no ties.

Averages are exactly rounded sums (``math.fsum``) divided by the number of queries, so a metric does not
depend on the device, the chunking or the summation order.

Image-to-text retrieval is the same call on the transposed matrix:
``retrieval_metrics(similarity.t(), gallery_pids, query_pids)``.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from php_runner.errors import InputError

CMC_RANKS = (1, 5, 10)
METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")


@dataclass(frozen=True, eq=False)
class QueryOutcomes:
    """Per-query results of one evaluation, parallel arrays in query order.

    ``first_rank`` (int32): 1-based rank of the first correct gallery item; ``average_precision`` and
    ``inverse_negative_penalty`` (float64, fractions in (0, 1]); ``query_pid`` (int64): the query's identity.
    """

    first_rank: np.ndarray
    average_precision: np.ndarray
    inverse_negative_penalty: np.ndarray
    query_pid: np.ndarray

    def __post_init__(self) -> None:
        for name, dtype in _FIELDS.items():
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != 1:
                raise ValueError(f"QueryOutcomes.{name} must be a 1-D {np.dtype(dtype).name} array")
        if len({getattr(self, name).shape for name in _FIELDS}) != 1 or len(self) == 0:
            raise ValueError("QueryOutcomes arrays must be non-empty and of one length")

    def __len__(self) -> int:
        return int(self.first_rank.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QueryOutcomes):
            return NotImplemented
        return all(np.array_equal(getattr(self, name), getattr(other, name)) for name in _FIELDS)

    def to_bytes(self) -> bytes:
        """A compressed ``.npz`` archive of the four arrays (no pickled objects)."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{name: getattr(self, name) for name in _FIELDS})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "per-query outcomes") -> "QueryOutcomes":
        """Read what ``to_bytes`` wrote; anything else is an ``InputError`` naming ``source``."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                if set(archive.files) != set(_FIELDS):
                    raise InputError(f"{source}: expected arrays {', '.join(_FIELDS)}, found {', '.join(archive.files)}")
                arrays = {name: archive[name] for name in _FIELDS}
            return cls(**arrays)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise InputError(f"{source}: not a per-query outcomes archive ({err})") from None


_FIELDS = {
    "first_rank": np.int32,
    "average_precision": np.float64,
    "inverse_negative_penalty": np.float64,
    "query_pid": np.int64,
}


def query_outcomes(similarity: Tensor, query_pids: Tensor, gallery_pids: Tensor, chunk_size: int = 1024) -> QueryOutcomes:
    """Per-query outcomes of ranking the gallery (columns) for each query (rows of ``similarity``).

    Every query needs at least one matching gallery item (AP and INP are undefined otherwise).
    """
    _check_shapes(similarity, query_pids, gallery_pids, chunk_size)
    num_queries, num_gallery = similarity.shape
    device = similarity.device
    query_pids = query_pids.reshape(-1).to(device)
    gallery_pids = gallery_pids.reshape(-1).to(device)
    positions = torch.arange(1, num_gallery + 1, device=device, dtype=torch.float32)
    first_rank = torch.empty(num_queries, device=device, dtype=torch.int32)
    average_precision = torch.empty(num_queries, device=device, dtype=torch.float64)
    inverse_negative_penalty = torch.empty(num_queries, device=device, dtype=torch.float64)
    for start in range(0, num_queries, chunk_size):
        scores = similarity[start : start + chunk_size]
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        matches = gallery_pids[order] == query_pids[start : start + chunk_size, None]
        num_relevant = matches.sum(dim=1)
        if bool((num_relevant == 0).any()):
            first = start + int((num_relevant == 0).nonzero()[0])
            raise ValueError(f"query {first} has no matching gallery item; AP and mINP are undefined")
        rows = slice(start, start + scores.shape[0])
        first_rank[rows] = (matches.to(torch.uint8).argmax(dim=1) + 1).to(torch.int32)  # argmax: first maximum
        hits_so_far = matches.cumsum(dim=1, dtype=torch.float32)  # exact: counts stay below 2**24
        average_precision[rows] = ((hits_so_far / positions) * matches).sum(dim=1).double() / num_relevant
        last_match = (matches * positions).amax(dim=1)  # 1-based position of the last relevant item
        inverse_negative_penalty[rows] = num_relevant.double() / last_match.double()
    return QueryOutcomes(
        first_rank=first_rank.cpu().numpy(),
        average_precision=average_precision.cpu().numpy(),
        inverse_negative_penalty=inverse_negative_penalty.cpu().numpy(),
        query_pid=query_pids.cpu().to(torch.int64).numpy(),
    )


def metrics_from_outcomes(outcomes: QueryOutcomes) -> dict[str, float]:
    """``{"R1", "R5", "R10", "mAP", "mINP"}`` as percentages (python floats) of stored per-query outcomes."""
    num_queries = len(outcomes)
    metrics = {f"R{k}": 100.0 * float(np.count_nonzero(outcomes.first_rank <= k)) / num_queries for k in CMC_RANKS}
    metrics["mAP"] = 100.0 * (math.fsum(outcomes.average_precision.tolist()) / num_queries)
    metrics["mINP"] = 100.0 * (math.fsum(outcomes.inverse_negative_penalty.tolist()) / num_queries)
    return metrics


def metric_values(values: dict) -> dict[str, float]:
    """The five metrics of an evaluation result (or a stored row with more keys) as python floats."""
    return {name: float(values[name]) for name in METRIC_NAMES}


def retrieval_metrics(
    similarity: Tensor, query_pids: Tensor, gallery_pids: Tensor, max_rank: int = 10, chunk_size: int = 1024
) -> dict[str, float]:
    """``{"R1", "R5", "R10", "mAP", "mINP"}`` as percentages; rows of ``similarity`` are queries.

    ``max_rank`` is the official CMC depth; it must reach 10 for R10. mAP and mINP use the full ranking.
    Equal to ``metrics_from_outcomes(query_outcomes(similarity, query_pids, gallery_pids))``.
    """
    if max_rank < max(CMC_RANKS):
        raise ValueError(f"max_rank must be at least {max(CMC_RANKS)}, got {max_rank}")
    return metrics_from_outcomes(query_outcomes(similarity, query_pids, gallery_pids, chunk_size))


def _check_shapes(similarity: Tensor, query_pids: Tensor, gallery_pids: Tensor, chunk_size: int) -> None:
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be 2-D, got shape {tuple(similarity.shape)}")
    num_queries, num_gallery = similarity.shape
    if query_pids.numel() != num_queries or gallery_pids.numel() != num_gallery:
        raise ValueError(
            f"pids do not match similarity {tuple(similarity.shape)}: "
            f"{query_pids.numel()} query pids, {gallery_pids.numel()} gallery pids"
        )
    if num_queries == 0 or chunk_size < 1:
        raise ValueError("need at least one query and a positive chunk_size")
