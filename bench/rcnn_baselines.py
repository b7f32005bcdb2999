"""The two methods that paper Table 4 times Fast R-CNN against, and the model of all three training pipelines.

R-CNN (Girshick et al., CVPR 2014; code rbgirshick/rcnn): each proposal is dilated by 16 px of context,
cropped, warped to the net's input size and sent through the whole net (conv, pool5, fc6, fc7); class-specific
linear SVMs score fc7 and class-specific linear box regressors read pool5. SPPnet (He et al., ECCV 2014): the
conv layers run once per image and scale, each window is max-pooled from conv5 into a {6x6, 3x3, 2x2, 1x1}
pyramid (50 bins) and fed to fc6/fc7, SVMs and regressors as in R-CNN. Both run the stock ImageNet nets of their
papers (`stock_backbone`: for S, CaffeNet without Fast R-CNN's conv1/pool padding) and fine-tune with a 21-way
softmax before training their SVMs. Their fc6/fc7 are model.BoxHead, the one box-head forward pass; the nets
expose .backbone, .roi_pool and .head so that detector.timing.StageTimer splits their time as it splits Fast
R-CNN's. The last section models the training pipelines as measured unit times x counts (`train_estimates`).
"""

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detector.backbones import Backbone
from detector.model import BoxHead
from kernels.roi_pool import roi_pool
from kernels.roi_pool_cpu import round_half_away

RCNN_CONTEXT_PADDING = 16  # R-CNN appendix A, rcnn_exp_cache_features.m: crop_padding 16, crop_mode 'warp'
SPP_LEVELS = (6, 3, 2, 1)  # SPPnet §4.1 (detection): a 4-level pyramid, 36 + 9 + 4 + 1 = 50 bins
NUM_CLASSES = 20  # PASCAL VOC
# The counts that the training model multiplies measured unit times by, and their sources:
VOC07_TRAINVAL = 5011  # images in VOC 2007 trainval, the paper's Table 4 training set
RCNN_FINETUNE_ITERS = 70_000  # rcnn_exp_cache_features.m loads finetune_voc_2007_trainval_iter_70k
SPP_FINETUNE_ITERS = 300_000  # SPPnet §4.1: 250k mini-batches at lr 1e-4, then 50k at 1e-5
FRCN_ITERS = 40_000  # FR solver.prototxt / train_net.py: 30k at lr 1e-3, then 10k at 1e-4
MINIBATCH = 128  # R-CNN §2.3: 32 positive + 96 background windows per SGD step; SPPnet follows R-CNN


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
    # MATLAB's 1-based pixels: the rounding only matches there (MATLAB's round() is round_half_away, halves away
    # from zero, not torch.round's to even). The centre is x1 + w/2, so the dilated box reaches one pixel further
    # right and down than a symmetric dilation would; kept as in the original.
    b = boxes.to(torch.float64) + 1
    scale = crop_size / (crop_size - 2 * padding)
    half_w, half_h = (b[:, 2] - b[:, 0] + 1) / 2, (b[:, 3] - b[:, 1] + 1) / 2
    cx, cy = b[:, 0] + half_w, b[:, 1] + half_h
    x1, x2 = round_half_away(cx - half_w * scale), round_half_away(cx + half_w * scale)
    y1, y2 = round_half_away(cy - half_h * scale), round_half_away(cy + half_h * scale)
    scale_x, scale_y = crop_size / (x2 - x1 + 1), crop_size / (y2 - y1 + 1)  # crop px per unclipped box px
    pad_x = round_half_away((1 - x1).clamp(min=0) * scale_x)  # what the image border cuts off, at crop scale
    pad_y = round_half_away((1 - y1).clamp(min=0) * scale_y)
    x1, y1, x2, y2 = x1.clamp(min=1), y1.clamp(min=1), x2.clamp(max=width), y2.clamp(max=height)
    crop_w = torch.minimum(round_half_away((x2 - x1 + 1) * scale_x), crop_size - pad_x)
    crop_h = torch.minimum(round_half_away((y2 - y1 + 1) * scale_y), crop_size - pad_y)
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


