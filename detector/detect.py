"""Test-time detection (FR lib/fast_rcnn/test.py): one conv pass per scale, RoI pooling, scores and boxes, NMS;
and `Detector`, a trained model pointed at images (FR tools/demo.py; torchvision's model(images) interface).

Per image: the image pyramid over the test scales; with several scales each RoI goes to the level whose scaled area
is closest to 224^2 (FR _project_im_rois); RoIs identical after projection to the stride-16 map are computed once
(FR DEDUP_BOXES = 1/16); softmax scores; class-specific box decoding and clipping. Per class: a score threshold,
the top `max_per_class`, NMS at 0.3; optionally a cap on detections per image across classes.
"""

import time
from dataclasses import replace

import numpy as np
import torch
from detector.progress import progress as progress_bar

from detector.boxes import clip_boxes, decode_boxes, nms
from detector.checkpoint import model_from_checkpoint, read_checkpoint
from detector.config import Config, config_from_dict, resolve_device
from detector.errors import InputError
from detector.proposals import dense_proposals, selective_search
from detector.svd import svd_compress
from detector.data import image_scale, resize_image, to_tensor
from detector.tiling import crop, merge_detections, read_tile, tile_grid
from detector.timing import StageTimer


def scale_levels(boxes: np.ndarray, scales: list[float]) -> np.ndarray:
    """Pyramid level per box (K, 4): the image scale that brings its area closest to 224^2 pixels (FR test.py
    _project_im_rois; SPPnet assigns windows to scales the same way)."""
    if len(scales) == 1:
        return np.zeros(len(boxes), dtype=np.int64)
    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    areas = widths[:, None] * heights[:, None] * np.asarray(scales)[None, :] ** 2
    return np.abs(areas - 224 * 224).argmin(axis=1)


