"""Retrieval metrics against a naive per-query reference written from spec 7 (ties, several positives)."""

from __future__ import annotations

import pytest
import torch

from php_runner.engine.metrics import retrieval_metrics


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
