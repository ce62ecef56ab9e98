"""The PHP model: CLIP backbone, CRFM (spec 2.3), the EFP mixture-of-experts transformer (spec 2.4), and
the variant / sharing / coupling switches (spec 2.5-2.7), with the official key layout (spec 3)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from php_runner.model.clip import (
    CLIP,
    LayerNorm,
    QuickGELU,
    SelfAttention,
    clip_config_for_weights,
    load_clip_weights,
    read_clip_state_dict,
)
from php_runner.model.config import COUPLINGS, VARIANTS, PHPConfig

ENCODERS = VARIANTS
# EFPBlock.attend's mode for the official coupling at batch size 1, computed for a whole batch.
ALONE_ATTENTION = "alone"
POS_EMBEDING_ROWS = 162  # size of the official, never-used CRFM table (spec 3.2)


class CRFM(nn.Module):
    """Cross-modal part aggregation: cnum learned queries pool the tokens, then a feed-forward (no residual).

    Kept under the official attribute name ``safl`` by the model; key layout ``part_tokens``,
    ``pos_embeding``, ``feed.{0,1,4}``.
    """

    def __init__(self, width: int, cnum: int):
        super().__init__()
        self.part_tokens = nn.Parameter(torch.empty(cnum, width))
        # Never used in the forward pass; the official model holds it, so its checkpoints carry the key.
        self.pos_embeding = nn.Parameter(torch.empty(POS_EMBEDING_ROWS, width))
        nn.init.kaiming_normal_(self.part_tokens)
        nn.init.kaiming_normal_(self.pos_embeding)
        # A plain nn.LayerNorm on purpose: the official one is created in fp16 and runs in fp16 (spec 2.2).
        self.feed = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(0.3), nn.Linear(4 * width, width)
        )
        self.scaling = math.sqrt(width)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, L, D)`` -> ``(B, cnum, D)``; no mask, so padding positions are pooled too (as official)."""
        queries = self.part_tokens.to(tokens.dtype)
        weights = (queries @ tokens.transpose(1, 2)).softmax(dim=-1)  # unscaled logits (spec 2.3)
        pooled = (weights @ tokens) / self.scaling
        return self.feed(pooled)


