"""Embedding extraction and text-to-image retrieval evaluation (spec 2.5 and 7).

The official evaluator encodes all captions first, then all images, each in its own unshuffled
loader in annotation order with ``batch_size`` samples per batch and the final partial batch kept.
With the official EFP coupling an embedding depends on its batch-mates, so this batching is part of
the protocol. ``order="shuffled"`` batches queries and gallery in a seeded random permutation instead
(to probe that coupling); embeddings are always returned in annotation order.

Where the protocol batch cannot matter it is not used: encoders whose embeddings do not depend on
batch-mates (the per-sample coupling, and the ``base`` and ``crfm`` encoders, which have no EFP
attention) encode at ``independent_batch_size``. The official coupling at batch size 1 is each EFP slot
attending only to itself; it is computed for ``independent_batch_size`` samples at once with the EFP
blocks' ``alone`` attention, which gives the batch-size-1 embeddings (tested). Scoring runs on
``device``, chunked over queries. The ``amp`` regime on CUDA encodes with a bf16 cast of the weights
(``precision.weights_as``; the fp32 masters come back after) instead of autocast over fp32 weights.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from php_runner.data import EvalSplit
from php_runner.data.loaders import ImageSet, TextSet
from php_runner.data.transforms import build_transform
from php_runner.engine.metrics import metrics_from_outcomes, query_outcomes, retrieval_metrics
from php_runner.model.precision import autocast_context, float32_matmul_scope, inference_weight_dtype, weights_as

ORDERS = ("annotation", "shuffled")
BATCH_INDEPENDENT_ENCODERS = ("base", "crfm")  # no EFP attention, so nothing couples batch-mates


@dataclass
class EvalSettings:
    """How test embeddings are computed; the defaults are the official protocol."""

    batch_size: int = 64
    order: str = "annotation"
    seed: int = 0
    encoder: str | None = None  # None: the model's own variant
    device: str = "cpu"
    precision: str = "official"
    num_workers: int = 0
    image_size: tuple[int, int] = (384, 128)
    image_cache: object | None = None  # an open data.cache.ImageCache at image_size: images are read from it
    independent_batch_size: int = 512  # batch of encodings that cannot depend on it (see the module text)

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        for name in ("batch_size", "independent_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class Embeddings:
    """Unnormalised fp32 CPU embeddings and their pids, in annotation order."""

    text: torch.Tensor
    image: torch.Tensor
    text_pids: torch.Tensor
    image_pids: torch.Tensor


def _batch_order(size: int, settings: EvalSettings, generator: torch.Generator) -> torch.Tensor:
    if settings.order == "annotation":
        return torch.arange(size)
    return torch.randperm(size, generator=generator)


def encoding_plan(model, settings: EvalSettings) -> tuple[int, bool]:
    """(batch size, whether the EFP blocks attend alone) that extraction encodes with."""
    encoder = settings.encoder or model.config.variant
    if encoder in BATCH_INDEPENDENT_ENCODERS or model.coupling != "official":
        return settings.independent_batch_size, False
    if settings.batch_size == 1:
        return settings.independent_batch_size, True
    return settings.batch_size, False


@torch.no_grad()
def _encode(model, dataset: Dataset, order: torch.Tensor, encode, settings: EvalSettings,
            batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``dataset`` in batches of ``order``; return (features, pids) in dataset order."""
    device = torch.device(settings.device)
    loader = DataLoader(
        Subset(dataset, order.tolist()),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
    )
    features, pids = [], []
    # bf16 weights (amp on CUDA) compute in bf16 without autocast; otherwise the precision's autocast.
    weights_cast = inference_weight_dtype(settings.precision, device) is not None
    for batch_pids, inputs in loader:
        with nullcontext() if weights_cast else autocast_context(settings.precision, device):
            output = encode(inputs.to(device, non_blocking=True), encoder=settings.encoder)
        features.append(output.float().cpu())
        pids.append(batch_pids)
    in_batch_order = torch.cat(features)
    restored = torch.empty_like(in_batch_order)
    restored[order] = in_batch_order
    restored_pids = torch.empty(len(order), dtype=torch.long)
    restored_pids[order] = torch.cat(pids).long()
    return restored, restored_pids


def extract_embeddings(model, split: EvalSplit, settings: EvalSettings | None = None) -> Embeddings:
    """Text then image embeddings of ``split``, batched as ``settings`` says, returned in annotation order."""
    settings = settings or EvalSettings()
    was_training = model.training
    model.eval()
    model.to(settings.device)
    generator = torch.Generator().manual_seed(settings.seed)
    batch_size, alone = encoding_plan(model, settings)
    try:
        with model.attending_alone() if alone else nullcontext(), \
                weights_as(model, inference_weight_dtype(settings.precision, settings.device)):
            texts = TextSet(split.caption_pids, split.captions)
            text_order = _batch_order(len(texts), settings, generator)
            text, text_pids = _encode(model, texts, text_order, model.encode_text, settings, batch_size)
            images = ImageSet(split.image_pids, split.img_paths, build_transform(settings.image_size, train=False),
                              cache=settings.image_cache)
            image_order = _batch_order(len(images), settings, generator)
            image, image_pids = _encode(model, images, image_order, model.encode_image, settings, batch_size)
    finally:
        model.train(was_training)
    return Embeddings(text=text, image=image, text_pids=text_pids, image_pids=image_pids)


def score_embeddings(embeddings: Embeddings, i2t: bool = False, device: str | torch.device = "cpu",
                     outcomes: bool = False):
    """Metrics of cosine-similarity retrieval: captions query images; ``i2t`` adds the reverse direction.

    The similarity matrix and the ranking (chunked over queries) are computed on ``device``; the similarity in
    full fp32 whatever the process's matmul precision (TF32 scores move ranks, hence R5 and mAP, on CUDA). With
    ``outcomes``: ``(metrics, QueryOutcomes)``, the text-to-image per-query outcomes the metrics average.
    """
    text = F.normalize(embeddings.text.to(device), p=2, dim=1)
    image = F.normalize(embeddings.image.to(device), p=2, dim=1)
    with float32_matmul_scope(allow_tf32=False):
        similarity = text @ image.t()
    per_query = query_outcomes(similarity, embeddings.text_pids, embeddings.image_pids)
    metrics = metrics_from_outcomes(per_query)
    if i2t:
        metrics["i2t"] = retrieval_metrics(similarity.t(), embeddings.image_pids, embeddings.text_pids)
    return (metrics, per_query) if outcomes else metrics


def evaluate(model, split: EvalSplit, settings: EvalSettings | None = None, i2t: bool = False,
             outcomes: bool = False):
    """Text-to-image metrics (R1, R5, R10, mAP, mINP) of ``model`` on ``split``; ``i2t`` adds an "i2t" sub-dict.

    With ``outcomes``: ``(metrics, QueryOutcomes)`` (see ``score_embeddings``).
    """
    settings = settings or EvalSettings()
    return score_embeddings(extract_embeddings(model, split, settings), i2t=i2t, device=settings.device,
                            outcomes=outcomes)
