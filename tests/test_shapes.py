"""The built-in data set: a VOC layout the reader accepts, determinism, the statistics asked for, caching."""

import os

import numpy as np
import pytest

from detector import shapes
from detector.data import DatasetError, load_voc


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """60 images: enough for the statistics below, ~1 s to generate."""
    root = shapes.generate(str(tmp_path_factory.mktemp("shapes") / "root"), n_train=50, n_test=10)
    lines = []
    train, classes = load_voc(root, "trainval", log=lines.append)
    test, _ = load_voc(root, "test", classes, log=lines.append)
    return root, train, test, classes, lines


def test_layout_is_voc_and_reads_cleanly(sample):
    root, train, test, classes, lines = sample
    assert classes == list(shapes.SHAPE_CLASSES)  # inferred from trainval, sorted
    assert not any(line.startswith("warning") for line in lines)
    assert [r.image_id for r in train] == [f"{i:06d}" for i in range(1, 51)]
    assert [r.image_id for r in test] == [f"{i:06d}" for i in range(51, 61)]
    for name in ("Annotations/000001.xml", "JPEGImages/000060.jpg", "ImageSets/Main/test.txt", "shapes.json"):
        assert os.path.isfile(os.path.join(root, name))
    for r in train + test:
        assert 200 <= r.width <= 330 and 200 <= r.height <= 330
        assert (r.boxes[:, :2] >= 0).all()
        assert (r.boxes[:, 2] < r.width).all() and (r.boxes[:, 3] < r.height).all()
        assert (r.boxes[:, 2:] > r.boxes[:, :2]).all()


def test_statistics_match_the_issue(sample):
    _, train, test, _, _ = sample
    records = train + test
    labels = np.concatenate([r.labels for r in records])
    boxes = np.concatenate([r.boxes for r in records])
    difficult = np.concatenate([r.difficult for r in records])
    longer = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) + 1
    assert set(labels.tolist()) == set(range(1, len(shapes.SHAPE_CLASSES) + 1))  # every class occurs
    assert 15 <= longer.min() and longer.max() <= 140 and longer.max() >= 80  # ~20 to ~120 px
    assert 0 < difficult.mean() < 0.2  # some heavily occluded objects, not many
    assert 2 <= len(labels) / len(records) <= 4


def test_seeded_and_prefix_stable(tmp_path):
    a = shapes.generate(str(tmp_path / "a"), seed=0, n_train=3, n_test=1)
    b = shapes.generate(str(tmp_path / "b"), seed=0, n_train=2, n_test=0)
    c = shapes.generate(str(tmp_path / "c"), seed=1, n_train=2, n_test=0)
    read = lambda root, name: open(os.path.join(root, name), "rb").read()
    for name in ("JPEGImages/000001.jpg", "JPEGImages/000002.jpg", "Annotations/000002.xml"):
        assert read(a, name) == read(b, name)  # image i depends only on (seed, i)
        assert read(a, name) != read(c, name)
    with pytest.raises(FileExistsError):
        shapes.generate(a, n_train=1, n_test=0)


def test_small_images_generate_or_are_refused(tmp_path):
    # Shapes are drawn at fixed pixel sizes: at 96 px seed 3 drew one larger than its image (numpy's "high - low
    # < 0" from deep inside); it is now shrunk to fit. Below MIN_SIZE the call is refused by name.
    for size in (96, shapes.MIN_SIZE):
        root = shapes.generate(str(tmp_path / f"s{size}"), seed=3, n_train=6, n_test=2, size=size)
        records, _ = load_voc(root, "trainval")
        assert all(r.boxes[:, 2].max() < r.width and r.boxes[:, 3].max() < r.height for r in records)
    with pytest.raises(ValueError, match="at least 80 px"):
        shapes.generate(str(tmp_path / "tiny"), size=64)
    assert not (tmp_path / "tiny").exists()


def test_ensure_dataset_generates_once(tmp_path):
    root = str(tmp_path / "shapes-v1")
    open(tmp_path / "shapes-v1.tmp-1", "w").close()  # debris of an interrupted run is ignored
    assert shapes.ensure_dataset(root, n_train=3, n_test=1, log=lambda *_: None) == root
    marker = os.path.join(root, "shapes.json")
    stamp = os.stat(marker).st_mtime_ns
    assert shapes.ensure_dataset(root, n_train=3, n_test=1) == root
    assert os.stat(marker).st_mtime_ns == stamp  # reused, not regenerated
    assert not any(name.startswith(f"shapes-v1.tmp-{os.getpid()}") for name in os.listdir(tmp_path))
    with pytest.raises(DatasetError, match="remove it to regenerate"):  # made with other sizes
        shapes.ensure_dataset(root, n_train=4, n_test=1)
    os.makedirs(tmp_path / "foreign")
    with pytest.raises(DatasetError, match="not a complete built-in data set"):
        shapes.ensure_dataset(str(tmp_path / "foreign"))


def test_cli_writes_data_and_example_sheet(tmp_path, capsys):
    out = str(tmp_path / "demo")
    shapes.main(["--out", out, "--n-train", "4", "--n-test", "1"])
    sheet = os.path.join(out, "examples.png")
    assert open(sheet, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "ms/image" in capsys.readouterr().out
