"""Large images with many small objects (the aerial-imagery case of issue 15): a generator in VOC layout, and
proposal recall with and without tiling.

The generator reuses the built-in data set's shapes, backgrounds and XML writer (detector/shapes.py) but draws
1500-2500 px images holding hundreds of 15-60 px objects. Run as a script to measure recall@0.5 and the time
per image for selective search and dense proposals, whole images vs tiles:

    .venv/bin/python tests/test_large_images.py --out /tmp/large --images 3
"""

import argparse
import os
import sys
import time

import cv2
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script, too

from detector import proposals, tiling  # noqa: E402
from detector.data import load_voc  # noqa: E402
from detector.shapes import (  # noqa: E402
    SHAPE_CLASSES, _annotation_xml, _background, _distinct_colour, _natural_images, _unit_outline)


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


def tiled_recall(records, source: str, max_boxes: int, tile: int, scale: int, max_size: int, **kw) -> tuple:
    """Proposals per tile, mapped back to their images and pooled: (recall dict over the whole images,
    seconds)."""
    tiles = tiling.tile_records(records, tile)
    t0 = time.time()
    boxes = proposals.proposals_for_split(tiles, source, max_boxes, scale=scale, max_size=max_size,
                                          log=lambda *_: None, **kw)
    seconds = time.time() - t0
    return proposals.proposal_recall(tiling.pool_boxes(boxes, tiles, len(records)), records), seconds


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """One 1500-1700 px image with ~300 objects of 15-60 px."""
    root = generate_large(str(tmp_path_factory.mktemp("large")), n_images=1, sizes=(1500, 1700))
    records, _ = load_voc(root, "trainval", list(SHAPE_CLASSES), log=lambda *_: None)
    return records


def test_generated_set_is_large_with_small_objects(large):
    rec = large[0]
    assert 1500 <= min(rec.height, rec.width) and max(rec.height, rec.width) <= 1700
    sides = np.maximum(rec.boxes[:, 2] - rec.boxes[:, 0], rec.boxes[:, 3] - rec.boxes[:, 1]) + 1
    assert len(rec.boxes) > 200
    assert 14 <= sides.min() and sides.max() <= 62 and 25 < np.median(sides) < 40


def test_the_warning_fires_on_it_and_tiling_at_native_scale_silences_it(large):
    assert "--tile" in tiling.small_object_warning(large, (320,), 533)
    assert tiling.small_object_warning(large, (512,), 512, tile=512) is None


def test_tiling_raises_dense_proposal_recall(large):
    # The demo's scale shrinks the image ~5x: whole-image dense boxes are then too coarse for 15-60 px
    # objects.
    whole = proposals.proposals_for_split(large, "dense", 2000, scale=320, max_size=533, log=lambda *_: None)
    whole_recall = proposals.proposal_recall(whole, large)["recall@0.5"]
    tiled, _ = tiled_recall(large, "dense", 2000, tile=512, scale=512, max_size=512)
    assert tiled["recall@0.5"] > whole_recall + 0.3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Proposal recall on generated large images, whole vs tiled.")
    p.add_argument("--out", required=True, help="VOC root to create (reused if it exists)")
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--max-proposals", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.out, "JPEGImages")):
        t0 = time.time()
        generate_large(args.out, args.images)
        print(f"generated {args.images} images in {time.time() - t0:.1f}s -> {args.out}")
    records, _ = load_voc(args.out, "trainval", list(SHAPE_CLASSES), log=lambda *_: None)
    print(f"{len(records)} images ({', '.join(f'{r.width}x{r.height}' for r in records)}), "
          f"{sum(len(r.boxes) for r in records)} objects")
    print(f"warning at the demo scale: {tiling.small_object_warning(records, (320,), 533)}")
    n = len(records)
    print(f"{'proposals':<12}{'input':<34}{'recall@0.5':>11}{'recall@0.7':>11}{'boxes/img':>10}{'s/img':>8}")
    t = args.tile
    for source in ("dense", "fast"):
        kw = dict(workers=args.workers, cache_dir=os.path.join(args.out, "cache")) if source == "fast" else {}
        for label, scale, max_size in (("whole image, scale 320/533", 320, 533),
                                       ("whole image, scale 600/1000", 600, 1000)):
            t0 = time.time()
            boxes = proposals.proposals_for_split(records, source, args.max_proposals, scale=scale,
                                                  max_size=max_size, log=lambda *_: None, **kw)
            r = proposals.proposal_recall(boxes, records)
            print(f"{source:<12}{label:<34}{r['recall@0.5']:>11.3f}{r['recall@0.7']:>11.3f}"
                  f"{r['boxes_per_image']:>10.0f}{(time.time() - t0) / n:>8.2f}")
        r, seconds = tiled_recall(records, source, args.max_proposals, t, t, t, **kw)
        label = f"{t}-px tiles, native scale"
        print(f"{source:<12}{label:<34}{r['recall@0.5']:>11.3f}{r['recall@0.7']:>11.3f}"
              f"{r['boxes_per_image']:>10.0f}{seconds / n:>8.2f}")


if __name__ == "__main__":
    main()
