"""Protocol audit: batch coupling, evaluation order, split leakage and checkpoint selection.

The official EFP attention mixes the samples of a batch (spec 2.5), so a PHP embedding can depend
on its batch-mates and evaluation metrics on the test order and batch size. This module measures
that for one model on one dataset and checks the data split and the checkpoint selection:

1. ``batch_independence``: relative change of sampled embeddings between being encoded alone, in
   their evaluation batch and with other batch-mates, per modality, with a verdict.
2. ``order_sensitivity``: metrics in annotation order, with shuffled orders (several seeds) and
   with other test batch sizes; the headline is the ordered-minus-shuffled R1 gap.
   ``batch_size_sweep``: ordered and shuffled metrics at each evaluation batch size of
   ``SWEEP_BATCH_SIZES`` (1, 8, 64, 256), so a reader sees how the gap grows with the batch.
3. ``split_audit``: train/val/test overlap of image paths, image content (sha256) and identities,
   captions shared across identities, captions per image.
4. ``selection_audit``: which split chose the checkpoint and how far best-on-test, best-on-val and
   the last epoch lie apart on the test metrics.

``run_audit`` composes them into one JSON-able report; ``audit_summary`` extracts the few keys
tables show. The sections share one ``Evaluations`` memo, so an evaluation several of them need
runs once.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from php_runner.data import EvalSplit, PedesDataset, read_dataset
from php_runner.data.loaders import ImageSet, TextSet
from php_runner.data.transforms import build_transform
from php_runner.engine.evaluate import EvalSettings, evaluate
from php_runner.engine.metrics import QueryOutcomes
from php_runner.engine.train import resolve_device
from php_runner.errors import InputError
from php_runner.model.checkpoint import extract_state_dict, load_checkpoint_file, load_model, load_state_dict_checked
from php_runner.model.php import PHPModel
from php_runner.model.precision import apply_precision, autocast_context
from php_runner.experiment.build import build_php_config
from php_runner.execute.checkpoints import verified_checkpoint
from php_runner.store.tables import AUDIT_ORDERED_SOURCE, AUDIT_SHUFFLED_SOURCE

METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")

# A relative embedding change below this is float noise, not batch dependence: fp32 rounding of a
# batch-size-dependent kernel is ~1e-7 relative, genuine EFP coupling is orders of magnitude larger.
RELATIVE_THRESHOLD = 1e-4
# In lower precision (the official fp16 layout) kernel rounding alone can exceed RELATIVE_THRESHOLD,
# so the threshold is raised to this multiple of the change measured on the CLIP-only encoder, which
# is batch-independent by construction (spec 2.6).
NOISE_MARGIN = 10.0

SUMMARY_KEYS = ("batch_dependent", "r1_ordered", "r1_shuffled", "r1_shuffled_std", "r1_gap")
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


def _metrics(values: dict) -> dict:
    return {name: float(values[name]) for name in METRIC_NAMES}


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
            self._done[key] = _metrics(metrics)
        return self._done[key]

    def recorded_outcomes(self) -> dict[str, QueryOutcomes]:
        """Outcomes at the base batch size by registry source: ordered, and each shuffled seed."""
        size = self.base.batch_size
        return {AUDIT_ORDERED_SOURCE if order == "annotation" else AUDIT_SHUFFLED_SOURCE.format(seed=seed): outcomes
                for (order, seed, batch), outcomes in self.outcomes.items() if batch == size}


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


# ----------------------------------------------------------------------------------------------
# 3. Data split audit


@dataclass(frozen=True)
class SplitView:
    """What the split audit needs of one split: images with their identities, captions with theirs."""

    name: str
    image_paths: list[str]
    image_pids: list[int]  # raw annotation ids, comparable across splits
    caption_pids: list[int]
    captions: list[str]
    captions_per_image: list[int] | None  # None where the split does not link captions to images


def raw_identity(dataset_name: str, split_name: str, pid: int) -> int:
    """The annotation ``id`` behind a loader pid: CUHK-PEDES train pids are ``id - 1`` (spec 6)."""
    return pid + 1 if dataset_name == "CUHK-PEDES" and split_name == "train" else pid


def split_views(dataset: PedesDataset) -> list[SplitView]:
    """The train split (one entry per image) and the val/test evaluation splits as ``SplitView``s."""
    images: dict[str, int] = {}
    counts: Counter[str] = Counter()
    for item in dataset.train:
        images.setdefault(str(item.img_path), raw_identity(dataset.name, "train", item.pid))
        counts[str(item.img_path)] += 1
    views = [
        SplitView(
            name="train",
            image_paths=list(images),
            image_pids=list(images.values()),
            caption_pids=[raw_identity(dataset.name, "train", item.pid) for item in dataset.train],
            captions=[item.caption for item in dataset.train],
            captions_per_image=[counts[path] for path in images],
        )
    ]
    for name in ("val", "test"):
        split = getattr(dataset, name)
        if split is None or not split.img_paths:
            continue
        views.append(
            SplitView(
                name=name,
                image_paths=[str(path) for path in split.img_paths],
                image_pids=list(split.image_pids),
                caption_pids=list(split.caption_pids),
                captions=list(split.captions),
                # EvalSplit keeps captions and images as separate lists, so captions cannot be linked to images.
                captions_per_image=None,
            )
        )
    return views


def sha256_of_file(path: str | Path) -> str | None:
    """Hex sha256 of the file's bytes, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def normalise_caption(caption: str) -> str:
    """Lower-case with collapsed whitespace, so trivially different copies of one caption match."""
    return " ".join(caption.lower().split())


