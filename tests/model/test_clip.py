"""CLIP backbone: attention equivalence, LayerNorm, shapes, causality, OpenAI archive loading, resize."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from php_runner.model.clip import (
    CLIP,
    ClipWeightsError,
    LayerNorm,
    SelfAttention,
    read_clip_state_dict,
    resize_visual_positional_embedding,
)
from php_runner.model.config import ClipConfig, PHPConfig
from php_runner.model.php import PHPModel


def _paired_attention(width=32, heads=4, seed=0):
    torch.manual_seed(seed)
    ours = SelfAttention(width, heads)
    reference = nn.MultiheadAttention(width, heads, batch_first=True)
    with torch.no_grad():
        ours.in_proj_weight.normal_(std=0.2)
        ours.in_proj_bias.normal_(std=0.1)
        ours.out_proj.bias.normal_(std=0.1)
        reference.in_proj_weight.copy_(ours.in_proj_weight)
        reference.in_proj_bias.copy_(ours.in_proj_bias)
        reference.out_proj.weight.copy_(ours.out_proj.weight)
        reference.out_proj.bias.copy_(ours.out_proj.bias)
    return ours, reference


def test_self_attention_matches_multihead_attention():
    ours, reference = _paired_attention()
    x = torch.randn(3, 7, 32)
    expected = reference(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_causal_self_attention_matches_multihead_attention_with_clip_mask():
    ours, reference = _paired_attention(seed=1)
    x = torch.randn(2, 9, 32)
    mask = torch.full((9, 9), float("-inf")).triu(1)  # CLIP's additive causal mask
    expected = reference(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(ours(x, causal=True), expected, atol=1e-5, rtol=1e-5)


def test_self_attention_keys_are_multihead_attention_keys():
    assert set(SelfAttention(32, 4).state_dict()) == set(nn.MultiheadAttention(32, 4).state_dict())


def test_clip_layernorm_normalises_in_fp32_and_returns_input_dtype():
    norm = LayerNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(4, 16) * 100).half()
    out = norm(x)
    assert out.dtype == torch.float16
    expected = F.layer_norm(x.float(), (16,), norm.weight, norm.bias, 1e-5).half()
    assert torch.equal(out, expected)


def test_towers_return_all_tokens_with_non_square_input_and_stride():
    config = ClipConfig(embed_dim=24, vision_width=32, vision_layers=1, vision_heads=2, patch_size=8, stride=6,
                        image_size=(48, 24), text_width=32, text_heads=2, text_layers=1, vocab_size=500)
    assert config.grid == (7, 3)
    model = CLIP(config).eval()
    image_tokens = model.encode_image(torch.randn(2, 3, 48, 24))
    text_tokens = model.encode_text(torch.randint(0, 500, (2, 77)))
    assert image_tokens.shape == (2, 1 + 7 * 3, 24)
    assert text_tokens.shape == (2, 77, 24)


def test_default_grid_is_193_tokens():
    assert ClipConfig().grid == (24, 8)


def test_text_tower_is_causal():
    model = CLIP(PHPConfig.tiny().clip).eval()
    ids = torch.randint(1, 400, (1, 77))
    changed = ids.clone()
    changed[0, 40:] = torch.randint(1, 400, (37,))
    with torch.no_grad():
        a, b = model.encode_text(ids), model.encode_text(changed)
    torch.testing.assert_close(a[:, :40], b[:, :40], atol=1e-6, rtol=0)
    assert (a[:, 40:] - b[:, 40:]).abs().max() > 1e-3


def _bilinear_reference(grid: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Half-pixel bilinear resampling written out per output pixel (align_corners=False semantics)."""
    in_h, in_w, channels = grid.shape

    def taps(index, out_size, in_size):
        source = max((index + 0.5) * in_size / out_size - 0.5, 0.0)
        low = min(int(math.floor(source)), in_size - 1)
        high = min(low + 1, in_size - 1)
        return low, high, source - low

    out = torch.empty(out_h, out_w, channels, dtype=torch.float64)
    for y in range(out_h):
        y0, y1, fy = taps(y, out_h, in_h)
        for x in range(out_w):
            x0, x1, fx = taps(x, out_w, in_w)
            top = (1 - fx) * grid[y0, x0] + fx * grid[y0, x1]
            bottom = (1 - fx) * grid[y1, x0] + fx * grid[y1, x1]
            out[y, x] = (1 - fy) * top + fy * bottom
    return out


def test_resize_matches_direct_bilinear_computation():
    torch.manual_seed(0)
    table = torch.randn(1 + 14 * 14, 5, dtype=torch.float64)
    resized = resize_visual_positional_embedding(table, (24, 8))
    assert resized.shape == (193, 5)
    assert torch.equal(resized[0], table[0])
    expected = _bilinear_reference(table[1:].reshape(14, 14, 5), 24, 8).reshape(192, 5)
    torch.testing.assert_close(resized[1:], expected, atol=1e-12, rtol=0)


def test_resize_rejects_a_non_square_table():
    with pytest.raises(ClipWeightsError):
        resize_visual_positional_embedding(torch.randn(1 + 12, 4), (6, 3))


class _OpenAIArchive(nn.Module):
    """A tiny module holding OpenAI CLIP's keys, including the ones PHP drops, for torch.jit tracing."""

    def __init__(self):
        super().__init__()
        config = ClipConfig(embed_dim=32, vision_width=64, vision_layers=1, vision_heads=1, patch_size=8,
                            stride=8, image_size=(32, 32), text_width=64, text_heads=1, text_layers=2, vocab_size=300)
        clip = CLIP(config)
        self.visual = clip.visual
        self.transformer = clip.transformer
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.register_buffer("input_resolution", torch.tensor(32))
        self.register_buffer("context_length", torch.tensor(77))
        self.register_buffer("vocab_size", torch.tensor(300))
        self.half()  # OpenAI archives store fp16 tensors

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return table + self.visual.positional_embedding.sum() + self.text_projection.sum() + self.logit_scale


