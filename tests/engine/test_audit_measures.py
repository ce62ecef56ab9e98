"""Tests of php_runner/engine/audit_measures.py: batch probes, batch alignment, chance R1, the evaluation memo."""

from __future__ import annotations

import random

import pytest
import torch

from php_runner.engine import audit_measures
from php_runner.engine.evaluate import EvalSettings
from php_runner.engine.metrics import METRIC_NAMES


# ----------------------------------------------------------------------------------------------
# pure pieces


def test_relative_change_matches_naive_formula():
    reference = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    changed = torch.tensor([[3.0, 5.0], [1.0, 0.0]])
    assert audit_measures.relative_change(changed, reference).tolist() == pytest.approx([1 / 5, 0.0])


@pytest.mark.parametrize("index,total,size,expected", [(0, 10, 4, [0, 1, 2, 3]), (5, 10, 4, [4, 5, 6, 7]),
                                                       (9, 10, 4, [8, 9]), (3, 4, 64, [0, 1, 2, 3])])
def test_evaluation_batch_is_the_annotation_order_batch(index, total, size, expected):
    assert audit_measures.evaluation_batch(index, total, size) == expected


def test_other_batch_avoids_the_evaluation_batch_when_it_can():
    rng = random.Random(0)
    mates = audit_measures.other_batch(5, 4, 20, {4, 5, 6, 7}, rng)
    assert mates[0] == 5 and len(mates) == 4 and len(set(mates)) == 4
    assert not set(mates[1:]) & {4, 5, 6, 7}
    # Too few others outside the batch: falls back to any other item.
    assert sorted(audit_measures.other_batch(1, 3, 3, {0, 1, 2}, rng)) == [0, 1, 2]


def _rows(indices):
    return torch.tensor([[float(i), float(i * i % 7) + 1.0] for i in indices])


def test_probe_finds_no_change_for_a_per_row_encoder():
    figures = audit_measures.probe_batch_dependence(lambda idx: _rows(idx), 10, 4, [0, 5, 9], random.Random(0))
    assert figures == {"alone": {"max": 0.0, "mean": 0.0}, "other_batch": {"max": 0.0, "mean": 0.0}}


def test_probe_measures_a_batch_mean_coupling():
    def coupled(indices):
        rows = _rows(indices)
        return rows + rows.mean(dim=0, keepdim=True)

    figures = audit_measures.probe_batch_dependence(coupled, 12, 4, [1, 6], random.Random(0))
    # Alone, a row is 2x; in its evaluation batch it is x + the batch mean (naive formula below).
    expected = []
    for index, batch in ((1, [0, 1, 2, 3]), (6, [4, 5, 6, 7])):
        rows = _rows(batch)
        in_batch = rows[batch.index(index)] + rows.mean(dim=0)
        expected.append(float((2 * rows[batch.index(index)] - in_batch).norm() / in_batch.norm()))
    assert figures["alone"]["max"] == pytest.approx(max(expected), rel=1e-6)
    assert figures["alone"]["mean"] == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert figures["other_batch"]["max"] > 0


def test_mean_and_std_over_runs():
    runs = [dict.fromkeys(METRIC_NAMES, 10.0), dict.fromkeys(METRIC_NAMES, 20.0)]
    summary = audit_measures.mean_and_std(runs)
    assert summary["R1"] == 15.0 and summary["std"]["mAP"] == pytest.approx(7.0710678)
    assert audit_measures.mean_and_std(runs[:1])["std"]["R1"] == 0.0


def test_batch_alignment_of_one_caption_per_image_in_file_order():
    from php_runner.data import EvalSplit

    pids = [0, 0, 1, 1, 2, 2, 3, 3, 4]
    aligned = EvalSplit(image_pids=pids, img_paths=[f"{i}.jpg" for i in pids], caption_pids=pids, captions=["c"] * 9)
    assert audit_measures.batch_alignment(aligned, 4) == {
        "batch_size": 4, "queries_with_match_in_same_batch": 1.0, "identical_batches": 1.0}
    # Two captions per image shift the text batches: the last identity's captions sit in a batch
    # index that has no image batch.
    doubled = EvalSplit(image_pids=[0, 1], img_paths=["a", "b"], caption_pids=[0, 0, 1, 1], captions=["c"] * 4)
    result = audit_measures.batch_alignment(doubled, 2)
    assert result["queries_with_match_in_same_batch"] == 0.5 and result["identical_batches"] == 0.0


def test_chance_r1_over_the_gallery_and_inside_the_same_index_batch():
    from php_runner.data import EvalSplit

    # Images 0 0 1 1 | 2 2 3 3 | 4 4, one caption per image: 2 matches of 10 in the gallery, 2 of 4 (or of 2) in batch.
    pids = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    split = EvalSplit(image_pids=pids, img_paths=[str(i) for i in range(10)], caption_pids=pids, captions=["c"] * 10)
    chance = audit_measures.chance_r1(split, 4)
    assert chance["gallery"] == pytest.approx(20.0)
    assert chance["same_batch"] == pytest.approx(100 * (8 * 2 / 4 + 2 * 2 / 2) / 10)
    # A caption in a batch index with no image batch can only be found by chance over the gallery.
    extra = EvalSplit(image_pids=[0], img_paths=["a"], caption_pids=[0, 0], captions=["c", "c"])
    assert audit_measures.chance_r1(extra, 1) == {"gallery": 100.0, "same_batch": 50.0, "batch_size": 1}


def test_evaluations_run_each_setting_once(monkeypatch):
    calls = []

    def fake_evaluate(model, split, settings, outcomes=False):
        calls.append((settings.order, settings.seed, settings.batch_size))
        assert outcomes  # the audit keeps each evaluation's per-query outcomes for the registry
        return dict.fromkeys(METRIC_NAMES, float(len(calls))), len(calls)

    monkeypatch.setattr(audit_measures, "evaluate", fake_evaluate)
    evaluations = audit_measures.Evaluations(None, None, EvalSettings(batch_size=4, seed=7))
    first = evaluations.metrics()
    assert evaluations.metrics(seed=3) is first and evaluations.metrics(batch_size=4) is first
    evaluations.metrics("shuffled", 1)
    evaluations.metrics("shuffled", 1)
    evaluations.metrics("shuffled", 2, 8)
    assert calls == [("annotation", 0, 4), ("shuffled", 1, 4), ("shuffled", 2, 8)]
    assert evaluations.base_batch_outcomes() == {("annotation", 0): 1, ("shuffled", 1): 2}  # base batch size only
