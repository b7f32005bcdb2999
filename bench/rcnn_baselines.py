"""The two methods that paper Table 4 times Fast R-CNN against, on our backbones (same conv and fc layers).

R-CNN (Girshick et al., CVPR 2014; code rbgirshick/rcnn): each proposal is dilated by 16 px of context,
cropped, warped to the net's input size and sent through the whole net (conv + fc); class-specific linear SVMs
score fc7 and class-specific linear box regressors read pool5. SPPnet (He et al., ECCV 2014): the conv layers
run once per image and scale, each window is max-pooled from conv5 into a {6x6, 3x3, 2x2, 1x1} pyramid (50
bins) and fed to fc6/fc7, SVMs and regressors as in R-CNN. Both fine-tune with a 21-way softmax before
training their SVMs; the last section models those training pipelines as measured unit times x counts.
"""

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detector.backbones import Backbone
from kernels.roi_pool import roi_pool

RCNN_CONTEXT_PADDING = 16  # R-CNN appendix A, rcnn_exp_cache_features.m: crop_padding 16, crop_mode 'warp'
SPP_LEVELS = (6, 3, 2, 1)  # SPPnet §4.1 (detection): a 4-level pyramid, 36 + 9 + 4 + 1 = 50 bins
SPP_TARGET_AREA = 224 * 224  # FR test.py _project_im_rois: a RoI goes to the scale closest to 224^2 pixels
NUM_CLASSES = 20  # PASCAL VOC
# The counts that the training estimates multiply measured unit times by, and their sources:
VOC07_TRAINVAL = 5011  # images in VOC 2007 trainval, the paper's Table 4 training set
RCNN_FINETUNE_ITERS = 70_000  # rcnn_exp_cache_features.m loads finetune_voc_2007_trainval_iter_70k
SPP_FINETUNE_ITERS = 300_000  # SPPnet §4.1: 250k mini-batches at lr 1e-4, then 50k at 1e-5
MINIBATCH = 128  # R-CNN §2.3: 32 positive + 96 background windows per SGD step; SPPnet follows R-CNN


