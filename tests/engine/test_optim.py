"""Parameter groups, optimiser choices and the per-epoch schedule against spec 5."""

import io
from collections import Counter

import pytest
import torch
from torch import nn

from php_runner.engine.optim import (
    WarmupCosine,
    build_optimizer,
    build_param_groups,
    merge_param_groups,
    param_group_rule,
    schedule_factor,
)

# Spec 5: epoch (1-based) -> f(epoch - 1) for 60 epochs, warm-up 5 epochs from 0.1.
SPEC_FACTORS = {
    1: 0.10, 2: 0.28, 3: 0.46, 4: 0.64, 5: 0.82, 6: 1.000, 7: 0.9992, 20: 0.8485, 30: 0.5993,
    40: 0.3186, 50: 0.0955, 58: 0.0073, 59: 0.0033, 60: 0.0008,
}
LR = 3e-6


def test_schedule_factor_matches_spec_values():
    for epoch, expected in SPEC_FACTORS.items():
        assert schedule_factor(epoch - 1, 60) == pytest.approx(expected, abs=5e-5)


def test_scheduler_steps_per_epoch_through_the_spec_values():
    optimizer = build_optimizer(build_param_groups(nn.Linear(2, 2), LR), lr=LR)
    scheduler = WarmupCosine(optimizer, epochs=60)
    seen = {}
    for epoch in range(1, 61):
        seen[epoch] = optimizer.param_groups[0]["lr"] / LR  # the weight group: base lr x1
        optimizer.step()
        scheduler.step()
    for epoch, expected in SPEC_FACTORS.items():
        assert seen[epoch] == pytest.approx(expected, abs=5e-5)


def test_scheduler_state_round_trips_through_a_weights_only_load():
    model = nn.Linear(4, 3)
    optimizer = build_optimizer(build_param_groups(model, LR), lr=LR)
    scheduler = WarmupCosine(optimizer, epochs=10, warmup_epochs=2)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    fresh_optimizer = build_optimizer(build_param_groups(model, LR), lr=LR)
    fresh = WarmupCosine(fresh_optimizer, epochs=10, warmup_epochs=2)
    fresh_optimizer.load_state_dict(saved["optimizer"])
    fresh.load_state_dict(saved["scheduler"])
    for _ in range(3):
        optimizer.step(), scheduler.step(), fresh_optimizer.step(), fresh.step()
        assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_warmup_free_schedule_is_plain_cosine():
    assert schedule_factor(0, 3, warmup_epochs=0) == 1.0
    assert schedule_factor(2, 4, warmup_epochs=0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("name", "solver", "expected"),
    [
        ("base_model.visual.conv1.weight", "head", (1.0, 4e-5)),
        ("base_model.visual.ln_pre.bias", "head", (2.0, 0.0)),
        ("cross_attn.in_proj_weight", "head", (5.0, 4e-5)),
        ("cross_attn.in_proj_bias", "head", (2.0, 0.0)),  # the bias rule comes later and wins
        ("classifier.weight", "head", (5.0, 4e-5)),
        ("classifier.bias", "head", (5.0, 0.0)),  # classifier rule wins on lr, bias rule set wd
        ("mlm_head.fc.weight", "head", (5.0, 4e-5)),
        ("shared_transformer.resblocks.0.comb_param", "head", (1.0, 4e-5)),
        ("shared_transformer.resblocks.0.feed_forward.experts.1.down.weight", "head", (1.0, 4e-5)),
        ("shared_transformer.resblocks.0.comb_param", "v1", (3.0, 4e-5)),
        ("shared_transformer.resblocks.0.feed_forward.alpha", "v1", (3.0, 4e-5)),
        ("shared_transformer.resblocks.0.feed_forward.experts.1.down.weight", "v1", (7.0, 4e-5)),
        ("shared_transformer.resblocks.0.feed_forward.experts.1.down.bias", "v1", (2.0, 0.0)),
        ("shared_transformer.resblocks.3.feed_forward.input_gate.weight", "v1", (7.0, 4e-5)),
        ("shared_transformert.resblocks.3.feed_forward.task_gate.weight", "v1", (7.0, 4e-5)),
        ("shared_transformerv.resblocks.0.attn.in_proj_weight", "v1", (3.0, 4e-5)),
        ("safl.part_tokens", "v1", (1.0, 4e-5)),
    ],
)
def test_group_rules(name, solver, expected):
    lr, wd = param_group_rule(name, 1.0, solver=solver, transformer_lr_factor=3.0, moe_lr_factor=7.0)
    assert (lr, wd) == pytest.approx(expected)


