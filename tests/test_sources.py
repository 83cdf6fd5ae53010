"""Readers: image folders, .npz and the user's legacy pickle; every bad input names its file."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from cnnlib.errors import DataError, UntrustedPickleError
from cnnlib.sources import parse_classes, read_array_file, read_image_folder, read_npz, read_pickle

from conftest import class_image, write_image

CLASSES = ("car", "truck", "cat")


# --- image folders --------------------------------------------------------

def test_image_folder_reads_pixels_labels_and_ids_in_class_order(image_tree):
    root = image_tree(train={"car": 3, "truck": 2, "cat": 1})
    data = read_image_folder(root / "train", CLASSES)
    assert data.images.shape == (6, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert data.ids.tolist()[:2] == ["train/car/0000.png", "train/car/0001.png"]
    np.testing.assert_array_equal(data.images[3], class_image("truck", 0))  # PNG is lossless


def test_class_order_defines_the_labels(image_tree):
    root = image_tree(train={"car": 1, "truck": 2, "cat": 3})
    data = read_image_folder(root / "train", ("cat", "car", "truck"))
    assert data.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert data.ids[0].startswith("train/cat/")


def test_jpeg_trees_are_read_too(image_tree):
    root = image_tree(train={"car": 2, "truck": 2, "cat": 2}, suffix=".jpg")
    data = read_image_folder(root / "train", CLASSES)
    assert len(data) == 6 and data.ids[0].endswith(".jpg")
    # JPEG is lossy but close: the class tint survives.
    assert abs(int(data.images[0, ..., 0].mean()) - int(class_image("car", 0)[..., 0].mean())) < 5


def test_corrupt_image_error_names_the_file(image_tree):
    root = image_tree()
    bad = root / "train" / "truck" / "0003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError, match="0003.png.*cannot decode"):
        read_image_folder(root / "train", CLASSES)


def test_truncated_jpeg_error_names_the_file(image_tree):
    root = image_tree(suffix=".jpg")
    bad = root / "train" / "cat" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cat[/\\]0001\.jpg"):
        read_image_folder(root / "train", CLASSES)


def test_empty_class_folder_error_names_the_folder(image_tree):
    root = image_tree()
    for path in (root / "train" / "cat").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"train[/\\]cat: class folder holds no"):
        read_image_folder(root / "train", CLASSES)


def test_wrong_sized_image_error_names_the_file_and_sizes(image_tree):
    root = image_tree()
    write_image(root / "train" / "car" / "0002.png", np.zeros((28, 30, 3), np.uint8))
    with pytest.raises(DataError, match=r"0002\.png: image is 30x28, expected 32x32"):
        read_image_folder(root / "train", CLASSES)


def test_unknown_class_folder_error_names_the_folder(image_tree):
    root = image_tree()
    write_image(root / "train" / "dog" / "0000.png", class_image("dog", 0))
    with pytest.raises(DataError, match="class folder.*dog.*not in the configured class order"):
        read_image_folder(root / "train", CLASSES)


def test_missing_class_folder_error_names_it(image_tree):
    root = image_tree(train={"car": 2, "truck": 2})
    with pytest.raises(DataError, match=r"train[/\\]cat: class folder missing"):
        read_image_folder(root / "train", CLASSES)


def test_class_list_must_be_distinct():
    assert parse_classes("cat, car ,truck") == ("cat", "car", "truck")
    with pytest.raises(DataError, match="distinct"):
        parse_classes("car,car,cat")


# --- .npz -----------------------------------------------------------------

def _npz(path, images, labels, **more):
    np.savez(path, images=images, labels=labels, **more)
    return path


def test_npz_round_trip_with_generated_ids(tmp_path):
    images = np.stack([class_image(c, i) for i, c in enumerate(["car", "cat", "truck"])])
    data = read_npz(_npz(tmp_path / "train.npz", images, np.array([0, 2, 1])), CLASSES)
    np.testing.assert_array_equal(data.images, images)
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [0, 2, 1]
    assert data.ids.tolist() == ["train.npz#0", "train.npz#1", "train.npz#2"]


def test_npz_label_out_of_range_names_label_index_and_file(tmp_path):
    path = _npz(tmp_path / "dev.npz", np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 1, 3, 2]))
    with pytest.raises(DataError, match=r"dev\.npz: label 3 at index 2 is out of range for 3 classes"):
        read_npz(path, CLASSES)


def test_npz_float_images_are_refused(tmp_path):
    path = _npz(tmp_path / "train.npz", np.zeros((2, 32, 32, 3), np.float32), np.array([0, 1]))
    with pytest.raises(DataError, match="float32, expected uint8"):
        read_npz(path, CLASSES)


def test_npz_missing_labels_array_is_named(tmp_path):
    path = tmp_path / "train.npz"
    np.savez(path, images=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="missing array.*labels"):
        read_npz(path, CLASSES)


def test_truncated_npz_is_a_data_error_naming_the_file(tmp_path):
    path = _npz(tmp_path / "train.npz", np.zeros((20, 32, 32, 3), np.uint8), np.zeros(20, np.int64))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError, match=r"train\.npz: not a readable \.npz"):
        read_npz(path, CLASSES)


# --- the legacy pickle ----------------------------------------------------

class _Marker:
    """Unpickling this creates a folder: proof of whether a pickle was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _to_normalized_chw(pixels: np.ndarray) -> torch.Tensor:
    """What the user's course pipeline stored: ToTensor() then Normalize(0.5, 0.5)."""
    return (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def test_pickle_is_refused_without_trust_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "train.pickle"
    path.write_bytes(pickle.dumps([(_Marker(marker), 0)]))
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        read_pickle(path, CLASSES)
    with pytest.raises(UntrustedPickleError, match="arbitrary code"):
        read_array_file(path, CLASSES, trust_pickle=False)
    assert not marker.exists()


def test_trusted_list_of_pairs_with_normalized_chw_tensors(tmp_path):
    pixels = [class_image(c, i) for i, c in enumerate(["car", "truck", "cat", "cat"])]
    path = tmp_path / "train.pickle"
    path.write_bytes(pickle.dumps([(_to_normalized_chw(p), label) for p, label in zip(pixels, [0, 1, 2, 2])]))
    data = read_pickle(path, CLASSES, trust=True)
    np.testing.assert_array_equal(data.images, np.stack(pixels))  # [-1, 1] floats map back to the exact bytes
    assert data.labels.tolist() == [0, 1, 2, 2]
    assert data.ids[3] == "train.pickle#3"


def test_trusted_list_of_pairs_with_hwc_uint8_arrays(tmp_path):
    pixels = [class_image("truck", i) for i in range(3)]
    path = tmp_path / "dev.pkl"
    path.write_bytes(pickle.dumps([(p, 1) for p in pixels]))
    data = read_array_file(path, CLASSES, trust_pickle=True)
    np.testing.assert_array_equal(data.images, np.stack(pixels))
    assert data.labels.tolist() == [1, 1, 1]


def test_trusted_dict_pickle_with_cifar_flat_rows(tmp_path):
    pixels = np.stack([class_image("car", 0), class_image("cat", 1)])
    flat = pixels.transpose(0, 3, 1, 2).reshape(2, -1)  # CIFAR: 1024 R, then 1024 G, then 1024 B per row
    path = tmp_path / "train.pickle"
    path.write_bytes(pickle.dumps({b"data": flat, b"labels": [0, 2]}))
    data = read_pickle(path, CLASSES, trust=True)
    np.testing.assert_array_equal(data.images, pixels)
    assert data.labels.tolist() == [0, 2]


def test_trusted_pickle_with_label_out_of_range_is_refused(tmp_path):
    path = tmp_path / "train.pickle"
    path.write_bytes(pickle.dumps([(class_image("car", 0), 5)]))
    with pytest.raises(DataError, match="label 5 at index 0 is out of range"):
        read_pickle(path, CLASSES, trust=True)


def test_trusted_pickle_of_another_shape_says_what_was_expected(tmp_path):
    path = tmp_path / "train.pickle"
    path.write_bytes(pickle.dumps({"images": [], "targets": []}))
    with pytest.raises(DataError, match="needs 'data' and 'labels'"):
        read_pickle(path, CLASSES, trust=True)


def test_trusted_pickle_with_images_of_different_sizes_names_the_first_odd_one(tmp_path):
    path = tmp_path / "train.pickle"
    pairs = [(_to_normalized_chw(class_image("car", i)), 0) for i in range(2)]
    pairs.append((torch.zeros(3, 28, 28), 1))
    path.write_bytes(pickle.dumps(pairs))
    with pytest.raises(DataError, match=r"train\.pickle\[2\]: image of shape \(28, 28, 3\), but image 0 is \(32, 32, 3\)"):
        read_pickle(path, CLASSES, trust=True)


def test_trusted_dict_pickle_of_tensors_loads(tmp_path):
    pixels = [class_image("cat", i) for i in range(2)]
    path = tmp_path / "dev.pickle"
    path.write_bytes(pickle.dumps({"data": torch.stack([_to_normalized_chw(p) for p in pixels]),
                                   "labels": torch.tensor([2, 2])}))
    data = read_pickle(path, CLASSES, trust=True)
    np.testing.assert_array_equal(data.images, np.stack(pixels))
    assert data.labels.tolist() == [2, 2]


def test_a_16_bit_greyscale_png_is_scaled_to_8_bits_not_saturated(tmp_path):
    """Pillow's convert("RGB") clips 16-bit values at 255: every pixel above 255/65535 would turn white."""
    path = tmp_path / "train" / "car" / "0000.png"
    path.parent.mkdir(parents=True)
    from PIL import Image  # noqa: PLC0415
    Image.fromarray(np.tile(np.array([0, 255, 32768, 65535], np.uint16), (32, 8))).save(path)

    image = read_image_folder(tmp_path / "train", ("car",)).images[0]

    assert image.shape == (32, 32, 3)
    assert image[0, :4].tolist() == [[0, 0, 0], [0, 0, 0], [128, 128, 128], [255, 255, 255]]