def _examples(items: Iterable, limit: int) -> list:
    return sorted(items, key=str)[:limit]


def _distribution(values: Iterable[int]) -> dict[str, int]:
    counts = Counter(values)
    return {str(value): counts[value] for value in sorted(counts)}


def split_audit(views: Sequence[SplitView], max_examples: int = 5, hash_workers: int = 8) -> dict:
    """Overlaps between every pair of splits, captions shared across identities, captions per image.

    Paths are compared as the dataset reader wrote them; copies under other paths are found by content.
    """
    all_paths = sorted({path for view in views for path in view.image_paths})
    with ThreadPoolExecutor(max_workers=hash_workers) as pool:
        digests = dict(zip(all_paths, pool.map(sha256_of_file, all_paths)))
    unreadable = [path for path, digest in digests.items() if digest is None]

    overlaps = {}
    for position, first in enumerate(views):
        for second in views[position + 1 :]:
            shared_paths = set(first.image_paths) & set(second.image_paths)
            first_hashes = defaultdict(list)
            for path in first.image_paths:
                if digests[path] is not None:
                    first_hashes[digests[path]].append(path)
            shared_content = [
                (first_hashes[digests[path]][0], path)
                for path in second.image_paths
                if digests[path] is not None and digests[path] in first_hashes
            ]
            shared_ids = set(first.image_pids) & set(second.image_pids)
            overlaps[f"{first.name}-{second.name}"] = {
                "image_paths": {"count": len(shared_paths), "examples": _examples(shared_paths, max_examples)},
                "image_content": {
                    "count": len(shared_content),
                    "examples": [list(pair) for pair in _examples(shared_content, max_examples)],
                },
                "identities": {"count": len(shared_ids), "examples": _examples(shared_ids, max_examples)},
            }

    owners: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for view in views:
        for caption, pid in zip(view.captions, view.caption_pids):
            owners[normalise_caption(caption)].add((view.name, pid))
    shared_captions = {caption: holders for caption, holders in owners.items() if len({pid for _, pid in holders}) > 1}
    return {
        "splits": {
            view.name: {
                "images": len(view.image_paths),
                "identities": len(set(view.image_pids)),
                "captions": len(view.captions),
                "captions_per_image": None
                if view.captions_per_image is None
                else _distribution(view.captions_per_image),
                "captions_per_identity": _distribution(Counter(view.caption_pids).values()),
            }
            for view in views
        },
        "unreadable_images": {"count": len(unreadable), "examples": unreadable[:max_examples]},
        "overlaps": overlaps,
        "captions_shared_across_identities": {
            "count": len(shared_captions),
            "examples": [
                {"caption": caption, "holders": [list(holder) for holder in sorted(holders)]}
                for caption, holders in sorted(shared_captions.items())[:max_examples]
            ],
        },
    }


# ----------------------------------------------------------------------------------------------
# 4. Selection audit


