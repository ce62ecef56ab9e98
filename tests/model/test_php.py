"""PHP model: spec 3 key layout and counts, CRFM/EFP vs naive references (MoE: test_moe.py), variants, sharing, coupling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from php_runner.model.config import PHPConfig
from php_runner.model.php import CRFM, EFPBlock, PHPModel

ATOL = 1e-5


def _numel(state, prefix=""):
    return sum(v.numel() for k, v in state.items() if k.startswith(prefix))


@pytest.mark.parametrize("sharing", ["shared", "separate"])
def test_default_state_dict_keys_and_shapes_equal_spec_tables(sharing, spec_tables, default_meta_model):
    state = default_meta_model(sharing=sharing).state_dict()
    base, head = spec_tables(sharing)
    base_keys = [k for k in state if k.startswith("base_model.")]
    head_keys = [k for k in state if not k.startswith("base_model.")]
    assert list(state)[: len(base_keys)] == base_keys  # base_model first
    assert {k: tuple(state[k].shape) for k in base_keys} == {k: shape for k, (shape, _) in base.items()}
    assert head_keys == [key for key, _, _ in head]  # same keys in the spec's order
    assert [tuple(state[k].shape) for k in head_keys] == [shape for _, shape, _ in head]


def test_default_parameter_counts_equal_spec_totals(default_meta_model):
    state = default_meta_model().state_dict()
    assert len(state) == 477
    assert _numel(state) == 165_512_196
    assert _numel(state, "base_model.") == 149_617_664
    assert _numel(state) - _numel(state, "base_model.") == 15_894_532
    assert _numel(state, "shared_transformer.resblocks.0.") == 3_426_561
    assert _numel(state, "safl.") == 2_188_288
    separate = default_meta_model(sharing="separate").state_dict()
    assert len([k for k in separate if not k.startswith("base_model.")]) == 352


def test_classifier_sits_between_efp_and_crfm(default_meta_model):
    state = default_meta_model(num_classes=11003).state_dict()
    keys = [k.split(".")[0] for k in state]
    order = list(dict.fromkeys(keys))
    assert order == ["base_model", "shared_transformer", "classifier", "safl"]
    assert state["classifier.weight"].shape == (11003, 512)


def test_model_reinitialises_experts_to_identity():
    torch.manual_seed(0)
    model = PHPModel(PHPConfig.tiny())
    moe = model.shared_transformer.resblocks[1].feed_forward
    bound = 1 / math.sqrt(32)
    for expert in moe.experts:
        assert not expert.up.weight.any() and not expert.up.bias.any() and not expert.down.bias.any()
        assert expert.down.weight.abs().max() <= bound
    u = torch.randn(3, 5, 32)
    y, _ = moe.eval()(u, torch.randn(32))
    torch.testing.assert_close(y, u, atol=ATOL, rtol=0)  # renormalised weights times identity experts


def test_crfm_matches_spec_formula():
    torch.manual_seed(2)
    crfm = CRFM(16, cnum=3).eval()
    tokens = torch.randn(2, 7, 16)
    out = crfm(tokens)
    expected = []
    for sample in tokens:
        attention = torch.softmax(crfm.part_tokens @ sample.t(), dim=-1)  # no 1/sqrt(d) on the logits
        expected.append(crfm.feed((attention @ sample) / math.sqrt(16)))
    torch.testing.assert_close(out, torch.stack(expected), atol=ATOL, rtol=0)
    assert crfm.pos_embeding.shape == (162, 16)


def test_official_coupling_is_multihead_attention_fed_batch_first_false():
    torch.manual_seed(3)
    block = EFPBlock(16, heads=2, num_experts=4, topk=2, reduction=4).eval()
    reference = nn.MultiheadAttention(16, 2)  # batch_first=False, as the official block
    reference.load_state_dict(block.attn.state_dict())
    x = torch.randn(5, 3, 16)  # (B, cnum, D), passed without a permute
    expected = reference(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(block.attend(x, "official"), expected, atol=ATOL, rtol=ATOL)
    per_sample = nn.MultiheadAttention(16, 2, batch_first=True)
    per_sample.load_state_dict(block.attn.state_dict())
    torch.testing.assert_close(block.attend(x, "per-sample"), per_sample(x, x, x, need_weights=False)[0],
                               atol=ATOL, rtol=ATOL)


def _attention_reference(attn, sequence, heads):
    """One sequence ``(L, D)`` through multi-head attention, operation by operation."""
    width = sequence.shape[-1]
    q, k, v = (sequence @ attn.in_proj_weight.t() + attn.in_proj_bias).chunk(3, dim=-1)
    outputs = []
    for head in range(heads):
        cols = slice(head * width // heads, (head + 1) * width // heads)
        scores = q[:, cols] @ k[:, cols].t() / math.sqrt(width // heads)
        outputs.append(scores.softmax(dim=-1) @ v[:, cols])
    return torch.cat(outputs, dim=-1) @ attn.out_proj.weight.t() + attn.out_proj.bias


def _efp_block_reference(block, x, coupling, heads):
    """Spec 2.4 block: x2 = x + MHA(ln_1 x); out = x2 + mlp(ln_2 x2) + MoE(ln_3 x2, comb_param)."""
    def norm(layer, t):
        return torch.nn.functional.layer_norm(t, t.shape[-1:], layer.weight, layer.bias, eps=1e-5)

    normed = norm(block.ln_1, x)
    attended = torch.empty_like(x)
    if coupling == "official":  # per slot, the batch is the sequence
        for slot in range(x.shape[1]):
            attended[:, slot] = _attention_reference(block.attn, normed[:, slot], heads)
    else:
        for sample in range(x.shape[0]):
            attended[sample] = _attention_reference(block.attn, normed[sample], heads)
    x2 = x + attended
    hidden = norm(block.ln_2, x2) @ block.mlp.c_fc.weight.t() + block.mlp.c_fc.bias
    mlp = (hidden * torch.sigmoid(1.702 * hidden)) @ block.mlp.c_proj.weight.t() + block.mlp.c_proj.bias
    moe, aux = block.feed_forward(norm(block.ln_3, x2), block.comb_param)  # MoE itself: tests/model/test_moe.py
    return x2 + mlp + moe, aux


@pytest.mark.parametrize("coupling", ["official", "per-sample"])
def test_efp_block_equals_per_operation_reference_with_random_layer_norms(coupling):
    torch.manual_seed(4)
    block = EFPBlock(16, heads=2, num_experts=4, topk=2, reduction=4).eval()
    with torch.no_grad():
        for name, param in block.named_parameters():
            if name.startswith("ln_") and name.endswith("weight"):
                param.copy_(1 + 0.5 * torch.randn_like(param))
            elif param.dim() > 0:
                param.copy_(0.3 * torch.randn_like(param))
    x = torch.randn(5, 3, 16)
    with torch.no_grad():
        out, aux = block(x, coupling)
        expected, expected_aux = _efp_block_reference(block, x, coupling, heads=2)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(aux, expected_aux)


def _encode(model, modality, inputs, encoder):
    with torch.no_grad():
        if modality == "image":
            return model.encode_image(inputs, encoder)
        return model.encode_text(inputs, encoder)


def _inputs(modality, tiny_images, tiny_token_ids, batch, seed):
    return tiny_images(batch, seed) if modality == "image" else tiny_token_ids(batch, seed=seed)


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("encoder", ["full", "efp", "base", "crfm"])
def test_per_sample_coupling_is_batch_independent(modality, encoder, tiny_model, tiny_images, tiny_token_ids):
    model = tiny_model(coupling="per-sample")
    batch = _inputs(modality, tiny_images, tiny_token_ids, 4, seed=0)
    others = _inputs(modality, tiny_images, tiny_token_ids, 3, seed=1)
    in_batch = _encode(model, modality, batch, encoder)[0]
    alone = _encode(model, modality, batch[:1], encoder)[0]
    with_others = _encode(model, modality, torch.cat([batch[:1], others]), encoder)[0]
    torch.testing.assert_close(alone, in_batch, atol=ATOL, rtol=0)
    torch.testing.assert_close(with_others, in_batch, atol=ATOL, rtol=0)


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("encoder", ["full", "efp"])
def test_official_coupling_depends_on_the_set_of_batch_mates_not_their_order(
    modality, encoder, tiny_model, tiny_images, tiny_token_ids
):
    model = tiny_model(coupling="official")
    batch = _inputs(modality, tiny_images, tiny_token_ids, 4, seed=0)
    others = _inputs(modality, tiny_images, tiny_token_ids, 3, seed=1)
    reference = _encode(model, modality, batch, encoder)[0]
    assert (reference - _encode(model, modality, batch[:1], encoder)[0]).abs().max() > 1e-3
    changed = torch.cat([batch[:1], others])
    assert (reference - _encode(model, modality, changed, encoder)[0]).abs().max() > 1e-3
    for order in ([3, 1, 2], [2, 3, 1]):
        shuffled = batch[[0, *order]]
        torch.testing.assert_close(_encode(model, modality, shuffled, encoder)[0], reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("encoder", ["base", "crfm"])
def test_base_and_crfm_encoders_are_batch_independent_under_official_coupling(
    modality, encoder, tiny_model, tiny_images, tiny_token_ids
):
    model = tiny_model(coupling="official")
    batch = _inputs(modality, tiny_images, tiny_token_ids, 4, seed=0)
    others = _inputs(modality, tiny_images, tiny_token_ids, 3, seed=1)
    reference = _encode(model, modality, batch, encoder)[0]
    torch.testing.assert_close(_encode(model, modality, batch[:1], encoder)[0], reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        _encode(model, modality, torch.cat([batch[:1], others]), encoder)[0], reference, atol=ATOL, rtol=0
    )


def test_coupling_is_settable_at_run_time(tiny_model, tiny_token_ids):
    model = tiny_model(coupling="official")
    ids = tiny_token_ids(4)
    official = _encode(model, "text", ids, None)
    model.coupling = "per-sample"
    assert model.config.coupling == "per-sample"
    per_sample = _encode(model, "text", ids, None)
    assert (official - per_sample).abs().max() > 1e-3
    torch.testing.assert_close(per_sample, _encode(tiny_model(coupling="per-sample"), "text", ids, None))
    with pytest.raises(ValueError):
        model.coupling = "per_sample"


def test_encoders_follow_spec_definitions(tiny_model, tiny_images, tiny_token_ids):
    model = tiny_model()
    images, ids = tiny_images(3), tiny_token_ids(3)
    with torch.no_grad():
        image_tokens = model.base_model.encode_image(images)
        text_tokens = model.base_model.encode_text(ids)
        eot = text_tokens[torch.arange(3), ids.argmax(-1)]
        efp = lambda x: model.shared_transformer(x, "official")[0]  # noqa: E731
        expected = {
            "base": (image_tokens[:, 0], eot),
            "crfm": (image_tokens[:, 0] + model.safl(image_tokens[:, 1:]).mean(1),
                     eot + model.safl(text_tokens).mean(1)),
            "efp": (image_tokens[:, 0] + efp(image_tokens[:, 1:]).mean(1), eot + efp(text_tokens).mean(1)),
            "full": (image_tokens[:, 0] + efp(model.safl(image_tokens[:, 1:])).mean(1),
                     eot + efp(model.safl(text_tokens)).mean(1)),
        }
        for encoder, (image_expected, text_expected) in expected.items():
            torch.testing.assert_close(model.encode_image(images, encoder), image_expected, atol=ATOL, rtol=0)
            torch.testing.assert_close(model.encode_text(ids, encoder), text_expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        model.encode_image(images, "safl")


@pytest.mark.parametrize("variant, has_aux", [("base", False), ("crfm", False), ("efp", True), ("full", True)])
def test_training_forward_per_variant(variant, has_aux, tiny_model, tiny_images, tiny_token_ids):
    model = tiny_model(variant=variant, num_classes=7).train()
    images, ids = tiny_images(4), tiny_token_ids(4)
    torch.manual_seed(0)
    out = model(images, ids)
    assert out.image_feats.shape == out.text_feats.shape == (4, 32)
    assert out.image_feats.dtype == out.text_feats.dtype == out.aux.dtype == torch.float32
    assert out.image_logits.shape == out.text_logits.shape == (4, 7)
    assert (float(out.aux.detach()) > 0) == has_aux
    model.eval()
    with torch.no_grad():
        again = model(images, ids)
        torch.testing.assert_close(again.image_feats, model.encode_image(images), atol=ATOL, rtol=0)
        torch.testing.assert_close(again.text_feats, model.encode_text(ids), atol=ATOL, rtol=0)
        torch.testing.assert_close(again.image_logits, model.classifier(again.image_feats))


def test_no_classifier_means_no_logits(tiny_model, tiny_images, tiny_token_ids):
    out = tiny_model()(tiny_images(2), tiny_token_ids(2))
    assert out.image_logits is None and out.text_logits is None


def test_separate_sharing_routes_each_modality_to_its_own_modules(tiny_model, tiny_images, tiny_token_ids):
    model = tiny_model(sharing="separate")
    images, ids = tiny_images(3), tiny_token_ids(3)
    image_before, text_before = _encode(model, "image", images, None), _encode(model, "text", ids, None)
    with torch.no_grad():
        model.saflt.part_tokens.add_(1.0)
        model.shared_transformert.resblocks[0].comb_param.add_(1.0)
    torch.testing.assert_close(_encode(model, "image", images, None), image_before, atol=0, rtol=0)
    assert (_encode(model, "text", ids, None) - text_before).abs().max() > 1e-4
    assert not hasattr(model, "safl") and not hasattr(model, "shared_transformer")


def test_gradients_reach_every_used_parameter(tiny_model, tiny_images, tiny_token_ids):
    model = tiny_model(num_classes=5).train()
    out = model(tiny_images(3), tiny_token_ids(3))
    (out.image_feats.sum() + out.text_feats.sum() + out.aux + out.image_logits.sum()).backward()
    without_grad = {name for name, p in model.named_parameters() if p.grad is None}
    assert without_grad == {"safl.pos_embeding"}  # unused officially too (spec 2.3)


def test_tiny_config_dimensions(tiny_model):
    model = tiny_model()
    assert model.safl.part_tokens.shape == (3, 32)
    assert model.shared_transformer.resblocks[0].feed_forward.experts[0].down.weight.shape == (8, 32)
    assert isinstance(model.config, PHPConfig)