@pytest.fixture
def openai_archive(tmp_path):
    torch.manual_seed(0)
    module = _OpenAIArchive()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; the format is OpenAI's
        traced = torch.jit.trace(module, torch.zeros(1, dtype=torch.float16))
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    return path, {key: value.clone() for key, value in module.state_dict().items()}


def test_openai_torchscript_archive_loads_with_resized_positional_embedding(openai_archive):
    path, original = openai_archive
    state = read_clip_state_dict(path)
    assert "logit_scale" in state and state["visual.conv1.weight"].dtype == torch.float16

    model = PHPModel(PHPConfig.tiny(), clip_weights=path)
    clip = model.config.clip
    assert (clip.vision_width, clip.vision_heads, clip.text_width, clip.text_heads) == (64, 1, 64, 1)
    assert (clip.vision_layers, clip.text_layers, clip.vocab_size, clip.embed_dim) == (1, 2, 300, 32)
    assert clip.grid == (6, 3)

    loaded = model.base_model.state_dict()
    table = original["visual.positional_embedding"]  # (17, 64) fp16: a 4x4 grid
    grid = table[1:].double().reshape(4, 4, 64)
    expected = torch.cat([table[:1].double(), _bilinear_reference(grid, 6, 3).reshape(18, 64)])
    # The resize runs on the stored fp16 table (spec 2.1), so agreement is to fp16 resolution.
    torch.testing.assert_close(loaded["visual.positional_embedding"].double(), expected, atol=2e-3, rtol=2e-3)
    assert torch.equal(loaded["visual.positional_embedding"],
                       resize_visual_positional_embedding(table, (6, 3)).float())
    for key in ("visual.conv1.weight", "transformer.resblocks.1.mlp.c_fc.weight", "token_embedding.weight"):
        assert torch.equal(loaded[key], original[key].float())
    assert "logit_scale" not in loaded


def test_plain_state_dict_file_loads_the_same(openai_archive, tmp_path):
    path, original = openai_archive
    plain = tmp_path / "plain.pt"
    torch.save(original, plain)
    a = PHPModel(PHPConfig.tiny(), clip_weights=path).base_model.state_dict()
    b = PHPModel(PHPConfig.tiny(), clip_weights=plain).base_model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_unreadable_clip_weights_give_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ClipWeightsError) as error:
        read_clip_state_dict(bad)
    assert "\n" not in str(error.value) and str(bad) in str(error.value)


def _randomise_every_parameter(module: nn.Module, seed: int) -> None:
    """Random values everywhere, LayerNorm weights and biases included (ones/zeros hide a swapped norm)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            parts = name.split(".")
            is_norm = len(parts) > 1 and parts[-2].startswith("ln_")
            param.copy_(1 + 0.3 * noise if is_norm and name.endswith("weight") else 0.2 * noise)


def _open_clip_towers(config: ClipConfig):
    """open_clip's own ViT and text transformer (OpenAI key names), QuickGELU, returning every token."""
    from open_clip.transformer import QuickGELU as OpenClipQuickGELU
    from open_clip.transformer import TextTransformer, VisionTransformer

    visual = VisionTransformer(
        image_size=config.image_size, patch_size=config.patch_size, width=config.vision_width,
        layers=config.vision_layers, heads=config.vision_heads, mlp_ratio=4.0, output_dim=config.embed_dim,
        act_layer=OpenClipQuickGELU, output_tokens=True,
    )
    text = TextTransformer(
        context_length=config.context_length, vocab_size=config.vocab_size, width=config.text_width,
        heads=config.text_heads, layers=config.text_layers, output_dim=config.embed_dim,
        act_layer=OpenClipQuickGELU, output_tokens=True,
    )
    return visual.eval(), text.eval()


def test_towers_equal_open_clip_with_the_same_random_weights(tiny_token_ids):
    config = PHPConfig.tiny().clip  # patch == stride, the only layout open_clip builds
    visual, text = _open_clip_towers(config)
    _randomise_every_parameter(visual, seed=1)
    _randomise_every_parameter(text, seed=2)
    ours = CLIP(config).eval()
    state = {f"visual.{key}": value for key, value in visual.state_dict().items()}
    state.update(text.state_dict())
    ours.load_state_dict(state, strict=True)  # same key names, nothing left over on either side

    images = torch.randn(3, 3, *config.image_size, generator=torch.Generator().manual_seed(3))
    ids = tiny_token_ids(3, config.context_length, seed=4)
    with torch.no_grad():
        image_tokens, text_tokens = ours.encode_image(images), ours.encode_text(ids)
        pooled_image, patch_tokens = visual(images)  # CLS projected; patches after ln_post, not projected
        pooled_text, all_text = text(ids)  # EOT projected; every position after ln_final, not projected
    torch.testing.assert_close(image_tokens[:, 0], pooled_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image_tokens[:, 1:], patch_tokens @ visual.proj, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_tokens, all_text @ text.text_projection, atol=1e-5, rtol=1e-5)
    eot = text_tokens[torch.arange(3), ids.argmax(dim=-1)]
    torch.testing.assert_close(eot, pooled_text, atol=1e-5, rtol=1e-5)
