"""Held-out validation identities: disjoint, stable per seed, official layout and re-indexing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from php_runner.data.datasets import DatasetError, EvalSplit, PedesDataset, TrainItem
from php_runner.data.splits import held_out_identities, hold_out_validation


def make_dataset(images_per_pid: list[int], captions_per_image: int = 2) -> PedesDataset:
    """Training pids 0..N-1 in file order, like the official reader produces."""
    train = []
    image_id = 0
    for pid, image_count in enumerate(images_per_pid):
        for _ in range(image_count):
            for caption in range(captions_per_image):
                train.append(TrainItem(pid, image_id, f"imgs/{pid}/{image_id}.jpg", f"person {pid} text {caption}"))
            image_id += 1
    test = EvalSplit(image_pids=[900], img_paths=["imgs/t.jpg"], caption_pids=[900], captions=["t"])
    return PedesDataset(
        name="ICFG-PEDES", root="/nowhere", train=train, val=None, test=test, num_classes=len(images_per_pid)
    )


def test_held_out_ids_are_disjoint_from_the_training_ids_that_remain():
    dataset = make_dataset([2, 1, 3, 2, 1, 2, 2, 1, 1, 3])
    split = hold_out_validation(dataset, fraction=0.3, seed=7)
    held_out = set(held_out_identities(dataset.train, 0.3, 7))
    assert len(held_out) == 3
    val_paths = set(split.val.img_paths)
    train_paths = {item.img_path for item in split.train}
    assert val_paths.isdisjoint(train_paths)
    assert val_paths | train_paths == {item.img_path for item in dataset.train}
    assert set(split.val.image_pids) == held_out == set(split.val.caption_pids)


def test_remaining_pids_are_reindexed_in_order_and_num_classes_follows():
    dataset = make_dataset([1] * 8)
    held_out = held_out_identities(dataset.train, 0.25, 3)
    split = hold_out_validation(dataset, fraction=0.25, seed=3)
    kept = [pid for pid in range(8) if pid not in held_out]
    assert sorted({item.pid for item in split.train}) == list(range(len(kept)))
    assert split.num_classes == len(kept)
    # pid order is preserved: the k-th remaining original id becomes k, each image keeps its identity
    for item in split.train:
        assert item.img_path.startswith(f"imgs/{kept[item.pid]}/")
    image_ids = [item.image_id for item in split.train]
    assert sorted(set(image_ids)) == list(range(len(set(image_ids))))


def test_val_split_has_the_official_evaluation_layout():
    dataset = make_dataset([2, 2, 2, 2], captions_per_image=2)
    split = hold_out_validation(dataset, fraction=0.5, seed=0)
    held = [item for item in dataset.train if item.pid in set(split.val.image_pids)]
    # one image entry per image in file order, every caption of every image in file order
    assert split.val.img_paths == list(dict.fromkeys(item.img_path for item in held))
    assert split.val.captions == [item.caption for item in held]
    assert split.val.caption_pids == [item.pid for item in held]
    assert len(split.val.img_paths) == 4 and len(split.val.captions) == 8
    assert split.test == dataset.test


def test_same_seed_same_identities_other_seed_differs():
    dataset = make_dataset([1] * 40)
    first = hold_out_validation(dataset, 0.2, seed=11)
    again = hold_out_validation(dataset, 0.2, seed=11)
    assert first == again
    others = {tuple(held_out_identities(dataset.train, 0.2, seed)) for seed in range(5)}
    assert len(others) > 1


def test_selection_does_not_depend_on_file_order():
    dataset = make_dataset([1, 2, 1, 3, 1, 1, 2, 1, 1, 1])
    shuffled = list(reversed(dataset.train))
    assert held_out_identities(dataset.train, 0.4, 5) == held_out_identities(shuffled, 0.4, 5)


@settings(max_examples=40, deadline=None)
@given(
    images=st.lists(st.integers(min_value=1, max_value=3), min_size=2, max_size=25),
    fraction=st.floats(min_value=0.01, max_value=0.99),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_partition_property(images, fraction, seed):
    dataset = make_dataset(images, captions_per_image=1)
    try:
        split = hold_out_validation(dataset, fraction, seed)
    except DatasetError:
        assert max(1, round(fraction * len(images))) >= len(images)
        return
    assert len(split.train) + len(split.val.captions) == len(dataset.train)
    assert 1 <= len(set(split.val.image_pids)) < len(images)
    assert split.num_classes + len(set(split.val.image_pids)) == len(images)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_fraction_outside_zero_one_is_refused_naming_the_field(fraction):
    with pytest.raises(DatasetError, match="data.val_from_train"):
        hold_out_validation(make_dataset([1, 1, 1]), fraction, 0)


def test_fraction_leaving_no_training_ids_is_refused():
    with pytest.raises(DatasetError, match="leaves none"):
        hold_out_validation(make_dataset([1, 1]), 0.9, 0)


def test_dataset_with_a_val_split_is_refused():
    dataset = make_dataset([1, 1, 1, 1])
    with_val = PedesDataset(
        name="CUHK-PEDES", root="/x", train=dataset.train, val=dataset.test, test=dataset.test, num_classes=4
    )
    with pytest.raises(DatasetError, match="already has a val split"):
        hold_out_validation(with_val, 0.5, 0)
