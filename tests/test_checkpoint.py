"""Checkpoints: a round trip predicts the same, and anything that is not our checkpoint is refused by name."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from cnnlib.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from cnnlib.ensemble import Ensemble
from cnnlib.errors import CheckpointError
from cnnlib.model import SeedCNN
from cnnlib.splits import DataConfig, prepare_splits
from cnnlib.config import TrainConfig
from cnnlib.training import DeviceData, predict_logits, train

from conftest import build_image_tree

CLASSES = ("car", "truck", "cat")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained for one epoch on a tiny tree: weights that differ from any fresh init."""
    root = build_image_tree(tmp_path_factory.mktemp("tree"), {c: 12 for c in CLASSES}, {c: 8 for c in CLASSES})
    splits = prepare_splits(DataConfig(root, train_counts=(12, 8, 6), dev_counts=(4, 4, 4), test_counts=(4, 4, 4)), None)
    config = TrainConfig(epochs=1, batch_size=8, dropout=0.3, seed=3)
    return train(config, splits, "cpu"), splits


def test_round_trip_gives_the_same_predictions_config_and_classes(trained, tmp_path, device):
    result, splits = trained
    path = save_checkpoint(tmp_path / "model.pt", result.model, result.config, CLASSES, 32, extra={"run": "x", "dev": 0.5})
    model, config, classes, extra = load_checkpoint(path, device)
    x = DeviceData(splits, "cpu").test.x
    assert not model.training  # ready to evaluate: dropout off
    torch.testing.assert_close(predict_logits(model, x.to(device)).cpu(), predict_logits(result.model, x), rtol=1e-4, atol=1e-5)
    assert config == result.config and classes == CLASSES and extra == {"run": "x", "dev": 0.5}


def test_saving_leaves_no_temporary_files(trained, tmp_path):
    result, _ = trained
    save_checkpoint(tmp_path / "model.pt", result.model, result.config, CLASSES)
    save_checkpoint(tmp_path / "model.pt", result.model, result.config, CLASSES)  # replacing is fine too
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_checkpoint_of_another_shape_is_refused_by_name(tmp_path):
    other = SeedCNN(n_classes=5)  # five outputs, but the file claims three classes
    path = tmp_path / "five.pt"
    torch.save({"format": FORMAT, "state_dict": other.state_dict(), "config": TrainConfig().to_dict(),
                "classes": list(CLASSES), "image_size": 32, "extra": {}}, path)
    with pytest.raises(CheckpointError, match=r"five\.pt: weights do not fit the seed CNN for 3 classes"):
        load_checkpoint(path)


def test_checkpoint_for_another_image_size_is_refused(trained, tmp_path):
    result, _ = trained
    path = save_checkpoint(tmp_path / "model.pt", result.model, result.config, CLASSES, image_size=48)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_checkpoint(path)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_bytes(b"just some bytes")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a loadable checkpoint"):
        load_checkpoint(path)


def _cut_short(path):
    save_checkpoint(path, SeedCNN(), TrainConfig(), CLASSES)
    path.write_bytes(path.read_bytes()[:2000])


def _plain_pickle(path):
    path.write_bytes(pickle.dumps(_Marker(path.parent / "code-ran")))


def _pickled_code(path):
    torch.save({"format": FORMAT, "payload": _Marker(path.parent / "code-ran")}, path)


@pytest.mark.parametrize("make, why", [
    (lambda path: path.write_text("hello\n"), "it is not the zip archive torch.save writes (it begins b'hello\\n')"),
    (lambda path: path.write_bytes(b""), "the file is empty"),
    (_cut_short, "its zip archive is damaged or cut short"),
    (_plain_pickle, "it is a plain pickle, not the zip archive torch.save writes; refused without unpickling it"),
    (_pickled_code, "it holds a Python object (posix.mkdir) that could run code when loaded; refused without loading"),
], ids=["text", "empty", "cut short", "plain pickle", "pickled code"])
def test_a_file_that_does_not_load_is_refused_with_why_in_our_words_never_advising_weights_only_false(tmp_path, make,
                                                                                                     why):
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: not a loadable checkpoint: {why}")
    assert "weights_only" not in message and "Re-running" not in message and "\n" not in message
    assert not (tmp_path / "code-ran").exists()


