"""The protocol audit's measurements of one model on one evaluation split: batch coupling and evaluation order.

The official EFP attention mixes the samples of a batch (spec 2.5), so a PHP embedding can depend
on its batch-mates and evaluation metrics on the test order and batch size. This module measures that:

1. ``batch_independence``: relative change of sampled embeddings between being encoded alone, in
   their evaluation batch and with other batch-mates, per modality, with a verdict.
2. ``order_sensitivity``: metrics in annotation order, with shuffled orders (several seeds) and
   with other test batch sizes; the headline is the ordered-minus-shuffled R1 gap, beside the
   text/image batch alignment and the R1 of chance (``batch_alignment``, ``chance_r1``).
   ``batch_size_sweep``: ordered and shuffled metrics at each evaluation batch size of
   ``SWEEP_BATCH_SIZES`` (1, 8, 64, 256), so a reader sees how the gap grows with the batch.

The measurements share one ``Evaluations`` memo, so an evaluation several of them need runs once.
The data split and checkpoint selection checks are ``engine/split_audit.py`` and
``engine/selection.py``; ``studies/audit.py`` composes all of them into the stored report.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from php_runner.data import EvalSplit
from php_runner.data.loaders import ImageSet, TextSet
from php_runner.data.transforms import build_transform
from php_runner.engine.evaluate import EvalSettings, evaluate
from php_runner.engine.metrics import QueryOutcomes, METRIC_NAMES, metric_values
from php_runner.model.precision import autocast_context

# A relative embedding change below this is float noise, not batch dependence: fp32 rounding of a
# batch-size-dependent kernel is ~1e-7 relative, genuine EFP coupling is orders of magnitude larger.
RELATIVE_THRESHOLD = 1e-4
# In lower precision (the official fp16 layout) kernel rounding alone can exceed RELATIVE_THRESHOLD,
# so the threshold is raised to this multiple of the change measured on the CLIP-only encoder, which
# is batch-independent by construction (spec 2.6).
NOISE_MARGIN = 10.0

# Evaluation batch sizes of the sweep: alone, the tiny training batch, the official test batch, and larger.
SWEEP_BATCH_SIZES = (1, 8, 64, 256)


@dataclass(frozen=True)
class AuditSettings:
    """How the audit evaluates: the evaluation settings it varies and the sample it probes."""

    eval: EvalSettings
    train_batch_size: int = 64
    seeds: int = 3  # shuffled evaluations, seeds 0..seeds-1
    sweep_seeds: int = 1  # shuffled evaluations per batch size of the sweep (each costs a full evaluation)
    sample_size: int = 16  # queries and gallery images probed for batch independence
    sample_seed: int = 0
    max_examples: int = 5  # examples listed per split-audit finding
    hash_workers: int = 8


# ----------------------------------------------------------------------------------------------
# 1. Batch independence


def relative_change(changed: Tensor, reference: Tensor) -> Tensor:
    """Per-row ``||changed - reference|| / ||reference||`` (rows are embeddings)."""
    changed, reference = changed.double(), reference.double()
    return (changed - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-12)


def evaluation_batch(index: int, total: int, batch_size: int) -> list[int]:
    """Indices of the annotation-order evaluation batch holding ``index`` (the last one may be partial)."""
    start = index // batch_size * batch_size
    return list(range(start, min(start + batch_size, total)))


def other_batch(index: int, size: int, total: int, exclude: set[int], rng: random.Random) -> list[int]:
    """``index`` first, then ``size - 1`` random batch-mates, avoiding ``exclude`` while enough others exist."""
    pool = [i for i in range(total) if i != index and i not in exclude]
    if len(pool) < size - 1:
        pool = [i for i in range(total) if i != index]
    return [index, *rng.sample(pool, min(size - 1, len(pool)))]


def _figures(values: Tensor) -> dict:
    return {"max": float(values.max()), "mean": float(values.mean())}


def probe_batch_dependence(
    encode: Callable[[list[int]], Tensor],
    total: int,
    batch_size: int,
    sample: Sequence[int],
    rng: random.Random,
) -> dict:
    """Relative changes of the sampled embeddings, taking the evaluation-batch embedding as reference.

    ``encode(indices)`` encodes those items as ONE batch and returns their embeddings in that order.
    Returns ``{"alone": figures, "other_batch": figures}`` with figures ``{"max", "mean"}``.
    """
    reference: dict[int, Tensor] = {}
    for index in sample:
        if index not in reference:
            batch = evaluation_batch(index, total, batch_size)
            embeddings = encode(batch)
            for position, member in enumerate(batch):
                reference[member] = embeddings[position]
    alone, others = [], []
    for index in sample:
        alone.append(encode([index])[0])
        in_batch = evaluation_batch(index, total, batch_size)
        others.append(encode(other_batch(index, len(in_batch), total, set(in_batch), rng))[0])
    ref = torch.stack([reference[i] for i in sample])
    return {
        "alone": _figures(relative_change(torch.stack(alone), ref)),
        "other_batch": _figures(relative_change(torch.stack(others), ref)),
    }


def _item_encoder(model, items, modality: str, encoder: str | None, settings: EvalSettings):
    """A function encoding a list of item indices of ``items`` (an ImageSet/TextSet) as one batch."""
    method = model.encode_image if modality == "image" else model.encode_text
    device = torch.device(settings.device)

    def encode(indices: list[int]) -> Tensor:
        inputs = torch.stack([items[i][1] for i in indices]).to(device)
        with torch.no_grad(), autocast_context(settings.precision, device):
            return method(inputs, encoder=encoder).float().cpu()

    return encode


def batch_independence(model, split: EvalSplit, settings: AuditSettings) -> dict:
    """Probe sampled queries and gallery images; verdict per modality and overall.

    The threshold is ``max(RELATIVE_THRESHOLD, NOISE_MARGIN * noise floor)``, the noise floor being
    the largest change the batch-independent CLIP-only encoder shows on the same probes.
    """
    eval_settings = settings.eval
    was_training = model.training
    model.eval()
    model.to(eval_settings.device)
    try:
        probes = _probe_both_modalities(model, split, settings)
    finally:
        model.train(was_training)
    noise_floor = max(
        figures["max"] for measured in probes.values() for figures in measured["base"].values()
    )
    threshold = max(RELATIVE_THRESHOLD, NOISE_MARGIN * noise_floor)
    result: dict = {"batch_size": eval_settings.batch_size, "threshold": threshold, "noise_floor": noise_floor}
    for modality, measured in probes.items():
        figures = measured[eval_settings.encoder or "model"]
        largest = max(entry["max"] for entry in figures.values())
        result[modality] = {"batch_dependent": largest > threshold, "probed": measured["probed"], **figures}
    result["batch_dependent"] = result["text"]["batch_dependent"] or result["image"]["batch_dependent"]
    return result


def _probe_both_modalities(model, split: EvalSplit, settings: AuditSettings) -> dict:
    """``{modality: {"probed": n, "model" or encoder: figures, "base": figures}}``."""
    eval_settings = settings.eval
    sets = {
        "text": TextSet(split.caption_pids, split.captions),
        "image": ImageSet(split.image_pids, split.img_paths, build_transform(eval_settings.image_size, train=False)),
    }
    probes = {}
    for modality, items in sets.items():
        rng = random.Random(f"{settings.sample_seed}-{modality}")
        sample = sorted(rng.sample(range(len(items)), min(settings.sample_size, len(items))))
        measured: dict = {"probed": len(sample)}
        for encoder in (eval_settings.encoder, "base"):
            encode = _item_encoder(model, items, modality, encoder, eval_settings)
            # The same batch-mates for both encoders, so the noise floor probes the same batches.
            mates = random.Random(f"{settings.sample_seed}-{modality}-mates")
            measured[encoder or "model"] = probe_batch_dependence(
                encode, len(items), eval_settings.batch_size, sample, mates
            )
        probes[modality] = measured
    return probes


# ----------------------------------------------------------------------------------------------
# 2. Order and batch-size sensitivity


class Evaluations:
    """Metrics of one model on one split per (order, shuffle seed, batch size), each evaluated once.

    ``base`` gives everything else (device, precision, encoder, image size). The seed only matters
    for the shuffled order, so ordered evaluations share one entry whatever the seed.
    """

    def __init__(self, model, split: EvalSplit, base: EvalSettings):
        self.model, self.split, self.base = model, split, base
        self._done: dict[tuple[str, int, int], dict] = {}
        self.outcomes: dict[tuple[str, int, int], QueryOutcomes] = {}  # per-query outcomes, same keys

    def metrics(self, order: str = "annotation", seed: int = 0, batch_size: int | None = None) -> dict:
        size = self.base.batch_size if batch_size is None else batch_size
        key = (order, seed if order == "shuffled" else 0, size)
        if key not in self._done:
            settings = replace(self.base, order=order, seed=key[1], batch_size=size)
            metrics, self.outcomes[key] = evaluate(self.model, self.split, settings, outcomes=True)
            self._done[key] = metric_values(metrics)
        return self._done[key]

    def base_batch_outcomes(self) -> dict[tuple[str, int], QueryOutcomes]:
        """Per-query outcomes at the base batch size, by (order, shuffle seed)."""
        return {(order, seed): outcomes for (order, seed, batch), outcomes in self.outcomes.items()
                if batch == self.base.batch_size}


def mean_and_std(runs: Sequence[dict]) -> dict:
    """Per-metric mean over runs, plus ``std`` (sample standard deviation; 0.0 for a single run)."""
    mean = {name: statistics.fmean(run[name] for run in runs) for name in METRIC_NAMES}
    std = {
        name: statistics.stdev(run[name] for run in runs) if len(runs) > 1 else 0.0 for name in METRIC_NAMES
    }
    return {**mean, "std": std}


def batch_alignment(split: EvalSplit, batch_size: int) -> dict:
    """How often text batch k and image batch k hold the same people in annotation order.

    ``queries_with_match_in_same_batch``: share of captions whose identity has an image in the
    image batch with the same index, the situation in which a batch-context term can point a query
    at its match (spec 2.5; every ICFG caption is in this situation).
    ``identical_batches``: share of batch indices whose text and image batches hold the same pid multiset.
    """
    def batches(pids: Sequence[int]) -> list[list[int]]:
        return [list(pids[start : start + batch_size]) for start in range(0, len(pids), batch_size)]

    text_batches, image_batches = batches(split.caption_pids), batches(split.image_pids)
    with_match = sum(
        pid in set(image_batches[k]) if k < len(image_batches) else False
        for k, batch in enumerate(text_batches)
        for pid in batch
    )
    identical = sum(
        sorted(text) == sorted(image) for text, image in zip(text_batches, image_batches)
    )
    return {
        "batch_size": batch_size,
        "queries_with_match_in_same_batch": with_match / max(len(split.caption_pids), 1),
        "identical_batches": identical / max(len(text_batches), 1),
    }


def chance_r1(split: EvalSplit, batch_size: int) -> dict:
    """R1 (percent) of a retriever that picks uniformly at random, from the whole gallery and from the image batch
    with the query's batch index (annotation order): the second is what a pure batch shortcut would reach."""
    image_pids = list(split.image_pids)
    gallery = Counter(image_pids)
    starts = range(0, len(image_pids), batch_size)
    image_batches = [Counter(image_pids[start : start + batch_size]) for start in starts]
    whole, in_batch = [], []
    for position, pid in enumerate(split.caption_pids):
        whole.append(gallery[pid] / max(len(image_pids), 1))
        k = position // batch_size
        batch = image_batches[k] if k < len(image_batches) else Counter()
        in_batch.append(batch[pid] / max(sum(batch.values()), 1))
    count = max(len(whole), 1)
    return {"gallery": 100 * sum(whole) / count, "same_batch": 100 * sum(in_batch) / count, "batch_size": batch_size}


