"""CLIP backbone with OpenAI key names: the ViT at PHP's non-square input and the causal text transformer.

Both towers return every token (spec 2.1): the image tower ``(B, 1 + gh*gw, D)`` after ``ln_post`` and
``proj``, the text tower ``(B, context, D)`` after ``ln_final`` and ``text_projection``. Also here:
reading OpenAI weights (TorchScript archive or plain state dict), reading dimensions from weights, and the
visual positional-embedding resize of spec 2.1.
"""

from __future__ import annotations

import math
import re
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from php_runner.errors import InputError
from php_runner.model.config import ClipConfig

HEAD_WIDTH = 64  # OpenAI CLIP derives head counts as width // 64


class ClipWeightsError(InputError):
    """A CLIP weights file that cannot be read or does not hold a CLIP state dict."""


class LayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: normalises in fp32 with fp32 parameters, returns the input dtype.

    PHP keeps these parameters fp32 under its fp16 layout (spec 2.2); plain ``nn.LayerNorm`` instances
    elsewhere (CRFM feed, adapter norms) are the ones that run in fp16.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), CLIP's activation."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, computed by SDPA.

    Input is ``(N, L, D)``: attention runs over L independently for each of the N rows. Numerically it is
    ``nn.MultiheadAttention`` (tested); writing it out lets callers choose the sequence axis explicitly.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (t.reshape(n, length, self.heads, width // self.heads).transpose(1, 2) for t in qkv.chunk(3, -1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class ResidualAttentionBlock(nn.Module):
    """CLIP block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a 4x QuickGELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width))
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of CLIP blocks on batch-first ``(B, L, D)`` tensors (keys ``resblocks.N.*``)."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width = width
        self.causal = causal
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x, causal=self.causal)
        return x


class VisionTransformer(nn.Module):
    """CLIP ViT with a configurable stride and non-square input; returns all tokens projected."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        width = config.vision_width
        self.grid = config.grid
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.stride, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid[0] * self.grid[1] + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, config.vision_layers, config.vision_heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, config.embed_dim))

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, width), row-major over the grid
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x) @ self.proj.to(x.dtype)


class CLIP(nn.Module):
    """OpenAI CLIP layout (``visual.*``, ``transformer.*``, ``token_embedding``, ``ln_final``, ...).

    No ``logit_scale``: PHP discards it (spec 4). The compute dtype follows ``visual.conv1.weight`` as in
    OpenAI's code, so the fp16 layout of spec 2.2 runs the towers in fp16.
    """

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)
        self.transformer = Transformer(config.text_width, config.text_layers, config.text_heads, causal=True)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.ln_final = LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self._init_text_parameters()

    def _init_text_parameters(self) -> None:
        """OpenAI CLIP's initialisation of the text tower (the ViT keeps its construction-time init)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, len(self.transformer.resblocks)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, 1 + gh*gw, embed_dim)``; token 0 is the CLS token."""
        return self.visual(images)

    def encode_text(self, token_ids: Tensor) -> Tensor:
        """``(B, context)`` token ids -> ``(B, context, embed_dim)`` for every position."""
        x = self.token_embedding(token_ids).to(self.dtype) + self.positional_embedding.to(self.dtype)
        x = self.ln_final(self.transformer(x))
        return x @ self.text_projection.to(x.dtype)


