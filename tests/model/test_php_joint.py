"""Image and text through the shared EFP head in one pass (php.py ``forward_parts``, ``PHPModel.forward``):
equal to separate passes and to an operation-by-operation reference written here, attention and the aux term
within each modality; fewer ops than two passes; the official fp16 regime keeps one pass per modality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from php_runner.model.php import EFPTransformer, PHPModel
from php_runner.model.precision import apply_precision

WIDTH, HEADS, EXPERTS, TOPK = 16, 2, 4, 2


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run under it (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _randomise(named_parameters, seed: int) -> None:
    """Every parameter random: LayerNorm weights around 1, other tensors scaled by their fan-in."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in named_parameters:
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 0:
                param.copy_(0.2 + 0.6 * torch.rand((), generator=generator))  # alpha in (0.2, 0.8)
            elif ("ln_" in name or "norm" in name or "feed.0" in name) and name.endswith("weight"):
                param.copy_(1 + 0.3 * noise)
            elif param.dim() == 1:
                param.copy_(0.3 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))


def _random_efp(seed: int) -> EFPTransformer:
    efp = EFPTransformer(WIDTH, layers=2, heads=HEADS, num_experts=EXPERTS, topk=TOPK, reduction=4).eval()
    _randomise(efp.named_parameters(), seed)
    return efp


def _layer_norm(module, x):
    return F.layer_norm(x, (x.shape[-1],), module.weight, module.bias, eps=1e-5)


