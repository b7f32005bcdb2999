import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from detector.roi_sampling import expand_targets, regression_stats, sample_rois
from oracles import iou_loop  # tests/oracles.py

EPS = 1e-14  # FR config.py


def target_loop(roi, gt) -> list[float]:
    """FR roidb.py::_compute_targets for one pair, written out (widths without +1, plus EPS)."""
    w, h = roi[2] - roi[0] + EPS, roi[3] - roi[1] + EPS
    gw, gh = gt[2] - gt[0] + EPS, gt[3] - gt[1] + EPS
    cx, cy, gcx, gcy = roi[0] + 0.5 * w, roi[1] + 0.5 * h, gt[0] + 0.5 * gw, gt[1] + 0.5 * gh
    return [(gcx - cx) / w, (gcy - cy) / h, math.log(gw / w), math.log(gh / h)]


def best_gt(box, gt_boxes) -> tuple[float, int]:
    overlaps = [iou_loop(box, g) for g in gt_boxes]
    j = max(range(len(overlaps)), key=lambda k: (overlaps[k], -k))  # first max
    return overlaps[j], j


def make_image(rng: np.random.Generator, num_props: int = 400):
    """Three objects on a 200x150 image; proposals are jittered copies of them plus random boxes."""
    gt = np.array([[10, 20, 60, 90], [100, 30, 180, 120], [40, 80, 110, 140]], dtype=np.float64)
    labels = np.array([3, 1, 3])
    jitter = gt[rng.integers(0, 3, num_props // 2)] + rng.integers(-25, 26, (num_props // 2, 4))
    x1, y1 = rng.integers(0, 180, num_props // 2), rng.integers(0, 130, num_props // 2)
    random = np.stack([x1, y1, x1 + rng.integers(5, 60, x1.size), y1 + rng.integers(5, 60, x1.size)], axis=1)
    props = np.concatenate([jitter, random]).astype(np.float64)
    props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 1)  # keep widths >= 1
    return gt, labels, np.unique(props, axis=0)  # unique: duplicates in the output mean sampling twice


@pytest.mark.parametrize("seed", range(3))
def test_sample_rois_thresholds_and_counts(seed):
    rng = np.random.default_rng(seed)
    gt, labels, props = make_image(rng)
    s = sample_rois(gt, labels, props, np.random.default_rng(100 + seed))
    r = len(s.labels)
    num_fg = int((s.labels > 0).sum())
    assert r <= 64 and num_fg <= 16  # round(0.25 * 64) = 16 (FR minibatch.py)
    assert s.rois.shape == (r, 4) and s.targets.shape == (r, 4)
    assert s.labels.dtype == torch.long
    assert (s.labels[:num_fg] > 0).all() and (s.labels[num_fg:] == 0).all()  # foreground first
    rows = [tuple(b) for b in s.rois.tolist()]
    assert len(set(rows)) == r  # without replacement
    candidates = {tuple(b) for b in np.concatenate([gt, props]).tolist()}
    for i, box in enumerate(rows):
        assert box in candidates
        overlap, j = best_gt(box, gt.tolist())
        if i < num_fg:
            assert overlap >= 0.5 and s.labels[i].item() == labels[j]
            assert_close(s.targets[i], torch.tensor(target_loop(box, gt[j].tolist())).float())
        else:
            assert 0.1 <= overlap < 0.5
            assert (s.targets[i] == 0).all()
    # This image has plenty of both kinds, so the batch is full: 16 fg + 48 bg.
    assert (num_fg, r) == (16, 64)


def test_sample_rois_is_reproducible():
    gt, labels, props = make_image(np.random.default_rng(0))
    a = sample_rois(gt, labels, props, np.random.default_rng(7))
    b = sample_rois(gt, labels, props, np.random.default_rng(7))
    c = sample_rois(gt, labels, props, np.random.default_rng(8))
    assert torch.equal(a.rois, b.rois) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.targets, b.targets)
    assert not torch.equal(a.rois, c.rois)


def test_gt_boxes_are_foreground_candidates():
    # Proposals that all miss the objects: the only foreground candidates are the gt boxes themselves
    # (overlap 1, zero targets); FR does not force them in, but here they are all there is.
    gt = np.array([[0, 0, 9, 9], [50, 50, 69, 59]], dtype=np.float64)
    props = np.array([[0, 0, 9, 30], [30, 30, 45, 45], [90, 90, 99, 99]], dtype=np.float64)  # IoU .32, 0, 0
    s = sample_rois(gt, np.array([2, 5]), props, np.random.default_rng(0))
    assert sorted(s.labels.tolist()) == [0, 2, 5]
    fg = s.labels > 0
    assert sorted(map(tuple, s.rois[fg].tolist())) == sorted(map(tuple, gt.tolist()))
    assert (s.targets == 0).all()
    assert s.rois[~fg].tolist() == [[0, 0, 9, 30]]  # only the 0.32 proposal is in [0.1, 0.5)


def test_small_fg_fraction_and_few_candidates():
    # 2 fg candidates (the gt and a near copy), 1 bg candidate: R = 3 < 64, no padding, no fallback.
    gt = np.array([[10, 10, 50, 50]], dtype=np.float64)
    props = np.array([[11, 11, 50, 50], [10, 10, 90, 90], [200, 200, 220, 220]], dtype=np.float64)
    s = sample_rois(gt, np.array([1]), props, np.random.default_rng(0))
    assert s.labels.tolist() == [1, 1, 0]
    s = sample_rois(gt, np.array([1]), props, np.random.default_rng(0), rois_per_image=4, fg_fraction=0.25)
    assert s.labels.tolist() == [1, 0]  # round(0.25 * 4) = 1 foreground


def test_image_without_objects_or_proposals():
    rng = np.random.default_rng(0)
    props = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]], dtype=np.float64)
    none = np.zeros((0, 4))
    s = sample_rois(none, np.zeros(0, dtype=np.int64), props, rng)  # all proposals are background
    assert s.labels.tolist() == [0, 0, 0] and sorted(map(tuple, s.rois.tolist())) == sorted(map(tuple, props))
    s = sample_rois(none, np.zeros(0, dtype=np.int64), np.tile(props, (30, 1)) + np.arange(90)[:, None], rng)
    assert len(s.labels) == 64
    gt = np.array([[1, 2, 30, 40]], dtype=np.float64)
    s = sample_rois(gt, np.array([4]), none, rng)  # no proposals: the gt box alone
    assert s.labels.tolist() == [4] and s.rois.tolist() == [[1, 2, 30, 40]]
    s = sample_rois(none, np.zeros(0, dtype=np.int64), none, rng)
    assert len(s.labels) == 0 and s.rois.shape == (0, 4) and s.targets.shape == (0, 4)