class Adapter(nn.Module):
    """One EFP expert: u + drop(up(drop(GELU(down(LN(u))))))."""

    def __init__(self, width: int, reduction: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)  # plain LayerNorm: created in fp16 officially (spec 2.2)
        self.down = nn.Linear(width, width // reduction)
        self.up = nn.Linear(width // reduction, width)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(0.1)

    def reset_official(self) -> None:
        """The model constructor's re-init (spec 2.4): every expert starts as the identity."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, u: Tensor) -> Tensor:
        return u + self.dropout(self.up(self.dropout(self.act(self.down(self.norm(u))))))


class MoELayer(nn.Module):
    """Top-k routing over adapters with an input gate and a task gate mixed by ``alpha`` (spec 2.4)."""

    def __init__(self, width: int, num_experts: int, topk: int, reduction: int):
        super().__init__()
        self.topk = topk
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.experts = nn.ModuleList(Adapter(width, reduction) for _ in range(num_experts))
        self.input_gate = nn.Linear(width, num_experts, bias=False)
        self.task_gate = nn.Linear(width, num_experts, bias=False)

    def forward(self, u: Tensor, task_vector: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (y like ``u``, load-balancing term ``a`` as a 0-dim fp32 tensor)."""
        num_experts = len(self.experts)
        flat = u.reshape(-1, u.shape[-1])
        # A 0-dim fp32 alpha does not promote the fp16 gate logits, as in the official fp16 run.
        logits = (1 - self.alpha) * self.input_gate(flat) + self.alpha * self.task_gate(task_vector)
        top_values, top_index = logits.topk(self.topk, dim=-1)
        route_weights = top_values.float().softmax(dim=-1).to(logits.dtype)
        probs = logits.float().softmax(dim=-1).to(logits.dtype)
        routed = torch.zeros_like(probs).scatter(-1, top_index, 1.0)
        aux = num_experts * (probs.mean(dim=0) * routed.mean(dim=0)).mean()

        # Dense dispatch: every expert runs on every row, scaled by its routing weight (zero where the row did
        # not choose it). Like the official per-expert call on a possibly empty selection, every expert then
        # gets a gradient each step (exactly zero when unchosen), so Adam steps it; and no host sync is needed.
        gates = torch.zeros_like(logits).scatter(-1, top_index, route_weights)
        if self.experts[0].down.weight.dtype == torch.float16:
            # The official fp16 regime calls the experts one by one: a batched computation rounds differently in
            # fp16 (its LayerNorm affine and batched GEMMs), and this regime keeps the official rounding.
            weighted = [gates[:, index, None] * expert(flat) for index, expert in enumerate(self.experts)]
        else:
            weighted = gates.t().unsqueeze(-1) * self.all_experts(flat)
        # Summed in ascending expert order, one add at a time as the official accumulation; unchosen experts
        # add exact zeros.
        out = weighted[0]
        for expert_output in weighted[1:]:
            out = out + expert_output
        return out.reshape(u.shape), aux.float()

    def all_experts(self, flat: Tensor) -> Tensor:
        """Every expert on every row of ``flat`` (N, D) as one batched computation: ``(E, N, D)``.

        The experts keep their own parameter tensors (official keys and optimiser groups); they are stacked
        here, per call, and the LayerNorm statistics shared by all experts are computed once.
        """
        experts = self.experts
        norm_weight = torch.stack([expert.norm.weight for expert in experts]).unsqueeze(1)
        norm_bias = torch.stack([expert.norm.bias for expert in experts]).unsqueeze(1)
        down_weight = torch.stack([expert.down.weight for expert in experts]).transpose(1, 2)
        down_bias = torch.stack([expert.down.bias for expert in experts]).unsqueeze(1)
        up_weight = torch.stack([expert.up.weight for expert in experts]).transpose(1, 2)
        up_bias = torch.stack([expert.up.bias for expert in experts]).unsqueeze(1)
        first = experts[0]
        normed = torch.addcmul(norm_bias, F.layer_norm(flat, flat.shape[-1:], eps=first.norm.eps), norm_weight)
        hidden = first.dropout(first.act(torch.baddbmm(down_bias, normed, down_weight)))
        return flat + first.dropout(torch.baddbmm(up_bias, hidden, up_weight))


class EFPBlock(nn.Module):
    """EFP residual block: attention, then MLP and MoE branches added to the stream (spec 2.4)."""

    def __init__(self, width: int, heads: int, num_experts: int, topk: int, reduction: int):
        super().__init__()
        self.comb_param = nn.Parameter(torch.randn(width))
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width))
        )
        self.ln_2 = LayerNorm(width)
        self.ln_3 = LayerNorm(width)
        self.feed_forward = MoELayer(width, num_experts, topk, reduction)

    def attend(self, x: Tensor, coupling: str) -> Tensor:
        """Self-attention of the slots ``x`` (B, slots, D) as ``coupling`` says, or ``"alone"``.

        ``"alone"`` is the official coupling at batch size 1 computed for a whole batch: with one
        sample per batch each slot attends only to itself, so every (sample, slot) is its own
        length-1 sequence.
        """
        if coupling == "official":
            # The official MHA is batch_first=False fed (B, slots, D): per slot, the B samples attend to each other.
            return self.attn(x.transpose(0, 1)).transpose(0, 1)
        if coupling == ALONE_ATTENTION:
            return self.attn(x.reshape(-1, 1, x.shape[-1])).reshape(x.shape)
        return self.attn(x)  # per-sample: the slots of one sample attend to each other

    def forward(self, x: Tensor, coupling: str) -> tuple[Tensor, Tensor]:
        x = x + self.attend(self.ln_1(x), coupling)
        moe_out, aux = self.feed_forward(self.ln_3(x), self.comb_param.to(x.dtype))
        return x + self.mlp(self.ln_2(x)) + moe_out, aux


class EFPTransformer(nn.Module):
    """The stack of EFP blocks (attribute ``shared_transformer``); returns (tokens, summed aux)."""

    def __init__(self, width: int, layers: int, heads: int, num_experts: int, topk: int, reduction: int):
        super().__init__()
        self.resblocks = nn.ModuleList(
            EFPBlock(width, heads, num_experts, topk, reduction) for _ in range(layers)
        )

    def forward(self, x: Tensor, coupling: str) -> tuple[Tensor, Tensor]:
        aux_total = torch.zeros((), device=x.device)
        for block in self.resblocks:
            x, aux = block(x, coupling)
            aux_total = aux_total + aux
        return x, aux_total


@dataclass
class PHPOutput:
    """Training forward result; features fp32 and not normalised, ``aux`` unweighted (a_img + a_txt)."""

    image_feats: Tensor
    text_feats: Tensor
    aux: Tensor
    image_logits: Tensor | None = None
    text_logits: Tensor | None = None