def stock_backbone(backbone: Backbone) -> Backbone:
    """The trunk as R-CNN and SPPnet ran it: the stock ImageNet net of their papers.

    Fast R-CNN's CaffeNet (S) pads conv1 by 5 and pool1/pool2 by 1 (FR models/CaffeNet/train.prototxt); the stock
    CaffeNet pads neither, so a 227 crop gives a 13x13 conv5 (15x15 padded, ~21% more arithmetic). For S this is a
    copy with those paddings set to 0 (same weight shapes); M and L are stock already: the same object.
    """
    if backbone.name != "caffenet":
        return backbone
    stock = copy.deepcopy(backbone)
    stock.trunk.conv1.padding = (0, 0)
    stock.trunk.pool1.padding = stock.trunk.pool2.padding = 0
    return stock


class RCNN(nn.Module):
    """R-CNN's per-crop net: trunk, pool5, fc6, fc7 (a BoxHead); SVMs on fc7, box regressors on pool5."""

    def __init__(self, backbone: Backbone, head: BoxHead, num_classes: int = NUM_CLASSES):
        """backbone: stock_backbone(...); head: fc6/fc7 reading pool5 (backbone.pooled_features inputs)."""
        super().__init__()
        self.backbone = backbone
        # The stock nets' pool5: 3x3 stride 2 on S/M's 13x13 conv5, 2x2 stride 2 on L's 14x14 -> 6x6 / 7x7.
        big = backbone.pool_size == 7
        self.roi_pool = nn.MaxPool2d(2, 2) if big else nn.MaxPool2d(3, 2, ceil_mode=True)
        self.head = head
        self.svm = nn.Linear(head.out_features, num_classes)  # rcnn_train.m: a linear SVM per class on fc7
        self.bbox_reg = nn.Linear(backbone.pooled_features, 4 * num_classes)  # ridge regressors on pool5
        self.cls_score = nn.Linear(head.out_features, num_classes + 1)  # the softmax of fine-tuning only

    def pool5(self, crops: Tensor) -> Tensor:
        """(K, 3, S, S) warped crops -> (K, C, P, P) pool5; raises if the crop size does not give P x P."""
        pooled = self.roi_pool(self.backbone(crops))
        if pooled.shape[-1] != self.backbone.pool_size:
            raise ValueError(f"a {crops.shape[-1]}-pixel crop gives a {pooled.shape[-1]}x{pooled.shape[-1]} pool5;"
                             f" fc6 reads {self.backbone.pool_size}x{self.backbone.pool_size}: use the net's crop size")
        return pooled

    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """Test time on (K, 3, S, S) warped crops: SVM scores (K, num_classes), box deltas (K, 4 num_classes)."""
        pooled = self.pool5(crops)
        return self.svm(self.head(pooled)), self.bbox_reg(pooled.flatten(1))

    def finetune_logits(self, crops: Tensor) -> Tensor:
        """Fine-tuning of everything above the frozen layers: 21-way logits (BoxHead's dropout in train mode)."""
        return self.cls_score(self.head(self.pool5(crops)))


class SPPPool(nn.Module):
    """Spatial pyramid max pooling of each RoI: our roi_pool at each pyramid size, flattened and concatenated.

    SPPnet maps a window to conv5 with its own rounding (floor/ceil at stride 16); we use the RoI pooling semantics
    of our kernel (torchvision's) at every level.
    """

    def __init__(self, spatial_scale: float, levels: tuple[int, ...] = SPP_LEVELS):
        super().__init__()
        self.spatial_scale, self.levels = spatial_scale, levels

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        """features (N, C, H, W), rois (K, 5) in image pixels -> (K, C * sum(l * l)), level after level."""
        return torch.cat([roi_pool(features, rois, level, self.spatial_scale).flatten(1) for level in self.levels],
                         dim=1)


