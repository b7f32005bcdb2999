import math
from dataclasses import dataclass

import numpy as np
import pytest

from detector.plots import plot_pr_curves
from detector.voc_eval import evaluate, format_ap_table, voc_ap, write_comp4
from oracles import iou_loop  # tests/oracles.py


@dataclass
class Record:
    image_id: str
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def eval_class(dets: list, gts: dict, use_07_metric: bool = True):
    """AP, recall and precision of one class through `evaluate`: dets [(image_id, score, box)], grouped by image
    in the order given; gts {image_id: (boxes, difficult)}. Images appear in order of first mention."""
    ids = list(dict.fromkeys([i for i, _, _ in dets] + list(gts)))
    records = [Record(i, np.asarray(gts.get(i, (np.zeros((0, 4)), None))[0], float).reshape(-1, 4),
                      np.ones(len(gts.get(i, (np.zeros((0, 4)),))[0]), np.int64),
                      np.asarray(gts[i][1] if i in gts else np.zeros(0), bool)) for i in ids]
    per_image = [np.array([[*b, s] for j, s, b in dets if j == i], float).reshape(-1, 5) for i in ids]
    result = evaluate([[None] * len(ids), per_image], records, ["x"], use_07_metric=use_07_metric)
    return (result["ap"]["x"], *result["pr"]["x"])


def read_comp4(path: str) -> list:
    """A comp4 file back as [(image_id, score, box 0-based)]: the devkit's reading of the format."""
    rows = [line.split() for line in open(path) if line.strip()]
    return [(r[0], float(r[1]), np.array([float(v) for v in r[2:6]]) - 1.0) for r in rows]


def box(*xyxy) -> np.ndarray:
    return np.array(xyxy, dtype=np.float64)


def devkit_loop(dets, gts, use_07_metric, thresh=0.5):
    """VOCevaldet.m / PF voc_eval.py written out: one detection at a time, stable descending score order."""
    order = sorted(range(len(dets)), key=lambda k: -dets[k][1])  # Python's sort is stable, as MATLAB's
    npos = sum(int((~np.asarray(d, bool)).sum()) for _, d in gts.values())
    matched = {k: [False] * len(b) for k, (b, _) in gts.items()}
    tp, fp = [], []
    for k in order:
        image_id, _, bb = dets[k]
        gt_boxes, difficult = gts.get(image_id, (np.zeros((0, 4)), np.zeros(0, bool)))
        ovmax, jmax = -math.inf, -1
        for j, g in enumerate(gt_boxes):
            ov = iou_loop(list(bb), list(g))
            if ov > ovmax:
                ovmax, jmax = ov, j
        if ovmax > thresh:
            if difficult[jmax]:
                tp.append(0), fp.append(0)
            elif not matched[image_id][jmax]:
                matched[image_id][jmax] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07_metric:
        # MATLAB `0:0.1:1`: the first half counts up from 0, the second half down from 1.
        thresholds = [k * 0.1 if k <= 5 else 1 - (10 - k) * 0.1 for k in range(11)]
        ap = 0.0
        for t in thresholds:
            p = [pr for r, pr in zip(rec, prec) if r >= t]
            ap += (max(p) if p else 0.0) / 11
    else:
        mrec, mpre = [0.0] + list(rec) + [1.0], [0.0] + list(prec) + [0.0]
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        steps = [i for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i]]
        ap = sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in steps)
    return ap, rec, prec


