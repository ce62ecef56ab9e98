"""Retrieval metrics and per-query outcomes against a naive per-query reference written from spec 7
(ties, several positives), against the former all-in-one implementation, and their storage."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from php_runner.engine.metrics import QueryOutcomes, metrics_from_outcomes, query_outcomes, retrieval_metrics
from php_runner.errors import InputError


def naive_metrics(similarity, query_pids, gallery_pids):
    """One query at a time; ties broken by gallery index (the stable order)."""
    sums = {"R1": 0.0, "R5": 0.0, "R10": 0.0, "mAP": 0.0, "mINP": 0.0}
    rows = similarity.tolist()
    for scores, pid in zip(rows, query_pids.tolist()):
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        matches = [gallery_pids[j].item() == pid for j in order]
        for k in (1, 5, 10):
            sums[f"R{k}"] += any(matches[:k])
        hits, precision_sum = 0, 0.0
        for rank, match in enumerate(matches):
            if match:
                hits += 1
                precision_sum += hits / (rank + 1)
        sums["mAP"] += precision_sum / hits
        last = max(rank for rank, match in enumerate(matches) if match)
        sums["mINP"] += hits / (last + 1)
    return {key: 100.0 * value / len(rows) for key, value in sums.items()}


def _problem(num_queries, num_gallery, num_ids, seed, levels=None):
    generator = torch.Generator().manual_seed(seed)
    gallery_pids = torch.randint(0, num_ids, (num_gallery,), generator=generator)
    gallery_pids[:num_ids] = torch.arange(num_ids)  # every identity present, several positives on average
    query_pids = gallery_pids[torch.randint(0, num_gallery, (num_queries,), generator=generator)]
    if levels is None:
        similarity = torch.randn(num_queries, num_gallery, generator=generator)
    else:  # few distinct values: many ties
        similarity = torch.randint(0, levels, (num_queries, num_gallery), generator=generator).float() / levels
    return similarity, query_pids, gallery_pids


@pytest.mark.parametrize("levels", [None, 3, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_reference_with_ties_and_several_positives(levels, seed):
    similarity, query_pids, gallery_pids = _problem(40, 60, 12, seed, levels)
    result = retrieval_metrics(similarity, query_pids, gallery_pids)
    expected = naive_metrics(similarity, query_pids, gallery_pids)
    assert result.keys() == expected.keys()
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-5), key


@pytest.mark.parametrize("chunk_size", [1, 7, 39, 40, 1000])
def test_chunked_equals_unchunked(chunk_size):
    similarity, query_pids, gallery_pids = _problem(40, 60, 12, 3, levels=5)
    whole = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=10_000)
    assert retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=chunk_size) == whole


def test_image_to_text_is_the_transposed_call():
    similarity, query_pids, gallery_pids = _problem(30, 30, 10, 4)
    result = retrieval_metrics(similarity.t(), gallery_pids, query_pids)
    expected = naive_metrics(similarity.t(), gallery_pids, query_pids)
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-5)


def test_golden_values():
    similarity = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.9, 0.2, 0.9]])
    query_pids, gallery_pids = torch.tensor([1, 2]), torch.tensor([5, 1, 2, 1])
    # query 0 ranks pids 5,1,2,1: hits at ranks 2 and 4 -> AP (1/2 + 2/4)/2 = 0.5, INP 2/4.
    # query 1 ranks (tie 1,3 kept in index order) 1,1,2,5: hit at rank 3 -> AP 1/3, INP 1/3.
    result = retrieval_metrics(similarity, query_pids, gallery_pids)
    assert result["R1"] == 0.0 and result["R5"] == 100.0 and result["R10"] == 100.0
    assert result["mAP"] == pytest.approx(100 * (0.5 + 1 / 3) / 2)
    assert result["mINP"] == pytest.approx(100 * (0.5 + 1 / 3) / 2)


def test_ties_are_resolved_by_gallery_index():
    similarity = torch.zeros(1, 5)
    assert retrieval_metrics(similarity, torch.tensor([7]), torch.tensor([7, 0, 0, 0, 0]))["R1"] == 100.0
    assert retrieval_metrics(similarity, torch.tensor([7]), torch.tensor([0, 7, 0, 0, 0]))["R1"] == 0.0


def test_bad_inputs_are_errors():
    similarity, query_pids, gallery_pids = _problem(5, 12, 4, 5)
    with pytest.raises(ValueError):
        retrieval_metrics(similarity, query_pids[:-1], gallery_pids)
    with pytest.raises(ValueError):
        retrieval_metrics(similarity, query_pids, gallery_pids, max_rank=5)
    with pytest.raises(ValueError):
        retrieval_metrics(similarity, torch.full((5,), 99), gallery_pids)


def test_results_are_python_floats_percentages():
    similarity, query_pids, gallery_pids = _problem(8, 20, 5, 6)
    result = retrieval_metrics(similarity.double(), query_pids, gallery_pids)
    assert all(isinstance(v, float) and 0.0 <= v <= 100.0 for v in result.values())


def naive_outcomes(similarity, query_pids, gallery_pids):
    """(first rank, AP, INP) of each query, one query at a time, ties broken by gallery index."""
    outcomes = []
    for scores, pid in zip(similarity.tolist(), query_pids.tolist()):
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        matches = [gallery_pids[j].item() == pid for j in order]
        first = matches.index(True) + 1
        hits, precision_sum = 0, 0.0
        for rank, match in enumerate(matches):
            if match:
                hits += 1
                precision_sum += hits / (rank + 1)
        last = max(rank for rank, match in enumerate(matches) if match) + 1
        outcomes.append((first, precision_sum / hits, hits / last))
    return outcomes


def former_retrieval_metrics(similarity, query_pids, gallery_pids):
    """The implementation before per-query outcomes existed (torch float64 means), kept as a reference."""
    positions = torch.arange(1, similarity.shape[1] + 1, dtype=torch.float32)
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    matches = gallery_pids[order] == query_pids[:, None]
    num_relevant = matches.sum(dim=1)
    hits = {k: float(matches[:, :k].any(dim=1).sum().double()) for k in (1, 5, 10)}
    hits_so_far = matches.cumsum(dim=1, dtype=torch.float32)
    average_precision = ((hits_so_far / positions) * matches).sum(dim=1).double() / num_relevant
    inverse_negative_penalty = num_relevant.double() / (matches * positions).amax(dim=1).double()
    metrics = {f"R{k}": 100.0 * hits[k] / similarity.shape[0] for k in (1, 5, 10)}
    metrics["mAP"] = 100.0 * float(average_precision.mean())
    metrics["mINP"] = 100.0 * float(inverse_negative_penalty.mean())
    return metrics


@pytest.mark.parametrize("levels", [None, 2, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_outcomes_match_naive_per_query_reference(levels, seed):
    similarity, query_pids, gallery_pids = _problem(40, 60, 12, seed, levels)
    outcomes = query_outcomes(similarity, query_pids, gallery_pids, chunk_size=16)
    expected = naive_outcomes(similarity, query_pids, gallery_pids)
    assert outcomes.first_rank.tolist() == [first for first, _, _ in expected]
    np.testing.assert_allclose(outcomes.average_precision, [ap for _, ap, _ in expected], rtol=1e-6)
    np.testing.assert_array_equal(outcomes.inverse_negative_penalty, [inp for _, _, inp in expected])
    assert outcomes.query_pid.tolist() == query_pids.tolist()


@pytest.mark.parametrize(("num_queries", "num_gallery", "num_ids", "levels"),
                         [(1, 5, 2, None), (40, 60, 12, 3), (300, 200, 50, 4), (1500, 400, 100, None)])
@pytest.mark.parametrize("seed", [0, 7])
def test_outcomes_reproduce_retrieval_metrics_exactly(num_queries, num_gallery, num_ids, levels, seed):
    similarity, query_pids, gallery_pids = _problem(num_queries, num_gallery, num_ids, seed, levels)
    metrics = retrieval_metrics(similarity, query_pids, gallery_pids)
    stored = QueryOutcomes.from_bytes(query_outcomes(similarity, query_pids, gallery_pids).to_bytes())
    assert metrics_from_outcomes(stored) == metrics  # exact, after a round trip through storage
    naive = naive_metrics(similarity, query_pids, gallery_pids)
    assert all(metrics[key] == naive[key] for key in ("R1", "R5", "R10"))  # same count / same division
    former = former_retrieval_metrics(similarity, query_pids, gallery_pids)
    assert all(metrics[key] == former[key] for key in ("R1", "R5", "R10"))
    # mAP/mINP: the former torch mean summed in another order; fsum is the exactly rounded sum.
    for key in ("mAP", "mINP"):
        assert metrics[key] == pytest.approx(former[key], rel=1e-13, abs=0), key


def test_outcomes_do_not_depend_on_chunking():
    similarity, query_pids, gallery_pids = _problem(50, 40, 10, 8, levels=3)
    whole = query_outcomes(similarity, query_pids, gallery_pids, chunk_size=10_000)
    for chunk_size in (1, 7, 49):
        assert query_outcomes(similarity, query_pids, gallery_pids, chunk_size=chunk_size) == whole


def test_outcome_dtypes_and_storage_round_trip():
    similarity, query_pids, gallery_pids = _problem(30, 40, 10, 9)
    outcomes = query_outcomes(similarity, query_pids.int(), gallery_pids.int())
    assert (outcomes.first_rank.dtype, outcomes.average_precision.dtype) == (np.int32, np.float64)
    assert (outcomes.inverse_negative_penalty.dtype, outcomes.query_pid.dtype) == (np.float64, np.int64)
    data = outcomes.to_bytes()
    assert data[:2] == b"PK" and QueryOutcomes.from_bytes(data) == outcomes


def test_stored_outcomes_that_are_not_outcomes_are_input_errors():
    with pytest.raises(InputError, match="run 3"):
        QueryOutcomes.from_bytes(b"not an archive", source="run 3")
    buffer = io.BytesIO()
    np.savez(buffer, first_rank=np.array([{"code": 1}], dtype=object))  # would need pickle to read
    with pytest.raises(InputError, match="run 3"):
        QueryOutcomes.from_bytes(buffer.getvalue(), source="run 3")
    buffer = io.BytesIO()
    np.savez(buffer, first_rank=np.ones(2, np.int32), average_precision=np.ones(2), inverse_negative_penalty=np.ones(2),
             query_pid=np.ones(3, np.int64))
    with pytest.raises(InputError, match="one length"):
        QueryOutcomes.from_bytes(buffer.getvalue())
