"""The VOC reader on hand-written annotations; box arithmetic of the image transforms (scale, flip, pad)."""

import os

import cv2
import numpy as np
import pytest
import torch

from detector.boxes import flip_boxes
from detector.data import (
    VOC_CLASSES,
    DatasetError,
    flip_image,
    image_scale,
    infer_classes,
    load_voc,
    pad_batch,
    read_image,
    resize_image,
    resolve_classes,
    to_tensor,
)

# Hand-written annotations. Coordinates in the XML are 1-based inclusive.
XML_A = """<annotation><filename>a.jpg</filename>
<size><width>40</width><height>30</height><depth>3</depth></size>
<object><name>cat</name><difficult>0</difficult>
  <bndbox><xmin>5</xmin><ymin>6</ymin><xmax>20</xmax><ymax>25</ymax></bndbox></object>
<object><name>dog</name><difficult>1</difficult>
  <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>
</annotation>"""
# b: no <size>; one box beyond the image (clipped), one zero-width and one inverted (both dropped).
XML_B = """<annotation><filename>b.png</filename>
<object><name>dog</name><bndbox><xmin>-4</xmin><ymin>3</ymin><xmax>60</xmax><ymax>18</ymax></bndbox></object>
<object><name>cat</name><difficult>0</difficult>
  <bndbox><xmin>11</xmin><ymin>5</ymin><xmax>11</xmax><ymax>15</ymax></bndbox></object>
<object><name>cat</name><bndbox><xmin>20</xmin><ymin>10</ymin><xmax>15</xmax><ymax>12</ymax></bndbox></object>
</annotation>"""


def _write_root(root, xmls: dict, images: dict, split: str = "trainval") -> str:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for image_id, text in xmls.items():
        with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write(text)
    for name, (height, width) in images.items():
        img = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
        cv2.imwrite(os.path.join(root, "JPEGImages", name), img)
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in xmls))
    return str(root)


@pytest.fixture
def root(tmp_path):
    return _write_root(tmp_path, {"a": XML_A, "b": XML_B}, {"a.jpg": (30, 40), "b.png": (20, 50)})


def test_reader_converts_validates_and_reports(root):
    lines = []
    records, classes = load_voc(root, "trainval", ["cat", "dog"], log=lines.append)
    assert classes == ["cat", "dog"]
    a, b = records
    assert (a.image_id, a.width, a.height) == ("a", 40, 30)
    assert a.path.endswith(os.path.join("JPEGImages", "a.jpg"))
    # 1-based inclusive -> 0-based: subtract 1 from every coordinate.
    np.testing.assert_array_equal(a.boxes, [[4, 5, 19, 24], [0, 0, 39, 29]])
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    np.testing.assert_array_equal(a.labels, [1, 2])
    np.testing.assert_array_equal(a.difficult, [False, True])  # difficult objects are kept
    # b (PNG, size from the image): the dog box is clipped to the 50x20 image, the two cat boxes dropped.
    assert (b.width, b.height) == (50, 20)
    np.testing.assert_array_equal(b.boxes, [[0, 2, 49, 17]])
    np.testing.assert_array_equal(b.labels, [2])
    text = "\n".join(lines)
    b_xml = os.path.join(root, "Annotations", "b.xml")
    assert f"{b_xml}: object 0 (dog) box (-4, 3, 60, 18) lies outside the 50x20 image; clipped" in text
    assert f"{b_xml}: object 1 (cat) box (11, 5, 11, 15) dropped" in text
    assert f"{b_xml}: object 2 (cat) box (20, 10, 15, 12) dropped" in text
    assert "2 images, 3 objects (1 difficult), 3 warnings" in text


def test_size_disagreeing_with_xml_is_reported(tmp_path):
    root = _write_root(tmp_path, {"a": XML_A}, {"a.jpg": (32, 40)})
    lines = []
    (rec,), _ = load_voc(root, "trainval", ["cat", "dog"], log=lines.append)
    assert (rec.width, rec.height) == (40, 32)
    assert any("<size> says 40x30 but the image is 40x32" in line for line in lines)


def _write(root: str, rel: str, data) -> None:
    with open(os.path.join(root, rel), "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    _write("", path, data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, expected",
    [
        # garbage bytes in place of a JPEG
        (lambda r: _write(r, "JPEGImages/a.jpg", os.urandom(3000)), "a.jpg: unreadable or corrupt image"),
        # a JPEG cut in half (libjpeg would only warn)
        (lambda r: _truncate(os.path.join(r, "JPEGImages", "a.jpg")), "a.jpg: truncated JPEG"),
        (lambda r: os.remove(os.path.join(r, "JPEGImages", "a.jpg")), "image for a not found"),
        (lambda r: _write(r, "Annotations/b.xml", "<annotation><object>"), "b.xml: malformed XML"),
        (lambda r: os.remove(os.path.join(r, "Annotations", "b.xml")), "b.xml not found"),
        (lambda r: _write(r, "Annotations/a.xml", XML_A.replace("dog", "wolf")),
         "a.xml: object 1 has class 'wolf', which is not in the class list (cat, dog)"),
        (lambda r: _write(r, "Annotations/a.xml", XML_A.replace("<xmin>5", "<xmin>five")),
         "a.xml: object 0 (cat) has a missing or non-numeric bndbox"),
        (lambda r: _write(r, "ImageSets/Main/trainval.txt", "\n"), "trainval.txt lists no images"),
    ],
)
def test_fatal_problems_name_the_file(root, damage, expected):
    damage(root)
    with pytest.raises(DatasetError) as err:
        load_voc(root, "trainval", ["cat", "dog"], log=lambda *_: None)
    assert expected in str(err.value)


