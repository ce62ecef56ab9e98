"""MoE layer (spec 2.4): outputs and gradients against a plain per-token routing written here, and the
optimiser steps every expert on every step, chosen or not, as the official per-expert dispatch does."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from php_runner.engine.optim import build_optimizer, build_param_groups
from php_runner.model.php import MoELayer
from php_runner.model.precision import apply_precision

WIDTH, EXPERTS, TOPK, REDUCTION = 16, 4, 2, 4


def _random_moe(seed: int) -> MoELayer:
    """A MoE layer whose every parameter is random (LayerNorms and the zero-initialised up-projections too)."""
    torch.manual_seed(seed)
    moe = MoELayer(WIDTH, num_experts=EXPERTS, topk=TOPK, reduction=REDUCTION).eval()
    with torch.no_grad():
        moe.alpha.fill_(0.3)
        for param in moe.parameters():
            if param.dim() > 0:
                param.copy_(0.3 * torch.randn_like(param))
        for expert in moe.experts:
            expert.norm.weight.copy_(1 + 0.3 * torch.randn(WIDTH))
    return moe


def _reference_expert(moe: MoELayer, index: int, token):
    """spec 2.4 Adapter, eval mode: u + up(GELU(down(LN(u)))) with the expert's parameter tensors."""
    expert = moe.experts[index]
    normed = F.layer_norm(token, (WIDTH,), expert.norm.weight, expert.norm.bias, eps=1e-5)
    hidden = F.gelu(normed @ expert.down.weight.t() + expert.down.bias)
    return token + hidden @ expert.up.weight.t() + expert.up.bias


def _reference_moe(moe: MoELayer, u, task):
    """Token by token: gate logits, top-k by sorting, softmax over the chosen, weighted sum of their experts."""
    tokens = u.reshape(-1, WIDTH)
    alpha = moe.alpha
    outputs, probs, counts = [], [], torch.zeros(EXPERTS)
    for token in tokens:
        logits = (1 - alpha) * (moe.input_gate.weight @ token) + alpha * (moe.task_gate.weight @ task)
        chosen = sorted(range(EXPERTS), key=lambda e: -float(logits[e].detach()))[:TOPK]
        weights = torch.softmax(torch.stack([logits[e] for e in chosen]), dim=0)
        outputs.append(sum(w * _reference_expert(moe, e, token) for w, e in zip(weights, chosen)))
        probs.append(torch.softmax(logits, dim=0))
        for e in chosen:
            counts[e] += 1
    n = tokens.shape[0]
    aux = EXPERTS * torch.mean(torch.stack(probs).mean(dim=0) * (counts / n))
    return torch.stack(outputs).reshape(u.shape), aux


def test_moe_outputs_and_gradients_equal_per_token_reference():
    moe = _random_moe(seed=1)
    u = torch.randn(3, 5, WIDTH, requires_grad=True)
    task = torch.randn(WIDTH, requires_grad=True)
    projection = torch.randn(3, 5, WIDTH)
    inputs = [u, task, *moe.parameters()]

    y, aux = moe(u, task)
    grads = torch.autograd.grad((y * projection).sum() + 3 * aux, inputs)
    expected_y, expected_aux = _reference_moe(moe, u, task)
    expected_grads = torch.autograd.grad((expected_y * projection).sum() + 3 * expected_aux, inputs)

    torch.testing.assert_close(y, expected_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, expected_aux, atol=1e-6, rtol=1e-6)
    names = ["u", "task", *(name for name, _ in moe.named_parameters())]
    for name, grad, expected in zip(names, grads, expected_grads):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")


def _moe_avoiding_last_expert(seed: int) -> MoELayer:
    """Random weights, with the task gate pushing the last expert's logit far below the others for every token."""
    moe = _random_moe(seed)
    with torch.no_grad():
        moe.task_gate.weight[-1].fill_(-10.0)
    return moe


def _hand_adam_zero_loss_gradient(p0, steps: int, lr: float, weight_decay: float, betas, eps: float):
    """Adam (coupled weight decay: g = wd * p) applied ``steps`` times to a parameter whose loss gradient is 0."""
    beta1, beta2 = betas
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step in range(1, steps + 1):
        g = weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p, m, v