def test_difficult_duplicates_and_misses():
    # npos = 2 (the difficult gt does not count). In score order:
    #   0.9 exact hit on gt0 -> TP; 0.8 on the difficult gt -> ignored;
    #   0.7 on gt0 again (IoU .9) -> duplicate FP; 0.6 on nothing -> FP. gt2 is never found.
    # cumTP 1 1 1 1, cumFP 0 0 1 2 -> rec .5 .5 .5 .5, prec 1 1 1/2 1/3.
    # 11-point: thresholds 0, .1, ..., .5 see precision 1, the other 5 see nothing -> 6/11.
    # Area: recall steps 0 -> .5 at envelope precision 1, then .5 -> 1 at 0 -> 0.5.
    gt_boxes = np.array([box(0, 0, 9, 9), box(20, 20, 29, 29), box(40, 0, 49, 9)])
    gts = {"a": (gt_boxes, np.array([0, 1, 0], bool))}
    dets = [("a", 0.7, box(0, 0, 9, 8)), ("a", 0.9, box(0, 0, 9, 9)), ("a", 0.6, box(50, 50, 59, 59)),
            ("a", 0.8, box(20, 20, 29, 29))]
    ap, rec, prec = eval_class(dets, gts)
    np.testing.assert_allclose(rec, [0.5, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(prec, [1, 1, 1 / 2, 1 / 3])
    assert ap == pytest.approx(6 / 11)
    assert eval_class(dets, gts, use_07_metric=False)[0] == pytest.approx(0.5)


def test_ties_keep_input_order():
    # Same score: a false positive on image b and a true positive on image a.
    # FP first: rec 0 1, prec 0 1/2 -> both metrics 0.5. TP first: rec 1 1, prec 1 1/2 -> 1.0.
    gts = {"a": (np.array([box(0, 0, 9, 9)]), np.array([False])), "b": (np.zeros((0, 4)), np.zeros(0, bool))}
    fp, tp = ("b", 0.5, box(0, 0, 9, 9)), ("a", 0.5, box(0, 0, 9, 9))
    for metric in (True, False):
        assert eval_class([fp, tp], gts, use_07_metric=metric)[0] == pytest.approx(0.5)
        assert eval_class([tp, fp], gts, use_07_metric=metric)[0] == pytest.approx(1.0)


def test_iou_must_exceed_threshold_strictly():
    # A 10x10 gt; a 5x10 detection overlaps exactly 50/100 = 0.5 -> FP; 6x10 -> 0.6 -> TP.
    gts = {"a": (np.array([box(0, 0, 9, 9)]), np.array([False]))}
    assert eval_class([("a", 0.9, box(0, 0, 4, 9))], gts)[0] == 0.0
    assert eval_class([("a", 0.9, box(0, 0, 5, 9))], gts)[0] == pytest.approx(1.0)


def test_11_point_thresholds_are_the_devkits():
    # 10 objects, 7 found first, then 3 false positives: recall reaches exactly 7/10.
    # MATLAB's 0:0.1:1 holds 0.7 exactly, so t = 0, .1, ..., .7 all see precision 1 -> 8/11
    # (PF's np.arange gives 0.7000000000000001 and 7/11). At 3/10 both miss t = 0.30000000000000004 -> 3/11.
    gts = {f"im{i}": (np.array([box(0, 0, 9, 9)]), np.array([False])) for i in range(10)}
    hits = [(f"im{i}", 1.0 - i / 100, box(0, 0, 9, 9)) for i in range(10)]
    misses = [(f"im{i}", 0.1, box(50, 50, 59, 59)) for i in range(3)]
    ap, rec, _ = eval_class(hits[:7] + misses, gts)
    assert rec[6] == 0.7 and ap == pytest.approx(8 / 11)
    assert eval_class(hits[:3] + misses, gts)[0] == pytest.approx(3 / 11)
    assert eval_class(hits[:7] + misses, gts, use_07_metric=False)[0] == pytest.approx(0.7)


def test_no_ground_truth_and_no_detections():
    empty = {"a": (np.zeros((0, 4)), np.zeros(0, bool))}
    ap, rec, prec = eval_class([("a", 0.9, box(0, 0, 9, 9))], empty)
    assert math.isnan(ap) and prec.tolist() == [0.0]
    # A detection on an image unknown to gts is a false positive: rec 0 1, prec 0 1/2 (as the ties case).
    one = {"a": (np.array([box(0, 0, 9, 9)]), np.array([False]))}
    ap, rec, prec = eval_class([("zzz", 0.9, box(0, 0, 9, 9)), ("a", 0.8, box(0, 0, 9, 9))], one)
    assert rec.tolist() == [0.0, 1.0] and prec.tolist() == [0.0, 0.5]
    only_difficult = {"a": (np.array([box(0, 0, 9, 9)]), np.array([True]))}
    assert math.isnan(eval_class([], only_difficult)[0])
    some = {"a": (np.array([box(0, 0, 9, 9)]), np.array([False]))}
    for metric in (True, False):
        ap, rec, prec = eval_class([], some, use_07_metric=metric)
        assert ap == 0.0 and rec.size == 0 and prec.size == 0
    assert voc_ap(np.array([]), np.array([])) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_eval_class_matches_devkit_loop(seed):
    rng = np.random.default_rng(seed)
    gts, dets = {}, []
    for i in range(6):
        g = rng.integers(0, 5)
        x1, y1 = rng.integers(0, 80, g), rng.integers(0, 80, g)
        x2, y2 = x1 + rng.integers(5, 40, g), y1 + rng.integers(5, 40, g)
        boxes = np.stack([x1, y1, x2, y2], axis=1).astype(float)
        gts[f"im{i}"] = (boxes, rng.random(g) < 0.2)
        for b in boxes:  # 0-2 jittered detections per object: hits, duplicates and near misses
            for _ in range(rng.integers(0, 3)):
                dets.append((f"im{i}", round(rng.random(), 2), b + rng.integers(-6, 7, 4)))
        for _ in range(rng.integers(0, 4)):  # background detections
            x, y = rng.integers(0, 100, 2)
            dets.append((f"im{i}", round(rng.random(), 2), box(x, y, x + 20, y + 20)))
    for metric in (True, False):
        ap, rec, prec = eval_class(dets, gts, use_07_metric=metric)
        exp_ap, exp_rec, exp_prec = devkit_loop(dets, gts, metric)
        np.testing.assert_allclose(rec, exp_rec, rtol=0, atol=1e-12)
        np.testing.assert_allclose(prec, exp_prec, rtol=0, atol=1e-12)
        assert ap == pytest.approx(exp_ap, abs=1e-12)


def make_records():
    image1 = np.array([box(10, 10, 50, 60), box(70, 20, 90, 40)])
    image2 = np.array([box(5, 5, 30, 30), box(40, 40, 80, 90)])
    return [
        Record("000001", image1, np.array([1, 2]), np.zeros(2, bool)),  # a cat and a dog
        Record("000002", image2, np.array([1, 1]), np.array([0, 1], bool)),  # two cats, the second difficult
        Record("000003", np.zeros((0, 4)), np.zeros(0, int), np.zeros(0, bool)),
    ]


def gt_as_detections(records, num_classes):
    """Every gt box as a detection of its class, score decreasing with position."""
    all_dets = [[np.zeros((0, 5)) for _ in records] for _ in range(num_classes + 1)]
    for i, r in enumerate(records):
        for j, (b, c) in enumerate(zip(r.boxes, r.labels)):
            all_dets[c][i] = np.vstack([all_dets[c][i], np.append(b, 0.9 - 0.1 * j)])
    return all_dets


def test_evaluate_round_trip_perfect_detections():
    records, classes = make_records(), ["cat", "dog", "emu"]  # no emu anywhere: AP nan, left out of mAP
    result = evaluate(gt_as_detections(records, 3), records, classes)
    # 11 x (1/11) sums to 1.0000000000000002 in float, as in the devkit.
    assert result["ap"]["cat"] == pytest.approx(1.0) and result["ap"]["dog"] == pytest.approx(1.0)
    assert math.isnan(result["ap"]["emu"]) and result["mAP"] == pytest.approx(1.0)
    assert set(result["pr"]) == set(classes)
    with pytest.raises(ValueError, match="K\\+1"):
        evaluate(gt_as_detections(records, 3)[:3], records, classes)
    with pytest.raises(ValueError, match="all_dets\\[1\\]"):
        evaluate([[]] + [[np.zeros((0, 5))]] * 3, records, classes)


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_matches_devkit_loop(seed):
    # Random records (some difficult objects, an empty image) and detections for K = 3 classes.
    rng = np.random.default_rng(seed)
    records, num_classes = [], 3
    for i in range(8):
        g = rng.integers(0, 5)
        x1, y1 = rng.integers(0, 80, g), rng.integers(0, 80, g)
        x2, y2 = x1 + rng.integers(5, 40, g), y1 + rng.integers(5, 40, g)
        boxes = np.stack([x1, y1, x2, y2], axis=1).astype(float)
        records.append(Record(f"{i:06d}", boxes, rng.integers(1, num_classes + 1, g), rng.random(g) < 0.2))
    all_dets = [[np.zeros((0, 5))] * len(records)]
    for c in range(1, num_classes + 1):
        per_image = []
        for r in records:
            # Mostly near this class's objects (hits, duplicates, near misses), else near any box or anywhere.
            pool = r.boxes[r.labels == c] if (r.labels == c).any() and rng.random() < 0.8 else r.boxes
            n = rng.integers(0, 6)
            anywhere = rng.integers(0, 80, (n, 4)) + [0, 0, 20, 20]
            near = pool[rng.integers(0, len(pool), n)] if len(pool) else anywhere
            noisy = near + rng.integers(-5, 6, (n, 4))
            per_image.append(np.hstack([noisy, np.round(rng.random((n, 1)), 1)]))  # 1 decimal: ties
        all_dets.append(per_image)
    for metric in (True, False):
        result = evaluate(all_dets, records, ["a", "b", "c"], use_07_metric=metric)
        for c, name in enumerate(["a", "b", "c"], start=1):
            gts = {r.image_id: (r.boxes[r.labels == c], r.difficult[r.labels == c]) for r in records}
            dets = [(r.image_id, d[4], d[:4]) for r, ds in zip(records, all_dets[c]) for d in ds]
            exp_ap, exp_rec, exp_prec = devkit_loop(dets, gts, metric)
            got_rec, got_prec = result["pr"][name]
            np.testing.assert_allclose(got_prec, exp_prec, rtol=0, atol=1e-12)
            if math.isnan(result["ap"][name]):
                assert not any((~g[1]).any() for g in gts.values())  # nan only without non-difficult gt
            else:
                assert result["ap"][name] == pytest.approx(exp_ap, abs=1e-12)
                np.testing.assert_allclose(got_rec, exp_rec, rtol=0, atol=1e-12)


def test_evaluate_hand_case():
    records, classes = make_records(), ["cat", "dog"]
    all_dets = gt_as_detections(records, 2)
    all_dets[1][2] = np.array([[0, 0, 20, 20, 0.95]])  # a confident false positive on the empty image
    result = evaluate(all_dets, records, classes, use_07_metric=False)
    # cat, npos 2: FP 0.95, TP 0.9, TP 0.9, difficult 0.8 -> rec 0 .5 1 1, prec 0 1/2 2/3 2/3; the envelope is
    # 2/3 from recall 0 to 1 -> area AP 2/3.
    cat_gts = {r.image_id: (r.boxes[r.labels == 1], r.difficult[r.labels == 1]) for r in records}
    cat_dets = [(r.image_id, d[4], d[:4]) for r, ds in zip(records, all_dets[1]) for d in ds]
    assert result["ap"]["cat"] == pytest.approx(2 / 3)
    assert result["ap"]["cat"] == pytest.approx(devkit_loop(cat_dets, cat_gts, False)[0])
    assert result["mAP"] == pytest.approx((result["ap"]["cat"] + 1.0) / 2)


def test_comp4_round_trip(tmp_path):
    records, classes = make_records(), ["cat", "dog"]
    all_dets = gt_as_detections(records, 2)
    all_dets[1][0] = np.array([[10.5, 10.0, 50.25, 60.0, 0.123], [0.0, 0.0, 5.0, 5.0, 0.5]])
    ids = [r.image_id for r in records]
    paths = write_comp4(str(tmp_path / "results"), "test", classes, ids, all_dets)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["comp4_det_test_cat.txt", "comp4_det_test_dog.txt"]
    # FR test.py's line format, 1-based: 10.5 -> "11.5", 50.25 -> "51.2" (rounded by .1f).
    assert open(paths[0]).read().splitlines()[0] == "000001 0.123 11.5 11.0 51.2 61.0"
    for c, path in enumerate(paths, start=1):
        back = read_comp4(path)
        expected = [(ids[i], d[4], d[:4]) for i in range(len(ids)) for d in all_dets[c][i]]
        assert [b[0] for b in back] == [e[0] for e in expected]
        np.testing.assert_allclose([b[1] for b in back], [round(e[1], 3) for e in expected])
        rounded = [np.round(e[2] + 1, 1) - 1 for e in expected]
        np.testing.assert_allclose([b[2] for b in back], rounded, atol=1e-9)
        # Reading the file back evaluates like the in-memory detections (here no rounding ties arise).
        gts = {r.image_id: (r.boxes[r.labels == c], r.difficult[r.labels == c]) for r in records}
        assert eval_class(back, gts)[0] == pytest.approx(eval_class(expected, gts)[0])


def test_format_ap_table_and_plot(tmp_path):
    table = format_ap_table({"aeroplane": 0.745, "bicycle": 0.783, "emu": math.nan}, 0.669)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "AP"]
    assert lines[2].split() == ["aeroplane", "74.5"] and lines[4].split() == ["emu", "nan"]
    assert lines[-1].split() == ["mAP", "66.9"]
    assert len({len(line) for line in lines if not line.startswith("-")}) == 1  # fixed width
    path = tmp_path / "pr.png"
    rec, prec = np.array([0.2, 0.5, 0.5]), np.array([1.0, 0.8, 0.6])
    curves = {"aeroplane": (rec, prec), "bicycle": (rec, prec), "emu": (np.array([]), np.array([]))}
    plot_pr_curves(curves, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
