"""End-to-end training of the tiny model on synthetic CUHK-format data: learning, selection, resume, stop."""

import dataclasses
import math

import pytest
import torch

import php_runner.engine.step as step_module
import php_runner.engine.train as train_module
from php_runner.data import read_dataset, write_synthetic
from php_runner.engine.evaluate import EvalSettings, evaluate
from php_runner.engine.optim import build_optimizer, build_param_groups
from php_runner.engine.train import (
    LAST_CHECKPOINT,
    StepRecord,
    StopTraining,
    TrainSettings,
    build_training_optimizer,
    prepare_training_model,
    train,
    train_step,
)
from php_runner.errors import InputError
from php_runner.model.checkpoint import load_model
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel
from php_runner.model.precision import apply_precision
from torch import nn

# The recipe that makes the tiny random-weight model learn in 3 CPU epochs (proposed tiny preset).
TINY_RECIPE = dict(
    epochs=3, batch_size=8, lr=5e-4, warmup_epochs=0, precision="amp", img_aug=False,
    test_batch_size=64, device="cpu", num_workers=0, deterministic=True,
)
LEARNING_IDS = 100  # train identities of the synthetic set the learning test uses


def _model(seed=0):
    torch.manual_seed(seed)
    return PHPModel(PHPConfig.tiny())


def _chance_r1(split):
    """Expected R1 of a random ranking: mean share of gallery images that match the query."""
    counts = {pid: split.image_pids.count(pid) for pid in set(split.image_pids)}
    return 100 * sum(counts[pid] for pid in split.caption_pids) / (len(split.caption_pids) * len(split.image_pids))


def _eval_settings(model, settings, batch_size=None):
    """The in-training evaluation: batched by the training batch size, as the official trainer does."""
    return EvalSettings(batch_size=batch_size or settings.batch_size, precision=settings.precision,
                        image_size=model.config.clip.image_size)


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic(root, "CUHK-PEDES", num_ids=LEARNING_IDS)
    dataset = read_dataset(root, "CUHK-PEDES")
    settings = TrainSettings(**TINY_RECIPE)
    delivered = []
    run_dir = tmp_path_factory.mktemp("run")
    result = train(_model(), dataset, settings, run_dir, on_epoch=delivered.append)
    return dataset, settings, result, delivered


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_synthetic(root, "CUHK-PEDES", num_ids=40)
    return read_dataset(root, "CUHK-PEDES")


def _small_settings(**changes):
    return TrainSettings(**{**TINY_RECIPE, "batch_size": 16, **changes})


def test_tiny_model_learns_far_above_chance(learning_run):
    dataset, _, result, _ = learning_run
    chance = _chance_r1(dataset.test)
    final_r1 = result.selected["last"][2]["R1"]
    print(f"\ntiny model, 3 epochs: test R1 {final_r1:.2f} (chance {chance:.2f})")
    assert final_r1 >= max(5 * chance, chance + 8)
    assert result.history[-1].losses["total"] < result.history[0].losses["total"]


def test_records_reach_the_callback_and_selection_follows_the_rules(learning_run):
    dataset, _, result, delivered = learning_run
    assert delivered == result.history
    assert [record.epoch for record in result.history] == [1, 2, 3]
    assert all(set(record.metrics) == {"test", "val"} for record in result.history)
    assert set(result.history[0].losses) == {"sdm_loss", "itc_loss", "aux_loss", "total"}
    assert [record.lr for record in result.history] == pytest.approx([5e-4, 5e-4 * 0.75, 5e-4 * 0.25])

    def first_best(split):
        scores = [record.metrics[split]["R1"] for record in result.history]
        return scores.index(max(scores)) + 1

    expected = {"best-on-test": first_best("test"), "best-on-val": first_best("val"), "last": 3}
    for rule, epoch in expected.items():
        assert result.selected[rule] == (epoch, "test", result.history[epoch - 1].metrics["test"])
    best = torch.load(result.best_checkpoint, weights_only=True)
    assert best["epoch"] == expected["best-on-test"] and best["rule"] == "best-on-test"