@torch.no_grad()
def im_detect(model, img: np.ndarray, boxes: np.ndarray, scales=(600,), max_size: int = 1000,
              timer: StageTimer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """img HxWx3 uint8 RGB, boxes (P, 4) proposals -> scores (P, K+1) and boxes (P, 4(K+1)) in image pixels.

    `timer`, a StageTimer entered by the caller, receives the time outside the network as "rest".
    """
    device = next(model.parameters()).device
    num_outputs = model.num_classes + 1
    if len(boxes) == 0:
        return np.zeros((0, num_outputs), np.float32), np.zeros((0, 4 * num_outputs), np.float32)
    tick = timer.tick if timer is not None else (lambda stage: None)
    height, width = img.shape[:2]
    im_scales = [image_scale(height, width, s, max_size) for s in scales]
    levels = scale_levels(boxes, im_scales)
    rois = np.concatenate([levels[:, None].astype(np.float64),
                           boxes * np.asarray(im_scales)[levels][:, None]], axis=1)
    # Dedup (FR DEDUP_BOXES): RoIs that round to the same cells of the stride-16 map pool identical features.
    keys = np.round(rois * model.roi_pool.spatial_scale)
    _, index, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    rois_t = torch.from_numpy(rois[index]).float().to(device)
    cls_prob = torch.zeros(len(rois_t), num_outputs, device=device)
    box_deltas = torch.zeros(len(rois_t), 4 * num_outputs, device=device)
    for level, s in enumerate(im_scales):
        sel = rois_t[:, 0] == level
        if not bool(sel.any()):
            continue
        x = model.backbone.normalize(to_tensor(resize_image(img, s))[None].to(device))
        level_rois = rois_t[sel].clone()
        level_rois[:, 0] = 0
        logits, deltas = model.predict(model.features(x), level_rois)
        cls_prob[sel] = torch.softmax(logits, 1)
        box_deltas[sel] = model.unnormalize(deltas)
    inv = torch.from_numpy(inverse.reshape(-1)).to(device)
    cls_prob, box_deltas = cls_prob[inv], box_deltas[inv]
    pred = decode_boxes(torch.from_numpy(boxes).float().to(device), box_deltas)
    pred = clip_boxes(pred, height, width)
    out = cls_prob.cpu().numpy(), pred.cpu().numpy()
    tick("rest")
    return out


def postprocess(scores: np.ndarray, boxes: np.ndarray, num_classes: int, score_thresh: float = 0.0,
                max_per_class: int = 100, nms_thresh: float = 0.3, max_per_image: int = 0) -> list[np.ndarray]:
    """Per class j >= 1: threshold, top max_per_class, NMS -> list over classes (index 0 empty) of (n, 5) arrays."""
    dets = [np.zeros((0, 5), np.float32)]
    for j in range(1, num_classes + 1):
        s, b = scores[:, j], boxes[:, 4 * j:4 * j + 4]
        keep = np.flatnonzero(s > score_thresh)
        keep = keep[np.argsort(-s[keep], kind="stable")[:max_per_class]]
        d = np.hstack([b[keep], s[keep, None]]).astype(np.float32)
        if len(d):
            d = d[nms(torch.from_numpy(d[:, :4]), torch.from_numpy(d[:, 4]), nms_thresh).numpy()]
        dets.append(d)
    return cap_per_image(dets, max_per_image)


def cap_per_image(dets: list[np.ndarray], max_per_image: int) -> list[np.ndarray]:
    """The max_per_image best detections of one image across classes (ties at the cut all kept; 0: no cap)."""
    if max_per_image > 0:
        all_scores = np.concatenate([d[:, 4] for d in dets[1:]])
        if len(all_scores) > max_per_image:
            cut = np.sort(all_scores)[-max_per_image]
            dets = [d[d[:, 4] >= cut] for d in dets]
    return dets


def detect_dataset(model, records, proposals, cfg, progress: bool = True, timer: StageTimer | None = None):
    """Detections for every image: all_dets[class][image] = (n, 5) array (x1, y1, x2, y2, score), 0-based pixels.

    `timer`: a StageTimer on `model`, entered by the caller; it accumulates the Fig. 2 split of every image.
    Records may be tiles (detector.tiling.TileRecord): their detections are then in tile coordinates
    (merge_split_detections maps them back).
    """
    model.eval()
    all_dets = [[None] * len(records) for _ in range(model.num_classes + 1)]
    for i, rec in enumerate(progress_bar(records, desc="detect", disable=not progress, leave=False)):
        img = read_tile(rec)
        scores, boxes = im_detect(model, img, np.asarray(proposals[i], np.float32), cfg.test_scales,
                                  cfg.test_max_size, timer)
        dets = postprocess(scores, boxes, model.num_classes, cfg.score_thresh, cfg.max_per_class, cfg.nms,
                           cfg.max_per_image)
        for j in range(model.num_classes + 1):
            all_dets[j][i] = dets[j]
    return all_dets


class Detector:
    """A trained Fast R-CNN pointed at images, with the test settings it was trained with.

        det = Detector.from_checkpoint("runs/demo/final.pt", device="cpu")
        found = det(image)  # HxWx3 uint8 RGB -> {"boxes": (n, 4), "labels": [n names], "scores": (n,)}

    Boxes are 0-based (x1, y1, x2, y2) pixels of the image as given, x2/y2 inclusive (detector/boxes.py); the
    detections are those of the evaluation (per-class score threshold, top max_per_class, NMS), across classes
    in descending score order. `seconds` accumulates the time per stage over all calls: proposals, conv, head
    (RoI pooling, fc layers, box decoding), nms.
    """

    def __init__(self, model, classes: list[str], cfg: Config):
        self.model = model.eval()
        self.classes = list(classes)
        self.cfg = cfg
        self.device = next(model.parameters()).device
        self.seconds = {"proposals": 0.0, "conv": 0.0, "head": 0.0, "nms": 0.0}

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", svd: bool = False, **overrides) -> "Detector":
        """Load a train.py checkpoint (final.pt or checkpoint.pt); nothing in the file runs (checkpoint.py).

        Args:
            device: "cpu", "cuda" or "auto".
            svd: use the truncated-SVD head (paper §3.1) with the checkpoint's ranks (svd_fc6 / svd_fc7).
            overrides: test-time Config fields, e.g. test_scales=(480, 576), score_thresh=0.05.
        """
        ckpt = read_checkpoint(path)
        cfg = config_from_dict(ckpt["config"])
        unknown = sorted(set(overrides) - set(Config.__dataclass_fields__))
        if unknown:
            raise InputError(f"unknown Detector settings {unknown}; they are Config fields (detector/config.py)")
        cfg = replace(cfg, **overrides)
        model = model_from_checkpoint(ckpt, path)
        if svd:
            model = svd_compress(model, cfg.svd_fc6, cfg.svd_fc7)
        return cls(model.to(resolve_device(device)), ckpt["classes"], cfg)

    def proposals(self, image: np.ndarray) -> np.ndarray:
        """Proposals for an image (or a tile), in the mode, number and working scale of the evaluation:
        selective search, or dense boxes; the working scale is the largest test scale (proposals_for_split)."""
        scale, max_size = max(self.cfg.test_scales), self.cfg.test_max_size
        if self.proposal_mode == "dense":
            return dense_proposals(image.shape[0], image.shape[1], self.cfg.max_proposals, scale, max_size)
        return selective_search(image, mode=self.proposal_mode, max_boxes=self.cfg.max_proposals, scale=scale,
                                max_size=max_size)

    @property
    def proposal_mode(self) -> str:
        """The checkpoint's test proposal mode; "quality" (the paper's) when it was tested on a .mat file."""
        return self.cfg.test_proposals if self.cfg.test_proposals in ("fast", "quality", "dense") else "quality"

    def windows(self, height: int, width: int) -> list:
        """The tiles the detector cuts an image into (--tile, detector.tiling.tile_grid); [] without tiling."""
        return tile_grid(height, width, self.cfg.tile, self.cfg.tile_overlap) if self.cfg.tile else []

    def __call__(self, image: np.ndarray, proposals=None, min_score: float = 0.0) -> dict:
        """Detections in one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            proposals: (P, 4) boxes in the image's pixels; None computes them (self.proposals). With tiling
                (cfg.tile > 0) a list with one (P, 4) array per tile of self.windows(H, W), in tile pixels.
            min_score: leave out detections scoring below this (a display threshold; the evaluation's
                cfg.score_thresh still applies first).
        Returns {"boxes": float32 (n, 4), "labels": list of n class names, "scores": float32 (n,)}, by
        descending score; boxes in the image's pixels (with tiling: the tiles' detections mapped back and
        merged by per-class NMS, then capped at cfg.max_per_image, as the evaluation does).
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be an HxWx3 uint8 RGB array, got {image.dtype} {image.shape}")
        windows = self.windows(*image.shape[:2])
        if not windows:
            dets = self._detect(image, proposals, self.cfg.max_per_image)
        else:
            if proposals is not None and len(proposals) != len(windows):
                raise ValueError(f"{len(proposals)} proposal arrays for {len(windows)} tiles")
            tile_dets = [self._detect(crop(image, w), None if proposals is None else proposals[k], 0)
                         for k, w in enumerate(windows)]
            start = time.perf_counter()
            dets = cap_per_image(merge_detections(tile_dets, windows, self.cfg.nms), self.cfg.max_per_image)
            self.seconds["nms"] += time.perf_counter() - start
        rows = np.concatenate([np.zeros((0, 5), np.float32)] + dets[1:])
        labels = np.concatenate([np.full(len(d), j, np.int64) for j, d in enumerate(dets[1:], start=1)] +
                                [np.zeros(0, np.int64)])
        order = np.argsort(-rows[:, 4], kind="stable")  # ties keep class order
        order = order[rows[order, 4] >= min_score]
        return {"boxes": rows[order, :4], "labels": [self.classes[j - 1] for j in labels[order]],
                "scores": rows[order, 4]}

    def _detect(self, image: np.ndarray, proposals, max_per_image: int) -> list[np.ndarray]:
        """postprocess's per-class detections of one image (or tile), timing each stage into self.seconds."""
        start = time.perf_counter()
        if proposals is None:
            proposals = self.proposals(image)
        self.seconds["proposals"] += time.perf_counter() - start
        timer = StageTimer(self.model, self.device)
        with timer:
            scores, boxes = im_detect(self.model, image, np.asarray(proposals, np.float32).reshape(-1, 4),
                                      self.cfg.test_scales, self.cfg.test_max_size, timer)
        self.seconds["conv"] += timer.seconds.get("conv", 0.0)
        self.seconds["head"] += sum(v for k, v in timer.seconds.items() if k != "conv")
        start = time.perf_counter()
        dets = postprocess(scores, boxes, self.model.num_classes, self.cfg.score_thresh, self.cfg.max_per_class,
                           self.cfg.nms, max_per_image)
        self.seconds["nms"] += time.perf_counter() - start
        return dets
