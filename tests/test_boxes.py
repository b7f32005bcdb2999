import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from detector.boxes import DELTA_CLIP, EPS, box_iou, clip_boxes, decode_boxes, encode_boxes, nms
from oracles import iou_loop  # tests/oracles.py


def random_boxes(rng: np.random.Generator, n: int, size: int = 100, max_side: int = 40) -> torch.Tensor:
    """Integer-pixel boxes, as proposals and VOC annotations are."""
    x1 = rng.integers(0, size, n)
    y1 = rng.integers(0, size, n)
    w = rng.integers(0, max_side, n)  # 0: a one-pixel-wide box, x1 == x2
    h = rng.integers(0, max_side, n)
    return torch.from_numpy(np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float64))


def nms_loop(boxes, scores, thresh) -> list[int]:
    """Greedy NMS as utils/nms.pyx, ties in score broken by the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    suppressed, keep = set(), []
    for pos, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[pos + 1 :]:
            if iou_loop(boxes[i], boxes[j]) >= thresh:
                suppressed.add(j)
    return keep


@pytest.mark.parametrize("seed", range(3))
def test_box_iou_matches_loop(seed):
    rng = np.random.default_rng(seed)
    a, b = random_boxes(rng, 13), random_boxes(rng, 7)
    expected = torch.tensor([[iou_loop(x.tolist(), y.tolist()) for y in b] for x in a], dtype=torch.float64)
    assert_close(box_iou(a, b), expected)
    assert_close(box_iou(a.float(), b.float()), expected.float())  # float32 callers (detect.py)
    np.testing.assert_allclose(box_iou(a.numpy(), b.numpy()), expected.numpy(), rtol=1e-12)  # numpy path


def test_box_iou_hand_values():
    # 10x10 box vs its left half (5x10 pixels): 50 / 100. Disjoint boxes touching at no pixel: 0.
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    b = torch.tensor([[0.0, 0.0, 4.0, 9.0], [10.0, 0.0, 19.0, 9.0], [0.0, 0.0, 9.0, 9.0]])
    assert box_iou(a, b).tolist() == [[0.5, 0.0, 1.0]]
    assert box_iou(a, torch.zeros(0, 4)).shape == (1, 0)
    with pytest.raises(ValueError, match="box_iou"):
        box_iou(torch.zeros(3, 5), a)


def test_encode_hand_values():
    # FR widths have no +1: roi width 10 (+EPS), centre (5, 5); gt width 20, height 10, centre (15, 10).
    rois = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    gt = torch.tensor([[5.0, 5.0, 25.0, 15.0]], dtype=torch.float64)
    dx, dy, dw, dh = encode_boxes(rois, gt)[0].tolist()
    assert dx == pytest.approx(10 / 10) and dy == pytest.approx(5 / 10)
    assert dw == pytest.approx(math.log(2)) and dh == pytest.approx(0.0, abs=1e-12)
    assert EPS == 1e-14


@pytest.mark.parametrize("seed", range(3))
def test_encode_decode_round_trip(seed):
    rng = np.random.default_rng(seed)
    rois, gt = random_boxes(rng, 50) + 0.25, random_boxes(rng, 50)  # +0.25: not only integers
    rois[:, 2:] += 1  # non-degenerate (width >= 1) so the deltas stay finite
    deltas = encode_boxes(rois, gt)
    assert_close(decode_boxes(rois, deltas), gt, atol=1e-9, rtol=0)
    # Class-specific layout: class j reads columns 4j:4j+4 of a [N, 4k] delta matrix.
    k3 = torch.cat([torch.zeros_like(deltas), deltas, 0.5 * deltas], dim=1)
    decoded = decode_boxes(rois, k3)
    assert decoded.shape == (50, 12)
    assert_close(decoded[:, 0:4], rois, atol=1e-9, rtol=0)  # zero deltas give the RoI back
    assert_close(decoded[:, 4:8], gt, atol=1e-9, rtol=0)
    assert_close(decoded[:, 8:12], decode_boxes(rois, 0.5 * deltas))


def test_decode_clamps_exp():
    # dw = 50 would make exp overflow float32; it is clamped at log(1000/16), i.e. at most 62.5x the width.
    rois = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    box = decode_boxes(rois, torch.tensor([[0.0, 0.0, 50.0, 50.0]]))[0]
    assert torch.isfinite(box).all()
    assert (box[2] - box[0]).item() == pytest.approx(16 * math.exp(DELTA_CLIP), rel=1e-5)
    assert DELTA_CLIP == pytest.approx(math.log(62.5))
    with pytest.raises(ValueError, match="deltas"):
        decode_boxes(rois, torch.zeros(1, 6))


def test_clip_boxes_all_coordinates():
    # Image 20 high, 30 wide: x into [0, 29], y into [0, 19], for every class column.
    boxes = torch.tensor([
        [-5.0, -3.0, 40.0, 25.0, 35.0, 22.0, 50.0, 30.0],  # both classes spill over every border
        [1.0, 2.0, 3.0, 4.0, -9.0, -9.0, -1.0, -2.0],  # inside; class 1 entirely above-left of the image
    ])
    expected = torch.tensor([
        [0.0, 0.0, 29.0, 19.0, 29.0, 19.0, 29.0, 19.0],
        [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0],
    ])
    assert_close(clip_boxes(boxes, height=20, width=30), expected)
    assert boxes[0, 0] == -5.0  # input untouched


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_loop(seed, thresh):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 300, size=100, max_side=30)  # crowded, and 3 blocks of nms's 128
    scores = torch.from_numpy(np.round(rng.random(300), 1))  # one decimal: plenty of exact ties
    keep = nms(boxes, scores, thresh)
    assert keep.dtype == torch.long
    assert keep.tolist() == nms_loop(boxes.tolist(), scores.tolist(), thresh)
    assert (scores[keep][1:] <= scores[keep][:-1]).all()


def test_nms_threshold_edge_and_ties():
    # IoU exactly 0.5 (a 10x10 box and its 5x10 half) suppresses at threshold 0.5 (nms.pyx: ovr >= thresh)
    # and not at 0.51. Equal scores: the lower index is kept.
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 4.0, 9.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.9, 0.1])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.51).tolist() == [0, 1, 2]
    assert nms(boxes[[1, 0, 2]], scores, 0.5).tolist() == [0, 2]  # now the half box comes first and wins
    assert nms(boxes.float(), scores.float(), 0.5).tolist() == [0, 2]


def test_nms_float32_overlap_vs_double_threshold():
    # nms.pyx computes the overlap in float32 and compares it with a double threshold. A 10x10 box and its
    # 10x7 part overlap 70/100: float32(0.7) = 0.69999999 < 0.7, so float32 boxes survive at 0.7, float64 not.
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 6.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.7).tolist() == [0]
    assert nms(boxes.float(), scores, 0.7).tolist() == [0, 1]


def test_nms_empty_and_errors():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.3).tolist() == []
    with pytest.raises(ValueError, match="nms"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.3)


def test_nms_2000_boxes():
    # The paper's scale: ~2000 proposals per class per image (float32 as in detect.py); 16 nms blocks.
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 2000, size=500, max_side=200).float()
    scores = torch.from_numpy(rng.random(2000)).float()
    keep = nms(boxes, scores, 0.3)
    sub = nms(boxes[:400], scores[:400], 0.3)
    assert sub.tolist() == nms_loop(boxes[:400].tolist(), scores[:400].tolist(), 0.3)
    # Every pair of kept boxes overlaps below the threshold; every dropped box hits a kept one.
    kept_iou = box_iou(boxes[keep], boxes[keep]).fill_diagonal_(0)
    assert (kept_iou < 0.3).all()
    dropped = torch.ones(2000, dtype=torch.bool)
    dropped[keep] = False
    assert (box_iou(boxes[dropped], boxes[keep]) >= 0.3).any(dim=1).all()