def test_each_evaluated_epoch_carries_per_query_outcomes_that_reproduce_its_metrics(learning_run):
    from php_runner.engine.metrics import metrics_from_outcomes

    dataset, _, result, _ = learning_run
    for record in result.history:
        assert set(record.outcomes) == set(record.metrics)
        for split, outcomes in record.outcomes.items():
            assert metrics_from_outcomes(outcomes) == record.metrics[split]
            assert len(outcomes) == len(getattr(dataset, split).caption_pids)
    payload = torch.load(result.last_checkpoint, weights_only=True)
    assert all(entry["outcomes"] == {} for entry in payload["history"])  # the registry keeps them, not last.pth


def test_saved_checkpoints_reproduce_the_recorded_metrics(learning_run):
    dataset, settings, result, _ = learning_run
    for path, rule in ((result.best_checkpoint, "best-on-test"), (result.last_checkpoint, "last")):
        model, info = load_model(path)
        epoch, _, recorded = result.selected[rule]
        assert info["epoch"] == epoch
        assert evaluate(model, dataset.test, _eval_settings(model, settings)) == recorded


def test_last_checkpoint_holds_the_resume_state_and_reads_weights_only(learning_run):
    _, _, result, _ = learning_run
    payload = torch.load(result.last_checkpoint, weights_only=True)
    assert payload["epoch"] == 3 and len(payload["history"]) == 3 and not payload["stopped"]
    assert set(payload["rng"]) == {"torch", "cuda", "python", "numpy", "loader"}
    assert payload["scheduler"]["last_epoch"] == 3
    groups = payload["optimizer"]["param_groups"]  # amp: the merged groups of the fast regime
    assert len(groups) <= 3 and sum(len(group["params"]) for group in groups) == len(list(_model().parameters()))
    assert sorted(name for group in groups for name in group["names"]) == sorted(dict(_model().named_parameters()))
    assert "base_model.visual.conv1.weight" in payload["model"]


@pytest.mark.parametrize(
    "changes",
    [{}, pytest.param({"epochs": 2, "num_workers": 2, "img_aug": True}, marks=pytest.mark.slow, id="workers-img_aug")],
    ids=lambda changes: "in-process" if not changes else None,
)
def test_resume_after_an_interrupt_equals_an_uninterrupted_run(small_dataset, tmp_path, monkeypatch, changes):
    settings = _small_settings(**changes)  # the paper's settings too: loader workers and img_aug draw random numbers
    reference_model = _model()
    reference = train(reference_model, small_dataset, settings, tmp_path / "reference")

    steps_per_epoch = math.ceil(len(small_dataset.train) / settings.batch_size)
    real_losses, calls = step_module.compute_losses, []

    def interrupt_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == steps_per_epoch + 3:
            raise KeyboardInterrupt
        return real_losses(*args, **kwargs)

    monkeypatch.setattr(step_module, "compute_losses", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), small_dataset, settings, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(step_module, "compute_losses", real_losses)

    resumed_model = _model(seed=123)  # weights must come from last.pth, not from this initialisation
    resumed = train(resumed_model, small_dataset, settings, tmp_path / "resumed")
    # Epochs restored from last.pth carry no per-query outcomes (the registry keeps them).
    strip = lambda history: [dataclasses.replace(record, seconds=0, outcomes={}) for record in history]  # noqa: E731
    assert strip(resumed.history) == strip(reference.history)
    assert resumed.selected == reference.selected
    reference_state, resumed_state = reference_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(reference_state[key], resumed_state[key]) for key in reference_state)


def test_stop_training_ends_cleanly_and_a_rerun_does_not_continue(small_dataset, tmp_path, capsys):
    def stop(record):
        raise StopTraining

    settings = _small_settings(epochs=3)
    result = train(_model(), small_dataset, settings, tmp_path, on_epoch=stop)
    assert result.stopped and [record.epoch for record in result.history] == [1]
    assert result.selected["last"][0] == 1
    assert "epoch 1/3" in capsys.readouterr().out  # plain progress lines when stdout is not a terminal

    def must_not_run(record):
        raise AssertionError("a stopped run must not train further")

    again = train(_model(), small_dataset, settings, tmp_path, on_epoch=must_not_run)
    assert again.stopped and len(again.history) == 1
    with pytest.raises(InputError, match="train.lr"):
        train(_model(), small_dataset, _small_settings(lr=1e-3), tmp_path)


