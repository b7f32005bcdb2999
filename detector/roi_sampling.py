"""Hierarchical minibatch sampling (paper §2.3) and box regression targets (FR roidb.py, minibatch.py).

Everything here works per image on numpy boxes in ORIGINAL image coordinates (before the 600/1000 rescale);
the data layer scales the sampled RoIs. Randomness comes only from the numpy Generator the caller passes in,
so a checkpoint can save and restore it. Box conventions: see detector/boxes.py.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from detector.boxes import EPS, box_iou, encode_boxes, flip_boxes


@dataclass
class Sample:
    """The RoIs sampled from one image.

    Args:
        rois: [R, 4] float boxes in image coordinates before scaling; foreground rows first.
        labels: [R] long class per RoI, 0 = background.
        targets: [R, 4] raw (un-normalised) deltas to the assigned ground truth; zero rows for background.
    """

    rois: Tensor
    labels: Tensor
    targets: Tensor


def _check_image(gt_boxes: np.ndarray, gt_labels: np.ndarray, proposals: np.ndarray, where: str) -> None:
    gt_boxes, gt_labels, proposals = np.asarray(gt_boxes), np.asarray(gt_labels), np.asarray(proposals)
    if gt_boxes.ndim != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"{where}: gt_boxes must be [G, 4], got {gt_boxes.shape}")
    if gt_labels.shape != (gt_boxes.shape[0],):
        raise ValueError(f"{where}: gt_labels must be [G] = [{gt_boxes.shape[0]}], got {gt_labels.shape}")
    if gt_labels.size and gt_labels.min() < 1:
        raise ValueError(f"{where}: gt_labels must be >= 1 (0 is background), got min {gt_labels.min()}")
    if proposals.ndim != 2 or proposals.shape[1] != 4:
        raise ValueError(f"{where}: proposals must be [P, 4], got {proposals.shape}")


def _match(gt_boxes: np.ndarray, proposals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates = gt boxes FIRST, then proposals (FR merge_roidbs); best IoU and the gt it comes from."""
    boxes = np.concatenate([gt_boxes, proposals]).astype(np.float64)  # float64 like FR's cython_bbox
    if len(gt_boxes) == 0:
        return boxes, np.zeros(len(boxes)), np.zeros(len(boxes), dtype=np.int64)
    iou = box_iou(boxes, boxes[: len(gt_boxes)])  # (G + P, G); gt rows score exactly 1 with themselves
    # FR labels a RoI by the class of its best overlap and regresses it to the argmax gt box
    # (_compute_targets); both pick the same gt except on exact ties between classes.
    return boxes, iou.max(axis=1), iou.argmax(axis=1)


