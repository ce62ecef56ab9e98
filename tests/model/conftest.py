"""Fixtures for the model tests: tiny models and inputs, and the spec 3 state-dict tables as data."""

from __future__ import annotations

import pytest
import torch

from php_runner.model.config import PHPConfig
from php_runner.model.php import Adapter, PHPModel

EOT_ID = 49407
F16, F32 = torch.float16, torch.float32


def _spec_efp_block(prefix: str, width: int = 512, experts: int = 4, bottleneck: int = 64) -> list[tuple[str, tuple, torch.dtype]]:
    """Spec 3.1, in state-dict order."""
    rows = [
        ("comb_param", (width,), F32),
        ("attn.in_proj_weight", (3 * width, width), F16),
        ("attn.in_proj_bias", (3 * width,), F16),
        ("attn.out_proj.weight", (width, width), F16),
        ("attn.out_proj.bias", (width,), F16),
        ("ln_1.weight", (width,), F32),
        ("ln_1.bias", (width,), F32),
        ("mlp.c_fc.weight", (4 * width, width), F16),
        ("mlp.c_fc.bias", (4 * width,), F16),
        ("mlp.c_proj.weight", (width, 4 * width), F16),
        ("mlp.c_proj.bias", (width,), F16),
        ("ln_2.weight", (width,), F32),
        ("ln_2.bias", (width,), F32),
        ("ln_3.weight", (width,), F32),
        ("ln_3.bias", (width,), F32),
        ("feed_forward.alpha", (), F32),
    ]
    for e in range(experts):
        rows += [
            (f"feed_forward.experts.{e}.norm.weight", (width,), F16),
            (f"feed_forward.experts.{e}.norm.bias", (width,), F16),
            (f"feed_forward.experts.{e}.down.weight", (bottleneck, width), F16),
            (f"feed_forward.experts.{e}.down.bias", (bottleneck,), F16),
            (f"feed_forward.experts.{e}.up.weight", (width, bottleneck), F16),
            (f"feed_forward.experts.{e}.up.bias", (width,), F16),
        ]
    rows += [("feed_forward.input_gate.weight", (experts, width), F16), ("feed_forward.task_gate.weight", (experts, width), F16)]
    return [(prefix + key, shape, dtype) for key, shape, dtype in rows]


def _spec_crfm(prefix: str) -> list[tuple[str, tuple, torch.dtype]]:
    """Spec 3.2."""
    return [
        (prefix + "part_tokens", (9, 512), F16),
        (prefix + "pos_embeding", (162, 512), F32),
        (prefix + "feed.0.weight", (512,), F16),
        (prefix + "feed.0.bias", (512,), F16),
        (prefix + "feed.1.weight", (2048, 512), F16),
        (prefix + "feed.1.bias", (2048,), F16),
        (prefix + "feed.4.weight", (512, 2048), F16),
        (prefix + "feed.4.bias", (512,), F16),
    ]


def _spec_base_model() -> dict[str, tuple[tuple, torch.dtype]]:
    """Spec 3.4 (order within base_model is not part of the table, so a mapping)."""
    rows = {
        "positional_embedding": ((77, 512), F32),
        "text_projection": ((512, 512), F16),
        "visual.class_embedding": ((768,), F32),
        "visual.positional_embedding": ((193, 768), F32),
        "visual.proj": ((768, 512), F16),
        "visual.conv1.weight": ((768, 3, 16, 16), F16),
        "token_embedding.weight": ((49408, 512), F32),
        "ln_final.weight": ((512,), F32),
        "ln_final.bias": ((512,), F32),
    }
    for norm in ("ln_pre", "ln_post"):
        rows[f"visual.{norm}.weight"] = ((768,), F32)
        rows[f"visual.{norm}.bias"] = ((768,), F32)
    for tower, width in (("visual.transformer", 768), ("transformer", 512)):
        for i in range(12):
            p = f"{tower}.resblocks.{i}."
            rows[p + "attn.in_proj_weight"] = ((3 * width, width), F16)
            rows[p + "attn.in_proj_bias"] = ((3 * width,), F16)
            rows[p + "attn.out_proj.weight"] = ((width, width), F16)
            rows[p + "attn.out_proj.bias"] = ((width,), F16)
            for norm in ("ln_1", "ln_2"):
                rows[p + norm + ".weight"] = ((width,), F32)
                rows[p + norm + ".bias"] = ((width,), F32)
            rows[p + "mlp.c_fc.weight"] = ((4 * width, width), F16)
            rows[p + "mlp.c_fc.bias"] = ((4 * width,), F16)
            rows[p + "mlp.c_proj.weight"] = ((width, 4 * width), F16)
            rows[p + "mlp.c_proj.bias"] = ((width,), F16)
    return {"base_model." + key: value for key, value in rows.items()}


def spec_layout(sharing: str) -> tuple[dict, list]:
    """(base_model mapping, ordered list of the PHP-head rows) for the paper configuration."""
    if sharing == "shared":
        efps, crfms = ["shared_transformer."], ["safl."]
    else:
        efps, crfms = ["shared_transformerv.", "shared_transformert."], ["saflv.", "saflt."]
    head = []
    for efp in efps:
        for i in range(4):
            head += _spec_efp_block(f"{efp}resblocks.{i}.")
    for crfm in crfms:
        head += _spec_crfm(crfm)
    return _spec_base_model(), head


@pytest.fixture
def spec_tables():
    return spec_layout


def build_default_on_meta(**changes) -> PHPModel:
    """The paper-size model without allocating memory (shapes, keys and dtypes only)."""
    with torch.device("meta"):
        return PHPModel(PHPConfig(**changes))


@pytest.fixture
def default_meta_model():
    return build_default_on_meta


def make_token_ids(batch: int, context: int = 77, seed: int = 0) -> torch.Tensor:
    """Random ids below the EOT id, an EOT at a random position, zero padding after it."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, context, dtype=torch.long)
    for row in range(batch):
        length = int(torch.randint(3, context - 1, (1,), generator=generator))
        ids[row, 0] = EOT_ID - 1
        ids[row, 1:length] = torch.randint(1, 400, (length - 1,), generator=generator)
        ids[row, length] = EOT_ID
    return ids


def randomise_experts(model: PHPModel, seed: int = 0) -> PHPModel:
    """Give the (identity-initialised) experts non-zero up-projections so routing matters in tests."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Adapter):
                module.up.weight.copy_(0.2 * torch.randn(module.up.weight.shape, generator=generator))
                module.up.bias.copy_(0.05 * torch.randn(module.up.bias.shape, generator=generator))
    return model


@pytest.fixture
def tiny_model():
    def build(seed: int = 0, **changes) -> PHPModel:
        torch.manual_seed(seed)
        return randomise_experts(PHPModel(PHPConfig.tiny(**changes)), seed).eval()

    return build


@pytest.fixture
def tiny_images():
    def build(batch: int, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, 48, 24, generator=generator)

    return build


@pytest.fixture
def tiny_token_ids():
    return make_token_ids
