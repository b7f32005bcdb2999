"""Box math: IoU, regression deltas (encode/decode), clipping and greedy NMS.

Conventions, stated once for the whole project:
- A box is (x1, y1, x2, y2) float pixels, 0-based, with x2/y2 INCLUSIVE (the last pixel inside the box).
- Areas and IoU use the inclusive-pixel "+1" convention of the original code and of the VOC devkit:
  area = (x2 - x1 + 1) * (y2 - y1 + 1) (FR utils/bbox.pyx, utils/nms.pyx, PF voc_eval.py).
- Regression deltas use FR's width = x2 - x1 + EPS instead (reference §5); see encode_boxes.
- Class-specific deltas/boxes are [N, 4k]: class j lives in columns 4j:4j+4 (FR test.py::_bbox_pred).
"""

import math

import numpy as np
import torch
from torch import Tensor

# FR config.py: __C.EPS = 1e-14, added to widths/heights in _compute_targets and _bbox_pred.
EPS = 1e-14
# exp(dw) overflows for an untrained or diverging head; later implementations (Detectron's
# BBOX_XFORM_CLIP, torchvision's box coder) clamp dw/dh at log(1000/16). FR itself has no clamp.
DELTA_CLIP = math.log(1000.0 / 16)
# Boxes per NMS block (see nms); 128 was fastest for 300-5000 boxes on a 2-core CPU.
_NMS_BLOCK = 128


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Mirror (N, 4) boxes in an image `width` pixels wide: x1' = W - x2 - 1, x2' = W - x1 - 1 (FR imdb
    append_flipped_images). Float64: FR's uint16 boxes underflowed here for boxes past the border (FR#45)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2] - 1, width - boxes[:, 0] - 1
    return flipped


def _check_boxes(name: str, boxes: Tensor, cols: int = 4) -> None:
    if boxes.dim() != 2 or boxes.shape[1] % cols != 0 or boxes.shape[1] == 0:
        raise ValueError(f"{name} must be [N, {cols}k] boxes, got shape {tuple(boxes.shape)}")