def order_sensitivity(model, split: EvalSplit, settings: AuditSettings, evaluations: Evaluations | None = None) -> dict:
    """Metrics in annotation order, shuffled (mean and std over seeds) and at other batch sizes."""
    base = replace(settings.eval, order="annotation")
    evaluations = evaluations or Evaluations(model, split, base)
    ordered = evaluations.metrics()
    shuffled_runs = [evaluations.metrics("shuffled", seed) for seed in range(settings.seeds)]
    shuffled = {**mean_and_std(shuffled_runs), "seeds": list(range(settings.seeds)), "runs": shuffled_runs}
    by_batch_size = {str(base.batch_size): ordered}
    for size in (1, settings.train_batch_size):
        if str(size) not in by_batch_size:
            by_batch_size[str(size)] = evaluations.metrics(batch_size=size)
    variants = [*shuffled_runs, *by_batch_size.values()]
    largest_change = max(abs(run[name] - ordered[name]) for run in variants for name in METRIC_NAMES)
    return {
        "ordered": ordered,
        "shuffled": shuffled,
        "batch_sizes": by_batch_size,
        "r1_gap": ordered["R1"] - shuffled["R1"],
        # Any metric of any shuffled or re-batched evaluation differing from the ordered one, even
        # when R1 happens to agree.
        "order_sensitive": largest_change > 0.0,
        "max_metric_change": largest_change,
        "alignment": batch_alignment(split, base.batch_size),
        "chance_r1": chance_r1(split, base.batch_size),
    }