def _deltas(boxes: np.ndarray, gt_boxes: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    gt = np.asarray(gt_boxes, dtype=np.float64)[assignment]
    return encode_boxes(torch.from_numpy(boxes), torch.from_numpy(gt)).numpy()


def sample_rois(
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    proposals: np.ndarray,
    rng: np.random.Generator,
    rois_per_image: int = 64,
    fg_fraction: float = 0.25,
    fg_thresh: float = 0.5,
    bg_thresh_hi: float = 0.5,
    bg_thresh_lo: float = 0.1,
) -> Sample:
    """Sample up to rois_per_image RoIs, at most fg_fraction foreground (FR minibatch.py::_sample_rois).

    Args:
        gt_boxes: [G, 4] ground-truth boxes (G may be 0).
        gt_labels: [G] classes in 1..K.
        proposals: [P, 4] proposal boxes (P may be 0).
        rng: numpy Generator, the only source of randomness.
        rois_per_image: R (FR: BATCH_SIZE 128 / IMS_PER_BATCH 2 = 64).
        fg_fraction: foreground share (FR config.py FG_FRACTION = 0.25, paper §2.3).
        fg_thresh: foreground if IoU >= this (FG_THRESH = 0.5).
        bg_thresh_hi: background if IoU < this ... (BG_THRESH_HI = 0.5)
        bg_thresh_lo: ... and IoU >= this (BG_THRESH_LO = 0.1, hard-example heuristic of §2.3).
    Returns:
        Sample with R <= rois_per_image rows: the foreground first, then the background.
    """
    _check_image(gt_boxes, gt_labels, proposals, "sample_rois")
    gt_labels = np.asarray(gt_labels, dtype=np.int64)
    boxes, max_overlaps, assignment = _match(np.asarray(gt_boxes), np.asarray(proposals))

    # round(0.25 * 64) = 16 foreground RoIs per image; np.round like FR.
    fg_per_image = int(np.round(fg_fraction * rois_per_image))
    fg_inds = np.flatnonzero(max_overlaps >= fg_thresh)  # includes the gt boxes themselves (overlap 1)
    num_fg = min(fg_per_image, fg_inds.size)
    fg_inds = rng.choice(fg_inds, size=num_fg, replace=False) if num_fg else fg_inds[:0]

    if len(gt_boxes) == 0:
        # Not in FR (every VOC image has objects): with nothing to overlap, every proposal is a background
        # candidate, so images without objects still teach the classifier what background looks like.
        bg_inds = np.arange(len(boxes))
    else:
        bg_inds = np.flatnonzero((max_overlaps < bg_thresh_hi) & (max_overlaps >= bg_thresh_lo))
    # The rest of the batch is background; no fallback below bg_thresh_lo and no padding (FR), so R may be
    # smaller than rois_per_image.
    num_bg = min(rois_per_image - num_fg, bg_inds.size)
    bg_inds = rng.choice(bg_inds, size=num_bg, replace=False) if num_bg else bg_inds[:0]

    keep = np.concatenate([fg_inds, bg_inds]).astype(np.int64)
    labels = np.zeros(keep.size, dtype=np.int64)
    targets = np.zeros((keep.size, 4))
    if num_fg:
        labels[:num_fg] = gt_labels[assignment[fg_inds]]
        targets[:num_fg] = _deltas(boxes[fg_inds], gt_boxes, assignment[fg_inds])
    return Sample(
        rois=torch.from_numpy(boxes[keep]).float(),
        labels=torch.from_numpy(labels),
        targets=torch.from_numpy(targets).float(),
    )


def regression_stats(
    gt_boxes_list: list,
    gt_labels_list: list,
    proposals_list: list,
    num_classes: int,
    bbox_thresh: float = 0.5,
    include_flipped: bool = True,
    widths: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean and std of the regression targets over a training set (FR add_bbox_regression_targets).

    Statistics run over every candidate (gt boxes first, then proposals) whose best IoU is >= bbox_thresh,
    gt boxes and horizontally flipped copies included, with FR's count that starts at EPS.
    FR leaves background (and any class without examples) at mean 0, std 0; we return std 1 there, and also
    where a class's targets are constant (std < 1e-6, e.g. only gt boxes), which FR would divide by 0.
    Those rows carry no loss weight, and the same stds fold into bbox_pred, so the choice is self-consistent.

    Args:
        gt_boxes_list: per image [G, 4] boxes.
        gt_labels_list: per image [G] classes in 1..K.
        proposals_list: per image [P, 4] proposals.
        num_classes: K object classes, background EXCLUDED (20 for VOC; FR's imdb.num_classes = 21 counts it).
        bbox_thresh: FR BBOX_THRESH = 0.5.
        include_flipped: also count the flipped copies (FR TRAIN.USE_FLIPPED = True).
        widths: per image width in pixels, required when include_flipped.
    Returns:
        (means, stds), each [K+1, 4] float64 over (dx, dy, dw, dh); row 0 is background.
    """
    n = len(gt_boxes_list)
    if len(gt_labels_list) != n or len(proposals_list) != n:
        raise ValueError(f"regression_stats: {n} gt_boxes, {len(gt_labels_list)} gt_labels, "
                         f"{len(proposals_list)} proposals lists; they must have one entry per image")
    if include_flipped and (widths is None or len(widths) != n):
        raise ValueError(f"regression_stats: include_flipped needs widths with one entry per image ({n})")
    all_targets, all_classes = [np.zeros((0, 4))], [np.zeros(0, dtype=np.int64)]
    for i in range(n):
        gt, labels, props = (np.asarray(x) for x in (gt_boxes_list[i], gt_labels_list[i], proposals_list[i]))
        _check_image(gt, labels, props, f"regression_stats: image {i}")
        if labels.size and labels.max() > num_classes:
            raise ValueError(f"regression_stats: image {i} has label {labels.max()} > {num_classes} classes")
        copies = [(gt, props)]
        if include_flipped:
            copies.append((flip_boxes(gt, widths[i]), flip_boxes(props, widths[i])))
        for gt_c, props_c in copies:
            boxes, max_overlaps, assignment = _match(gt_c, props_c)
            ex = np.flatnonzero(max_overlaps >= bbox_thresh)
            if ex.size:
                all_targets.append(_deltas(boxes[ex], gt_c, assignment[ex]))
                all_classes.append(labels[assignment[ex]].astype(np.int64))
    targets, classes = np.concatenate(all_targets), np.concatenate(all_classes)

    k1 = num_classes + 1
    counts = np.bincount(classes, minlength=k1) + EPS  # (K+1,), FR starts the count at EPS
    sums = np.stack([np.bincount(classes, targets[:, j], k1) for j in range(4)], axis=1)  # (K+1, 4)
    squares = np.stack([np.bincount(classes, targets[:, j] ** 2, k1) for j in range(4)], axis=1)
    means = sums / counts[:, None]
    stds = np.sqrt(np.maximum(squares / counts[:, None] - means**2, 0.0))  # clamp rounding below 0
    means[0] = 0.0
    stds[0] = 1.0
    stds[stds < 1e-6] = 1.0
    return means, stds


def expand_targets(
    targets: Tensor, labels: Tensor, num_classes: int, means: Tensor, stds: Tensor
) -> tuple[Tensor, Tensor]:
    """Normalise targets and spread them into class-specific columns (FR _get_bbox_regression_labels).

    Args:
        targets: [R, 4] raw deltas.
        labels: [R] long classes, 0 = background.
        num_classes: K object classes, background excluded.
        means: [K+1, 4] from regression_stats.
        stds: [K+1, 4] from regression_stats.
    Returns:
        (bbox_targets, bbox_weights), each [R, 4 * (K+1)]: for a foreground RoI of class c, columns
        4c:4c+4 hold (t - means[c]) / stds[c] and weight 1; everything else (all background rows) is 0.
    """
    r = targets.shape[0]
    if targets.dim() != 2 or targets.shape[1] != 4 or labels.shape != (r,):
        raise ValueError(f"expand_targets: targets must be [R, 4], labels [R]; got {tuple(targets.shape)}, "
                         f"{tuple(labels.shape)}")
    means = torch.as_tensor(means, dtype=targets.dtype, device=targets.device)
    stds = torch.as_tensor(stds, dtype=targets.dtype, device=targets.device)
    k1 = num_classes + 1
    if means.shape != (k1, 4) or stds.shape != (k1, 4):
        raise ValueError(f"expand_targets: means/stds must be [K+1, 4] = [{k1}, 4], got "
                         f"{tuple(means.shape)}, {tuple(stds.shape)}")
    if r and (labels.min() < 0 or labels.max() > num_classes):
        raise ValueError(f"expand_targets: labels must lie in 0..{num_classes}, "
                         f"got {int(labels.min())}..{int(labels.max())}")
    bbox_targets = targets.new_zeros(r, 4 * k1)
    bbox_weights = targets.new_zeros(r, 4 * k1)
    rows = torch.nonzero(labels > 0).squeeze(1)  # foreground RoIs
    cls = labels[rows]
    cols = 4 * cls[:, None] + torch.arange(4, device=labels.device)  # (F, 4)
    bbox_targets[rows[:, None], cols] = (targets[rows] - means[cls]) / stds[cls]
    bbox_weights[rows[:, None], cols] = 1.0
    return bbox_targets, bbox_weights