def _best_epoch(by_epoch: dict[int, dict]) -> int | None:
    """Earliest epoch with the highest R1 (the official rule writes best.pth only on strict improvement)."""
    best = None
    for epoch in sorted(by_epoch):
        if best is None or by_epoch[epoch]["R1"] > by_epoch[best]["R1"]:
            best = epoch
    return best


def selection_audit(test_by_epoch: dict[int, dict], val_by_epoch: dict[int, dict] | None, selection: str) -> dict:
    """Which split chose the checkpoint, and the test metrics of each selection rule.

    ``selection`` is the training rule (``test`` | ``val`` | ``last``). Gaps are test R1 differences:
    ``test_minus_last`` and ``test_minus_val`` measure how much choosing the epoch on the test split
    itself flatters the reported number.
    """
    rules: dict[str, dict | None] = {"best-on-test": None, "best-on-val": None, "last": None}
    if test_by_epoch:
        best = _best_epoch(test_by_epoch)
        rules["best-on-test"] = {"epoch": best, "test": _metrics(test_by_epoch[best])}
        last = max(test_by_epoch)
        rules["last"] = {"epoch": last, "test": _metrics(test_by_epoch[last])}
    if val_by_epoch:
        best = _best_epoch(val_by_epoch)
        rules["best-on-val"] = {
            "epoch": best,
            "val": _metrics(val_by_epoch[best]),
            "test": _metrics(test_by_epoch[best]) if best in test_by_epoch else None,
        }

    def gap(rule: str) -> float | None:
        chosen, other = rules["best-on-test"], rules[rule]
        if chosen is None or other is None or other.get("test") is None:
            return None
        return chosen["test"]["R1"] - other["test"]["R1"]

    return {
        "selected_by": {"test": "test", "val": "val", "last": "none (last epoch)"}.get(selection, selection),
        "epochs": len(test_by_epoch),
        "rules": rules,
        "r1_gaps": {"test_minus_val": gap("best-on-val"), "test_minus_last": gap("last")},
    }


# ----------------------------------------------------------------------------------------------
# The whole audit


def run_audit(
    model,
    dataset: PedesDataset,
    settings: AuditSettings,
    selection: dict | None = None,
    evaluations: Evaluations | None = None,
) -> dict:
    """All four sections for ``model`` on ``dataset``'s test split, as one JSON-able report.

    ``selection`` is a ``selection_audit`` result (or ``None`` when nothing is known of the run).
    ``evaluations`` (from ``audit_evaluations``) keeps the per-query outcomes for the caller.
    """
    started = time.perf_counter()
    evaluations = evaluations or audit_evaluations(model, dataset, settings)
    order = order_sensitivity(model, dataset.test, settings, evaluations)
    sweep = batch_size_sweep(model, dataset.test, settings, evaluations=evaluations)
    independence = batch_independence(model, dataset.test, settings)
    return {
        "dataset": dataset.name,
        "coupling": model.coupling,
        "encoder": settings.eval.encoder or model.config.variant,
        "eval_batch_size": settings.eval.batch_size,
        "batch_dependent": independence["batch_dependent"],
        "r1_ordered": order["ordered"]["R1"],
        "r1_shuffled": order["shuffled"]["R1"],
        "r1_shuffled_std": order["shuffled"]["std"]["R1"],
        "r1_gap": order["r1_gap"],
        "batch_independence": independence,
        **order,
        "batch_size_sweep": sweep,
        "split": split_audit(split_views(dataset), settings.max_examples, settings.hash_workers),
        "selection": selection,
        "seconds": time.perf_counter() - started,
    }


def audit_evaluations(model, dataset: PedesDataset, settings: AuditSettings) -> Evaluations:
    return Evaluations(model, dataset.test, replace(settings.eval, order="annotation"))


def audit_summary(report: dict) -> dict:
    """The keys a results table shows from a stored audit report."""
    return {key: report.get(key) for key in SUMMARY_KEYS}


# ----------------------------------------------------------------------------------------------
# Auditing a registry run or a checkpoint file


def selection_from_history(entries: Iterable, selection: str) -> dict:
    """``selection_audit`` over registry epoch entries (objects with ``epoch``, ``split``, ``metrics``)."""
    by_split: dict[str, dict[int, dict]] = defaultdict(dict)
    for entry in entries:
        if entry.split in ("test", "val") and "R1" in entry.metrics:
            by_split[entry.split][entry.epoch] = entry.metrics
    return selection_audit(by_split.get("test", {}), by_split.get("val") or None, selection)


