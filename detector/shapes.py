"""The built-in data set: seeded images of shapes on textured backgrounds, written to disk in VOC layout.

The default run trains and tests on it through exactly the code path real VOC data takes (JPEG + XML +
ImageSets), so nothing needs downloading. It is a real detection problem: six classes that differ only in
shape (colours are random), objects from ~20 to ~120 px with rotation and aspect jitter, partial occlusion
(heavily occluded objects are marked difficult, as in VOC), unlabelled distractors (letters, scratches),
procedural or natural-image backgrounds, blur, noise and JPEG artefacts. Boxes are the extent of the *visible*
pixels (VOC annotation guidelines). Image i depends only on (seed, i): a small set is a prefix of a big one.
`generate_large` draws the other kind of data people bring: 1500-2500 px images with hundreds of 15-60 px objects
(aerial-like), the case tiling is for (tests, bench/large_images.py).
"""

import argparse
import json
import os
import shutil
import time
import xml.etree.ElementTree as ET

import cv2
import matplotlib
import numpy as np
from matplotlib.colors import LightSource

from detector.data import DatasetError, load_voc, read_image

# Sorted, so classes inferred from the annotations come out in this order too.
SHAPE_CLASSES = ("circle", "cross", "ring", "square", "star", "triangle")
VERSION = 1  # bump when the images change; the default cache directory is named after it
MIN_SIZE = 80  # generate(size=...): below this the shapes and distractors stop fitting their images
_OCCLUDED_REJECT = 0.35  # a placement that leaves an earlier object less visible than this is redrawn
_OCCLUDED_DIFFICULT = 0.6  # objects less visible than this are marked difficult
_LETTERS = "EFGHKMNPRSUWYZ"  # distractor letters: none looks like a class (no O, C, D, Q, X, T, V, A, I, L)