def test_a_last_checkpoint_whose_optimizer_groups_do_not_fit_is_refused_naming_the_file(small_dataset, tmp_path):
    """An amp last.pth from before the merged groups holds per-tensor groups: one line naming it, no traceback."""
    settings = _small_settings(epochs=2)

    def stop(record):
        raise StopTraining

    train(_model(), small_dataset, settings, tmp_path, on_epoch=stop)
    last = tmp_path / LAST_CHECKPOINT
    payload = torch.load(last, weights_only=True)
    payload["stopped"] = False
    groups = payload["optimizer"]["param_groups"]
    payload["optimizer"]["param_groups"] = [{**groups[0], "params": [index]} for group in groups for index in group["params"]]
    torch.save(payload, last)
    with pytest.raises(InputError, match=f"{last}: its saved training state does not fit"):
        train(_model(), small_dataset, settings, tmp_path)


def _as_per_tensor_groups(optimizer_state: dict) -> dict:
    """A merged-group optimiser state laid out as older php-runs wrote it: one group per tensor, ``name`` each."""
    groups, state, position = [], {}, 0
    for group in optimizer_state["param_groups"]:
        options = {key: value for key, value in group.items() if key not in ("params", "names")}
        for index, name in zip(group["params"], group["names"]):
            groups.append({**options, "params": [position], "name": name})
            if index in optimizer_state["state"]:
                state[position] = optimizer_state["state"][index]
            position += 1
    return {"state": state, "param_groups": groups}


@pytest.mark.slow
def test_an_official_last_checkpoint_with_per_tensor_groups_resumes_exactly(small_dataset, tmp_path):
    settings = _small_settings(epochs=2, precision="official")
    reference_model = _model()
    reference = train(reference_model, small_dataset, settings, tmp_path / "reference")

    def stop(record):
        raise StopTraining

    train(_model(), small_dataset, settings, tmp_path / "resumed", on_epoch=stop)
    last = tmp_path / "resumed" / LAST_CHECKPOINT
    payload = torch.load(last, weights_only=True)
    payload["stopped"] = False
    payload["optimizer"] = _as_per_tensor_groups(payload["optimizer"])
    assert len(payload["optimizer"]["param_groups"]) == len(list(_model().parameters()))
    torch.save(payload, last)
    resumed_model = _model(seed=123)
    resumed = train(resumed_model, small_dataset, settings, tmp_path / "resumed")
    assert [record.losses for record in resumed.history] == [record.losses for record in reference.history]
    reference_state, resumed_state = reference_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(reference_state[key], resumed_state[key]) for key in reference_state)

    payload = torch.load(last, weights_only=True)
    sizes = [len(group["names"]) for group in payload["optimizer"]["param_groups"]]
    in_largest_group = sum(sizes[:sizes.index(max(sizes))]) + 1
    payload["optimizer"] = _as_per_tensor_groups(payload["optimizer"])
    payload["optimizer"]["param_groups"][in_largest_group]["weight_decay"] += 1  # no longer its merged group's
    payload["epoch"], payload["stopped"] = 1, False
    torch.save(payload, last)
    with pytest.raises(InputError, match=f"{last}: its saved training state does not fit.*no longer fit"):
        train(_model(), small_dataset, settings, tmp_path / "resumed")


def test_official_precision_trains_fp16_weights_and_its_checkpoint_evaluates_the_same(small_dataset, tmp_path):
    settings = _small_settings(epochs=1, precision="official")
    result = train(_model(), small_dataset, settings, tmp_path)
    assert math.isfinite(result.history[0].losses["total"])
    payload = torch.load(result.last_checkpoint, weights_only=True)
    assert payload["model"]["base_model.visual.conv1.weight"].dtype == torch.float16
    assert payload["model"]["base_model.visual.ln_pre.weight"].dtype == torch.float32
    model, _ = load_model(result.best_checkpoint)
    apply_precision(model, "official")
    assert evaluate(model, small_dataset.test, _eval_settings(model, settings)) == result.selected["best-on-test"][2]