def spp_pool(features: Tensor, rois: Tensor, spatial_scale: float, levels: tuple[int, ...] = SPP_LEVELS) -> Tensor:
    """SPPPool as a function: (K, C * sum(l * l)) pooled features of rois (K, 5)."""
    return SPPPool(spatial_scale, levels)(features, rois)


class SPPnet(nn.Module):
    """SPPnet on conv5: SPP pooling, fc6 (C*50 inputs) and fc7 (a BoxHead); SVMs on fc7, regressors on the SPP."""

    def __init__(self, backbone: Backbone, num_classes: int = NUM_CLASSES, levels: tuple[int, ...] = SPP_LEVELS):
        """backbone: stock_backbone(...); fc6/fc7 have the backbone's head widths."""
        super().__init__()
        self.backbone = backbone
        self.roi_pool = SPPPool(backbone.spatial_scale, levels)
        self.spp_dim = backbone.out_channels * sum(level * level for level in levels)
        self.head = BoxHead(self.spp_dim, *backbone.head_widths)  # fc6 reads 50 bins, not pool_size^2: new
        self.svm = nn.Linear(self.head.out_features, num_classes)
        self.bbox_reg = nn.Linear(self.spp_dim, 4 * num_classes)  # SPPnet §4.1: regression on pooled conv5
        self.cls_score = nn.Linear(self.head.out_features, num_classes + 1)  # SPPnet fine-tuning: a 21-way fc8

    def pool(self, images: list[Tensor], rois: Tensor) -> Tensor:
        """SPP features (K, spp_dim): conv at every pyramid scale, each RoI pooled from its own level.

        Args:
            images: normalised images (1, 3, H_l, W_l), one per scale.
            rois: (K, 5) (level, x1, y1, x2, y2), the box in that level's pixels.
        """
        pooled = rois.new_empty(rois.shape[0], self.spp_dim)
        for level, image in enumerate(images):
            features = self.backbone(image)  # SPPnet runs every scale, whether or not a window picked it
            sel = (rois[:, 0] == level).nonzero().flatten()
            if sel.numel():
                level_rois = torch.cat([rois.new_zeros(len(sel), 1), rois[sel, 1:]], dim=1)  # batch index 0
                pooled[sel] = self.roi_pool(features, level_rois)
        return pooled

    def forward(self, images: list[Tensor], rois: Tensor) -> tuple[Tensor, Tensor]:
        """Test time: SVM scores (K, num_classes) and box deltas (K, 4 num_classes); arguments as pool()."""
        pooled = self.pool(images, rois)
        return self.svm(self.head(pooled)), self.bbox_reg(pooled)

    def finetune_logits(self, pooled: Tensor) -> Tensor:
        """Fine-tuning of fc6 and up on cached SPP features (SPPnet §4.1); BoxHead's dropout in train mode."""
        return self.cls_score(self.head(pooled))


# ------------------------------------------------------------------------------------------------------------
# The training pipelines: fine-tuning, features cached to disk, SVMs trained over the cache. MODELLED as
# measured unit time x count, not run in full.
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


@dataclass
class UnitTimes:
    """What one net's training model multiplies by counts: seconds measured by bench/speed_vs_rcnn.py, sizes."""

    proposals: int  # windows per image
    rcnn_step_s: float  # one R-CNN fine-tuning step (forward, backward, SGD) on rcnn_step_crops warped crops
    rcnn_step_crops: int
    rcnn_crop_conv_s: float  # test mode, per crop at the fastest batch size: warp, conv, pool5
    rcnn_crop_fc_s: float  # the same crop's fc6, fc7, SVMs and regressors
    pool5_mb: float  # pool5 of every proposal of one image, fp32: R-CNN's feature cache
    spp_step_s: float  # one SPPnet fine-tuning step (fc layers only) on spp_step_windows cached windows
    spp_step_windows: int
    spp_pyramid_s: float  # conv at every pyramid scale of one image
    conv5_mb: float  # the conv5 pyramid of one image, fp32: SPPnet's feature cache
    spp_head_s: float  # SPP pooling, fc6, fc7, SVMs and regressors of every proposal of one image
    frcn_step_s: float  # one Fast R-CNN iteration (forward, backward, SGD)
    frcn_step_images: int
    frcn_step_rois: int