def test_sample_rois_rejects_bad_input():
    rng = np.random.default_rng(0)
    box = np.zeros((1, 4))
    with pytest.raises(ValueError, match="gt_boxes"):
        sample_rois(np.zeros((1, 5)), np.array([1]), box, rng)
    with pytest.raises(ValueError, match="gt_labels"):
        sample_rois(box, np.array([1, 2]), box, rng)
    with pytest.raises(ValueError, match="background"):
        sample_rois(box, np.array([0]), box, rng)
    with pytest.raises(ValueError, match="proposals"):
        sample_rois(box, np.array([1]), np.zeros(4), rng)


def stats_loop(gts, labels, props, widths, num_classes, include_flipped):
    """FR add_bbox_regression_targets written as plain loops over images, candidates and gt boxes."""
    count = [EPS] * (num_classes + 1)
    sums = [[0.0] * 4 for _ in range(num_classes + 1)]
    squares = [[0.0] * 4 for _ in range(num_classes + 1)]
    for g, l, p, w in zip(gts, labels, props, widths):
        copies = [(g.tolist(), p.tolist())]
        if include_flipped:
            flip = lambda bs: [[w - b[2] - 1, b[1], w - b[0] - 1, b[3]] for b in bs]  # noqa: E731
            copies.append((flip(g.tolist()), flip(p.tolist())))
        for gt_boxes, prop_boxes in copies:
            for box in gt_boxes + prop_boxes:
                if not gt_boxes:
                    continue
                overlap, j = best_gt(box, gt_boxes)
                if overlap >= 0.5:
                    c = int(l[j])
                    count[c] += 1
                    for k, t in enumerate(target_loop(box, gt_boxes[j])):
                        sums[c][k] += t
                        squares[c][k] += t * t
    means = np.array([[s / n for s in row] for row, n in zip(sums, count)])
    var = np.array([[q / n for q in row] for row, n in zip(squares, count)]) - means**2
    return means, np.sqrt(np.maximum(var, 0))