def test_in_training_evaluation_batches_with_the_training_batch_size(small_dataset, tmp_path):
    settings = _small_settings(epochs=1, selection="last")
    assert settings.batch_size != settings.test_batch_size  # 16 and 64: the official rule decides
    result = train(_model(), small_dataset, settings, tmp_path)
    model, _ = load_model(result.last_checkpoint)
    assert model.coupling == "official"  # the coupling under which the batch size changes the numbers
    recorded = result.history[-1].metrics["test"]
    assert evaluate(model, small_dataset.test, _eval_settings(model, settings)) == recorded
    assert evaluate(model, small_dataset.test, _eval_settings(model, settings, settings.test_batch_size)) != recorded


def test_two_shuffle_seeds_give_different_training_orders(small_dataset):
    model = _model()

    def order(seed):
        settings = _small_settings(seed=seed)
        generator = torch.Generator().manual_seed(settings.seed)  # as train() seeds its loader generator
        return list(train_module._train_loader(model, small_dataset, settings, torch.device("cpu"), generator).sampler)

    first = order(1)
    assert sorted(first) == list(range(len(small_dataset.train))) and first != sorted(first)
    assert order(1) == first and order(2) != first


def test_val_selection_needs_a_val_split(small_dataset, tmp_path):
    without_val = dataclasses.replace(small_dataset, val=None)
    with pytest.raises(InputError, match="train.selection"):
        train(_model(), without_val, _small_settings(selection="val"), tmp_path)


def test_without_test_evaluation_training_never_touches_the_test_split(small_dataset, tmp_path, monkeypatch):
    from php_runner.engine import train as train_module

    real_evaluate = train_module.evaluate

    def evaluate_but_not_test(model, split, settings, outcomes=False):
        assert split is not small_dataset.test, "the test split was evaluated during training"
        return real_evaluate(model, split, settings, outcomes=outcomes)

    monkeypatch.setattr(train_module, "evaluate", evaluate_but_not_test)
    result = train(_model(), small_dataset, _small_settings(epochs=2, selection="val", evaluate_test=False), tmp_path)
    assert all(set(record.metrics) == {"val"} for record in result.history)
    assert set(result.selected) == {"best-on-val", "last"}
    epoch, split, metrics = result.selected["best-on-val"]
    assert split == "val" and metrics == result.history[epoch - 1].metrics["val"]
    with pytest.raises(InputError, match="train.evaluate_test"):
        TrainSettings(selection="test", evaluate_test=False)


