"""The user's split: exact counts, disjoint dev/test, seeded, cached and rebuilt when anything changes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cnnlib import sources as sources_module
from cnnlib import splits as splits_module
from cnnlib.errors import DataError
from cnnlib.splits import DataConfig, format_summary, prepare_splits, write_summary

from conftest import class_image, write_image

USER_COUNTS = {
    "train": {"car": 4000, "truck": 600, "cat": 400},
    "dev": {"car": 503, "truck": 51, "cat": 71},
    "test": {"car": 400, "truck": 400, "cat": 400},
}


# --- the real shared data -------------------------------------------------

def test_real_split_has_the_users_exact_counts(real_splits):
    assert real_splits.classes == ("car", "truck", "cat")
    assert real_splits.summary()["splits"] == USER_COUNTS


def test_real_split_draws_train_from_train_and_dev_test_from_test(real_splits):
    assert all(i.startswith("train/") for i in real_splits.train.ids)
    assert all(i.startswith("test/") for i in np.concatenate([real_splits.dev.ids, real_splits.test.ids]))


def test_real_dev_and_test_are_disjoint_and_free_of_duplicates(real_splits):
    dev, test = set(real_splits.dev.ids), set(real_splits.test.ids)
    assert len(dev) == len(real_splits.dev) and len(test) == len(real_splits.test)
    assert not dev & test


def test_real_labels_match_the_class_folder_of_each_image(real_splits):
    for split in real_splits.named().values():
        folders = np.array([i.split("/")[1] for i in split.ids])
        assert (folders == np.array(real_splits.classes)[split.labels]).all()


def test_real_split_is_the_same_for_the_same_seed(real_data, real_splits):
    again = prepare_splits(DataConfig(real_data), cache_dir=None)  # rebuilt from the images, not the cache
    for name, split in real_splits.named().items():
        other = again.named()[name]
        assert split.ids.tolist() == other.ids.tolist(), name
        np.testing.assert_array_equal(split.images, other.images)


def test_summary_file_has_the_documented_shape(real_splits, tmp_path):
    write_summary(real_splits, tmp_path / "summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["classes"] == ["car", "truck", "cat"]
    assert summary["splits"] == USER_COUNTS
    table = format_summary(summary)
    assert "4000" in table and "503" in table and table.splitlines()[3].split()[-1] == "1200"


# --- small trees: seeds, the cache, and bad counts ------------------------

SMALL = {"train_counts": (5, 3, 2), "dev_counts": (3, 1, 2), "test_counts": (2, 2, 2)}


def _tree(image_tree):
    return image_tree(train={"car": 8, "truck": 8, "cat": 8}, test={"car": 8, "truck": 8, "cat": 8})


def test_a_different_seed_draws_a_different_split(image_tree):
    root = _tree(image_tree)
    a = prepare_splits(DataConfig(root, seed=0, **SMALL), None)
    b = prepare_splits(DataConfig(root, seed=1, **SMALL), None)
    assert a.train.ids.tolist() != b.train.ids.tolist()
    assert b.summary()["splits"] == a.summary()["splits"]


def test_cache_is_reused_when_nothing_changed(image_tree, tmp_path, monkeypatch):
    root, cache = _tree(image_tree), tmp_path / "cache"
    first = prepare_splits(DataConfig(root, **SMALL), cache)
    assert first.cache_path.is_file() and first.cache_path.parent == cache

    def no_rebuild(config, source):
        raise AssertionError("split was rebuilt although the cache is valid")

    monkeypatch.setattr(splits_module, "_draw_from_tree", no_rebuild)
    second = prepare_splits(DataConfig(root, **SMALL), cache)
    assert second.cache_path == first.cache_path
    assert second.train.ids.tolist() == first.train.ids.tolist()
    np.testing.assert_array_equal(second.dev.images, first.dev.images)


@pytest.mark.parametrize("change", [{"seed": 3}, {"dev_counts": (2, 2, 2)}, {"classes": ("cat", "truck", "car")}])
def test_cache_is_rebuilt_when_settings_change(image_tree, tmp_path, change):
    root, cache = _tree(image_tree), tmp_path / "cache"
    first = prepare_splits(DataConfig(root, **SMALL), cache)
    changed = prepare_splits(DataConfig(root, **{**SMALL, **change}), cache)
    assert changed.cache_path != first.cache_path
    assert len(list(cache.glob("split-*.npz"))) == 2


def test_cache_is_rebuilt_when_an_image_is_replaced(image_tree, tmp_path):
    root, cache = _tree(image_tree), tmp_path / "cache"
    first = prepare_splits(DataConfig(root, **SMALL), cache)
    replaced = root / first.train.ids[0]
    write_image(replaced, np.zeros((32, 32, 3), np.uint8))
    second = prepare_splits(DataConfig(root, **SMALL), cache)
    assert second.cache_path != first.cache_path
    assert second.train.ids[0] == first.train.ids[0]
    assert second.train.images[0].max() == 0  # the new pixels, not the cached ones


def test_a_damaged_cache_is_rebuilt_not_trusted(image_tree, tmp_path):
    root, cache = _tree(image_tree), tmp_path / "cache"
    first = prepare_splits(DataConfig(root, **SMALL), cache)
    first.cache_path.write_bytes(b"not an npz")
    second = prepare_splits(DataConfig(root, **SMALL), cache)
    assert second.train.ids.tolist() == first.train.ids.tolist()
    np.load(second.cache_path)  # rewritten as a valid archive


def test_a_truncated_cache_is_rebuilt_too(image_tree, tmp_path):
    root, cache = _tree(image_tree), tmp_path / "cache"
    first = prepare_splits(DataConfig(root, **SMALL), cache)
    data = first.cache_path.read_bytes()
    first.cache_path.write_bytes(data[: len(data) // 2])  # e.g. a disk that filled up during a copy
    second = prepare_splits(DataConfig(root, **SMALL), cache)
    assert second.train.ids.tolist() == first.train.ids.tolist()


def test_asking_for_more_images_than_a_class_has_names_the_folder(image_tree):
    root = _tree(image_tree)
    with pytest.raises(DataError, match=r"test[/\\]truck: 8 images, but the split needs 5 \+ 4 = 9"):
        prepare_splits(DataConfig(root, train_counts=(1, 1, 1), dev_counts=(1, 5, 1), test_counts=(1, 4, 1)), None)


def test_counts_must_match_the_number_of_classes(image_tree):
    with pytest.raises(DataError, match="train_counts .* 2 entries for 3 classes"):
        DataConfig(_tree(image_tree), train_counts=(1, 1))


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere: data folder not found"):
        prepare_splits(DataConfig(tmp_path / "nowhere"), None)


def test_a_folder_of_npz_files_gives_train_and_dev_without_test(tmp_path):
    for name, n in (("train", 6), ("dev", 3)):
        images = np.stack([class_image("car", i) for i in range(n)])
        np.savez(tmp_path / f"{name}.npz", images=images, labels=np.arange(n) % 3)
    data = prepare_splits(DataConfig(tmp_path), None)
    assert len(data.train) == 6 and len(data.dev) == 3 and data.test is None
    assert data.summary()["splits"]["dev"] == {"car": 1, "truck": 1, "cat": 1}


def test_a_temporary_left_by_a_killed_cache_write_is_removed_by_the_next_build(image_tree, tmp_path):
    root, cache = _tree(image_tree), tmp_path / "cache"
    cache.mkdir()
    stale = cache / ".split-0123456789abcdef.npz.k1ll3d.tmp"  # what atomic_path leaves after a kill -9
    stale.write_bytes(b"\0" * 1000)
    old = stale.stat().st_mtime - 3600
    os.utime(stale, (old, old))
    fresh = cache / ".split-fedcba9876543210.npz.wr1t1n.tmp"  # another process may be writing this one now
    fresh.write_bytes(b"\0" * 1000)

    prepare_splits(DataConfig(root, **SMALL), cache)

    assert not stale.exists() and fresh.exists()


def test_the_smallest_image_size_is_the_one_the_seed_cnn_needs():
    from cnnlib.model import flat_features  # noqa: PLC0415

    assert flat_features(sources_module.MIN_IMAGE_SIZE) > 0
    with pytest.raises(ValueError):
        flat_features(sources_module.MIN_IMAGE_SIZE - 1)