def _reference_attention(attn, h, coupling):
    """Multi-head attention by einsum; ``official``: per slot along the batch (spec 2.5), else per sample."""
    sequences = h.transpose(0, 1) if coupling == "official" else h
    q, k, v = (t.unflatten(-1, (HEADS, -1)) for t in F.linear(sequences, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    scores = torch.einsum("nlhd,nmhd->nhlm", q, k) / math.sqrt(WIDTH // HEADS)
    out = F.linear(torch.einsum("nhlm,nmhd->nlhd", scores.softmax(-1), v).flatten(-2), attn.out_proj.weight, attn.out_proj.bias)
    return out.transpose(0, 1) if coupling == "official" else out


def _reference_moe(moe, u, task):
    """Spec 2.4 on one modality's tokens: top-k of the mixed gates, experts one by one, aux over these tokens."""
    flat = u.reshape(-1, WIDTH)
    logits = (1 - moe.alpha) * F.linear(flat, moe.input_gate.weight) + moe.alpha * F.linear(task, moe.task_gate.weight)
    top_values, top_index = logits.topk(TOPK, dim=-1)
    gates = torch.zeros_like(logits).scatter(-1, top_index, top_values.softmax(-1))
    out = torch.zeros_like(flat)
    for index, expert in enumerate(moe.experts):
        hidden = F.gelu(F.linear(_layer_norm(expert.norm, flat), expert.down.weight, expert.down.bias))
        out = out + gates[:, index, None] * (flat + F.linear(hidden, expert.up.weight, expert.up.bias))
    chosen = torch.zeros_like(logits).scatter(-1, top_index, 1.0)
    aux = EXPERTS * (logits.softmax(-1).mean(0) * chosen.mean(0)).mean()
    return out.reshape(u.shape), aux


def _reference_efp(efp, x, coupling):
    """One modality through the EFP blocks, operation by operation: (tokens, aux summed over the blocks)."""
    aux_total = torch.zeros(())
    for block in efp.resblocks:
        x = x + _reference_attention(block.attn, _layer_norm(block.ln_1, x), coupling)
        hidden = F.linear(_layer_norm(block.ln_2, x), block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        mlp = F.linear(hidden * torch.sigmoid(1.702 * hidden), block.mlp.c_proj.weight, block.mlp.c_proj.bias)
        moe, aux = _reference_moe(block.feed_forward, _layer_norm(block.ln_3, x), block.comb_param)
        x = x + mlp + moe
        aux_total = aux_total + aux
    return x, aux_total


def _loss_and_grads(outputs, aux, projections, inputs):
    """A loss weighting each modality's aux differently, so an aux mixed across modalities would show."""
    loss = sum((out * projection).sum() for out, projection in zip(outputs, projections)) + 3 * aux[0] + 5 * aux[1]
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("coupling", ["official", "per-sample"])
@pytest.mark.parametrize("slots", [(3, 3), (6, 11)], ids=["full-like", "efp-like"])
def test_joint_pass_equals_per_modality_reference(coupling, slots):
    """fp32: outputs and aux within 1e-5 relative of the reference (einsum attention rounds differently from
    SDPA), every gradient within 1e-5 of the largest entry of the reference gradient."""
    efp = _random_efp(seed=11)
    generator = torch.Generator().manual_seed(12)
    parts = [torch.randn(4, n, WIDTH, generator=generator).requires_grad_() for n in slots]
    projections = [torch.randn(part.shape, generator=generator) for part in parts]
    inputs = [*parts, *efp.parameters()]

    outputs, aux = efp.forward_parts(parts, coupling)
    grads = _loss_and_grads(outputs, aux, projections, inputs)
    references = [_reference_efp(efp, part, coupling) for part in parts]
    expected_aux = torch.stack([aux for _, aux in references])
    expected_grads = _loss_and_grads([out for out, _ in references], expected_aux, projections, inputs)

    assert aux.shape == (2,)
    torch.testing.assert_close(aux, expected_aux, rtol=1e-5, atol=0)
    for out, (expected, _) in zip(outputs, references):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.detach().abs().max()))
    names = ["image", "text", *(name for name, _ in efp.named_parameters())]
    for name, grad, expected in zip(names, grads, expected_grads):
        scale = float(expected.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5 * scale, msg=f"gradient of {name}")


def _random_model(tiny_model, **changes) -> PHPModel:
    model = tiny_model(**changes)
    _randomise(((name, p) for name, p in model.named_parameters() if not name.startswith("base_model.")), seed=13)
    return model


def _separate_passes(model: PHPModel, images, ids):
    """The training forward written as before the joint pass: CLIP, then each modality alone through its head."""
    image_tokens = model.base_model.encode_image(images)
    text_tokens = model.base_model.encode_text(ids)
    eot = text_tokens[torch.arange(ids.shape[0]), ids.argmax(-1)]
    suffixes = ("", "") if model.config.sharing == "shared" else ("v", "t")
    features, auxes = [], []
    for suffix, global_token, tokens in zip(suffixes, (image_tokens[:, 0], eot), (image_tokens[:, 1:], text_tokens)):
        if model.config.variant == "full":
            tokens = getattr(model, "safl" + suffix)(tokens)
        tokens, aux = getattr(model, "shared_transformer" + suffix)(tokens, model.coupling)
        features.append(global_token.float() + tokens.mean(1))
        auxes.append(aux)
    return features, auxes[0] + auxes[1]


def _model_outputs_and_grads(model, forward):
    features, aux = forward()
    loss = features[0].square().sum() + (features[1] * features[1].flip(0)).sum() + 7 * aux
    used = [p for name, p in model.named_parameters() if name != "safl.pos_embeding" and p.requires_grad]
    return features, aux, torch.autograd.grad(loss, used, allow_unused=True)


def _training_forward(model, images, ids):
    out = model(images, ids)
    return [out.image_feats, out.text_feats], out.aux


@pytest.mark.parametrize("coupling", ["official", "per-sample"])
@pytest.mark.parametrize("variant", ["full", "efp"])
@pytest.mark.parametrize("sharing", ["shared", "separate"])
def test_training_forward_equals_separate_passes_in_fp32(sharing, variant, coupling, tiny_model, tiny_images, tiny_token_ids):
    """Outputs within 1e-6 relative; gradients within 2e-6 of each gradient's largest entry (one GEMM sums
    both modalities' rows where two passes summed two GEMMs)."""
    model = _random_model(tiny_model, sharing=sharing, variant=variant, coupling=coupling)
    images, ids = tiny_images(4, seed=1), tiny_token_ids(4, seed=2)
    features, aux, grads = _model_outputs_and_grads(model, lambda: _training_forward(model, images, ids))
    expected_features, expected_aux, expected_grads = _model_outputs_and_grads(
        model, lambda: _separate_passes(model, images, ids)
    )
    torch.testing.assert_close(aux, expected_aux, rtol=1e-6, atol=0)
    for out, expected in zip(features, expected_features):
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6 * float(expected.detach().abs().max()))
    for grad, expected in zip(grads, expected_grads):
        if expected is None:
            assert grad is None
            continue
        torch.testing.assert_close(grad, expected, rtol=0, atol=2e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("coupling", ["official", "per-sample"])
def test_official_fp16_regime_keeps_one_pass_per_modality(coupling, tiny_model, tiny_images, tiny_token_ids):
    """fp16 weights: outputs and gradients bit-equal to separate passes (each modality's gradient rounded)."""
    model = apply_precision(_random_model(tiny_model, coupling=coupling), "official")
    images, ids = tiny_images(3, seed=1), tiny_token_ids(3, seed=2)
    features, aux, grads = _model_outputs_and_grads(model, lambda: _training_forward(model, images, ids))
    expected_features, expected_aux, expected_grads = _model_outputs_and_grads(
        model, lambda: _separate_passes(model, images, ids)
    )
    assert torch.equal(aux, expected_aux)
    assert all(torch.equal(out, expected) for out, expected in zip(features, expected_features))
    for grad, expected in zip(grads, expected_grads):
        assert (grad is None and expected is None) or torch.equal(grad, expected)


def _count_ops(run) -> int:
    counter = OpCounter()
    with counter:
        run()
    return counter.count


@pytest.mark.parametrize("coupling", ["official", "per-sample"])
def test_joint_pass_runs_fewer_ops_than_two_passes(coupling):
    efp = _random_efp(seed=14)
    parts = [torch.randn(4, 3, WIDTH, requires_grad=True), torch.randn(4, 3, WIDTH, requires_grad=True)]

    def joint():
        outputs, aux = efp.forward_parts(parts, coupling)
        (outputs[0].sum() + outputs[1].sum() + aux.sum()).backward()

    def separate():
        (image, image_aux), (text, text_aux) = (efp(part, coupling) for part in parts)
        (image.sum() + text.sum() + image_aux + text_aux).backward()

    joint_ops, separate_ops = _count_ops(joint), _count_ops(separate)
    assert joint_ops < 0.75 * separate_ops, (joint_ops, separate_ops)


def test_training_forward_uses_the_joint_pass(tiny_model, tiny_images, tiny_token_ids):
    """The model's training forward costs fewer ops than the same model run one modality at a time."""
    model = tiny_model()
    images, ids = tiny_images(4), tiny_token_ids(4)
    with torch.no_grad():
        joint_ops = _count_ops(lambda: model(images, ids))
        separate_ops = _count_ops(lambda: _separate_passes(model, images, ids))
    assert joint_ops < separate_ops, (joint_ops, separate_ops)