@pytest.mark.parametrize(("field", "value"), [("optimizer", "lamb"), ("solver", "v2"), ("selection", "best"),
                                              ("precision", "fp8"), ("epochs", 0)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(InputError, match=f"train.{field}"):
        TrainSettings(**{field: value})


def _random_batch(config, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    caption_ids = torch.randint(1, 400, (size, config.clip.context_length), generator=generator)
    caption_ids[:, 12] = config.clip.vocab_size - 1  # the end-of-text token, the argmax position
    return {"pids": torch.arange(size // 2).repeat(2), "caption_ids": caption_ids,
            "images": torch.randn(size, 3, *config.clip.image_size, generator=generator)}


def _per_tensor_optimizer(model, settings):
    groups = build_param_groups(model, settings.lr, solver=settings.solver, weight_decay=settings.weight_decay,
                                weight_decay_bias=settings.weight_decay_bias, bias_lr_factor=settings.bias_lr_factor,
                                lr_factor=settings.lr_factor, moe_lr_factor=settings.moe_lr_factor)
    return build_optimizer(groups, settings.optimizer, lr=settings.lr, adam_eps=settings.adam_eps)


def test_fast_regime_trains_exactly_like_per_tensor_groups_and_official_keeps_them():
    settings = TrainSettings(precision="amp", solver="v1", lr=1e-3, device="cpu")
    fast, reference = prepare_training_model(_model(), settings, "cpu"), prepare_training_model(_model(), settings, "cpu")
    fast_optimizer, reference_optimizer = build_training_optimizer(fast, settings), _per_tensor_optimizer(reference, settings)
    assert len(fast_optimizer.param_groups) <= 4 and fast_optimizer.defaults["foreach"]
    for seed in range(3):
        torch.manual_seed(seed)  # the same dropout masks in both models
        fast_losses = train_step(fast, _random_batch(fast.config, seed=seed), fast_optimizer, settings, "cpu")
        torch.manual_seed(seed)
        reference_losses = train_step(reference, _random_batch(reference.config, seed=seed), reference_optimizer, settings, "cpu")
        assert fast_losses["total"].item() == reference_losses["total"].item()
    for (name, a), b in zip(reference.named_parameters(), fast.parameters()):
        assert torch.equal(a, b), name



def _optimizer_state_by_name(optimizer):
    names = [name for group in optimizer.param_groups for name in group.get("names", [group.get("name")])]
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return {name: optimizer.state[param] for name, param in zip(names, params)}


_DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
def test_official_regime_merged_groups_are_bit_equal_to_per_tensor_groups(optimizer_name, device):
    """The official fp16 layout, four steps: parameters and every optimiser state tensor bit-equal to torch's
    default kernel over the official per-tensor groups (on CUDA both run the multi-tensor kernel)."""
    settings = TrainSettings(precision="official", solver="v1", lr=1e-3, optimizer=optimizer_name, device=device)
    merged, reference = prepare_training_model(_model(), settings, device), prepare_training_model(_model(), settings, device)
    assert {p.dtype for p in merged.parameters()} == {torch.float16, torch.float32}
    merged_optimizer = build_training_optimizer(merged, settings)
    groups = build_param_groups(reference, settings.lr, solver=settings.solver, moe_lr_factor=settings.moe_lr_factor)
    reference_optimizer = build_optimizer(groups, optimizer_name, lr=settings.lr, adam_eps=settings.adam_eps)
    assert len(merged_optimizer.param_groups) <= 4 and len(reference_optimizer.param_groups) > 100
    for seed in range(4):
        torch.manual_seed(seed)
        merged_losses = train_step(merged, _random_batch(merged.config, seed=seed), merged_optimizer, settings, device)
        torch.manual_seed(seed)
        reference_losses = train_step(reference, _random_batch(reference.config, seed=seed), reference_optimizer,
                                      settings, device)
        assert merged_losses["total"].item() == reference_losses["total"].item()
    for (name, a), b in zip(reference.named_parameters(), merged.parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    merged_state, reference_state = _optimizer_state_by_name(merged_optimizer), _optimizer_state_by_name(reference_optimizer)
    assert sorted(merged_state) == sorted(reference_state)
    for name, state in reference_state.items():
        assert state.keys() == merged_state[name].keys(), name
        for key, value in state.items():
            assert torch.equal(merged_state[name][key], value), (name, key)


@pytest.fixture
def non_default_matmul_settings():
    """Process-wide TF32 settings nobody uses by default, restored after the test."""
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = False
    yield "medium", True, False
    torch.set_float32_matmul_precision(previous[0])
    torch.backends.cudnn.allow_tf32 = previous[1]


def _matmul_settings():
    return torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("precision", ["amp", "official"])
def test_a_training_step_leaves_the_process_matmul_settings_as_they_were(precision, non_default_matmul_settings):
    settings = TrainSettings(precision=precision, lr=1e-3, device="cpu")
    model = prepare_training_model(_model(), settings, "cpu")
    optimizer = build_training_optimizer(model, settings)
    inside = []
    real_step = optimizer.step
    optimizer.step = lambda: (inside.append(torch.get_float32_matmul_precision()), real_step())
    train_step(model, _random_batch(model.config), optimizer, settings, "cpu")
    assert inside == ["highest"]  # CPU and the official regime: full fp32 whatever the process says
    assert _matmul_settings() == non_default_matmul_settings


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_evaluation_after_an_amp_step_equals_the_one_before(device, small_dataset):
    """An amp step on CUDA runs in TF32; the evaluation after it (same process) must not."""
    settings = TrainSettings(precision="amp", lr=1e-3, device=device)
    model = _model()
    eval_settings = EvalSettings(batch_size=16, device=device, image_size=model.config.clip.image_size)
    before = evaluate(model, small_dataset.test, eval_settings)
    trained = prepare_training_model(_model(), settings, device)
    train_step(trained, _random_batch(trained.config), build_training_optimizer(trained, settings), settings, device)
    assert evaluate(model, small_dataset.test, eval_settings) == before


_READ_BACKS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero")


def test_training_reads_nothing_back_from_the_device_inside_a_step(small_dataset, tmp_path, monkeypatch):
    """Counts php_runner's read-backs (each a host-device sync on CUDA) over a 3-step and a 6-step epoch."""
    import inspect

    monkeypatch.setattr(train_module, "evaluate", lambda model, split, settings, outcomes=False: ({"R1": 0.0}, None))
    counts = []
    for batch_size in (len(small_dataset.train) // 3 + 1, len(small_dataset.train) // 6 + 1):
        reads = []
        for name in _READ_BACKS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                caller = inspect.currentframe().f_back.f_code.co_filename
                if "php_runner/engine" in caller or "php_runner/model" in caller:  # the input pipeline is on the host
                    reads.append((_name, caller))
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        settings = _small_settings(epochs=1, batch_size=batch_size)
        train(_model(), small_dataset, settings, tmp_path / str(batch_size))  # the full model: EFP MoE included
        monkeypatch.undo()
        monkeypatch.setattr(train_module, "evaluate", lambda model, split, settings, outcomes=False: ({"R1": 0.0}, None))
        counts.append(reads)
    assert counts[0] == counts[1] and len(counts[0]) == 1  # the epoch's mean losses, read once


def test_on_step_gets_the_running_mean_losses_every_log_period(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "evaluate", lambda model, split, settings, outcomes=False: ({"R1": 0.0}, None))
    real_losses, seen = step_module.compute_losses, []

    def recorded(output, pids, config):
        losses = real_losses(output, pids, config)
        seen.append((len(pids), {name: value.item() for name, value in losses.items()}))
        return losses

    monkeypatch.setattr(step_module, "compute_losses", recorded)
    settings = _small_settings(epochs=2, batch_size=len(small_dataset.train) // 5 + 1)  # 5 steps, the last partial
    records = []
    result = train(_model(), small_dataset, settings, tmp_path, on_step=records.append, log_period=2)
    assert [(r.epoch, r.iteration, r.iterations_per_epoch) for r in records] == [(1, 2, 5), (1, 4, 5), (2, 2, 5), (2, 4, 5)]
    assert [r.lr for r in records] == [result.history[0].lr] * 2 + [result.history[1].lr] * 2
    for record in records:
        steps = seen[(record.epoch - 1) * 5:(record.epoch - 1) * 5 + record.iteration]
        samples = sum(size for size, _ in steps)
        for name, value in record.losses.items():
            assert value == pytest.approx(sum(size * losses[name] for size, losses in steps) / samples, rel=1e-6), name
    assert isinstance(records[0], StepRecord) and set(records[0].losses) == set(result.history[0].losses)


@pytest.mark.slow
def test_compiled_training_step_agrees_with_eager():
    """torch.compile (inductor on CPU) against eager over two steps; dropout off, since compiled dropout draws
    its masks from another generator. Losses: rtol 1e-4, atol 1e-6. Parameters: atol 2e-5, 2% of one Adam step
    (lr 1e-3): gradients that are zero up to rounding (the attention key bias) get noise-sized Adam updates."""
    pytest.importorskip("torch._inductor")
    results = {}
    for compiled in (False, True):
        settings = TrainSettings(precision="amp", lr=1e-3, compile=compiled, device="cpu")
        model = _model()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        model = prepare_training_model(model, settings, "cpu")
        optimizer = build_training_optimizer(model, settings)
        losses = [train_step(model, _random_batch(model.config, seed=seed), optimizer, settings, "cpu") for seed in range(2)]
        results[compiled] = ([step["total"].detach() for step in losses], dict(model.named_parameters()))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-6)
    for name, parameter in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], parameter, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_fast_regime_step_on_cuda_never_synchronises(compiled):
    """The fast regime's step (bf16 autocast, fused Adam, sync-free MoE) under CUDA's sync debug mode."""
    settings = TrainSettings(precision="amp", lr=1e-3, compile=compiled, device="cuda")
    model = prepare_training_model(_model(), settings, "cuda")
    optimizer = build_training_optimizer(model, settings)
    assert optimizer.defaults["fused"]
    batch = {name: value.pin_memory() for name, value in _random_batch(model.config).items()}
    train_step(model, batch, optimizer, settings, "cuda")  # warm-up: compilation and lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            losses = train_step(model, batch, optimizer, settings, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(losses["total"].item())
