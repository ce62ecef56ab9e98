"""Training on the cache pipeline: batches augmented on the device, exact deterministic resume, cached evaluation."""

import dataclasses
import math

import pytest
import torch

import php_runner.engine.step as step_module
import php_runner.engine.train as train_module
from php_runner.data import read_dataset, write_synthetic
from php_runner.data.loaders import CachedTrainBatches
from php_runner.engine.evaluate import EvalSettings, evaluate
from php_runner.engine.train import TrainSettings, train
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel

RECIPE = dict(epochs=2, batch_size=16, lr=5e-4, warmup_epochs=0, precision="amp", img_aug=True,
              test_batch_size=64, device="cpu", num_workers=0, deterministic=True, pipeline="cache")


def _model(seed=0):
    torch.manual_seed(seed)
    return PHPModel(PHPConfig.tiny())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cached")
    write_synthetic(root, "CUHK-PEDES", num_ids=12)
    return read_dataset(root, "CUHK-PEDES")


def test_cache_pipeline_resume_equals_an_uninterrupted_run(dataset, tmp_path, monkeypatch):
    settings = TrainSettings(**RECIPE)
    loaders = []
    real_loader = train_module._train_loader
    monkeypatch.setattr(train_module, "_train_loader", lambda *a, **k: loaders.append(real_loader(*a, **k)) or loaders[-1])
    reference_model = _model()
    reference = train(reference_model, dataset, settings, tmp_path / "reference")
    assert isinstance(loaders[0], CachedTrainBatches)

    steps_per_epoch = math.ceil(len(dataset.train) / settings.batch_size)
    real_losses, calls = step_module.compute_losses, []

    def interrupt_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == steps_per_epoch + 2:
            raise KeyboardInterrupt
        return real_losses(*args, **kwargs)

    monkeypatch.setattr(step_module, "compute_losses", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), dataset, settings, tmp_path / "resumed")
    monkeypatch.setattr(step_module, "compute_losses", real_losses)
    resumed_model = _model(seed=5)
    resumed = train(resumed_model, dataset, settings, tmp_path / "resumed")
    # Epochs restored from last.pth carry no per-query outcomes (the registry keeps them).
    strip = lambda history: [dataclasses.replace(record, seconds=0, outcomes={}) for record in history]  # noqa: E731
    assert strip(resumed.history) == strip(reference.history)
    reference_state, resumed_state = reference_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(reference_state[key], resumed_state[key]) for key in reference_state)

    # In-training evaluation read the cache; its metrics equal evaluation from the image files.
    files = evaluate(reference_model, dataset.test, EvalSettings(batch_size=settings.batch_size, precision="amp",
                                                                 image_size=reference_model.config.clip.image_size))
    assert reference.history[-1].metrics["test"] == files


def test_pipeline_is_part_of_the_recipe_and_validated():
    # Same recipe, other pipeline: a different experiment (train.pipeline is part of the recipe).
    assert "pipeline" in TrainSettings(**RECIPE).recipe()
    with pytest.raises(Exception, match="train.pipeline"):
        TrainSettings(**{**RECIPE, "pipeline": "gpu"})