def _checkpoint_of(registry, run) -> str:
    paths = {record.role: record.path for record in registry.checkpoints(run.id)}
    path = paths.get("best") or paths.get("last")
    if path is None:
        raise InputError(f"run {run.id}: no checkpoint recorded (status {run.status}); train it first")
    if not Path(path).is_file():
        raise InputError(f"run {run.id}: checkpoint {path} not found")
    return verified_checkpoint(registry, run, path)


def audit_run(
    registry,
    ref: int | str,
    data_root: str | Path | None = None,
    coupling: str | None = None,
    batch_size: int | None = None,
    seeds: int = 3,
    sample_size: int = 16,
    device: str = "auto",
    record: bool = True,
) -> dict:
    """Audit a registry run with its own checkpoint, config and evaluation settings; store the report.

    The split audit reads the dataset as annotated: a held-out val split (``val_from_train``)
    renumbers train pids, and identities are compared by annotation id.
    """
    run = registry.get_run(ref)
    config = run.config
    path = _checkpoint_of(registry, run)
    weights = extract_state_dict(load_checkpoint_file(path))
    classifier = weights.get("classifier.weight")
    model = PHPModel(build_php_config(config["model"], 0 if classifier is None else classifier.shape[0]))
    load_state_dict_checked(model, weights, source=path)
    train = config["train"]
    apply_precision(model, train["precision"])
    if coupling is not None:
        model.coupling = coupling
    root = data_root if data_root is not None else config.get("runtime", {}).get("data_root") or "."
    dataset = read_dataset(root, config["data"]["dataset"])
    settings = AuditSettings(
        eval=EvalSettings(
            batch_size=batch_size or train["test_batch_size"],
            device=str(resolve_device(device)),
            precision=train["precision"],
            image_size=model.config.clip.image_size,
        ),
        train_batch_size=train["batch_size"],
        seeds=seeds,
        sample_size=sample_size,
    )
    selection = selection_from_history(registry.epochs(run.id), train["selection"])
    evaluations = audit_evaluations(model, dataset, settings)
    report = {"run": run.id, "checkpoint": path, **run_audit(model, dataset, settings, selection, evaluations)}
    if record:
        registry.record_audit(run.id, report, evaluations.recorded_outcomes())
    return report


def audit_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    dataset_name: str | None = None,
    config_yaml: str | Path | None = None,
    coupling: str | None = None,
    encoder: str | None = None,
    batch_size: int | None = None,
    seeds: int = 3,
    sample_size: int = 16,
    device: str = "auto",
    precision: str = "official",
) -> dict:
    """Audit a checkpoint file (ours or an official ``best.pth``, with its ``configs.yaml`` when given).

    Batch sizes and the selecting split come from the yaml (``test_batch_size``, ``batch_size``,
    ``val_dataset``), else the official defaults (64, 64, test).
    """
    model, info = load_model(checkpoint, config_yaml)
    yaml_values = info.get("yaml") or {}
    name = dataset_name or yaml_values.get("dataset_name")
    if name is None:
        raise InputError("--dataset: required when no configs.yaml names the dataset (dataset_name)")
    apply_precision(model, precision)
    if coupling is not None:
        model.coupling = coupling
    dataset = read_dataset(data_root, name)
    settings = AuditSettings(
        eval=EvalSettings(
            batch_size=batch_size or int(yaml_values.get("test_batch_size", 64)),
            device=str(resolve_device(device)),
            precision=precision,
            encoder=encoder,
            image_size=model.config.clip.image_size,
        ),
        train_batch_size=int(yaml_values.get("batch_size", 64)),
        seeds=seeds,
        sample_size=sample_size,
    )
    # A checkpoint file carries no per-epoch metrics: only the selecting split and the epoch are known.
    selection = {
        "selected_by": yaml_values.get("val_dataset", "test"),
        "epoch": info.get("epoch"),
        "epochs": 0,
        "rules": None,
        "r1_gaps": None,
    }
    return {"checkpoint": str(checkpoint), **run_audit(model, dataset, settings, selection)}
