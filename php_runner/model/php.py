"""The PHP model: CLIP backbone, CRFM (spec 2.3), the EFP mixture-of-experts transformer (spec 2.4), and
the variant / sharing / coupling switches (spec 2.5-2.7), with the official key layout (spec 3).

Two computation paths with equal results: with fp32 weights (the fast regime, bf16 autocast on CUDA) the
experts run as one batched computation and, in training, image and text go through a shared head in one
pass; with fp16 weights (the official regime) the experts are called one by one and each modality has its
own pass, as the official code rounds (``keeps_official_rounding``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
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


def keeps_official_rounding(layer: nn.Linear) -> bool:
    """fp16 weights mean the official regime (spec 2.2), which keeps the official code's order of computation
    wherever a faster equal path would round differently in fp16 (per-expert calls, one pass per modality)."""
    return layer.weight.dtype == torch.float16


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
        return self.feed(self.pool(tokens))

    def forward_parts(self, parts: Sequence[Tensor]) -> list[Tensor]:
        """Several parts (B_i, L_i, D): each pooled alone, then the feed-forward once on all their slots."""
        fed = self.feed(torch.cat([self.pool(tokens) for tokens in parts]))
        return list(fed.split([tokens.shape[0] for tokens in parts]))

    def pool(self, tokens: Tensor) -> Tensor:
        """The learned queries' softmax pooling of ``tokens``, scaled: ``(B, cnum, D)``."""
        # No cast of the queries: their dtype is the tokens' in every regime but autocast, whose matmul casts
        # them once per step (a cached cast of a parameter).
        weights = (self.part_tokens @ tokens.transpose(1, 2)).softmax(dim=-1)  # unscaled logits (spec 2.3)
        return (weights @ tokens) / self.scaling


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

    def forward(self, u: Tensor, task_vector: Tensor, part_rows: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Returns (y like ``u``, load-balancing term ``a`` as a 0-dim fp32 tensor).

        With ``part_rows``, the rows of ``u`` (flattened to (N, D)) are consecutive parts of those sizes (image
        and text slots in one pass) and ``a`` is computed within each part: a ``(len(part_rows),)`` tensor.
        """
        num_experts = len(self.experts)
        flat = u.reshape(-1, u.shape[-1])
        # A 0-dim fp32 alpha does not promote the fp16 gate logits, as in the official fp16 run.
        # The task vector takes the gate's dtype (fp16 officially, spec 2.4); under autocast the gate casts it.
        task_logits = self.task_gate(task_vector.to(self.task_gate.weight.dtype))
        logits = (1 - self.alpha) * self.input_gate(flat) + self.alpha * task_logits
        top_values, top_index = logits.topk(self.topk, dim=-1)
        route_weights = top_values.float().softmax(dim=-1).to(logits.dtype)
        probs = logits.float().softmax(dim=-1).to(logits.dtype)
        routed = torch.zeros_like(probs).scatter(-1, top_index, 1.0)
        sizes = [flat.shape[0]] if part_rows is None else list(part_rows)
        prob_means = torch.stack([part.mean(dim=0) for part in probs.split(sizes)])
        routed_means = torch.stack([part.mean(dim=0) for part in routed.split(sizes)])
        aux = num_experts * (prob_means * routed_means).mean(dim=-1)

        # Dense dispatch: every expert runs on every row, scaled by its routing weight (zero where the row did
        # not choose it). Like the official per-expert call on a possibly empty selection, every expert then
        # gets a gradient each step (exactly zero when unchosen), so Adam steps it; and no host sync is needed.
        gates = torch.zeros_like(logits).scatter(-1, top_index, route_weights)
        if keeps_official_rounding(self.experts[0].down):
            # One call per expert: batched, the LayerNorm affine and the GEMMs round differently in fp16.
            weighted = [gates[:, index, None] * expert(flat) for index, expert in enumerate(self.experts)]
        else:
            weighted = gates.t().unsqueeze(-1) * self.all_experts(flat)
        # Summed in ascending expert order, one add at a time as the official accumulation; unchosen experts
        # add exact zeros.
        out = weighted[0]
        for expert_output in weighted[1:]:
            out = out + expert_output
        return out.reshape(u.shape), aux.float() if part_rows is not None else aux[0].float()

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
        """Self-attention of the slots ``x`` (B, slots, D) as ``coupling`` says, or ``"alone"``."""
        return self.attend_parts(x.reshape(-1, x.shape[-1]), [tuple(x.shape[:2])], coupling).reshape(x.shape)

    def attend_parts(self, rows: Tensor, shapes: Sequence[tuple[int, int]], coupling: str) -> Tensor:
        """Self-attention of packed parts: ``rows`` (sum of B*slots, D) holds parts of ``shapes`` (B, slots)
        back to back, each (B, slots, D) row-major; attention never crosses parts, the projections run once.

        ``"official"``: the official MHA is batch_first=False fed (B, slots, D), so per slot the B samples of
        a part attend to each other. ``"per-sample"``: the slots of one sample attend to each other.
        ``"alone"`` is the official coupling at batch size 1 computed for a whole batch: each slot attends
        only to itself, so every (sample, slot) is its own length-1 sequence.
        """
        width, heads = rows.shape[-1], self.attn.heads
        qkv = F.linear(rows, self.attn.in_proj_weight, self.attn.in_proj_bias)
        outputs = []
        for part, (batch, slots) in zip(qkv.split([batch * slots for batch, slots in shapes]), shapes):
            part = part.view(batch, slots, 3 * width)
            if coupling == "official":
                part = part.transpose(0, 1)
            elif coupling == ALONE_ATTENTION:
                part = part.reshape(-1, 1, 3 * width)
            n, length = part.shape[:2]
            q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in part.chunk(3, dim=-1))
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, width)
            outputs.append((out.transpose(0, 1) if coupling == "official" else out).reshape(-1, width))
        return self.attn.out_proj(outputs[0] if len(outputs) == 1 else torch.cat(outputs))

    def forward(self, x: Tensor, coupling: str) -> tuple[Tensor, Tensor]:
        """One part ``x`` (B, slots, D): (tokens like ``x``, its 0-dim aux)."""
        out, aux = self.forward_parts(x.reshape(-1, x.shape[-1]), [tuple(x.shape[:2])], coupling)
        return out.reshape(x.shape), aux[0]

    def forward_parts(self, rows: Tensor, shapes: Sequence[tuple[int, int]], coupling: str) -> tuple[Tensor, Tensor]:
        """Packed parts as in ``attend_parts``: (rows, aux per part ``(len(shapes),)``)."""
        x = rows + self.attend_parts(self.ln_1(rows), shapes, coupling)
        part_rows = [batch * slots for batch, slots in shapes]
        moe_out, aux = self.feed_forward(self.ln_3(x), self.comb_param, part_rows)
        return x + self.mlp(self.ln_2(x)) + moe_out, aux


class EFPTransformer(nn.Module):
    """The stack of EFP blocks (attribute ``shared_transformer``); returns (tokens, summed aux)."""

    def __init__(self, width: int, layers: int, heads: int, num_experts: int, topk: int, reduction: int):
        super().__init__()
        self.resblocks = nn.ModuleList(
            EFPBlock(width, heads, num_experts, topk, reduction) for _ in range(layers)
        )

    def forward(self, x: Tensor, coupling: str) -> tuple[Tensor, Tensor]:
        """One part ``x`` (B, slots, D): (tokens like ``x``, aux summed over the blocks, 0-dim)."""
        outputs, aux = self.forward_parts([x], coupling)
        return outputs[0], aux[0]

    def forward_parts(self, parts: Sequence[Tensor], coupling: str) -> tuple[list[Tensor], Tensor]:
        """Several parts (B_i, slots_i, D) in one pass: per-token layers run once on all their rows, while
        attention and the load-balancing term stay within each part. Returns (outputs, aux per part)."""
        shapes = [(part.shape[0], part.shape[1]) for part in parts]
        width = parts[0].shape[-1]
        rows = torch.cat([part.reshape(-1, width) for part in parts]) if len(parts) > 1 else parts[0].reshape(-1, width)
        aux_total = torch.zeros(len(parts), device=rows.device)
        for block in self.resblocks:
            rows, aux = block.forward_parts(rows, shapes, coupling)
            aux_total = aux_total + aux
        outputs = rows.split([batch * slots for batch, slots in shapes])
        return [out.view(*shape, width) for out, shape in zip(outputs, shapes)], aux_total


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

    def _fuse(
        self, global_tokens: Sequence[Tensor], tokens: Sequence[Tensor], modalities: Sequence[str], encoder: str | None
    ) -> tuple[list[Tensor], Tensor]:
        """Spec 2.6 per modality: global feature plus the slot mean of the encoder's branch (mean in the compute
        dtype); and the aux summed over the modalities (a_img + a_txt in training)."""
        encoder = self.config.variant if encoder is None else encoder
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
        features = [global_token.float() for global_token in global_tokens]
        aux = torch.zeros((), device=features[0].device)
        if encoder == "base":
            return features, aux
        if len(modalities) > 1 and self.config.sharing == "shared" and not keeps_official_rounding(self.safl.feed[1]):
            return self._fuse_shared(features, tokens, encoder)
        heads = [self._head(modality) for modality in modalities]
        if encoder in ("crfm", "full"):
            tokens = [crfm(part) for (crfm, _), part in zip(heads, tokens)]
        if encoder in ("efp", "full"):
            results = [efp(part, self._coupling) for (_, efp), part in zip(heads, tokens)]
            tokens = [out for out, _ in results]
            aux = torch.stack([part_aux for _, part_aux in results]).sum()
        return [feature + part.mean(dim=1) for feature, part in zip(features, tokens)], aux

    def _fuse_shared(self, features: list[Tensor], tokens: Sequence[Tensor], encoder: str) -> tuple[list[Tensor], Tensor]:
        """``_fuse`` for modalities sharing the head, in one pass through its per-token layers (CRFM feed-forward,
        EFP projections, MLPs and experts) while pooling, attention and the aux term stay within each modality:
        equal to one pass per modality, with half the kernel launches. Not in fp16: one pass would round each
        shared weight's gradient once where the official code rounds it per modality."""
        aux = torch.zeros((), device=features[0].device)
        if encoder in ("crfm", "full"):
            tokens = self.safl.forward_parts(tokens)
        if encoder in ("efp", "full"):
            tokens, part_aux = self.shared_transformer.forward_parts(tokens, self._coupling)
            aux = part_aux.sum()
        return [feature + part.mean(dim=1) for feature, part in zip(features, tokens)], aux

    def _text_tokens(self, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(global EOT token (B, D), all tokens (B, context, D)); the EOT position is the argmax of the ids."""
        tokens = self.base_model.encode_text(token_ids)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), token_ids.argmax(dim=-1)], tokens

    def encode_image(self, images: Tensor, encoder: str | None = None) -> Tensor:
        """``(B, D)`` fp32, not normalised; ``encoder`` None means ``config.variant``."""
        tokens = self.base_model.encode_image(images)
        return self._fuse([tokens[:, 0]], [tokens[:, 1:]], ["image"], encoder)[0][0]

    def encode_text(self, token_ids: Tensor, encoder: str | None = None) -> Tensor:
        """``(B, D)`` fp32, not normalised; the global token is the EOT position (argmax of the ids)."""
        eot, tokens = self._text_tokens(token_ids)
        return self._fuse([eot], [tokens], ["text"], encoder)[0][0]

    def _logits(self, features: Tensor) -> Tensor | None:
        if self.config.num_classes <= 0:
            return None
        return self.classifier(features.to(self.classifier.weight.dtype)).float()

    def forward(self, images: Tensor, token_ids: Tensor) -> PHPOutput:
        """Training forward: both modalities, through a shared EFP head in one pass."""
        image_tokens = self.base_model.encode_image(images)
        eot, text_tokens = self._text_tokens(token_ids)
        (image_feats, text_feats), aux = self._fuse(
            [image_tokens[:, 0], eot], [image_tokens[:, 1:], text_tokens], ["image", "text"], None
        )
        return PHPOutput(
            image_feats=image_feats,
            text_feats=text_feats,
            aux=aux,
            image_logits=self._logits(image_feats),
            text_logits=self._logits(text_feats),
        )
