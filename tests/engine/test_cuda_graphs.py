"""``cuda_graphs``: the fast regime's forward + losses as one compiled region (CUDA graphs on CUDA), static
shapes with the partial last batch a second shape, against the eager step; refused for ``official``."""

import math

import pytest
import torch
from torch import nn

import php_runner.engine.step as step_module
from php_runner.data import read_dataset, write_synthetic
from php_runner.engine.benchmark import BenchSizes, training_samples_per_s
from php_runner.engine.step import TrainingStep, forward_losses
from php_runner.engine.train import (
    TrainSettings,
    build_training_optimizer,
    prepare_training_model,
    train,
)
from php_runner.errors import InputError
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel

# Full batches of 8 and a partial one of 5 (a last batch the official loader keeps), interleaved as in epochs.
SIZES = (8, 5, 8, 5)
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(seed=0):
    """The tiny model with dropout off: compiled dropout draws its masks from another generator."""
    torch.manual_seed(seed)
    model = PHPModel(PHPConfig.tiny())
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _batch(config, size, seed):
    """Images, captions (end-of-text at position 12) and identities shared two by two, as in training."""
    generator = torch.Generator().manual_seed(seed)
    caption_ids = torch.randint(1, 400, (size, config.clip.context_length), generator=generator)
    caption_ids[:, 12] = config.clip.vocab_size - 1
    return {"pids": torch.arange(size) // 2, "caption_ids": caption_ids,
            "images": torch.randn(size, 3, *config.clip.image_size, generator=generator)}


def _trajectory(cuda_graphs: bool, device: str, sizes=SIZES):
    """Losses of every step and the final parameters of a few amp steps, eager or with the compiled region."""
    settings = TrainSettings(precision="amp", lr=1e-3, cuda_graphs=cuda_graphs, device=device)
    model = prepare_training_model(_model(), settings, device)
    step = TrainingStep(model, build_training_optimizer(model, settings), settings, device)
    model.train()
    losses = []
    for seed, size in enumerate(sizes):
        # Cloned at once: a graph's outputs are overwritten by its next replay.
        losses.append({name: value.detach().clone() for name, value in step(_batch(model.config, size, seed)).items()})
    return losses, {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def test_cuda_graphs_with_the_official_precision_is_a_one_line_error():
    with pytest.raises(InputError) as caught:
        TrainSettings(precision="official", cuda_graphs=True)
    assert str(caught.value) == ("runtime.cuda_graphs: needs train.precision = 'amp' (the fast regime), "
                                 "got 'official'")
    assert "cuda_graphs" not in TrainSettings(precision="amp", cuda_graphs=True).recipe()  # a runtime field


def test_the_region_is_compiled_once_per_run_with_static_shapes(monkeypatch, tmp_path):
    """torch.compile is recorded (not run): reduce-overhead, dynamic=False, over forward_losses, once for a
    2-epoch run whose last batch is partial; the model itself is not compiled on top."""
    calls = []

    def recording_compile(function, **options):
        calls.append((function, options))
        return function

    monkeypatch.setattr(step_module.torch, "compile", recording_compile)
    write_synthetic(tmp_path / "data", "CUHK-PEDES", num_ids=12)
    dataset = read_dataset(tmp_path / "data", "CUHK-PEDES")
    assert len(dataset.train) % 20 != 0
    settings = TrainSettings(epochs=2, batch_size=20, lr=5e-4, warmup_epochs=0, precision="amp", img_aug=False,
                             device="cpu", num_workers=0, compile=True, cuda_graphs=True)
    model = _model()
    result = train(model, dataset, settings, tmp_path / "run")
    assert calls == [(forward_losses, {"mode": "reduce-overhead", "dynamic": False})]
    assert model._compiled_call_impl is None
    assert all(math.isfinite(record.losses["total"]) for record in result.history)


@pytest.mark.slow
def test_on_the_cpu_the_region_is_a_compiled_one_that_agrees_with_eager_on_full_and_partial_batches():
    """On the CPU reduce-overhead records no graphs: inductor kernels for two static shapes (8 and 5, each
    compiled once), in fp32. Tolerances of the ``compile`` test: losses rtol 1e-4, atol 1e-6; parameters
    rtol 1e-4, atol 2e-5 (2% of one Adam step at lr 1e-3)."""
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_losses, eager_parameters = _trajectory(False, "cpu")
    graphed_losses, graphed_parameters = _trajectory(True, "cpu")
    assert counters["stats"]["unique_graphs"] == 2  # one graph per batch size, none dynamic, none recompiled
    for eager, graphed in zip(eager_losses, graphed_losses, strict=True):
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-6)
    for name, parameter in eager_parameters.items():
        torch.testing.assert_close(graphed_parameters[name], parameter, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_cuda_graph_steps_equal_eager_steps_including_a_partial_batch(device):
    """Six bf16-autocast steps (8, 8, 8, 5, 8, 5: the partial shape is recorded, then replayed). The region
    fuses and orders the bf16 arithmetic differently (bf16 keeps 8 bits: 4e-3 relative), so losses agree
    within rtol 2e-2, atol 1e-3, and parameters within atol 2e-3: two of the six Adam steps' worth at lr 1e-3
    (one step moves a weight by at most about lr), while a stale input or a skipped update is far outside."""
    eager_losses, eager_parameters = _trajectory(False, device, sizes=(8, 8, 8, 5, 8, 5))
    graphed_losses, graphed_parameters = _trajectory(True, device, sizes=(8, 8, 8, 5, 8, 5))
    for eager, graphed in zip(eager_losses, graphed_losses, strict=True):
        torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=1e-3)
    for name, parameter in eager_parameters.items():
        torch.testing.assert_close(graphed_parameters[name], parameter, rtol=0, atol=2e-3, msg=name)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_a_cuda_graph_step_never_synchronises(device):
    """After warm-up (compilation, a warm-up run and the recording of each shape), full and partial steps run
    under CUDA's sync debug mode: nothing inside a step waits for the device."""
    settings = TrainSettings(precision="amp", lr=1e-3, cuda_graphs=True, device=device)
    model = prepare_training_model(_model(), settings, device)
    step = TrainingStep(model, build_training_optimizer(model, settings), settings, device)
    model.train()
    batches = [{name: value.pin_memory() for name, value in _batch(model.config, size, size).items()} for size in (8, 5)]
    for _ in range(3):
        for batch in batches:
            step(batch)
    torch.cuda.synchronize()
    totals = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches * 2:
            totals.append(step(batch)["total"].detach().clone())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(total.item()) for total in totals)


def test_the_bench_times_cuda_graph_steps_after_three_untimed_ones(monkeypatch):
    """training_samples_per_s(cuda_graphs=True) runs its steps through one compiled region (recorded, not run
    here) and leaves at least 3 steps untimed: compile and warm-up run, recording, first replay."""
    regions, steps = [], []

    def recording_compile(function, **options):
        regions.append(options)
        return lambda *args: steps.append(args[1].shape[0]) or function(*args)

    monkeypatch.setattr(step_module.torch, "compile", recording_compile)
    sizes = BenchSizes(batch_size=4, steps=2, warmup=1)
    assert training_samples_per_s(PHPConfig.tiny(), "fast", 4, sizes, "cpu", cuda_graphs=True) > 0
    assert regions == [{"mode": "reduce-overhead", "dynamic": False}] and steps == [4] * 5