def test_nothing_found_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_voc(str(tmp_path / "nowhere"), "trainval")
    with pytest.raises(DatasetError) as err:
        load_voc(str(tmp_path), "trainval")
    assert os.path.join(str(tmp_path), "ImageSets", "Main", "trainval.txt") in str(err.value)


def test_classes_inferred_from_training_split_or_given(root, tmp_path):
    assert infer_classes(root, "trainval") == ["cat", "dog"]
    records, classes = load_voc(root, "trainval", log=lambda *_: None)  # None: resolved on this split
    assert classes == ["cat", "dog"] and records[0].labels.tolist() == [1, 2]
    assert resolve_classes(root, "trainval", "dog,cat") == ["dog", "cat"]
    with pytest.raises(DatasetError):
        resolve_classes(root, "trainval", "dog,dog")
    # Annotations naming all 20 VOC classes: the devkit's order, not sorted.
    box = "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>"
    objects = "".join(f"<object><name>{c}</name>{box}</object>" for c in sorted(VOC_CLASSES))
    voc = _write_root(tmp_path / "voc", {"x": f"<annotation>{objects}</annotation>"}, {"x.jpg": (10, 10)})
    assert resolve_classes(voc, "trainval", log=lambda *_: None) == list(VOC_CLASSES)


def test_image_scale_follows_the_600_1000_rule():
    assert image_scale(375, 500) == pytest.approx(1.6)  # 600 / 375; 800 <= 1000
    assert image_scale(200, 1000) == pytest.approx(1.0)  # 600 / 200 would make 3000 > 1000: 1000 / 1000
    assert image_scale(256, 300, 384, 640) == pytest.approx(1.5)
    assert image_scale(100, 170, 600, 1000) == pytest.approx(1000 / 170)  # round(6 * 170) = 1020 > 1000


def test_flip_boxes_matches_flipped_pixels():
    img = np.zeros((30, 40, 3), np.uint8)
    boxes = np.array([[3, 4, 12, 20], [0, 0, 39, 29], [39, 5, 39, 6]], np.float32)
    flipped = flip_boxes(boxes, 40)
    np.testing.assert_array_equal(flipped, [[27, 4, 36, 20], [0, 0, 39, 29], [0, 5, 0, 6]])
    np.testing.assert_array_equal(flip_boxes(flipped, 40), boxes)  # an involution
    for (x1, y1, x2, y2), (f1, _, f2, _) in zip(boxes.astype(int), flipped.astype(int)):
        img[:] = 0
        img[y1 : y2 + 1, x1 : x2 + 1] = 255
        cols = np.nonzero(flip_image(img)[:, :, 0].any(0))[0]
        assert (cols.min(), cols.max()) == (f1, f2)


def test_boxes_scale_with_the_image():
    img = np.zeros((300, 400, 3), np.uint8)
    x1, y1, x2, y2 = 80, 51, 270, 190
    img[y1 : y2 + 1, x1 : x2 + 1] = 255
    s = image_scale(300, 400)  # 2.0
    big = resize_image(img, s)
    assert big.shape == (600, 800, 3)
    ys, xs = np.nonzero(big[:, :, 0] > 127)
    # Pixel i covers [i, i + 1) and lands on [s i, s (i + 1)): the box starts at x1 * s (FR multiplies the
    # corners by the float scale) and its last pixel is (x2 + 1) * s - 1.
    np.testing.assert_allclose([xs.min(), ys.min()], np.array([x1, y1]) * s, atol=1)
    np.testing.assert_allclose([xs.max(), ys.max()], (np.array([x2, y2]) + 1) * s - 1, atol=1)


def test_read_image_is_rgb(tmp_path):
    path = str(tmp_path / "x.png")
    cv2.imwrite(path, np.array([[[255, 0, 0]]], np.uint8))  # cv2 writes BGR: this pixel is blue
    np.testing.assert_array_equal(read_image(path)[0, 0], [0, 0, 255])
    with pytest.raises(DatasetError, match="missing.png"):
        read_image(str(tmp_path / "missing.png"))


def test_tensor_and_pad():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    t = to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[2, 1, 0].item() == img[1, 0, 2]
    a, b = torch.ones(3, 2, 5), torch.full((3, 4, 3), 2.0)
    batch = pad_batch([a, b])
    assert batch.shape == (2, 3, 4, 5)
    # Top-left placement, zeros elsewhere.
    assert batch[0, :, :2, :5].eq(1).all() and batch[0, :, 2:].eq(0).all()
    assert batch[1, :, :4, :3].eq(2).all() and batch[1, :, :, 3:].eq(0).all()