def _round_half_away(x: Tensor) -> Tensor:
    # MATLAB's round() takes halves away from zero (torch.round takes them to even)
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def warp_windows(boxes: Tensor, image_hw: tuple[int, int], crop_size: int,
                 padding: int = RCNN_CONTEXT_PADDING) -> tuple[Tensor, Tensor]:
    """R-CNN's crop geometry (rcnn_im_crop.m, 'warp' mode): where each box is cut from and where it lands.

    The box is dilated about its centre by crop_size / (crop_size - 2 * padding), so that after warping to
    crop_size x crop_size `padding` pixels of context surround it. The part of the dilated box inside the
    image (the source window) is resized into the destination rectangle; the rest of the crop is the mean.

    Args:
        boxes: (K, 4) proposals (x1, y1, x2, y2), 0-based inclusive pixels, inside an image of size image_hw.
        image_hw: (height, width) of the image.
        crop_size: the net's input side (227 for S/M, 224 for L).
        padding: context pixels at the warped size.

    Returns:
        src (K, 4): the clipped source window (x1, y1, x2, y2), 0-based inclusive image pixels.
        dst (K, 4): (x0, y0, w, h) of the destination rectangle inside the crop.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4) x1, y1, x2, y2, got shape {tuple(boxes.shape)}")
    if not 0 <= 2 * padding < crop_size:
        raise ValueError(f"padding {padding} leaves no room in a {crop_size}-pixel crop")
    height, width = image_hw
    if padding == 0:  # rcnn_im_crop.m skips its dilation block: the box itself fills the crop
        full = boxes.new_tensor([0, 0, crop_size, crop_size], dtype=torch.float64).expand(len(boxes), 4)
        return boxes.to(torch.float64), full
    # MATLAB's 1-based pixels: the rounding only matches there. The centre is x1 + w/2, so the dilated box
    # reaches one pixel further right and down than a symmetric dilation would; kept as in the original.
    b = boxes.to(torch.float64) + 1
    scale = crop_size / (crop_size - 2 * padding)
    half_w, half_h = (b[:, 2] - b[:, 0] + 1) / 2, (b[:, 3] - b[:, 1] + 1) / 2
    cx, cy = b[:, 0] + half_w, b[:, 1] + half_h
    x1, x2 = _round_half_away(cx - half_w * scale), _round_half_away(cx + half_w * scale)
    y1, y2 = _round_half_away(cy - half_h * scale), _round_half_away(cy + half_h * scale)
    scale_x, scale_y = crop_size / (x2 - x1 + 1), crop_size / (y2 - y1 + 1)  # crop px per unclipped box px
    pad_x = _round_half_away((1 - x1).clamp(min=0) * scale_x)  # what the image border cuts off, at crop scale
    pad_y = _round_half_away((1 - y1).clamp(min=0) * scale_y)
    x1, y1, x2, y2 = x1.clamp(min=1), y1.clamp(min=1), x2.clamp(max=width), y2.clamp(max=height)
    crop_w = torch.minimum(_round_half_away((x2 - x1 + 1) * scale_x), crop_size - pad_x)
    crop_h = torch.minimum(_round_half_away((y2 - y1 + 1) * scale_y), crop_size - pad_y)
    return torch.stack([x1, y1, x2, y2], dim=1) - 1, torch.stack([pad_x, pad_y, crop_w, crop_h], dim=1)


def _sample_axis(lo: Tensor, hi: Tensor, d0: Tensor, dn: Tensor, crop_size: int) -> tuple[Tensor, Tensor]:
    """Source coordinate of each crop pixel along one axis (K, S), and the mask of the destination pixels."""
    i = torch.arange(crop_size, device=lo.device, dtype=torch.float32)[None]  # (1, S)
    lo, hi, d0, dn = (t.float()[:, None] for t in (lo, hi, d0, dn))
    # imresize without antialiasing maps pixel centres: x_src + 0.5 = (x_dst + 0.5) * src size / dst size
    coord = lo + (i - d0 + 0.5) * (hi - lo + 1) / dn - 0.5
    coord = torch.minimum(torch.maximum(coord, lo), hi)  # imresize replicates the window's edge pixels
    return coord, (i >= d0) & (i < d0 + dn)


def warp_crops(image: Tensor, src: Tensor, dst: Tensor, crop_size: int) -> Tensor:
    """Bilinear warp of every source window into its destination rectangle, zeros (the mean) elsewhere.

    Args:
        image: (1, 3, H, W) normalised (mean-subtracted) image.
        src, dst: (K, 4) from warp_windows.
        crop_size: output side S.

    Returns: (K, 3, S, S) crops.
    """
    _, channels, height, width = image.shape
    k = src.shape[0]
    xs, mask_x = _sample_axis(src[:, 0], src[:, 2], dst[:, 0], dst[:, 2], crop_size)  # (K, S)
    ys, mask_y = _sample_axis(src[:, 1], src[:, 3], dst[:, 1], dst[:, 3], crop_size)
    gx, gy = (xs + 0.5) / width * 2 - 1, (ys + 0.5) / height * 2 - 1  # grid_sample, align_corners=False
    grid = torch.stack([gx[:, None, :].expand(k, crop_size, crop_size),
                        gy[:, :, None].expand(k, crop_size, crop_size)], dim=-1)  # (K, S, S, 2)
    # One (1, K*S, S) grid over the single image instead of K copies of it. The sample points are already
    # clamped into the window: border padding only absorbs float error at the image's edges.
    out = F.grid_sample(image, grid.reshape(1, k * crop_size, crop_size, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)
    out = out.view(channels, k, crop_size, crop_size).transpose(0, 1)  # (K, 3, S, S)
    return out * (mask_y[:, None, :, None] & mask_x[:, None, None, :])


class RCNN(nn.Module):
    """R-CNN's per-crop net on a Backbone: trunk, pool5, fc6, fc7; SVMs on fc7, box regressors on pool5."""

    def __init__(self, backbone: Backbone, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.backbone = backbone
        # The trunks end at conv5 (Fast R-CNN replaced pool5); pool5 brings one crop's conv5 to fc6's grid. On
        # VGG16 at 224 it equals the 2x2/2 max pool (14 -> 7); for S/M it gives the 3x3/2 pool's 6x6 output.
        self.pool5 = nn.AdaptiveMaxPool2d(backbone.pool_size)
        pool5_dim = backbone.out_channels * backbone.pool_size**2
        self.svm = nn.Linear(backbone.fc_dim, num_classes)  # rcnn_train.m: a linear SVM per class on fc7
        self.bbox_reg = nn.Linear(pool5_dim, 4 * num_classes)  # rcnn_train_bbox_regressor.m: ridge on pool5
        self.cls_score = nn.Linear(backbone.fc_dim, num_classes + 1)  # the softmax of fine-tuning only

    def pool5_features(self, crops: Tensor) -> Tensor:
        return self.pool5(self.backbone.trunk(crops)).flatten(1)  # (K, C*P*P)

    def score_pool5(self, pool5: Tensor) -> tuple[Tensor, Tensor]:
        """SVM scores (K, num_classes) and box deltas (K, 4 num_classes) from pool5 features (K, C*P*P)."""
        fc7 = F.relu(self.backbone.fc7(F.relu(self.backbone.fc6(pool5))))
        return self.svm(fc7), self.bbox_reg(pool5)

    def score(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """Test time on (K, 3, S, S) warped crops: SVM scores and box deltas."""
        return self.score_pool5(self.pool5_features(crops))

    def finetune_logits(self, crops: Tensor) -> Tensor:
        """Fine-tuning: 21-way logits, dropout 0.5 after fc6 and fc7 as in the Caffe train prototxt."""
        x = F.dropout(F.relu(self.backbone.fc6(self.pool5_features(crops))), 0.5, self.training)
        x = F.dropout(F.relu(self.backbone.fc7(x)), 0.5, self.training)
        return self.cls_score(x)


def spp_pool(features: Tensor, rois: Tensor, spatial_scale: float,
             levels: tuple[int, ...] = SPP_LEVELS) -> Tensor:
    """Spatial pyramid max pooling of each RoI: our roi_pool at each pyramid size, flattened and concatenated.

    SPPnet maps a window to conv5 with its own rounding (floor/ceil at stride 16); we use the RoI pooling
    semantics of our kernel (torchvision's) at every level.

    Args:
        features: (N, C, H, W) conv5 map.
        rois: (K, 5) (batch index, x1, y1, x2, y2) in the pixels of the image that gave `features`.
        spatial_scale: feature-map cells per image pixel (1/16).
        levels: pyramid grid sides.

    Returns: (K, C * sum(l * l)), level after level, each level's (C, l, l) block flattened.
    """
    return torch.cat([roi_pool(features, rois, level, spatial_scale).flatten(1) for level in levels], dim=1)


def assign_scale_levels(boxes: Tensor, image_scales: list[float]) -> Tensor:
    """Pyramid level per box (K, 4): the scale that brings its area closest to 224^2 (FR _project_im_rois)."""
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)  # +1: inclusive pixels
    scaled = areas[:, None] * boxes.new_tensor(image_scales)[None, :] ** 2  # (K, levels)
    return (scaled - SPP_TARGET_AREA).abs().argmin(dim=1)


class SPPnet(nn.Module):
    """SPPnet above conv5 on a Backbone: SPP, fc6 (C*50 inputs), fc7; SVMs on fc7, regressors on the SPP."""

    def __init__(self, backbone: Backbone, num_classes: int = NUM_CLASSES,
                 levels: tuple[int, ...] = SPP_LEVELS):
        super().__init__()
        self.backbone, self.levels = backbone, levels
        self.spp_dim = backbone.out_channels * sum(level * level for level in levels)
        # fc6 reads 50 bins, not pool_size^2: a new layer (He init like the backbone's); fc7 is the backbone's
        self.fc6 = nn.utils.skip_init(nn.Linear, self.spp_dim, backbone.fc6.out_features)
        nn.init.normal_(self.fc6.weight, std=(2.0 / self.spp_dim) ** 0.5)
        nn.init.zeros_(self.fc6.bias)
        self.fc7 = backbone.fc7
        self.svm = nn.Linear(backbone.fc_dim, num_classes)
        self.bbox_reg = nn.Linear(self.spp_dim, 4 * num_classes)  # SPPnet §4.1: regression on pooled conv5
        self.cls_score = nn.Linear(backbone.fc_dim, num_classes + 1)  # SPPnet fine-tuning: a 21-way fc8

    def pool(self, feature_maps: list[Tensor], rois: Tensor, levels: Tensor) -> Tensor:
        """SPP features (K, spp_dim) of rois (K, 5) in their level's image pixels; levels (K,) index maps."""
        pooled = rois.new_empty(rois.shape[0], self.spp_dim)
        for level, fmap in enumerate(feature_maps):
            sel = (levels == level).nonzero().flatten()
            if sel.numel():
                pooled[sel] = spp_pool(fmap, rois[sel], self.backbone.spatial_scale, self.levels)
        return pooled

    def score(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Test time: SVM scores (K, num_classes) and box deltas (K, 4 num_classes) from SPP features."""
        fc7 = F.relu(self.fc7(F.relu(self.fc6(pooled))))
        return self.svm(fc7), self.bbox_reg(pooled)

    def finetune_logits(self, pooled: Tensor) -> Tensor:
        """Fine-tuning of the fc layers only (SPPnet §4.1), dropout 0.5 after fc6 and fc7."""
        x = F.dropout(F.relu(self.fc6(pooled)), 0.5, self.training)
        x = F.dropout(F.relu(self.fc7(x)), 0.5, self.training)
        return self.cls_score(x)


# ------------------------------------------------------------------------------------------------------------
# The training pipelines around the nets: fine-tuning, features cached to disk, SVMs trained over the cache.
# ------------------------------------------------------------------------------------------------------------


def disk_speed(folder: Path, megabytes: int) -> dict:
    """Sequential write (with fsync) and read throughput, MB/s, of a `megabytes` file in `folder`."""
    path, chunk = Path(folder) / "disk_probe.tmp", os.urandom(1 << 20)
    try:
        start = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(megabytes):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        write_s = time.perf_counter() - start
        with open(path, "rb") as f:
            if hasattr(os, "posix_fadvise"):  # drop the file from the page cache: the read must hit the disk
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while f.read(1 << 24):
                pass
            read_s = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    mb = megabytes * (1 << 20) / 1e6
    return {"write_mb_s": mb / max(write_s, 1e-9), "read_mb_s": mb / max(read_s, 1e-9)}


def _estimate(method: str, stage: str, unit_s: float, unit: str, count: int, count_source: str) -> dict:
    return {"method": method, "stage": stage, "unit_s": unit_s, "unit": unit, "count": count,
            "count_source": count_source, "hours": unit_s * count / 3600}


def train_estimates(u: dict, disk: dict, proposals: int) -> list[dict]:
    """R-CNN's and SPPnet's training stages as measured unit time x count, in hours (rows of `_estimate`).

    Not modelled, so both totals are lower bounds: the liblinear solves on the mined caches (rcnn_train.m
    update_model), fitting the box regressors, and reading the fine-tuning windows from disk.

    Args:
        u: the unit times and sizes that speed_vs_rcnn.measure_net returns as "units".
        disk: disk_speed()'s result.
        proposals: windows per image.
    """
    w, r = 1 / disk["write_mb_s"], 1 / disk["read_mb_s"]  # seconds per MB
    n, p = u["rcnn_step_crops"], proposals
    scaled = f" x {MINIBATCH}/{n} (EXTRAPOLATED)" if n != MINIBATCH else ""
    return [
        _estimate("R-CNN", "fine-tune", u["rcnn_step_s"] * MINIBATCH / n,
                  f"{u['rcnn_step_s']:.4f} s per step of {n} warped crops{scaled}",
                  RCNN_FINETUNE_ITERS, "iterations of 128 crops (R-CNN's released 70k-iteration model)"),
        _estimate("R-CNN", "pool5 cache", p * u["rcnn_crop_conv_s"] + u["pool5_mb"] * w,
                  f"{p} x {u['rcnn_crop_conv_s']:.4f} s warp+conv per crop + {u['pool5_mb']:.0f} MB written",
                  VOC07_TRAINVAL, "VOC07 trainval images"),
        _estimate("R-CNN", "SVM training", u["pool5_mb"] * r + p * u["rcnn_crop_fc_s"],
                  f"{u['pool5_mb']:.0f} MB read + {p} x {u['rcnn_crop_fc_s']:.5f} s fc6, fc7, SVMs per crop",
                  VOC07_TRAINVAL, "images, one hard-negative pass (rcnn_train.m max_hard_epochs = 1)"),
        _estimate("SPPnet", "conv5 cache", u["spp_pyramid_s"] + u["conv5_mb"] * w,
                  f"{u['spp_pyramid_s']:.3f} s conv pyramid + {u['conv5_mb']:.0f} MB written",
                  VOC07_TRAINVAL, "VOC07 trainval images"),
        _estimate("SPPnet", "fine-tune (fc)", u["spp_step_s"],
                  f"{u['spp_step_s']:.4f} s per step of {u['spp_step_windows']} pooled windows",
                  SPP_FINETUNE_ITERS, "iterations (SPPnet §4.1: 250k + 50k mini-batches)"),
        _estimate("SPPnet", "SVM training", u["conv5_mb"] * r + u["spp5_head_s"],
                  f"{u['conv5_mb']:.0f} MB read + {u['spp5_head_s']:.3f} s SPP, fc, SVMs for {p} windows",
                  VOC07_TRAINVAL, "images, one hard-negative pass (SPPnet §4.1 follows R-CNN)"),
    ]
