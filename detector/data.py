"""VOC-format data: read and validate a VOC-style root; the paper's image transforms (scale, flip, pad).

A root holds Annotations/<id>.xml, JPEGImages/<id>.jpg (or .png) and ImageSets/Main/<split>.txt: PASCAL VOC
itself or any custom data set laid out the same way. XML boxes are 1-based inclusive; internally boxes are
0-based (x1, y1, x2, y2) float pixels, as in FR datasets/pascal_voc.py. Validation happens once, up front:
fixable problems (boxes outside the image, degenerate boxes) are repaired and named in the log; anything else
raises DatasetError with one message that names the file and the problem.
"""

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from detector.errors import InputError

# The devkit's order (VOCcode/VOCinit.m); label k is VOC_CLASSES[k - 1], 0 is background.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_MAX_WARNINGS = 20  # per split; the rest are counted, not printed


@dataclass
class ImageRecord:
    image_id: str
    path: str
    width: int
    height: int
    boxes: np.ndarray  # (G, 4) float32, 0-based x1, y1, x2, y2
    labels: np.ndarray  # (G,) int64 in 1..K; 0 is background
    difficult: np.ndarray  # (G,) bool; kept for training (as FR), ignored by evaluation


class DatasetError(InputError):
    """A fatal problem with the data; the message names the file and the problem."""


def read_split_ids(root: str, split: str) -> list[str]:
    """Image ids listed in ImageSets/Main/<split>.txt (first token of each line)."""
    if not os.path.isdir(root):
        raise DatasetError(f"data set root {root} does not exist")
    path = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        listed = os.listdir(folder) if os.path.isdir(folder) else []
        found = sorted(f[:-4] for f in listed if f.endswith(".txt"))
        raise DatasetError(
            f"split file {path} not found (splits there: {', '.join(found) or 'none'}); a VOC-format root "
            "needs Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt"
        )
    with open(path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise DatasetError(f"{path} lists no images")
    return ids


def _parse_xml(path: str) -> ET.Element:
    if not os.path.isfile(path):
        raise DatasetError(f"annotation {path} not found")
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{path}: malformed XML ({e})") from None


def infer_classes(root: str, split: str) -> list[str]:
    """Sorted class names found in the annotations of a split (use the training split)."""
    names = set()
    for image_id in read_split_ids(root, split):
        xml = os.path.join(root, "Annotations", f"{image_id}.xml")
        names.update((obj.findtext("name") or "").strip() for obj in _parse_xml(xml).iter("object"))
    names.discard("")
    if not names:
        raise DatasetError(f"no objects in the annotations of {root} split {split}")
    return sorted(names)


def resolve_classes(
    root: str, train_split: str, names: str | list[str] | None = None, log=print
) -> list[str]:
    """The class list: the user's (--classes a,b,c); VOC's 20 for VOC data; else inferred from training.

    "VOC data" means training annotations that use exactly the 20 VOC names. A custom set that uses only some
    of them is custom: its classes are inferred, so no class goes untrained and unscored.
    """
    if names:
        classes = [c.strip() for c in names.split(",")] if isinstance(names, str) else list(names)
        if "" in classes or len(set(classes)) != len(classes) or "__background__" in classes:
            raise DatasetError(f"--classes {names!r}: names must be unique and non-empty")
        return classes
    found = infer_classes(root, train_split)
    if set(found) == set(VOC_CLASSES):
        log(f"classes: the 20 PASCAL VOC classes (found in {train_split})")
        return list(VOC_CLASSES)
    log(f"classes inferred from {train_split} (sorted): {', '.join(found)}")
    return found


def _find_image(root: str, image_id: str) -> str:
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(root, "JPEGImages", image_id + ext)
        if os.path.isfile(path):
            return path
    tried = ", ".join(f"JPEGImages/{image_id}{ext}" for ext in IMAGE_EXTENSIONS)
    raise DatasetError(f"image for {image_id} not found under {root} (looked for {tried})")


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file header, after checks that catch corrupt and truncated files.

    Decoding every image would cost ~4 ms each (40 s for VOC07) and still accept a truncated JPEG (libjpeg
    only warns). So: Pillow reads the header (garbage or a cut header fails here), verify() checks PNG chunk
    CRCs, and a JPEG must end with its EOI marker (a half-downloaded file does not).
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            fmt = im.format
            im.verify()
    except Exception as e:  # Pillow raises several types for bad files
        raise DatasetError(f"{path}: unreadable or corrupt image ({e})") from None
    if fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(os.path.getsize(path) - 1024, 0))
            if b"\xff\xd9" not in f.read():
                raise DatasetError(f"{path}: truncated JPEG (no end-of-image marker)")
    return height, width


def _xml_size(root_el: ET.Element) -> tuple[int, int] | None:
    try:
        h, w = int(root_el.findtext("size/height")), int(root_el.findtext("size/width"))
    except (TypeError, ValueError):
        return None
    return (h, w) if h > 0 and w > 0 else None


