"""Embedding extraction with the official batching, shuffled-order probing and the metrics of evaluate()."""

import pytest
import torch
import torch.nn.functional as F

from php_runner.data import read_dataset, write_synthetic
from php_runner.engine.evaluate import EvalSettings, Embeddings, evaluate, extract_embeddings, score_embeddings
from php_runner.engine.metrics import query_outcomes, retrieval_metrics
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
    return EvalSettings(**{"batch_size": BATCH, "precision": "amp", "image_size": model.config.clip.image_size,
                           **changes})


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
    with_outcomes, outcomes = score_embeddings(embeddings, outcomes=True)
    assert with_outcomes == expected and outcomes == query_outcomes(similarity, embeddings.text_pids, embeddings.image_pids)


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


def _recorded(model, split, settings):
    """extract_embeddings with the batch size of every encode call recorded."""
    calls = []
    original_text, original_image = model.encode_text, model.encode_image

    def record(kind, encode):
        def wrapped(inputs, encoder=None):
            calls.append((kind, inputs.shape[0]))
            return encode(inputs, encoder=encoder)
        return wrapped

    model.encode_text, model.encode_image = record("text", original_text), record("image", original_image)
    try:
        return extract_embeddings(model, split, settings), calls
    finally:
        del model.encode_text, model.encode_image


def _one_at_a_time(model, split):
    """True batch-size-1 embeddings: one forward per caption and per image, the official coupling as is."""
    from php_runner.data.loaders import ImageSet, TextSet
    from php_runner.data.transforms import build_transform

    tokens = TextSet(split.caption_pids, split.captions).token_ids
    images = ImageSet(split.image_pids, split.img_paths, build_transform(model.config.clip.image_size))
    model.eval()
    with torch.no_grad():
        text = torch.cat([model.encode_text(tokens[i:i + 1]) for i in range(len(tokens))])
        image = torch.cat([model.encode_image(images[i][1][None]) for i in range(len(images))])
    return Embeddings(text=text, image=image, text_pids=torch.tensor(split.caption_pids),
                      image_pids=torch.tensor(split.image_pids))


# Batched "alone" vs one forward per sample: the same arithmetic per row, but the matmuls run with a
# different number of rows, which may round differently: fp32 agreement to 1e-5 relative, 5e-6 absolute
# (embedding entries are of order 1; the largest difference seen was 1.1e-6).
ALONE_RTOL, ALONE_ATOL = 1e-5, 5e-6


def test_official_coupling_at_batch_size_one_is_one_batched_alone_pass_equal_to_one_at_a_time(model, split):
    assert model.coupling == "official"
    batched, calls = _recorded(model, split, _settings(model, batch_size=1))
    assert calls == [("text", len(split.captions)), ("image", len(split.img_paths))]  # one pass each
    reference = _one_at_a_time(model, split)
    torch.testing.assert_close(batched.text, reference.text, rtol=ALONE_RTOL, atol=ALONE_ATOL)
    torch.testing.assert_close(batched.image, reference.image, rtol=ALONE_RTOL, atol=ALONE_ATOL)
    assert score_embeddings(batched, i2t=True) == score_embeddings(reference, i2t=True)
    assert model.coupling == "official" and model._coupling == "official"  # the mode ends with the pass
    # Alone is not another batching in disguise: the protocol batch couples samples and moves embeddings.
    assert (extract_embeddings(model, split, _settings(model)).text - reference.text).abs().max() > 1e-2


def test_batch_independent_encoders_encode_at_the_large_batch_and_coupled_ones_at_the_protocol_batch(model, split):
    from php_runner.data.loaders import TextSet

    texts, images = len(split.captions), len(split.img_paths)
    base, calls = _recorded(model, split, _settings(model, encoder="base", independent_batch_size=7))
    assert calls == ([("text", min(7, texts - start)) for start in range(0, texts, 7)]
                     + [("image", min(7, images - start)) for start in range(0, images, 7)])
    tokens = TextSet(split.caption_pids, split.captions).token_ids
    with torch.no_grad():
        at_protocol_batch = torch.cat([model.encode_text(tokens[i:i + BATCH], encoder="base")
                                       for i in range(0, texts, BATCH)])
    torch.testing.assert_close(base.text, at_protocol_batch, rtol=ALONE_RTOL, atol=ALONE_ATOL)
    _, crfm_calls = _recorded(model, split, _settings(model, encoder="crfm", independent_batch_size=7))
    model.coupling = "per-sample"
    try:
        _, per_sample_calls = _recorded(model, split, _settings(model, independent_batch_size=7))
    finally:
        model.coupling = "official"
    assert crfm_calls == per_sample_calls == calls
    _, efp_calls = _recorded(model, split, _settings(model, encoder="efp", independent_batch_size=7))
    assert max(size for _, size in efp_calls) == BATCH  # the official coupling keeps the protocol batch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scoring_on_cuda_gives_the_cpu_metrics(model, split):
    """Scoring computes its similarity in full fp32 even when the process allows TF32 (which moves ranks)."""
    embeddings = extract_embeddings(model, split, _settings(model))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        on_cuda = score_embeddings(embeddings, i2t=True, device="cuda")
        assert torch.get_float32_matmul_precision() == "high"  # scoring's own scope ends with it
    finally:
        torch.set_float32_matmul_precision(previous)
    assert on_cuda == pytest.approx(score_embeddings(embeddings, i2t=True), rel=1e-12)
