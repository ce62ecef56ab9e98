"""Projected hours of one paper run (60 epochs of CUHK-PEDES, evaluated after every epoch) from measured rates."""

from __future__ import annotations

# One paper run of CUHK-PEDES (php_spec.md, dataset sizes): 60 epochs of 68,126 training pairs, the test
# split (3,074 images, 6,156 captions) encoded after every epoch.
CUHK_TRAIN_PAIRS = 68_126
CUHK_TEST_IMAGES = 3_074
CUHK_TEST_CAPTIONS = 6_156
PAPER_EPOCHS = 60


def projected_run_hours(train_samples_per_s: float, eval_images_per_s: float, eval_captions_per_s: float) -> float:
    """Hours of one 60-epoch CUHK-PEDES run evaluated after every epoch, at the given measured rates."""
    epoch_seconds = (CUHK_TRAIN_PAIRS / train_samples_per_s + CUHK_TEST_IMAGES / eval_images_per_s
                     + CUHK_TEST_CAPTIONS / eval_captions_per_s)
    return PAPER_EPOCHS * epoch_seconds / 3600


def projection(result: dict) -> dict:
    """Per training regime: the projected hours of a paper CUHK-PEDES run from the bench's model-only training
    rate at the bench's batch and that regime's evaluation rates (the compiled regime uses the eager fast ones)."""
    projected = {}
    for name, entry in result["train"].items():
        rates = result["eval"]["official" if name == "official" else "fast"]
        projected[name] = {
            "hours_60_epochs_cuhk": projected_run_hours(entry["samples_per_s"], rates["images_per_s"],
                                                        rates["texts_per_s"]),
            "batch_size": entry["batch_size"],
        }
    return projected


def packed_gpu_hours_per_run(aggregate_samples_per_s: float, eval_images_per_s: float,
                             eval_captions_per_s: float) -> float:
    """Device hours one paper CUHK-PEDES run costs when N runs are packed on the device.

    N packed runs train at ``aggregate / N`` samples/s each, so a run's training takes N times
    ``CUHK_TRAIN_PAIRS / aggregate`` seconds an epoch of wall time while holding 1/N of the device: its
    device time is ``CUHK_TRAIN_PAIRS / aggregate``. Evaluation is charged at the unpacked rates, whole:
    packing's effect on evaluation is not measured, so no gain is assumed. That is
    ``projected_run_hours`` with the training rate replaced by the measured aggregate.
    """
    return projected_run_hours(aggregate_samples_per_s, eval_images_per_s, eval_captions_per_s)