def _read_record(root: str, image_id: str, class_index: dict, warn, clean: bool) -> ImageRecord:
    xml = os.path.join(root, "Annotations", f"{image_id}.xml")
    ann = _parse_xml(xml)
    path = _find_image(root, image_id)
    xml_size = _xml_size(ann)
    height, width = _image_size(path)
    if xml_size is not None and xml_size != (height, width):
        warn(f"{xml}: <size> says {xml_size[1]}x{xml_size[0]} but the image is {width}x{height}; "
             "using the image's")
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(ann.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise DatasetError(
                f"{xml}: object {k} has class {name!r}, which is not in the class list "
                f"({', '.join(class_index)}); name the classes with --classes or fix the file"
            )
        try:
            # VOC XML is 1-based inclusive: subtract 1 (FR pascal_voc.py _load_pascal_annotation).
            box = [float(obj.findtext(f"bndbox/{t}")) - 1 for t in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise DatasetError(f"{xml}: object {k} ({name}) has a missing or non-numeric bndbox") from None
        difficult_text = (obj.findtext("difficult") or "0").strip()
        if not clean:  # evaluation: the ground truth as the devkit reads it, nothing repaired
            boxes.append(box)
            labels.append(class_index[name])
            difficult.append(difficult_text not in ("0", ""))
            continue
        limits = (width - 1, height - 1, width - 1, height - 1)
        clipped = [min(max(v, 0), hi) for v, hi in zip(box, limits)]
        where = f"{xml}: object {k} ({name}) box {_one_based(box)}"
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            # Zero width or height breaks box encoding, log(gw / w) (PF#266 NaN losses); inverted boxes break
            # flipping (FR#45).
            warn(f"{where} dropped: zero width/height or inverted once clipped to the {width}x{height} image")
            continue
        if clipped != box:
            warn(f"{where} lies outside the {width}x{height} image; clipped")
        boxes.append(clipped)
        labels.append(class_index[name])
        difficult.append(difficult_text not in ("0", ""))
    return ImageRecord(image_id, path, width, height, np.array(boxes, np.float32).reshape(-1, 4),
                       np.array(labels, np.int64), np.array(difficult, bool))


def _one_based(box: list[float]) -> str:
    return "(" + ", ".join(f"{v + 1:g}" for v in box) + ")"


def load_voc(
    root: str, split: str, classes: list[str] | None = None, log=print, clean: bool = True
) -> tuple[list[ImageRecord], list[str]]:
    """Read and validate one split of a VOC-format root.

    Args:
        root: the directory holding Annotations/, JPEGImages/, ImageSets/Main/.
        split: a file name in ImageSets/Main without .txt (trainval, test, ...).
        classes: the class list; label k is classes[k - 1]. Pass the list resolved on the training split
            (resolve_classes) when loading a test split; None resolves it on this split.
        log: where warnings and the one-line summary go.
        clean: repair for training (boxes clipped to the image, degenerate ones dropped, each named); False
            keeps the boxes as written, the ground truth the VOC devkit scores against (evaluation).
    Returns (records in ImageSets order, classes). Raises DatasetError on a fatal problem.
    """
    ids = read_split_ids(root, split)
    if classes is None:
        classes = resolve_classes(root, split, log=log)
    class_index = {name: k + 1 for k, name in enumerate(classes)}
    warnings: list[str] = []
    records = [_read_record(root, image_id, class_index, warnings.append, clean) for image_id in ids]
    for w in warnings[:_MAX_WARNINGS]:
        log(f"warning: {w}")
    if len(warnings) > _MAX_WARNINGS:
        log(f"warning: ... and {len(warnings) - _MAX_WARNINGS} more")
    n_obj = sum(len(r.boxes) for r in records)
    n_diff = sum(int(r.difficult.sum()) for r in records)
    empty = sum(len(r.boxes) == 0 for r in records)
    summary = f"{root} {split}: {len(records)} images, {n_obj} objects ({n_diff} difficult)"
    log(f"{summary}, {len(warnings)} warnings" + (f", {empty} images without objects" if empty else ""))
    return records, list(classes)


def read_image(path: str) -> np.ndarray:
    """HxWx3 uint8 RGB (cv2 reads BGR; FR keeps BGR for Caffe, our backbones take RGB)."""
    # Pixels as stored, like the header size in the records: no EXIF rotation, which would swap W and H.
    img = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DatasetError(f"{path}: unreadable or corrupt image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def image_scale(height: int, width: int, scale: int = 600, max_size: int = 1000) -> float:
    """Factor bringing the shorter side to `scale`, unless the longer then exceeds `max_size` (FR blob.py)."""
    im_scale = scale / min(height, width)
    if round(im_scale * max(height, width)) > max_size:
        im_scale = max_size / max(height, width)
    return float(im_scale)


def resize_image(img: np.ndarray, im_scale: float) -> np.ndarray:
    """Resize by im_scale, bilinear (FR blob.py); boxes scale by the same float, unrounded."""
    return cv2.resize(img, None, fx=im_scale, fy=im_scale, interpolation=cv2.INTER_LINEAR)


def flip_image(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[:, ::-1])


def to_tensor(img: np.ndarray) -> Tensor:
    """HxWx3 uint8 RGB -> (3, H, W) float32, values 0..255 (the backbone normalises)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()


def pad_batch(images: list[Tensor]) -> Tensor:
    """Stack (3, h, w) images into (N, 3, H, W), zero-padded at the bottom and right (FR im_list_to_blob).

    Normalise first: padding with 0 then equals the mean colour, as in FR.
    """
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    return batch
