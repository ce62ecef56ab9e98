"""PHP's training losses (spec 4): sdm, itc, aux, id, cmpm, with a fixed logit scale 1/temperature.

All losses take the fp32 fused features of ``PHPOutput``. ``compute_losses`` returns each active loss
already multiplied by its official weight, plus their sum as ``total``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from php_runner.model.php import PHPOutput

LOSS_NAMES = ("sdm", "itc", "aux", "id", "cmpm")
LABEL_EPSILON = 1e-8  # keeps log() finite on the zero entries of the label distributions


@dataclass(frozen=True)
class LossConfig:
    names: tuple[str, ...] = ("sdm", "itc", "aux")
    temperature: float = 0.02
    itc_weight: float = 5.0  # hard-coded x5 in the official code
    aux_factor: float = 0.5

    def __post_init__(self) -> None:
        unknown = [name for name in self.names if name not in LOSS_NAMES]
        if unknown or not self.names:
            raise ValueError(f"loss names must be a non-empty subset of {', '.join(LOSS_NAMES)}, got {list(self.names)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


def _same_identity(pids: Tensor) -> Tensor:
    pids = pids.reshape(-1, 1)
    return (pids == pids.t()).float()


def _matching_kl(logits: Tensor, label_distribution: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(logits) || labels), labels smoothed by LABEL_EPSILON inside the log."""
    probs = logits.softmax(dim=1)
    per_entry = probs * (logits.log_softmax(dim=1) - torch.log(label_distribution + LABEL_EPSILON))
    return per_entry.sum(dim=1).mean()


def cosine_similarity(text_feats: Tensor, image_feats: Tensor) -> Tensor:
    """Text-to-image cosine similarities ``(texts, images)``: the one matrix SDM and ITC both start from."""
    return F.normalize(text_feats, dim=1) @ F.normalize(image_feats, dim=1).t()


def sdm_loss(image_feats: Tensor, text_feats: Tensor, pids: Tensor, logit_scale: float) -> Tensor:
    """IRRA's similarity-distribution matching, both directions, labels = same-identity rows normalised."""
    return sdm_from_cosine(cosine_similarity(text_feats, image_feats), pids, logit_scale)


def sdm_from_cosine(t2i_cosine: Tensor, pids: Tensor, logit_scale: float) -> Tensor:
    labels = _same_identity(pids)
    labels = labels / labels.sum(dim=1, keepdim=True)
    t2i = logit_scale * t2i_cosine
    return _matching_kl(t2i.t(), labels) + _matching_kl(t2i, labels)


def itc_loss(image_feats: Tensor, text_feats: Tensor, logit_scale: float) -> Tensor:
    """CLIP InfoNCE with diagonal targets, mean of the two directions (unweighted)."""
    return itc_from_cosine(cosine_similarity(text_feats, image_feats), logit_scale)


def itc_from_cosine(t2i_cosine: Tensor, logit_scale: float) -> Tensor:
    logits = logit_scale * t2i_cosine
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits.t(), targets) + F.cross_entropy(logits, targets)) / 2


def cmpm_loss(image_feats: Tensor, text_feats: Tensor, pids: Tensor) -> Tensor:
    """IRRA's CMPM: raw features projected on the other side's unit vectors; labels divided by their L2 norm."""
    labels = _same_identity(pids)
    labels = labels / labels.norm(dim=1, keepdim=True)
    image_on_text = image_feats @ F.normalize(text_feats, dim=1).t()
    text_on_image = text_feats @ F.normalize(image_feats, dim=1).t()
    return _matching_kl(image_on_text, labels) + _matching_kl(text_on_image, labels)


def id_loss(image_logits: Tensor, text_logits: Tensor, pids: Tensor) -> Tensor:
    """Identity classification on both modalities, averaged (no extra weight, as official)."""
    return (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2


def compute_losses(output: PHPOutput, pids: Tensor, config: LossConfig) -> dict[str, Tensor]:
    """``{"<name>_loss": weighted value, ..., "total": sum}`` for the names in ``config``."""
    scale = 1.0 / config.temperature
    image_feats, text_feats = output.image_feats.float(), output.text_feats.float()
    # SDM and ITC share one normalisation and one similarity matrix (ITC reads it transposed).
    cosine = cosine_similarity(text_feats, image_feats) if {"sdm", "itc"} & set(config.names) else None
    losses: dict[str, Tensor] = {}
    for name in config.names:
        if name == "sdm":
            value = sdm_from_cosine(cosine, pids, scale)
        elif name == "itc":
            value = config.itc_weight * itc_from_cosine(cosine, scale)
        elif name == "aux":
            value = config.aux_factor * output.aux.float()
        elif name == "cmpm":
            value = cmpm_loss(image_feats, text_feats, pids)
        else:
            if output.image_logits is None or output.text_logits is None:
                raise ValueError("the id loss needs a model built with num_classes > 0")
            value = id_loss(output.image_logits.float(), output.text_logits.float(), pids)
        losses[f"{name}_loss"] = value
    losses["total"] = torch.stack(list(losses.values())).sum()
    return losses