def box_iou(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Pairwise IoU with inclusive-pixel (+1) areas, as FR utils/bbox.pyx; torch in torch out, numpy likewise.

    NMS and VOC evaluation call it on many small numpy matrices, where numpy's per-op cost is far below
    torch's.

    Args:
        a: [N, 4] boxes.
        b: [M, 4] boxes.
    Returns:
        [N, M] IoU.
    """
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"box_iou: a must be [N, 4], got {tuple(a.shape)}")
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"box_iou: b must be [M, 4], got {tuple(b.shape)}")
    xp = np if isinstance(a, np.ndarray) else torch  # both spell maximum/minimum the same way
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)  # (N,)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)  # (M,)
    iw = xp.minimum(a[:, None, 2], b[None, :, 2]) - xp.maximum(a[:, None, 0], b[None, :, 0]) + 1  # (N, M)
    ih = xp.minimum(a[:, None, 3], b[None, :, 3]) - xp.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = iw.clip(min=0) * ih.clip(min=0)  # disjoint boxes -> 0 intersection
    # Same operation order as bbox.pyx: (area_a + area_b) - inter.
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _centres(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # FR roidb.py::_compute_targets / test.py::_bbox_pred: width WITHOUT +1, plus EPS.
    # PF's bbox_transform.py uses +1.0 instead. Both are self-consistent as long as encode and decode agree;
    # we keep FR's because the paper's models (and their normalisation stats) were trained with it.
    # EPS does not save degenerate x1 == x2 boxes (1e-14 is lost in float32 and gives huge deltas):
    # the data layer must drop zero-width proposals (the NaN-loss reports, PF#266).
    widths = boxes[:, 2] - boxes[:, 0] + EPS
    heights = boxes[:, 3] - boxes[:, 1] + EPS
    return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights


def encode_boxes(rois: Tensor, gt: Tensor) -> Tensor:
    """Regression targets (dx, dy, dw, dh) that move each RoI onto its ground truth (FR convention).

    Args:
        rois: [N, 4] source boxes.
        gt: [N, 4] target boxes, row-aligned with rois.
    Returns:
        [N, 4] deltas: dx = (gcx - cx) / w, dy = (gcy - cy) / h, dw = log(gw / w), dh = log(gh / h).
    """
    if rois.dim() != 2 or rois.shape[1] != 4 or gt.shape != rois.shape:
        raise ValueError(
            f"encode_boxes: rois and gt must both be [N, 4], got {tuple(rois.shape)}, {tuple(gt.shape)}"
        )
    cx, cy, w, h = _centres(rois)
    gcx, gcy, gw, gh = _centres(gt)
    return torch.stack([(gcx - cx) / w, (gcy - cy) / h, torch.log(gw / w), torch.log(gh / h)], dim=1)


def decode_boxes(rois: Tensor, deltas: Tensor) -> Tensor:
    """Apply class-specific deltas to RoIs (FR test.py::_bbox_pred), dw/dh clamped at log(1000/16).

    Args:
        rois: [N, 4] boxes the deltas are relative to.
        deltas: [N, 4k] deltas; class j in columns 4j:4j+4.
    Returns:
        [N, 4k] boxes (x1, y1, x2, y2) per class, not clipped.
    """
    _check_boxes("decode_boxes: deltas", deltas)
    if rois.dim() != 2 or rois.shape[1] != 4 or rois.shape[0] != deltas.shape[0]:
        raise ValueError(
            f"decode_boxes: rois must be [N, 4] with N = {deltas.shape[0]}, got {tuple(rois.shape)}"
        )
    cx, cy, w, h = (t[:, None] for t in _centres(rois))  # (N, 1) each, broadcast over k classes
    dx, dy = deltas[:, 0::4], deltas[:, 1::4]  # (N, k)
    dw, dh = deltas[:, 2::4].clamp(max=DELTA_CLIP), deltas[:, 3::4].clamp(max=DELTA_CLIP)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = torch.exp(dw) * w, torch.exp(dh) * h
    boxes = torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=2)  # (N, k, 4)
    return boxes.reshape(deltas.shape)


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Clip every coordinate into the image: x to [0, width-1], y to [0, height-1].

    FR's _clip_boxes only clips x1, y1 >= 0 and x2 <= W-1, y2 <= H-1; clipping all four coordinates (PF
    bbox_transform.py::clip_boxes) is a superset that also fixes boxes regressed entirely off the image.

    Args:
        boxes: [N, 4k] boxes.
        height: image height in pixels.
        width: image width in pixels.
    Returns:
        [N, 4k] clipped copy.
    """
    _check_boxes("clip_boxes: boxes", boxes)
    out = boxes.clone()
    out[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)  # x1, x2 of every class
    out[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)  # y1, y2 of every class
    return out


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, as FR utils/nms.pyx: drop a box if IoU >= threshold with a kept one.

    Ties in score keep the lower index first (stable sort; nms.pyx's argsort()[::-1] leaves ties unspecified).
    Runs on the CPU in numpy whatever the device of the inputs.

    Args:
        boxes: [N, 4] boxes.
        scores: [N] scores.
        iou_threshold: suppression threshold (paper test: 0.3).
    Returns:
        LongTensor of kept indices into boxes, by descending score.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
        raise ValueError(
            f"nms: boxes must be [N, 4] and scores [N]; got {tuple(boxes.shape)}, {tuple(scores.shape)}"
        )
    order = np.argsort(-scores.detach().cpu().numpy(), kind="stable")
    ranked = boxes.detach().cpu().numpy()[order]
    # Overlaps are computed in the boxes' dtype (float32 in nms.pyx) but compared in float64, as the C code
    # compares a float32 overlap with a double threshold (np.float64 keeps numpy from rounding it to float32).
    threshold = np.float64(iou_threshold)
    keep: list[int] = []  # ranks of the kept boxes
    # Walk the ranked boxes in blocks: a block's candidates are first tested against every box kept so far
    # (those decisions are final), then the survivors run the greedy pass among themselves. This computes
    # only (kept x block) + (block x block) overlaps: a few times less than the N x N matrix for N ~ 2000.
    for start in range(0, len(order), _NMS_BLOCK):
        cand = np.arange(start, min(start + _NMS_BLOCK, len(order)))
        if keep:
            cand = cand[(box_iou(ranked[cand], ranked[keep]) < threshold).all(axis=1)]
        over = box_iou(ranked[cand], ranked[cand]) >= threshold  # over[i, j]: i suppresses j
        removed = np.zeros(len(cand), dtype=bool)
        for i in range(len(cand)):  # O(block) Python steps, O(block) numpy work per kept box
            if not removed[i]:
                keep.append(int(cand[i]))
                removed |= over[i]  # also marks i and earlier candidates, which are already decided
    return torch.as_tensor(order[keep], dtype=torch.long, device=boxes.device)
