"""Precision regimes: the official fp16 layout of spec 2.2/3 and fp16 forward/backward on CPU; amp."""

from __future__ import annotations

import contextlib

import pytest
import torch

from php_runner.model.clip import LayerNorm
from php_runner.model.precision import (
    apply_precision,
    autocast_context,
    float32_matmul_scope,
    training_matmul_scope,
)


@pytest.mark.parametrize("sharing", ["shared", "separate"])
def test_official_layout_equals_spec_dtypes(sharing, spec_tables, default_meta_model):
    model = apply_precision(default_meta_model(sharing=sharing), "official")
    state = model.state_dict()
    base, head = spec_tables(sharing)
    expected = {key: dtype for key, (_, dtype) in base.items()}
    expected.update({key: dtype for key, _, dtype in head})
    assert {key: value.dtype for key, value in state.items()} == expected


def test_classifier_is_fp16_under_official(default_meta_model):
    state = apply_precision(default_meta_model(num_classes=10), "official").state_dict()
    assert state["classifier.weight"].dtype == state["classifier.bias"].dtype == torch.float16


def test_amp_is_all_fp32_and_parameters_are_kept(tiny_model):
    model = tiny_model()
    identities = [id(p) for p in model.parameters()]
    apply_precision(model, "official")
    assert {p.dtype for p in model.parameters()} == {torch.float16, torch.float32}
    apply_precision(model, "amp")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert [id(p) for p in model.parameters()] == identities
    with pytest.raises(ValueError):
        apply_precision(model, "fp16")


def test_official_forward_runs_in_fp16_on_cpu_and_tracks_fp32(tiny_model, tiny_images, tiny_token_ids):
    reference = tiny_model()
    model = apply_precision(tiny_model(), "official")
    images, ids = tiny_images(3), tiny_token_ids(3)
    with torch.no_grad():
        tokens = model.base_model.encode_image(images)
        half, full = model(images, ids), reference(images, ids)
    assert tokens.dtype == torch.float16  # the towers compute in fp16
    assert half.image_feats.dtype == half.text_feats.dtype == half.aux.dtype == torch.float32
    for a, b in ((half.image_feats, full.image_feats), (half.text_feats, full.text_feats)):
        assert (a - b).abs().max() <= 0.02 * b.abs().max()
    torch.testing.assert_close(half.aux, full.aux, atol=5e-3, rtol=0)


def test_official_backward_gives_fp16_grads_for_fp16_parameters(tiny_model, tiny_images, tiny_token_ids):
    model = apply_precision(tiny_model(), "official").train()
    out = model(tiny_images(2), tiny_token_ids(2))
    (out.image_feats.square().mean() + out.text_feats.square().mean() + out.aux).backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert parameter.grad.dtype == parameter.dtype, name
            assert torch.isfinite(parameter.grad.float()).all(), name


def test_clip_layernorms_stay_fp32_and_return_fp16(tiny_model):
    model = apply_precision(tiny_model(), "official")
    clip_norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert clip_norms and all(m.weight.dtype == torch.float32 for m in clip_norms)
    assert clip_norms[0](torch.randn(2, clip_norms[0].weight.shape[0]).half()).dtype == torch.float16


def test_autocast_context_is_null_except_amp_on_cuda():
    assert isinstance(autocast_context("official", "cpu"), contextlib.nullcontext)
    assert isinstance(autocast_context("amp", "cpu"), contextlib.nullcontext)
    assert isinstance(autocast_context("official", "cuda"), contextlib.nullcontext)
    with pytest.raises(ValueError):
        autocast_context("bf16", "cpu")


def test_matmul_scopes_set_their_precision_and_restore_the_process_settings_even_on_error():
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = False
    try:
        with float32_matmul_scope(allow_tf32=True):
            assert (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32) == ("high", True)
        with pytest.raises(KeyError), float32_matmul_scope(allow_tf32=False):
            assert not torch.backends.cuda.matmul.allow_tf32
            raise KeyError("inside")
        for precision, device, inside in (("amp", "cuda", "high"), ("amp", "cpu", "highest"), ("official", "cuda", "highest")):
            with training_matmul_scope(precision, device):
                assert torch.get_float32_matmul_precision() == inside, (precision, device)
        assert (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32) == ("medium", True, False)
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_autocasts_to_bf16_on_cuda(tiny_model, tiny_images, tiny_token_ids):
    model = apply_precision(tiny_model(), "amp").cuda()
    with autocast_context("amp", "cuda"):
        tokens = model.base_model.encode_image(tiny_images(2).cuda())
        out = model(tiny_images(2).cuda(), tiny_token_ids(2).cuda())
    assert tokens.dtype == torch.bfloat16
    assert out.image_feats.dtype == torch.float32


def test_bf16_inference_weights_give_faithful_embeddings_and_restore_the_masters(tiny_model):
    """amp on CUDA evaluates with bf16 weights: on the CPU (bf16 kernels exist) the unit-normalised embeddings
    stay within atol 2e-2 of fp32 (bf16 keeps 8 significant bits) and cosine >= 0.999; the masters come back."""
    import torch.nn.functional as F

    from php_runner.model.precision import inference_weight_dtype, weights_as

    model = tiny_model().eval()
    masters = list(model.parameters())
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, *model.config.clip.image_size, generator=generator)
    ids = torch.randint(1, 400, (8, model.config.clip.context_length), generator=generator)
    ids[:, 12] = model.config.clip.vocab_size - 1
    with torch.no_grad():
        reference = [F.normalize(model.encode_image(images), dim=1), F.normalize(model.encode_text(ids), dim=1)]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with weights_as(model, torch.bfloat16):
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
            cast = [F.normalize(model.encode_image(images).float(), dim=1),
                    F.normalize(model.encode_text(ids).float(), dim=1)]
    for fp32, bf16 in zip(reference, cast):
        torch.testing.assert_close(bf16, fp32, atol=2e-2, rtol=0)
        assert (fp32 * bf16).sum(dim=1).min() >= 0.999
        assert not torch.equal(bf16, fp32)  # the cast happened
    assert list(model.parameters()) == masters
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert inference_weight_dtype("amp", "cuda") == torch.bfloat16
    assert inference_weight_dtype("amp", "cpu") is None and inference_weight_dtype("official", "cuda") is None