def _count_blocks(state_dict: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"resblocks\.(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _heads(width: int, field: str) -> int:
    if width % HEAD_WIDTH:
        raise ClipWeightsError(f"{field}: width {width} is not a multiple of {HEAD_WIDTH}; give the head count explicitly")
    return width // HEAD_WIDTH


def clip_config_from_state_dict(
    state_dict: dict[str, Tensor], image_size: tuple[int, int] = (384, 128), stride: int = 16, **overrides
) -> ClipConfig:
    """Read CLIP dimensions from OpenAI-named weights (no prefix); heads default to width // 64."""
    try:
        vision_width, _, patch, _ = state_dict["visual.conv1.weight"].shape
        text_width = state_dict["ln_final.weight"].shape[0]
        values = dict(
            embed_dim=state_dict["text_projection"].shape[1],
            vision_width=vision_width,
            vision_layers=_count_blocks(state_dict, "visual.transformer."),
            patch_size=patch,
            stride=stride,
            image_size=tuple(image_size),
            text_width=text_width,
            text_layers=_count_blocks(state_dict, "transformer."),
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
        )
    except KeyError as missing:
        raise ClipWeightsError(f"CLIP weights lack the key {missing.args[0]}") from None
    values.update(overrides)
    if "vision_heads" not in values:
        values["vision_heads"] = _heads(vision_width, "vision_heads")
    if "text_heads" not in values:
        values["text_heads"] = _heads(text_width, "text_heads")
    return ClipConfig(**values)


def resize_visual_positional_embedding(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """Spec 2.1: keep row 0 (CLS); the rest is a square grid, resized bilinearly (align_corners=False).

    Computed in the table's own dtype (the OpenAI archive stores fp16) and flattened row-major, which is
    the order of the conv output flatten.
    """
    cls, patches = table[:1], table[1:]
    side = math.isqrt(patches.shape[0])
    if side * side != patches.shape[0]:
        raise ClipWeightsError(f"visual.positional_embedding: {patches.shape[0]} patch rows are not a square grid")
    width = table.shape[1]
    image = patches.reshape(1, side, side, width).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)], dim=0)


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def read_clip_state_dict(path: str | Path) -> dict[str, Tensor]:
    """OpenAI weights as a state dict: a TorchScript archive (like ``ViT-B-16.pt``) or a plain state dict.

    TorchScript archives are read with ``torch.jit.load``, whose loader only rebuilds TorchScript types;
    anything else goes through ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipWeightsError(f"{path}: CLIP weights file not found")
    try:
        if _is_torchscript_archive(path):
            with warnings.catch_warnings():
                # torch.jit is deprecated, but it is the only reader of OpenAI's archive format.
                warnings.simplefilter("ignore", FutureWarning)
                state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure becomes one line naming the file
        if "weights only load failed" in str(error).lower():  # torch then advises weights_only=False: never pass it on
            raise ClipWeightsError(f"{path}: not CLIP weights: it holds Python objects other than tensors, which "
                                   "php-run never unpickles; give OpenAI's ViT-B-16.pt") from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClipWeightsError(f"{path}: not a CLIP weights file: cannot read it ({first_line}); "
                               "give OpenAI's ViT-B-16.pt") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or "visual.conv1.weight" not in state_dict:
        raise ClipWeightsError(f"{path}: not an OpenAI CLIP state dict (no visual.conv1.weight)")
    return dict(state_dict)


def check_clip_weights(path: str | Path) -> None:
    """Refuse a file that is not CLIP weights, cheaply, before a run is recorded: a TorchScript archive is
    accepted by its layout (it is read when the model is built), anything else is read as a state dict."""
    path = Path(path)
    if path.is_file() and _is_torchscript_archive(path):
        return
    read_clip_state_dict(path)


def load_clip_weights(model: CLIP, state_dict: dict[str, Tensor]) -> None:
    """Copy OpenAI weights into ``model``: keys the model lacks are dropped, the visual table is resized.

    Every model key must be present with the expected shape (after the resize); values are cast to the
    model's dtypes by ``copy_``.
    """
    own = model.state_dict()
    incoming = {key: value for key, value in state_dict.items() if key in own}
    table = incoming.get("visual.positional_embedding")
    if table is not None and table.shape != own["visual.positional_embedding"].shape:
        incoming["visual.positional_embedding"] = resize_visual_positional_embedding(table, model.visual.grid)
    missing = sorted(set(own) - set(incoming))
    if missing:
        raise ClipWeightsError(f"CLIP weights lack {len(missing)} keys, e.g. {', '.join(missing[:3])}")
    for key, value in incoming.items():
        if value.shape != own[key].shape:
            raise ClipWeightsError(f"CLIP weights: {key} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}")
    with torch.no_grad():
        for key, value in incoming.items():
            own[key].copy_(value)


def clip_config_for_weights(state_dict: dict[str, Tensor], requested: ClipConfig) -> ClipConfig:
    """Dimensions from the weights; input size and stride from ``requested``.

    Head counts follow OpenAI's width // 64 rule; a width that is not a multiple of 64 (tiny test
    weights) keeps the requested head count.
    """
    heads = {}
    conv, final_norm = state_dict.get("visual.conv1.weight"), state_dict.get("ln_final.weight")
    if conv is not None and conv.shape[0] % HEAD_WIDTH:
        heads["vision_heads"] = requested.vision_heads
    if final_norm is not None and final_norm.shape[0] % HEAD_WIDTH:
        heads["text_heads"] = requested.text_heads
    return clip_config_from_state_dict(state_dict, image_size=requested.image_size, stride=requested.stride, **heads)
