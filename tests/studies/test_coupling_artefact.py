"""The coupling artefact, end to end on CPU: a tiny PHP model trained briefly with the real training
loop on a synthetic ICFG-format set, then audited with the batch-size sweep.

With official coupling, annotation-order evaluation batches hold one person each (8 images of one
identity per batch of 8, one caption per image), so the batch-mixing EFP attention lets a query see
its match's batch: ordered R1 must beat shuffled R1. With per-sample coupling no embedding depends on
its batch-mates, so ordered and shuffled metrics must be equal exactly, at every batch size.
"""

from __future__ import annotations

import pytest
import torch

from php_runner.data import TestSplitSize, read_dataset, write_synthetic
from php_runner.engine import audit_measures
from php_runner.engine.audit_measures import AuditSettings
from php_runner.engine.evaluate import EvalSettings
from php_runner.engine.train import TrainSettings, seed_everything, train
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel

IMAGES_PER_ID = 8  # = the evaluation batch below: each ordered batch is one identity
EVAL_BATCH = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def icfg_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("icfg-small")
    write_synthetic(root, "ICFG-PEDES", num_ids=24, seed=0,
                    test=TestSplitSize(identities=6, images_per_identity=IMAGES_PER_ID, captions_per_image=1))
    return read_dataset(root, "ICFG-PEDES")


def _trained(dataset, coupling: str, run_dir):
    seed_everything(1)
    model = PHPModel(PHPConfig.tiny(coupling=coupling))
    settings = TrainSettings(epochs=6, batch_size=8, lr=1e-3, warmup_epochs=0, img_aug=False, precision="amp",
                             deterministic=True, device="cpu", num_workers=0, eval_period=6,
                             test_batch_size=EVAL_BATCH, seed=1)
    train(model, dataset, settings, run_dir)
    return model


def _settings():
    return AuditSettings(eval=EvalSettings(batch_size=EVAL_BATCH, precision="amp", image_size=(48, 24)),
                         train_batch_size=8, seeds=2, sweep_seeds=1, hash_workers=2)


@pytest.mark.slow
def test_official_coupling_scores_higher_in_annotation_order(icfg_small, tmp_path):
    model = _trained(icfg_small, "official", tmp_path)
    sweep = audit_measures.batch_size_sweep(model, icfg_small.test, _settings(), batch_sizes=(1, EVAL_BATCH))
    ordered, shuffled = sweep["ordered"][str(EVAL_BATCH)]["R1"], sweep["shuffled"][str(EVAL_BATCH)]["R1"]
    assert ordered > shuffled


@pytest.mark.slow
def test_per_sample_coupling_scores_the_same_in_any_order(icfg_small, tmp_path):
    model = _trained(icfg_small, "per-sample", tmp_path)
    sweep = audit_measures.batch_size_sweep(model, icfg_small.test, _settings(), batch_sizes=(1, EVAL_BATCH, 32))
    for size in (str(EVAL_BATCH), "32"):
        assert sweep["shuffled"][size]["runs"][0] == sweep["ordered"][size]
        assert sweep["r1_gap"][size] == 0.0
