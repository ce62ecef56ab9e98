"""Embedding extraction with the official batching, shuffled-order probing and the metrics of evaluate()."""

import pytest
import torch
import torch.nn.functional as F

from php_runner.data import read_dataset, write_synthetic
from php_runner.engine.evaluate import EvalSettings, Embeddings, evaluate, extract_embeddings, score_embeddings
from php_runner.engine.metrics import retrieval_metrics
from php_runner.model.config import PHPConfig
from php_runner.model.php import PHPModel

BATCH = 16


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, "CUHK-PEDES", num_ids=40)
    return read_dataset(root, "CUHK-PEDES").test


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = PHPModel(PHPConfig.tiny())
    # Non-zero expert weights so that the MoE branch is not the identity it is at initialisation.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name and name.endswith("up.weight"):
                param.normal_(0, 0.05)
    return model


def _settings(model, **changes):
    return EvalSettings(batch_size=BATCH, precision="amp", image_size=model.config.clip.image_size, **changes)


def test_official_batching_texts_first_in_annotation_order_with_partial_last_batch(model, split):
    calls = []
    original_text, original_image = model.encode_text, model.encode_image

    def record(kind, encode):
        def wrapped(inputs, encoder=None):
            calls.append((kind, inputs.shape[0]))
            return encode(inputs, encoder=encoder)
        return wrapped

    model.encode_text, model.encode_image = record("text", original_text), record("image", original_image)
    try:
        embeddings = extract_embeddings(model, split, _settings(model))
    finally:
        del model.encode_text, model.encode_image
    texts, images = len(split.captions), len(split.img_paths)
    expected = [("text", min(BATCH, texts - start)) for start in range(0, texts, BATCH)]
    expected += [("image", min(BATCH, images - start)) for start in range(0, images, BATCH)]
    assert calls == expected
    assert images % BATCH, "the synthetic split should end with a partial batch"
    assert embeddings.text.shape == (texts, model.config.clip.embed_dim)
    assert embeddings.text.dtype == torch.float32 and embeddings.image.shape[0] == images
    assert embeddings.text_pids.tolist() == split.caption_pids
    assert embeddings.image_pids.tolist() == split.image_pids


def test_annotation_order_equals_naive_consecutive_batches(model, split):
    from php_runner.data.loaders import ImageSet, TextSet
    from php_runner.data.transforms import build_transform

    embeddings = extract_embeddings(model, split, _settings(model))
    tokens = TextSet(split.caption_pids, split.captions).token_ids
    images = ImageSet(split.image_pids, split.img_paths, build_transform(model.config.clip.image_size))
    pixels = torch.stack([images[i][1] for i in range(len(images))])
    model.eval()
    with torch.no_grad():
        text = torch.cat([model.encode_text(tokens[i:i + BATCH]) for i in range(0, len(tokens), BATCH)])
        image = torch.cat([model.encode_image(pixels[i:i + BATCH]) for i in range(0, len(pixels), BATCH)])
    assert torch.equal(embeddings.text, text)
    assert torch.equal(embeddings.image, image)


def test_per_sample_coupling_makes_shuffled_order_give_the_same_metrics(model, split):
    model.coupling = "per-sample"
    try:
        ordered = extract_embeddings(model, split, _settings(model))
        shuffled = extract_embeddings(model, split, _settings(model, order="shuffled", seed=3))
    finally:
        model.coupling = "official"
    torch.testing.assert_close(shuffled.text, ordered.text, rtol=0, atol=1e-5)
    torch.testing.assert_close(shuffled.image, ordered.image, rtol=0, atol=1e-5)
    assert torch.equal(shuffled.text_pids, ordered.text_pids)
    assert score_embeddings(shuffled, i2t=True) == score_embeddings(ordered, i2t=True)


def test_official_coupling_makes_embeddings_depend_on_the_batching(model, split):
    ordered = extract_embeddings(model, split, _settings(model))
    shuffled = extract_embeddings(model, split, _settings(model, order="shuffled", seed=3))
    assert (shuffled.text - ordered.text).abs().max() > 1e-2
    assert (shuffled.image - ordered.image).abs().max() > 1e-2
    # Batch-mates are the only cause: the CLIP-only encoder is batch-independent under the same shuffle.
    base_ordered = extract_embeddings(model, split, _settings(model, encoder="base"))
    base_shuffled = extract_embeddings(model, split, _settings(model, encoder="base", order="shuffled", seed=3))
    torch.testing.assert_close(base_shuffled.text, base_ordered.text, rtol=0, atol=1e-5)


def test_shuffled_order_is_seeded(model, split):
    first = extract_embeddings(model, split, _settings(model, order="shuffled", seed=5))
    again = extract_embeddings(model, split, _settings(model, order="shuffled", seed=5))
    assert torch.equal(first.text, again.text) and torch.equal(first.image, again.image)
    other = extract_embeddings(model, split, _settings(model, order="shuffled", seed=6))
    assert not torch.equal(first.text, other.text) and not torch.equal(first.image, other.image)


def test_metrics_are_cosine_retrieval_of_captions_over_images_and_i2t_on_request():
    generator = torch.Generator().manual_seed(0)
    embeddings = Embeddings(
        text=torch.randn(12, 8, generator=generator) * 3,
        image=torch.randn(6, 8, generator=generator),
        text_pids=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]),
        image_pids=torch.tensor([0, 0, 1, 1, 2, 2]),
    )
    similarity = F.normalize(embeddings.text, dim=1) @ F.normalize(embeddings.image, dim=1).t()
    metrics = score_embeddings(embeddings, i2t=True)
    expected = retrieval_metrics(similarity, embeddings.text_pids, embeddings.image_pids)
    assert {key: metrics[key] for key in expected} == expected
    assert metrics["i2t"] == retrieval_metrics(similarity.t(), embeddings.image_pids, embeddings.text_pids)
    assert "i2t" not in score_embeddings(embeddings)


def test_evaluate_matches_its_embeddings_and_restores_training_mode(model, split):
    model.train()
    settings = _settings(model)
    metrics = evaluate(model, split, settings, i2t=True)
    assert model.training
    assert metrics == score_embeddings(extract_embeddings(model, split, settings), i2t=True)
    assert set(metrics) == {"R1", "R5", "R10", "mAP", "mINP", "i2t"}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="order"):
        EvalSettings(order="random")
    with pytest.raises(ValueError, match="batch_size"):
        EvalSettings(batch_size=0)
