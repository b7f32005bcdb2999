"""Large images with many small objects (the aerial-imagery case of issue 15; shapes.generate_large): proposal
recall with and without tiling. Run as a script to measure recall@0.5 and the time per image for selective
search and dense proposals, whole images vs tiles:

    .venv/bin/python tests/test_large_images.py --out /tmp/large --images 3
"""

import argparse
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script, too

from detector import proposals, tiling  # noqa: E402
from detector.data import load_voc  # noqa: E402
from detector.shapes import SHAPE_CLASSES, generate_large  # noqa: E402


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