@pytest.mark.parametrize("include_flipped", [True, False])
def test_regression_stats_matches_loop(include_flipped):
    rng = np.random.default_rng(0)
    images = [make_image(rng, num_props=60) for _ in range(3)]
    gts, labels, props = [im[0] for im in images], [im[1] for im in images], [im[2] for im in images]
    gts.append(np.zeros((0, 4)))  # an image without objects contributes nothing
    labels.append(np.zeros(0, dtype=np.int64))
    props.append(props[0])
    widths = [200, 200, 210, 200]
    means, stds = regression_stats(gts, labels, props, 4, include_flipped=include_flipped, widths=widths)
    exp_means, exp_stds = stats_loop(gts, labels, props, widths, 4, include_flipped)
    assert means.shape == stds.shape == (5, 4)
    # Classes 1 and 3 have examples; background (0) and the absent classes 2 and 4 become mean 0, std 1.
    for c in (1, 3):
        np.testing.assert_allclose(means[c], exp_means[c], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stds[c], exp_stds[c], rtol=1e-9, atol=1e-12)
    for c in (0, 2, 4):
        assert (means[c] == 0).all() and (stds[c] == 1).all()
    if include_flipped:
        # dx flips sign with the image, so with both copies its mean is ~0 (EPS aside).
        assert abs(means[1, 0]) < 1e-9 and abs(means[3, 0]) < 1e-9


def test_regression_stats_constant_targets_and_errors():
    # Only the gt box itself reaches 0.5: every target is 0, std 0 -> replaced by 1 (FR would divide by 0).
    gt, props = np.array([[0, 0, 9, 9]], dtype=np.float64), np.array([[50, 50, 60, 60]], dtype=np.float64)
    means, stds = regression_stats([gt], [np.array([1])], [props], 1, include_flipped=False)
    assert (means == 0).all() and (stds == 1).all()
    with pytest.raises(ValueError, match="widths"):
        regression_stats([gt], [np.array([1])], [props], 1)
    with pytest.raises(ValueError, match="label 2"):
        regression_stats([gt], [np.array([2])], [props], 1, include_flipped=False)
    with pytest.raises(ValueError, match="one entry per image"):
        regression_stats([gt], [], [props], 1, include_flipped=False)


def test_expand_targets_layout():
    # 4 RoIs, K = 3 classes: labels 2, 0, 3, 2.
    targets = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    labels = torch.tensor([2, 0, 3, 2])
    means = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 10
    stds = torch.full((4, 4), 2.0)
    bbox_targets, bbox_weights = expand_targets(targets, labels, 3, means, stds)
    assert bbox_targets.shape == bbox_weights.shape == (4, 16)
    expected_t, expected_w = torch.zeros(4, 16), torch.zeros(4, 16)
    for r, c in enumerate(labels.tolist()):
        if c > 0:
            for k in range(4):
                expected_t[r, 4 * c + k] = (targets[r, k] - means[c, k]) / stds[c, k]
                expected_w[r, 4 * c + k] = 1.0
    assert_close(bbox_targets, expected_t)
    assert torch.equal(bbox_weights, expected_w)
    empty_t, empty_w = expand_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 3, means, stds)
    assert empty_t.shape == empty_w.shape == (0, 16)
    with pytest.raises(ValueError, match="labels must lie"):
        expand_targets(targets, torch.tensor([4, 0, 0, 0]), 3, means, stds)
    with pytest.raises(ValueError, match="means/stds"):
        expand_targets(targets, labels, 4, means, stds)