def _unit_outline(name: str) -> list[np.ndarray]:
    """Polygon(s) of a class in a unit box centred on 0; a ring is an outer and an inner (hole) polygon."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1) * 0.5
    if name == "circle":
        return [circle]
    if name == "ring":
        return [circle, circle * 0.55]
    if name == "square":
        return [np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])]
    if name == "triangle":
        a = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return [np.stack([np.cos(a), -np.sin(a)], 1) * 0.58 + [0, 0.12]]
    if name == "star":
        a = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.21)
        return [np.stack([np.cos(a) * r, -np.sin(a) * r], 1)]
    if name == "cross":
        w = 0.17
        arm = np.array([[-w, -0.5], [w, -0.5], [w, -w]])  # one arm's corners; the others are its rotations
        quarter_turn = np.array([[0, -1], [1, 0]])
        return [np.concatenate([arm @ np.linalg.matrix_power(quarter_turn, k).T for k in range(4)])]
    raise ValueError(f"unknown shape class {name!r}")


def _shape_mask(rng, name: str, height: int, width: int, near=None) -> tuple[np.ndarray, tuple]:
    """A randomly sized, stretched, rotated and placed shape (centred close to `near` (x, y) if given):
    a bool mask and the image window (y slice, x slice) it covers."""
    size = np.exp(rng.uniform(np.log(22), np.log(90)))  # the box's longer side then spans ~20 to ~125 px
    aspect = np.exp(rng.uniform(-0.3, 0.3))  # aspect jitter: 0.74 .. 1.35
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    polys = [(p * [size * aspect, size / aspect]) @ rot.T for p in _unit_outline(name)]
    lo, hi = np.min(polys[0], 0), np.max(polys[0], 0)
    # A shape wider or taller than a small image (generate(size=...) well below the default) is shrunk to fit;
    # every shape that fitted before is drawn as before, so the built-in set does not change.
    fit = np.min((np.array([width, height]) - 2.5) / (hi - lo))
    if np.any(hi - lo > [width - 2, height - 2]):
        polys = [p * fit for p in polys]
        size, lo, hi = size * fit, lo * fit, hi * fit
    centre = rng.uniform(-lo + 1, [width - 1, height - 1] - hi)
    if near is not None:
        centre = np.clip(near + rng.normal(0, 0.4 * size, 2), -lo + 1, [width - 1, height - 1] - hi)
    x0, y0 = np.floor(lo + centre).astype(int)
    x1, y1 = np.ceil(hi + centre).astype(int) + 1
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    # 4 fractional bits: sub-pixel vertices keep small shapes faithful.
    for k, p in enumerate(polys):
        pts = np.round((p + centre - [x0, y0]) * 16).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1 if k == 0 else 0, cv2.LINE_8, 4)
    return mask.astype(bool), (slice(y0, y1), slice(x0, x1))


def _natural_images() -> list[np.ndarray]:
    """RGB images that ship with matplotlib (a photo and two elevation maps, colour-mapped); may be empty."""
    folder = os.path.join(matplotlib.get_data_path(), "sample_data")
    out = []
    photo = cv2.imread(os.path.join(folder, "grace_hopper.jpg"))
    if photo is not None:
        out.append(cv2.cvtColor(photo, cv2.COLOR_BGR2RGB))
    for name, key in (("jacksboro_fault_dem.npz", "elevation"), ("topobathy.npz", "topo")):
        try:
            z = np.load(os.path.join(folder, name))[key].astype(np.float32)
        except (OSError, KeyError):
            continue
        # Hill-shaded terrain: natural-looking relief with edges at every scale.
        light = LightSource(azdeg=315, altdeg=45)
        shaded = light.shade(z, cmap=matplotlib.colormaps["gist_earth"], blend_mode="overlay")
        out.append(np.uint8(255 * shaded[..., :3]))
    return out


def _background(rng, height: int, width: int, naturals: list[np.ndarray]) -> np.ndarray:
    """Float32 (H, W, 3) RGB: multi-octave colour noise, waves, or a jittered crop of a natural image."""
    kind = rng.choice(3, p=[0.4, 0.3, 0.3] if naturals else [0.55, 0.45, 0.0])
    if kind == 2:
        src = naturals[rng.integers(len(naturals))]
        s = rng.uniform(0.5, 1.0) * min(src.shape[0], src.shape[1])
        y, x = rng.uniform(0, src.shape[0] - s), rng.uniform(0, src.shape[1] - s)
        crop = src[int(y):int(y + s), int(x):int(x + s)]
        img = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        return img * rng.uniform(0.6, 1.2, 3) + rng.uniform(-30, 30, 3)
    if kind == 0:
        img = np.zeros((height, width, 3), np.float32)
        for cells, amp in ((3, 70), (8, 35), (24, 15)):  # octaves: coarse colour blobs to fine grain
            grid = rng.normal(0, amp, (cells, cells, 3)).astype(np.float32)
            img += cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        return img + rng.uniform(60, 200, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    f, a = rng.uniform(0.03, 0.25), rng.uniform(0, np.pi)
    wave = np.sin(f * (np.cos(a) * xx + np.sin(a) * yy) + 3 * np.sin(0.02 * yy + rng.uniform(0, 6)))
    c0, c1 = rng.uniform(30, 230, 3), rng.uniform(30, 230, 3)
    return (c0 + (c1 - c0) * (0.5 + 0.5 * wave[..., None])).astype(np.float32)


def _distinct_colour(rng, under: np.ndarray) -> np.ndarray:
    """A random colour far enough from the pixels it covers to be visible (class is never told by colour)."""
    mean = under.reshape(-1, 3)[::7].mean(0)  # a subsample is plenty
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - mean) > 90:
            return colour
    return 255 - mean


def _draw_distractor(rng, img: np.ndarray, owner: np.ndarray) -> None:
    """An unlabelled letter or scratch, drawn into img; its pixels are owned by nobody (-2)."""
    height, width = owner.shape
    layer = np.zeros((height, width), np.uint8)
    if rng.random() < 0.5:
        letter = _LETTERS[rng.integers(len(_LETTERS))]
        scale = rng.uniform(0.8, 2.2)
        org = (int(rng.uniform(0, width - 30 * scale)), int(rng.uniform(25 * scale, height)))
        thickness = int(rng.integers(2, 5))
        cv2.putText(layer, letter, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 1, thickness, cv2.LINE_AA)
    else:  # a random walk of 3-6 points
        steps = rng.normal(0, 25, (int(rng.integers(3, 7)), 2))
        points = np.cumsum(steps, 0) + rng.uniform(0, [width, height])
        cv2.polylines(layer, [points.astype(np.int32)], False, 1, int(rng.integers(1, 4)), cv2.LINE_AA)
    on = layer > 0
    img[on] = _distinct_colour(rng, img[on]) if on.any() else img[on]
    owner[on] = -2


def _render(rng, height: int, width: int, naturals: list[np.ndarray]):
    """One image: float RGB, and the annotation list [(class, x1, y1, x2, y2 (0-based), difficult)]."""
    img = _background(rng, height, width, naturals)
    owner = np.full((height, width), -1, np.int32)  # which object each pixel shows (-1 background)
    for _ in range(rng.integers(1, 4)):
        _draw_distractor(rng, img, owner)
    names, areas, visible, windows = [], [], [], []  # visible: pixels each object still shows
    for _ in range(rng.integers(1, 6)):
        name = SHAPE_CLASSES[rng.integers(len(SHAPE_CLASSES))]
        # A quarter of the objects go next to an earlier one, so that occlusion is common enough to learn.
        near = None
        if windows and rng.random() < 0.25:
            wy, wx = windows[rng.integers(len(windows))]
            near = np.array([(wx.start + wx.stop) / 2, (wy.start + wy.stop) / 2])
        for _attempt in range(20):
            mask, win = _shape_mask(rng, name, height, width, near)
            covered = owner[win][mask]
            lost = np.bincount(covered[covered >= 0], minlength=len(names))
            # Moderate occlusion only: reject a placement that hides most of an earlier object.
            if all(v - k >= _OCCLUDED_REJECT * a for v, k, a in zip(visible, lost, areas)):
                break
        else:
            continue
        visible = [v - k for v, k in zip(visible, lost)] + [int(covered.size)]
        patch = img[win]
        colour = _distinct_colour(rng, patch[mask])
        # Shading: a linear ramp across the object, so fills are not flat.
        yy, xx = np.nonzero(mask)
        ramp = rng.normal(0, 0.4, 2) @ np.stack([xx - xx.mean(), yy - yy.mean()])
        patch[yy, xx] = colour + np.clip(ramp, -40, 40)[:, None]
        owner[win][mask] = len(names)
        names.append(name)
        areas.append(int(covered.size))
        windows.append(win)
    if rng.random() < 0.5:  # a scratch across everything, objects included
        _draw_distractor(rng, img, owner)
    objects = []
    for i, (name, (wy, wx)) in enumerate(zip(names, windows)):
        yy, xx = np.nonzero(owner[wy, wx] == i)
        if len(xx) == 0:
            continue
        difficult = len(xx) / areas[i] < _OCCLUDED_DIFFICULT
        x1, y1, x2, y2 = xx.min() + wx.start, yy.min() + wy.start, xx.max() + wx.start, yy.max() + wy.start
        objects.append((name, int(x1), int(y1), int(x2), int(y2), bool(difficult)))
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.2))
    img += rng.uniform(2, 8) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _annotation_xml(image_id: str, width: int, height: int, objects) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "shapes"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    for name, x1, y1, x2, y2, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(difficult))
        box = ET.SubElement(obj, "bndbox")
        # VOC XML is 1-based inclusive.
        for tag, v in (("xmin", x1), ("ymin", y1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = str(v + 1)
    ET.indent(root)
    return ET.tostring(root)


def generate(out_dir: str, seed: int = 0, n_train: int = 400, n_test: int = 100, size: int = 256) -> str:
    """Write the data set (JPEGImages/, Annotations/, ImageSets/Main/{trainval,test}.txt) into out_dir.

    Args:
        out_dir: the VOC root to create; must not exist or be empty.
        seed: image i is drawn from the generator seeded with (seed, i).
        n_train, n_test: images in trainval and test (ids 000001.. in that order).
        size: nominal image side; each image's width and height are drawn from [0.85 size, 1.25 size].
    Returns the absolute root.
    """
    if size < MIN_SIZE:  # shapes, letters and scratches are drawn at fixed pixel sizes
        raise ValueError(f"size {size}: the generated images need a nominal side of at least {MIN_SIZE} px")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} is not empty; the data set is written into a new directory")
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    naturals = _natural_images()
    ids = [f"{i + 1:06d}" for i in range(n_train + n_test)]
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, i])
        height, width = (int(v) for v in rng.integers(int(0.85 * size), int(1.25 * size) + 1, 2))
        img, objects = _render(rng, height, width, naturals)
        quality = int(rng.integers(80, 96))
        path = os.path.join(out_dir, "JPEGImages", f"{image_id}.jpg")
        cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        with open(os.path.join(out_dir, "Annotations", f"{image_id}.xml"), "wb") as f:
            f.write(_annotation_xml(image_id, width, height, objects))
    for split, part in (("trainval", ids[:n_train]), ("test", ids[n_train:])):
        with open(os.path.join(out_dir, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in part))
    params = dict(version=VERSION, seed=seed, n_train=n_train, n_test=n_test, size=size)
    with open(os.path.join(out_dir, "shapes.json"), "w") as f:  # written last: marks a complete data set
        json.dump(params, f)
    return os.path.abspath(out_dir)


# --- large images with many small objects (aerial-like): the case tiling is for (tests, bench/large_images.py) ---


def _small_shape(rng, name: str, side: float) -> np.ndarray:
    """A filled shape whose longer box side is about `side` px: a bool mask, cropped to its pixels."""
    aspect = np.exp(rng.uniform(-0.3, 0.3))
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    polys = [(p * [aspect, 1 / aspect]) @ rot.T for p in _unit_outline(name)]
    polys = [p * (side / np.ptp(polys[0], 0).max()) for p in polys]  # the longer box side becomes `side`
    lo = np.min(polys[0], 0)
    extent = np.ceil(np.max(polys[0], 0) - lo).astype(int) + 2
    mask = np.zeros((extent[1], extent[0]), np.uint8)
    for k, p in enumerate(polys):  # 4 fractional bits, as shapes.py: small shapes stay faithful
        cv2.fillPoly(mask, [np.round((p - lo + 1) * 16).astype(np.int32)], 1 if k == 0 else 0, cv2.LINE_8, 4)
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(bool)


def render_large(rng, height: int, width: int, naturals, pixels_per_object: int = 8000,
                 sizes=(15, 60)) -> tuple[np.ndarray, list]:
    """One image: uint8 RGB and [(class, x1, y1, x2, y2, difficult)] with 0-based boxes, objects not
    touching."""
    img = _background(rng, height, width, naturals)
    taken = np.zeros((height, width), bool)  # object boxes plus a 2-px margin: objects never overlap
    objects = []
    for _ in range(height * width // pixels_per_object):
        name = SHAPE_CLASSES[rng.integers(len(SHAPE_CLASSES))]
        mask = _small_shape(rng, name, np.exp(rng.uniform(np.log(sizes[0]), np.log(sizes[1]))))
        h, w = mask.shape
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        if taken[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2].any():
            continue  # a crowded spot: skip rather than redraw, the count is only a target
        taken[y:y + h, x:x + w] = True
        patch = img[y:y + h, x:x + w]
        patch[mask] = _distinct_colour(rng, patch[mask])
        objects.append((name, x, y, x + w - 1, y + h - 1, False))
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.8))
    img += rng.uniform(2, 6) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), objects


def generate_large(out_dir: str, n_images: int = 3, seed: int = 0, sizes=(1500, 2500),
                   pixels_per_object: int = 8000) -> str:
    """Write a VOC root of n_images large images (sides drawn from `sizes`), all listed in trainval and
    test."""
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    naturals = _natural_images()
    ids = [f"{i + 1:06d}" for i in range(n_images)]
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, 15, i])
        height, width = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
        img, objects = render_large(rng, height, width, naturals, pixels_per_object)
        path = os.path.join(out_dir, "JPEGImages", f"{image_id}.jpg")
        cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        with open(os.path.join(out_dir, "Annotations", f"{image_id}.xml"), "wb") as f:
            f.write(_annotation_xml(image_id, width, height, objects))
    for split in ("trainval", "test"):
        with open(os.path.join(out_dir, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return os.path.abspath(out_dir)


def default_root() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo, "data", f"shapes-v{VERSION}")


def ensure_dataset(root: str | None = None, n_train: int = 400, n_test: int = 100, log=print) -> str:
    """The built-in data set at root (default <repo>/data/shapes-v1), generated on first use and reused after.

    Generation writes to a temporary directory and renames it into place, so an interrupted run leaves nothing
    that a later run could mistake for a complete data set.
    """
    root = os.path.abspath(root or default_root())
    marker = os.path.join(root, "shapes.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            made = json.load(f)
        if (made.get("version"), made.get("n_train"), made.get("n_test")) != (VERSION, n_train, n_test):
            raise DatasetError(f"{root} holds a built-in data set made with {made}, not version {VERSION} "
                               f"with {n_train}/{n_test} images; remove it to regenerate")
        return root
    if os.path.exists(root):
        raise DatasetError(f"{root} exists but is not a complete built-in data set (no shapes.json); "
                           "remove it or pass another directory")
    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    generate(tmp, n_train=n_train, n_test=n_test)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built-in data set: {n_train + n_test} images generated in {time.time() - t0:.1f}s -> {root}")
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the built-in shapes detection data set in VOC layout.")
    p.add_argument("--out", required=True, help="directory to create (the VOC root)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args(argv)
    t0 = time.time()
    root = generate(args.out, args.seed, args.n_train, args.n_test, args.size)
    n = args.n_train + args.n_test
    seconds = time.time() - t0
    print(f"{n} images in {seconds:.1f}s ({seconds / max(n, 1) * 1000:.1f} ms/image) -> {root}")
    from detector.plots import draw_boxes_sheet  # matplotlib's pyplot: only the command line needs it

    records, classes = load_voc(root, "trainval", list(SHAPE_CLASSES), log=lambda *_: None)
    shown = records[:12]
    labels = [[classes[c - 1] + (" (difficult)" if d else "") for c, d in zip(r.labels, r.difficult)]
              for r in shown]
    sheet = os.path.join(root, "examples.png")
    draw_boxes_sheet([read_image(r.path) for r in shown], [r.boxes for r in shown], labels, sheet)
    print(f"example sheet: {sheet}")


if __name__ == "__main__":
    main()
