"""corrections.csv: reviewed labels change exactly the listed images, in every split, or fail loudly."""

from __future__ import annotations

import numpy as np
import pytest

from cnnlib.corrections import apply_corrections, read_corrections
from cnnlib.errors import DataError
from cnnlib.splits import DataConfig, prepare_splits

COUNTS = dict(train_counts=(6, 4, 3), dev_counts=(2, 2, 2), test_counts=(2, 2, 2))


@pytest.fixture
def tree(image_tree):
    return image_tree(train={"car": 6, "truck": 4, "cat": 3}, test={"car": 4, "truck": 4, "cat": 4})


def load(tree, tmp_path, corrections=None):
    return prepare_splits(DataConfig(tree, corrections=corrections, **COUNTS), tmp_path / "cache")


def write(tmp_path, text, name="corrections.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def labels_by_id(splits):
    return {(name, i): int(label) for name, split in splits.named().items()
            for i, label in zip(split.ids.tolist(), split.labels)}


def test_corrections_change_exactly_the_listed_labels_in_every_split(tree, tmp_path):
    plain = load(tree, tmp_path)
    train_id, dev_id = plain.train.ids[0], plain.dev.ids[-1]  # a car in train, a cat in dev
    path = write(tmp_path, f"id,new_label\n{train_id},cat\n{dev_id},truck\n")

    fixed = load(tree, tmp_path, path)

    before, after = labels_by_id(plain), labels_by_id(fixed)
    assert before.keys() == after.keys()
    changed = {key: after[key] for key in before if before[key] != after[key]}
    assert changed == {("train", train_id): 2, ("dev", dev_id): 1}


def test_drop_removes_the_image_and_nothing_else(tree, tmp_path):
    plain = load(tree, tmp_path)
    dropped = plain.test.ids[3]
    path = write(tmp_path, f"id,new_label\n{dropped},drop\n")

    fixed = load(tree, tmp_path, path)

    assert set(labels_by_id(plain)) - set(labels_by_id(fixed)) == {("test", dropped)}
    assert len(fixed.test) == len(fixed.test.images) == len(plain.test) - 1
    kept = plain.test.ids != dropped
    assert np.array_equal(fixed.test.images, plain.test.images[kept])


def test_unknown_image_fails_naming_file_line_and_id(tree, tmp_path):
    plain = load(tree, tmp_path)
    path = write(tmp_path, f"id,new_label\n{plain.train.ids[0]},truck\ntrain/car/9999.png,truck\n")

    with pytest.raises(DataError) as error:
        apply_corrections(plain, path)

    message = str(error.value)
    assert str(path) in message and "line 3" in message and "train/car/9999.png" in message


def test_unknown_class_fails_naming_file_line_value_and_the_classes(tree, tmp_path):
    plain = load(tree, tmp_path)
    path = write(tmp_path, f"id,new_label\n{plain.train.ids[0]},lorry\n")

    with pytest.raises(DataError) as error:
        load(tree, tmp_path, path)

    message = str(error.value)
    assert str(path) in message and "line 2" in message and "'lorry'" in message
    assert "car, truck, cat" in message and "drop" in message


def test_an_image_corrected_twice_is_an_error_naming_both_lines(tmp_path):
    path = write(tmp_path, "id,new_label\ntrain/car/0001.jpg,cat\n\ntrain/car/0001.jpg,truck\n")

    with pytest.raises(DataError, match=r"line 4: id 'train/car/0001.jpg' is already corrected on line 2"):
        read_corrections(path, ("car", "truck", "cat"))


def test_a_file_without_the_id_and_new_label_columns_is_refused(tmp_path):
    path = write(tmp_path, "image,label\ntrain/car/0001.jpg,cat\n")

    with pytest.raises(DataError, match=r"line 1: .*lacks column\(s\) id, new_label"):
        read_corrections(path, ("car", "truck", "cat"))


def test_extra_columns_blank_lines_and_a_spreadsheet_bom_are_accepted(tmp_path):
    # A reviewer's copy of suspects.csv with a new_label column added, saved by a spreadsheet.
    text = ("\ufeffrank,id,given_label,new_label,note\n"
            "1,train/car/0001.jpg,car, truck ,looks like a pickup\n"
            "\n"
            "2,test/cat/0002.jpg,cat,DROP,\n")
    path = tmp_path / "reviewed.csv"
    path.write_text(text, encoding="utf-8")

    corrections = read_corrections(path, ("car", "truck", "cat"))

    assert [(c.image_id, c.new_label, c.line) for c in corrections] == [
        ("train/car/0001.jpg", "truck", 2), ("test/cat/0002.jpg", "drop", 4)]


def test_the_cached_split_is_rebuilt_when_the_corrections_file_changes(tree, tmp_path):
    plain = load(tree, tmp_path)
    image = plain.train.ids[0]
    path = write(tmp_path, f"id,new_label\n{image},cat\n")
    first = load(tree, tmp_path, path)
    again = load(tree, tmp_path, path)  # from the cache: still corrected
    path.write_text(f"id,new_label\n{image},truck\n")
    edited = load(tree, tmp_path, path)

    assert len({plain.cache_path, first.cache_path, edited.cache_path}) == 3
    assert again.cache_path == first.cache_path
    position = plain.train.ids.tolist().index(image)
    assert [int(s.train.labels[position]) for s in (plain, first, again, edited)] == [0, 2, 2, 1]


def test_an_id_that_two_splits_share_is_refused_as_ambiguous(tmp_path):
    """npz files that number their own images ("0", "1", ...) share ids: a correction would hit both images."""
    for name in ("train", "dev"):
        np.savez(tmp_path / f"{name}.npz", images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.array([0, 1, 2]),
                 ids=np.array(["0", "1", "2"]))
    path = write(tmp_path, "id,new_label\n1,cat\n")

    with pytest.raises(DataError, match=r"corrections.csv: line 2: id '1' names an image in train and one in dev"):
        prepare_splits(DataConfig(tmp_path, corrections=path), None)