def test_optimizer_choices():
    groups = lambda: build_param_groups(nn.Linear(2, 2), LR)  # noqa: E731
    adam = build_optimizer(groups(), "adam", lr=LR)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["eps"] == 1e-3
    assert adam.defaults["betas"] == (0.9, 0.999) and not adam.defaults["amsgrad"]
    adamw = build_optimizer(groups(), "adamw", lr=LR, betas=(0.8, 0.99))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["eps"] == 1e-8
    assert adamw.defaults["betas"] == (0.8, 0.99)
    sgd = build_optimizer(groups(), "sgd", lr=LR, momentum=0.7)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.7
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(groups(), "lamb", lr=LR)


def test_one_group_per_tensor_in_named_parameters_order():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    groups = build_param_groups(model, LR)
    assert [g["name"] for g in groups] == [name for name, _ in model.named_parameters()]
    assert all(len(g["params"]) == 1 for g in groups)


def _paper_model_on_meta():
    from php_runner.model.config import PHPConfig
    from php_runner.model.php import PHPModel

    with torch.device("meta"):
        return PHPModel(PHPConfig())


def _group_counts(groups):
    return Counter((round(g["lr"] / LR, 6), g["weight_decay"]) for g in groups)


def test_head_solver_groups_on_the_paper_model():
    groups = build_param_groups(_paper_model_on_meta(), LR, solver="head")
    assert len(groups) == 477
    assert _group_counts(groups) == {(1.0, 4e-5): 251, (2.0, 0.0): 226}


def test_v1_solver_groups_on_the_paper_model():
    groups = build_param_groups(_paper_model_on_meta(), LR, solver="v1", transformer_lr_factor=1.0, moe_lr_factor=2.0)
    assert _group_counts(groups) == {(1.0, 4e-5): 195, (2.0, 0.0): 226, (2.0, 4e-5): 56}


def test_merged_groups_collapse_the_paper_model_to_its_distinct_hyper_parameters():
    per_tensor = build_param_groups(_paper_model_on_meta(), LR, solver="v1", transformer_lr_factor=1.0, moe_lr_factor=2.0)
    merged = merge_param_groups(per_tensor)
    assert _group_counts(merged) == {(1.0, 4e-5): 1, (2.0, 0.0): 1, (2.0, 4e-5): 1}
    assert [len(g["params"]) for g in merged] == [len(g["names"]) for g in merged]
    assert sorted(name for g in merged for name in g["names"]) == sorted(g["name"] for g in per_tensor)
    first_group = next(g for g in merged if g["names"][0] == per_tensor[0]["name"])
    in_order = [g["name"] for g in per_tensor if (g["lr"], g["weight_decay"]) == (first_group["lr"], first_group["weight_decay"])]
    assert first_group["names"] == in_order  # named_parameters order kept inside a group


def _tiny_model():
    from php_runner.model.config import PHPConfig
    from php_runner.model.php import PHPModel

    torch.manual_seed(0)
    return PHPModel(PHPConfig.tiny())


@pytest.mark.parametrize(("optimizer", "kernel"), [("adam", "foreach"), ("adam", "fused"), ("adamw", "foreach"),
                                                   ("adamw", "fused"), ("sgd", "foreach")])
def test_merged_groups_with_multi_tensor_kernels_update_like_per_tensor_groups(optimizer, kernel):
    reference, fast = _tiny_model(), _tiny_model()
    options = dict(solver="v1", weight_decay=1e-2, lr_factor=5.0, moe_lr_factor=3.0)
    reference_opt = build_optimizer(build_param_groups(reference, 1e-3, **options), optimizer, lr=1e-3)
    fast_opt = build_optimizer(merge_param_groups(build_param_groups(fast, 1e-3, **options)), optimizer, lr=1e-3,
                               kernel=kernel)
    assert len(fast_opt.param_groups) < 5 < len(reference_opt.param_groups)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(reference.parameters(), fast.parameters()):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        reference_opt.step()
        fast_opt.step()
    for (name, a), b in zip(reference.named_parameters(), fast.parameters()):
        if kernel == "foreach":
            assert torch.equal(a, b), name  # bit-identical: the same per-element arithmetic
        else:  # the fused kernel orders the arithmetic differently: about one fp32 ulp after 4 steps
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7, msg=name)


def test_fused_kernel_is_refused_for_sgd_and_unknown_kernels():
    with pytest.raises(ValueError, match="fused"):
        build_optimizer(build_param_groups(nn.Linear(2, 2), LR), "sgd", lr=LR, kernel="fused")
    with pytest.raises(ValueError, match="kernel"):
        build_optimizer(build_param_groups(nn.Linear(2, 2), LR), lr=LR, kernel="apex")