def batch_size_sweep(
    model,
    split: EvalSplit,
    settings: AuditSettings,
    batch_sizes: Sequence[int] = SWEEP_BATCH_SIZES,
    evaluations: Evaluations | None = None,
) -> dict:
    """Ordered and shuffled metrics (mean and std over ``settings.sweep_seeds``) at each evaluation batch size.

    Returns ``{"batch_sizes": [...], "ordered": {size: metrics}, "shuffled": {size: mean_and_std},
    "r1_gap": {size: ordered minus shuffled R1}}`` with sizes as strings (JSON keys). At batch size 1
    each sample is encoded alone (no batch-mates), which is the model's batch-independent R1, and the
    shuffled entry is the ordered one.
    """
    evaluations = evaluations or Evaluations(model, split, replace(settings.eval, order="annotation"))
    ordered, shuffled, gaps = {}, {}, {}
    for size in batch_sizes:
        key = str(size)
        ordered[key] = evaluations.metrics(batch_size=size)
        # A batch of one has no batch-mates, so every order gives the ordered embeddings: not evaluated again.
        runs = [ordered[key]] if size == 1 else [
            evaluations.metrics("shuffled", seed, size) for seed in range(settings.sweep_seeds)]
        shuffled[key] = {**mean_and_std(runs), "runs": runs}
        gaps[key] = ordered[key]["R1"] - shuffled[key]["R1"]
    return {
        "batch_sizes": list(batch_sizes),
        "seeds": list(range(settings.sweep_seeds)),
        "ordered": ordered,
        "shuffled": shuffled,
        "r1_gap": gaps,
    }
