"""Each loss against a naive per-row float64 reference written from spec 4; weighting and totals."""

from __future__ import annotations

import math

import pytest
import torch

from php_runner.model.losses import (
    LossConfig,
    cmpm_loss,
    compute_losses,
    id_loss,
    itc_loss,
    sdm_loss,
)
from php_runner.model.php import PHPOutput

SCALE = 50.0


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    text = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    pids = torch.tensor([3, 1, 3, 7, 1, 3])  # several positives per row
    return image, text, pids


def _unit(rows):
    return [r / math.sqrt(float(r @ r)) for r in rows]


def _kl_rows(logit_rows, label_rows):
    total = 0.0
    for logits, labels in zip(logit_rows, label_rows):
        exps = [math.exp(v) for v in logits]
        z = sum(exps)
        total += sum((e / z) * (math.log(e / z) - math.log(l + 1e-8)) for e, l in zip(exps, labels))
    return total / len(logit_rows)


def _labels(pids, normaliser):
    rows = []
    for a in pids:
        row = [1.0 if a == b else 0.0 for b in pids]
        rows.append([v / normaliser(row) for v in row])
    return rows


def naive_sdm(image, text, pids):
    img, txt = _unit(image), _unit(text)
    labels = _labels(pids.tolist(), sum)
    i2t = [[SCALE * float(i @ t) for t in txt] for i in img]
    t2i = [[SCALE * float(t @ i) for i in img] for t in txt]
    return _kl_rows(i2t, labels) + _kl_rows(t2i, labels)


def naive_cmpm(image, text, pids):
    img, txt = _unit(image), _unit(text)
    labels = _labels(pids.tolist(), lambda row: math.sqrt(sum(v * v for v in row)))
    i2t = [[float(i @ t) for t in txt] for i in image]
    t2i = [[float(t @ i) for i in img] for t in text]
    return _kl_rows(i2t, labels) + _kl_rows(t2i, labels)


def naive_itc(image, text):
    img, txt = _unit(image), _unit(text)
    n = len(img)
    logits = [[SCALE * float(img[a] @ txt[b]) for b in range(n)] for a in range(n)]

    def ce(rows):
        return sum(math.log(sum(math.exp(v) for v in row)) - row[k] for k, row in enumerate(rows)) / n

    return (ce(logits) + ce([list(col) for col in zip(*logits)])) / 2


def naive_ce(logits, pids):
    return sum(math.log(sum(math.exp(v) for v in row)) - row[p] for row, p in zip(logits.tolist(), pids.tolist())) / len(pids)


def test_sdm_matches_reference(batch):
    image, text, pids = batch
    assert float(sdm_loss(image, text, pids, SCALE)) == pytest.approx(naive_sdm(image, text, pids), rel=1e-7)


def test_itc_matches_reference(batch):
    image, text, _ = batch
    assert float(itc_loss(image, text, SCALE)) == pytest.approx(naive_itc(image, text), rel=1e-7)


def test_cmpm_matches_reference(batch):
    image, text, pids = batch
    assert float(cmpm_loss(image, text, pids)) == pytest.approx(naive_cmpm(image, text, pids), rel=1e-7)


def test_id_matches_reference(batch):
    _, _, pids = batch
    generator = torch.Generator().manual_seed(1)
    image_logits = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    text_logits = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    expected = (naive_ce(image_logits, pids) + naive_ce(text_logits, pids)) / 2
    assert float(id_loss(image_logits, text_logits, pids)) == pytest.approx(expected, rel=1e-7)


def test_compute_losses_weights_and_total(batch):
    image, text, pids = batch
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    output = PHPOutput(image.float(), text.float(), torch.tensor(2.5), logits.float(), logits.flip(0).float())
    config = LossConfig(names=("sdm", "itc", "aux", "id", "cmpm"), aux_factor=0.5)
    losses = compute_losses(output, pids, config)
    assert set(losses) == {"sdm_loss", "itc_loss", "aux_loss", "id_loss", "cmpm_loss", "total"}
    assert float(losses["sdm_loss"]) == pytest.approx(naive_sdm(image, text, pids), rel=1e-4)
    assert float(losses["itc_loss"]) == pytest.approx(5 * naive_itc(image, text), rel=1e-4)
    assert float(losses["aux_loss"]) == pytest.approx(1.25)
    assert float(losses["cmpm_loss"]) == pytest.approx(naive_cmpm(image, text, pids), rel=1e-4)
    parts = sum(float(v) for k, v in losses.items() if k != "total")
    assert float(losses["total"]) == pytest.approx(parts, rel=1e-6)


def test_temperature_sets_the_logit_scale(batch):
    image, text, pids = batch
    output = PHPOutput(image, text, torch.tensor(0.0))
    losses = compute_losses(output, pids, LossConfig(names=("sdm",), temperature=0.1))
    assert float(losses["sdm_loss"]) == pytest.approx(float(sdm_loss(image, text, pids, 10.0)), rel=1e-7)


def test_default_config_is_the_paper_recipe():
    config = LossConfig()
    assert (config.names, config.temperature, config.itc_weight, config.aux_factor) == (("sdm", "itc", "aux"), 0.02, 5.0, 0.5)


def test_id_without_classifier_and_unknown_names_are_errors(batch):
    image, text, pids = batch
    with pytest.raises(ValueError):
        compute_losses(PHPOutput(image, text, torch.tensor(0.0)), pids, LossConfig(names=("id",)))
    with pytest.raises(ValueError):
        LossConfig(names=("mlm",))


def test_losses_backpropagate_through_model(tiny_model, tiny_images, tiny_token_ids):
    model = tiny_model().train()
    losses = compute_losses(model(tiny_images(4), tiny_token_ids(4)), torch.tensor([0, 1, 0, 2]), LossConfig())
    losses["total"].backward()
    assert model.shared_transformer.resblocks[0].feed_forward.input_gate.weight.grad.abs().sum() > 0


def infonce_at_scale(image, text, scale):
    """CLIP InfoNCE from its definition: mean over both directions of -log softmax of the matching pair."""
    img, txt = _unit(image), _unit(text)
    total = 0.0
    for rows in ([[scale * float(i @ t) for t in txt] for i in img], [[scale * float(t @ i) for i in img] for t in txt]):
        for index, row in enumerate(rows):
            total += -(row[index] - math.log(sum(math.exp(v) for v in row))) / len(rows)
    return total / 2


@pytest.mark.parametrize("temperature", [0.02, 0.5])
def test_itc_loss_uses_the_configured_temperature(batch, temperature):
    """Issue 24 item 17: the ITC term of compute_losses is 5 x InfoNCE at scale 1/temperature (a fixed
    scale would match at most one of the two temperatures)."""
    image, text, pids = batch
    output = PHPOutput(image, text, torch.tensor(0.0))
    losses = compute_losses(output, pids, LossConfig(names=("itc",), temperature=temperature))
    expected = 5.0 * infonce_at_scale(image, text, 1.0 / temperature)
    assert losses["itc_loss"].item() == pytest.approx(expected, rel=1e-5)