def test_someone_elses_torch_file_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(SeedCNN().state_dict(), path)  # plain weights, no config or classes
    with pytest.raises(CheckpointError, match=f"not a {FORMAT} checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", [{"drop": "classes"}, {"drop": "state_dict"}, {"config": {"learning_rate": 1}}])
def test_a_checkpoint_with_missing_or_foreign_entries_is_refused_by_name(trained, tmp_path, damage):
    result, _ = trained
    path = save_checkpoint(tmp_path / "model.pt", result.model, result.config, CLASSES)
    payload = torch.load(path, weights_only=True)
    payload.pop(damage.get("drop", ""), None)
    payload.update({k: v for k, v in damage.items() if k != "drop"})
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"model\.pt: checkpoint (lacks|settings do not fit)"):
        load_checkpoint(path)


class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "payload": _Marker(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a loadable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_predictions_depend_on_the_loaded_weights_not_a_fresh_init(trained, tmp_path):
    result, splits = trained
    path = save_checkpoint(tmp_path / "model.pt", result.model, result.config, CLASSES)
    model, *_ = load_checkpoint(path)
    fresh = SeedCNN(3, result.config.dropout).eval()
    x = torch.from_numpy(np.ascontiguousarray(splits.test.images)).permute(0, 3, 1, 2).float() / 255
    assert not torch.allclose(predict_logits(model, x), predict_logits(fresh, x))


def test_an_ensemble_round_trips_and_predicts_the_mean_softmax_of_its_members(trained, tmp_path, device):
    result, splits = trained
    other = SeedCNN(n_classes=3, dropout=0.3).eval()  # a second member with other weights
    ensemble = Ensemble([result.model, other]).eval()
    path = save_checkpoint(tmp_path / "model.pt", ensemble, result.config, CLASSES, extra={"seeds": [0, 1]})
    model, config, classes, extra = load_checkpoint(path, device)
    assert isinstance(model, Ensemble) and len(model.members) == 2 and not model.training
    assert config == result.config and classes == CLASSES and extra == {"seeds": [0, 1]}
    x = DeviceData(splits, "cpu").test.x
    with torch.no_grad():
        mean = (result.model(x).softmax(-1) + other(x).softmax(-1)) / 2
        loaded = model(x.to(device)).cpu()
    torch.testing.assert_close(loaded.exp(), mean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("members", [0, -1, True, "2", 10**9])
def test_an_ensemble_whose_member_count_is_no_count_is_refused_by_name(trained, tmp_path, members):
    result, _ = trained
    path = save_checkpoint(tmp_path / "model.pt", Ensemble([result.model, result.model]), result.config, CLASSES)
    payload = torch.load(path, weights_only=True)
    payload["members"] = members
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"model\.pt: members .* is not a whole number"):
        load_checkpoint(path)


@pytest.mark.parametrize("members, held", [(4, 3), (2, 3), (1, 3)])
def test_an_ensemble_whose_member_count_was_edited_says_how_many_models_its_weights_hold(trained, tmp_path, members,
                                                                                         held):
    result, _ = trained
    path = save_checkpoint(tmp_path / "model.pt", Ensemble([result.model] * held), result.config, CLASSES)
    payload = torch.load(path, weights_only=True)
    payload["members"] = members
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"model\.pt: its 'members' entry says {members} model\(s\), but its "
                                              rf"weights are those of {held}$"):
        load_checkpoint(path)


def test_a_one_model_checkpoint_read_as_an_ensemble_is_refused_by_name(trained, tmp_path):
    result, _ = trained
    path = save_checkpoint(tmp_path / "model.pt", result.model, result.config, CLASSES)
    payload = torch.load(path, weights_only=True)
    payload["members"] = 2
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"model\.pt: its 'members' entry says 2 model\(s\), but its weights "
                                              r"are those of 1$"):
        load_checkpoint(path)