@dataclass
class Estimate:
    """One modelled training stage: hours = unit_s x count / 3600; `formula` spells out how unit_s was formed."""

    method: str
    stage: str
    unit_s: float
    formula: str
    count: int
    count_source: str

    @property
    def hours(self) -> float:
        return self.unit_s * self.count / 3600


def train_estimates(u: UnitTimes, disk: dict) -> list[Estimate]:
    """The three methods' training stages, MODELLED as measured unit time x count.

    Not modelled, so R-CNN's and SPPnet's totals are lower bounds: the liblinear solves on the mined caches
    (rcnn_train.m update_model), fitting the box regressors, and reading the fine-tuning windows from disk.

    Args:
        u: unit times of one net.
        disk: disk_speed()'s result (the feature caches are written and read back).
    """
    w, r = 1 / disk["write_mb_s"], 1 / disk["read_mb_s"]  # seconds per MB
    n, p = u.rcnn_step_crops, u.proposals
    scaled = f" x {MINIBATCH}/{n} crops" if n != MINIBATCH else ""
    return [
        Estimate("R-CNN", "fine-tune", u.rcnn_step_s * MINIBATCH / n,
                 f"{u.rcnn_step_s:.4g} s/step of {n} crops{scaled}", RCNN_FINETUNE_ITERS,
                 "iterations of 128 crops (R-CNN's released 70k-iteration model)"),
        Estimate("R-CNN", "pool5 cache", p * u.rcnn_crop_conv_s + u.pool5_mb * w,
                 f"{p} crops x {u.rcnn_crop_conv_s:.4g} s warp+conv+pool5 + {u.pool5_mb:.0f} MB / write speed",
                 VOC07_TRAINVAL, "VOC07 trainval images"),
        Estimate("R-CNN", "SVM training", u.pool5_mb * r + p * u.rcnn_crop_fc_s,
                 f"{u.pool5_mb:.0f} MB / read speed + {p} crops x {u.rcnn_crop_fc_s:.4g} s fc6+fc7+SVMs",
                 VOC07_TRAINVAL, "images, one hard-negative pass (rcnn_train.m max_hard_epochs = 1)"),
        Estimate("SPPnet", "conv5 cache", u.spp_pyramid_s + u.conv5_mb * w,
                 f"{u.spp_pyramid_s:.4g} s conv pyramid + {u.conv5_mb:.0f} MB / write speed",
                 VOC07_TRAINVAL, "VOC07 trainval images"),
        Estimate("SPPnet", "fine-tune (fc)", u.spp_step_s, f"{u.spp_step_s:.4g} s/step of {u.spp_step_windows} "
                 "cached windows", SPP_FINETUNE_ITERS, "iterations (SPPnet §4.1: 250k + 50k mini-batches)"),
        Estimate("SPPnet", "SVM training", u.conv5_mb * r + u.spp_head_s,
                 f"{u.conv5_mb:.0f} MB / read speed + {u.spp_head_s:.4g} s SPP+fc+SVMs for {p} windows",
                 VOC07_TRAINVAL, "images, one hard-negative pass (SPPnet §4.1 follows R-CNN)"),
        Estimate("Fast R-CNN", "fine-tune", u.frcn_step_s,
                 f"{u.frcn_step_s:.4g} s/iteration of {u.frcn_step_images} images, {u.frcn_step_rois} RoIs",
                 FRCN_ITERS, "iterations (FR solver: 30k + 10k)"),
    ]
