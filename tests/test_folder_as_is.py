"""A user's own image folder as it is: any number of classes, uneven counts, no count variables.

Every train/ image is used; dev is val/ when the tree has one, else a
stratified share of train/; test is test/, else the same share of train/.
The trees are tiny and made here; their pixels carry a class tint only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnnlib.errors import DataError
from cnnlib.splits import DataConfig, prepare_splits
from conftest import build_image_tree, run_cli, write_image, class_image

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


def as_is(root: Path, classes, **settings) -> DataConfig:
    return DataConfig(root, tuple(classes), None, None, None, **settings)


def uneven(n: int) -> dict[str, int]:
    """n classes, each about half as many train images as the one before (at least 4)."""
    return {f"c{i:02d}": max(4, 40 >> i) for i in range(n)}


def test_every_train_image_is_used_and_dev_is_a_stratified_share_of_it(tmp_path):
    train = {"big": 40, "rare": 4}
    root = build_image_tree(tmp_path / "d", train, {"big": 5, "rare": 5})
    splits = prepare_splits(as_is(root, train), None)
    counts = {name: dict(zip(train, split.counts(2))) for name, split in splits.named().items()}
    assert counts["dev"] == {"big": 6, "rare": 1}  # 15 %, at least one image of every class
    assert {c: counts["train"][c] + counts["dev"][c] for c in train} == train
    assert counts["test"] == {"big": 5, "rare": 5}  # test/ as it is
    assert not set(splits.train.ids) & set(splits.dev.ids)


def test_val_is_dev_and_a_tree_without_test_holds_test_out_of_train(tmp_path):
    train = {"a": 20, "b": 8}
    root = tmp_path / "d"
    for split, counts in (("train", train), ("val", {"a": 3, "b": 2})):
        for name, n in counts.items():
            for i in range(n):
                write_image(root / split / name / f"{i:04d}.png", class_image(name, i + 1000 * (split == "val")))
    splits = prepare_splits(as_is(root, train), None)
    assert list(splits.dev.counts(2)) == [3, 2] and all(i.startswith("val/") for i in splits.dev.ids)
    assert list(splits.test.counts(2)) == [3, 1]  # 15 % of train/, held out of it
    assert list(splits.train.counts(2) + splits.test.counts(2)) == [20, 8]
    assert not set(splits.train.ids) & set(splits.test.ids)


def test_the_split_is_the_same_on_every_build_and_keyed_apart_from_counted_splits(tmp_path):
    train = {"a": 20, "b": 9}
    root = build_image_tree(tmp_path / "d", train, {"a": 3, "b": 3})
    first, again = (prepare_splits(as_is(root, train), tmp_path / f"cache{i}") for i in range(2))
    assert first.cache_key == again.cache_key and list(first.dev.ids) == list(again.dev.ids)
    other = prepare_splits(as_is(root, train, dev_fraction=0.3), tmp_path / "cache3")
    assert other.cache_key != first.cache_key and len(other.dev) > len(first.dev)


def test_a_class_too_small_to_split_names_itself_its_count_and_the_minimum(tmp_path):
    root = build_image_tree(tmp_path / "d", {"a": 10, "tiny": 2}, {})
    with pytest.raises(DataError, match=r"/train/tiny: 2 image\(s\), but a class needs at least 3 in train/ "
                                        r"\(one to train on, one for dev, one for test\)"):
        prepare_splits(as_is(root, ("a", "tiny")), None)


def test_the_command_refuses_a_too_small_class_in_one_line_and_writes_nothing(tmp_path):
    root = build_image_tree(tmp_path / "d", {"a": 10, "tiny": 1}, {"a": 2, "tiny": 2})
    code, out, err = run_cli("data", "--data", root, "--results", tmp_path / "r")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "tiny: 1 image(s), but a class needs at least 2" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_the_first_lines_give_the_counts_per_class_and_split_and_the_imbalance(tmp_path):
    train = {"a": 40, "b": 4}
    root = build_image_tree(tmp_path / "d", train, {"a": 2, "b": 2})
    code, out, err = run_cli("data", "--data", root, "--results", tmp_path / "r")
    assert code == 0, err
    assert "imbalance: 11.3:1 in train (a 34, b 3)" in out
    assert "the folder as it is, every image (dev: 15% of each class's train/ (DEV_FRACTION); test: test/)" in out
    summary = json.loads((tmp_path / "r" / "data" / "summary.json").read_text())
    assert summary["splits"]["dev"] == {"a": 6, "b": 1}


def test_counts_given_still_draw_the_split_as_before(tmp_path):
    root = build_image_tree(tmp_path / "d", {"a": 10, "b": 10}, {"a": 6, "b": 6})
    code, out, err = run_cli("data", "--data", root, "--results", tmp_path / "r", "--train-counts", "8,4",
                             "--dev-counts", "2,1", "--test-counts", "3,3")
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "data" / "summary.json").read_text())
    assert summary["splits"] == {"train": {"a": 8, "b": 4}, "dev": {"a": 2, "b": 1}, "test": {"a": 3, "b": 3}}


@pytest.mark.slow
@pytest.mark.parametrize("classes", [2, 6, 12])
def test_a_tree_of_any_class_count_runs_data_search_export_and_final_without_count_variables(tmp_path, classes):
    train = uneven(classes)
    root = build_image_tree(tmp_path / "d", train, dict.fromkeys(train, 2))
    results = tmp_path / "r"
    data = ("--data", root, "--device", "cpu")
    for command, *extra in (("data", *data), ("search", "--space", "smoke", "--trials", "2", *data), ("export",),
                            ("final", "--seeds", "1", "--candidates", "1", "--epsilons", "0,0.01", "--no-png", *data)):
        code, out, err = run_cli(command, *extra, "--results", results)
        assert code == 0, f"{command}: {err}"
    metrics = json.loads((results / "final" / "smoke" / "metrics.json").read_text())
    assert metrics["classes"] == sorted(train)
    assert np.asarray(metrics["test"]["confusion_matrix"]).shape == (classes, classes)
    assert metrics["data"]["splits"]["test"] == dict.fromkeys(sorted(train), 2)
    trials = (results / "smoke" / "trials.csv").read_text().splitlines()
    assert len(trials) == 3  # the header and the search's two trials


def test_make_finals_folds_fall_to_the_rarest_class_with_a_note(tmp_path, capsys):
    from study.final.folds import fold_assignment, folds_for_rarest

    root = build_image_tree(tmp_path / "d", {"a": 40, "rare": 3}, {"a": 2, "rare": 2})
    splits = prepare_splits(as_is(root, ("a", "rare")), None)  # rare: 2 train + 1 dev
    assert folds_for_rarest(splits, 4) == 3
    assert "note: class rare has 3 images in train+dev, fewer than FOLDS 4: cross-validating on 3 folds" in \
        capsys.readouterr().out
    _, fold_of = fold_assignment(splits, 3)
    pool_labels = np.concatenate([splits.train.labels, splits.dev.labels])
    assert all(set(pool_labels[fold_of == k]) == {0, 1} for k in range(3))  # every fold holds every class
    assert folds_for_rarest(splits, 3) == 3 and capsys.readouterr().out == ""