def test_unchosen_expert_is_stepped_by_adam_with_zero_loss_gradient():
    moe = _moe_avoiding_last_expert(seed=2).train()
    lr, weight_decay, eps, betas = 1e-2, 5e-2, 1e-3, (0.9, 0.999)
    groups = build_param_groups(moe, lr, weight_decay=weight_decay, bias_lr_factor=2.0)
    optimizer = build_optimizer(groups, "adam", lr=lr, betas=betas, adam_eps=eps)
    unchosen = dict(moe.experts[-1].named_parameters())
    before = {name: param.detach().clone() for name, param in unchosen.items()}
    generator = torch.Generator().manual_seed(3)
    steps = 2
    for _ in range(steps):
        u = torch.randn(4, 3, WIDTH, generator=generator)
        task = torch.randn(WIDTH, generator=generator).abs() + 0.5  # positive, so the -10 task-gate row stays last
        y, aux = moe(u, task)
        _, top_index = ((1 - moe.alpha) * moe.input_gate(u) + moe.alpha * moe.task_gate(task)).topk(TOPK, dim=-1)
        assert not (top_index == EXPERTS - 1).any(), "the construction must leave the last expert unchosen"
        optimizer.zero_grad()
        ((y * torch.randn(y.shape, generator=generator)).sum() + aux).backward()
        for name, param in unchosen.items():
            assert param.grad is not None and not param.grad.any(), f"{name}: the loss gradient must be exactly 0"
        optimizer.step()

    states = [optimizer.state[param] for param in moe.parameters()]
    assert all(states), "every parameter has optimiser state"
    assert {int(state["step"]) for state in states} == {steps}
    group_of = {id(group["params"][0]): group for group in optimizer.param_groups}
    for name, param in unchosen.items():
        group = group_of[id(param)]
        expected, m, v = _hand_adam_zero_loss_gradient(before[name], steps, group["lr"], group["weight_decay"], betas, eps)
        state = optimizer.state[param]
        torch.testing.assert_close(state["exp_avg"], m, atol=1e-9, rtol=1e-5, msg=f"{name} first moment")
        torch.testing.assert_close(state["exp_avg_sq"], v, atol=1e-12, rtol=1e-5, msg=f"{name} second moment")
        torch.testing.assert_close(param.detach(), expected, atol=1e-7, rtol=1e-6, msg=f"{name} after Adam")
        if "bias" not in name:  # weights decay, so they moved; biases have weight decay 0 and stay put
            assert not torch.equal(param.detach(), before[name]), name
    assert math.isclose(group_of[id(unchosen["down.bias"])]["weight_decay"], 0.0)


def _dense_dispatch_reference(moe: MoELayer, u, task):
    """The per-expert dense dispatch in the layer's dtype: every expert called on every row with its own
    LayerNorm and linears, weighted by its gate (zero when unchosen), accumulated in ascending expert order."""
    flat = u.reshape(-1, WIDTH)
    logits = (1 - moe.alpha) * F.linear(flat, moe.input_gate.weight) + moe.alpha * F.linear(task, moe.task_gate.weight)
    top_values, top_index = logits.topk(TOPK, dim=-1)
    gates = torch.zeros_like(logits).scatter(-1, top_index, top_values.float().softmax(-1).to(logits.dtype))
    out = torch.zeros_like(flat)
    for index, expert in enumerate(moe.experts):
        normed = F.layer_norm(flat, (WIDTH,), expert.norm.weight, expert.norm.bias, eps=1e-5)
        adapted = flat + F.linear(F.gelu(F.linear(normed, expert.down.weight, expert.down.bias)), expert.up.weight, expert.up.bias)
        out = out + gates[:, index, None] * adapted
    return out.reshape(u.shape)


def _outputs_and_gradients(moe: MoELayer, forward, dtype):
    generator = torch.Generator().manual_seed(5)
    u = torch.randn(6, 3, WIDTH, generator=generator).to(dtype).requires_grad_()
    task = torch.randn(WIDTH, generator=generator).to(dtype).requires_grad_()
    projection = torch.randn(6, 3, WIDTH, generator=generator).to(dtype)
    inputs = [u, task, *moe.parameters()]
    y = forward(u, task)
    grads = torch.autograd.grad((y * projection).float().sum(), inputs, allow_unused=True)
    names = ["u", "task", *(name for name, _ in moe.named_parameters())]
    return y, {name: grad for name, grad in zip(names, grads) if name != "alpha"}  # alpha: only through aux


def test_batched_experts_equal_per_expert_dense_dispatch_in_fp32():
    """Outputs bit-equal; gradients within 2e-6 of the largest entry of each (stacked GEMMs sum in another order)."""
    moe = _random_moe(seed=6)
    y, grads = _outputs_and_gradients(moe, lambda u, task: moe(u, task)[0], torch.float32)
    expected_y, expected_grads = _outputs_and_gradients(moe, lambda u, task: _dense_dispatch_reference(moe, u, task), torch.float32)
    assert torch.equal(y, expected_y)
    for name, expected in expected_grads.items():
        scale = float(expected.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grads[name], expected, atol=2e-6 * scale, rtol=0, msg=f"gradient of {name}")


def test_batched_expert_outputs_equal_each_adapter_called_alone():
    moe = _random_moe(seed=7)
    flat = torch.randn(10, WIDTH)
    stacked = moe.all_experts(flat)
    assert stacked.shape == (EXPERTS, 10, WIDTH)
    for index in range(EXPERTS):
        torch.testing.assert_close(stacked[index], _reference_expert(moe, index, flat), atol=1e-6, rtol=1e-6)


def test_official_fp16_experts_are_bit_equal_to_the_per_expert_dispatch():
    """fp16 weights (the official regime) keep the per-expert calls: outputs and gradients bit for bit."""
    moe = apply_precision(_random_moe(seed=8), "official")
    assert moe.experts[0].down.weight.dtype == torch.float16
    y, grads = _outputs_and_gradients(moe, lambda u, task: moe(u, task)[0], torch.float16)
    expected_y, expected_grads = _outputs_and_gradients(moe, lambda u, task: _dense_dispatch_reference(moe, u, task), torch.float16)
    assert y.dtype == torch.float16 and torch.equal(y, expected_y)
    for name, expected in expected_grads.items():
        assert torch.equal(grads[name], expected), f"gradient of {name}"