class PHPModel(nn.Module):
    """PHP with the official key layout. ``clip_weights`` loads OpenAI weights (dimensions read from them)."""

    def __init__(self, config: PHPConfig, clip_weights: str | Path | None = None):
        super().__init__()
        clip_state = None
        if clip_weights is not None:
            clip_state = read_clip_state_dict(clip_weights)
            config = replace(config, clip=clip_config_for_weights(clip_state, config.clip))
        self.config = config
        self._coupling = config.coupling
        width = config.clip.embed_dim
        # Construction order follows the official RNG order (spec 10): CLIP, weights, EFP, heads, CRFM.
        self.base_model = CLIP(config.clip)
        if clip_state is not None:
            load_clip_weights(self.base_model, clip_state)
        efp_names = ("shared_transformer",) if config.sharing == "shared" else ("shared_transformerv", "shared_transformert")
        for name in efp_names:
            efp = EFPTransformer(width, config.efp_layers, config.efp_heads, config.num_experts, config.topk, config.reduction)
            for block in efp.resblocks:
                for expert in block.feed_forward.experts:
                    expert.reset_official()
            setattr(self, name, efp)
        if config.num_classes > 0:
            self.classifier = nn.Linear(width, config.num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)
        crfm_names = ("safl",) if config.sharing == "shared" else ("saflv", "saflt")
        for name in crfm_names:
            setattr(self, name, CRFM(width, config.cnum))

    @property
    def coupling(self) -> str:
        return self._coupling

    @coupling.setter
    def coupling(self, value: str) -> None:
        if value not in COUPLINGS:
            raise ValueError(f"coupling must be one of {', '.join(COUPLINGS)}, got {value!r}")
        self._coupling = value
        self.config = replace(self.config, coupling=value)

    @contextmanager
    def attending_alone(self) -> Iterator[None]:
        """For the duration, the EFP blocks attend as the official coupling does at batch size 1 (each
        slot only to itself) whatever the batch, so one pass gives every sample's batch-size-1 embedding.
        It is no coupling a spec could choose, hence not through the validated ``coupling`` setter."""
        previous = self._coupling
        self._coupling = ALONE_ATTENTION
        try:
            yield
        finally:
            self._coupling = previous

    def _head(self, modality: str) -> tuple[CRFM, EFPTransformer]:
        if self.config.sharing == "shared":
            return self.safl, self.shared_transformer
        suffix = "v" if modality == "image" else "t"
        return getattr(self, "safl" + suffix), getattr(self, "shared_transformer" + suffix)

    def _fuse(self, global_token: Tensor, tokens: Tensor, modality: str, encoder: str | None) -> tuple[Tensor, Tensor]:
        """Spec 2.6: global feature plus the slot mean of the encoder's branch (mean in the compute dtype)."""
        encoder = self.config.variant if encoder is None else encoder
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
        features = global_token.float()
        aux = torch.zeros((), device=features.device)
        if encoder == "base":
            return features, aux
        crfm, efp = self._head(modality)
        if encoder in ("crfm", "full"):
            tokens = crfm(tokens)
        if encoder in ("efp", "full"):
            tokens, aux = efp(tokens, self._coupling)
        return features + tokens.mean(dim=1), aux

    def _image(self, images: Tensor, encoder: str | None) -> tuple[Tensor, Tensor]:
        tokens = self.base_model.encode_image(images)
        return self._fuse(tokens[:, 0], tokens[:, 1:], "image", encoder)

    def _text(self, token_ids: Tensor, encoder: str | None) -> tuple[Tensor, Tensor]:
        tokens = self.base_model.encode_text(token_ids)
        eot = tokens[torch.arange(tokens.shape[0], device=tokens.device), token_ids.argmax(dim=-1)]
        return self._fuse(eot, tokens, "text", encoder)

    def encode_image(self, images: Tensor, encoder: str | None = None) -> Tensor:
        """``(B, D)`` fp32, not normalised; ``encoder`` None means ``config.variant``."""
        return self._image(images, encoder)[0]

    def encode_text(self, token_ids: Tensor, encoder: str | None = None) -> Tensor:
        """``(B, D)`` fp32, not normalised; the global token is the EOT position (argmax of the ids)."""
        return self._text(token_ids, encoder)[0]

    def _logits(self, features: Tensor) -> Tensor | None:
        if self.config.num_classes <= 0:
            return None
        return self.classifier(features.to(self.classifier.weight.dtype)).float()

    def forward(self, images: Tensor, token_ids: Tensor) -> PHPOutput:
        image_feats, image_aux = self._image(images, None)
        text_feats, text_aux = self._text(token_ids, None)
        return PHPOutput(
            image_feats=image_feats,
            text_feats=text_feats,
            aux=image_aux + text_aux,
            image_logits=self._logits(image_feats),
            text_logits=self._logits(text_feats),
        )
