"""Training minibatches: N images per SGD step, R/N RoIs from each (paper §2.3 hierarchical sampling), loaded,
flipped, scaled and normalised; roi_sampling.py picks the RoIs (FR's minibatch.py does both).

Owns the order in which images are visited and every random choice (scale, flip, RoI sample), drawn from numpy
Generators whose states are checkpointed, so a resumed run sees exactly the minibatches an uninterrupted one would.
FR walks a shuffled permutation of the images and reshuffles when it runs out (roi_data_layer/layer.py).

Under data parallelism (K processes) every process draws the same permutation each epoch (a generator seeded alike
on all of them) and walks its own share of it, positions rank, rank + K, ... (as torch's DistributedSampler), so
the processes never train on the same image in the same epoch; flips, scales and RoIs come from a generator of
the process's own. With one process a single generator does both, as FR's.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from detector.boxes import flip_boxes
from detector.data import flip_image, image_scale, pad_batch, resize_image, to_tensor
from detector.roi_sampling import expand_targets, sample_rois
from detector.tiling import read_tile


@dataclass
class Minibatch:
    unpadded: list[Tensor]  # the N normalised (3, h, w) images
    keys: list[tuple[int, int, bool]]  # what determines each image: (record index, scale, flipped)
    rois: Tensor  # (R, 5) batch index, x1, y1, x2, y2 in the scaled images' pixels
    labels: Tensor  # (R,) 0 = background
    bbox_targets: Tensor  # (R, 4(K+1)) normalised targets in the true class's columns
    bbox_weights: Tensor  # (R, 4(K+1)) 1 where a target is set

    @cached_property
    def images(self) -> Tensor:
        """(N, 3, H, W) the images zero-padded to a common size; made on first use (frozen_features.py pads
        the kept maps instead)."""
        return pad_batch(self.unpadded)

    def targets(self, device: torch.device | str) -> dict:
        """The loss targets FastRCNN.forward takes, on `device`."""
        return {"labels": self.labels.to(device), "bbox_targets": self.bbox_targets.to(device),
                "bbox_weights": self.bbox_weights.to(device)}


class BatchLoader:
    def __init__(self, records, proposals, cfg, num_classes: int, means: np.ndarray, stds: np.ndarray,
                 normalize, seed: int, rank: int = 0, world: int = 1):
        """seed: the run's seed (cfg.seed); rank / world: this process's place among `world` data-parallel ones."""
        if len(records) < world * cfg.ims_per_batch:
            raise ValueError(f"{len(records)} training images cannot fill {world} x {cfg.ims_per_batch} images per "
                             "step: use fewer processes or fewer --ims-per-batch")
        self.records, self.proposals, self.cfg = records, proposals, cfg
        self.num_classes = num_classes
        self.means, self.stds = torch.as_tensor(means).float(), torch.as_tensor(stds).float()
        self.normalize = normalize  # the backbone's input normalisation, applied before zero-padding (FR blob.py)
        self.rank, self.world = rank, world
        self.rng = np.random.default_rng(seed + rank)  # this process's flips, scales and RoI samples
        self.order_rng = np.random.default_rng(seed) if world > 1 else self.rng  # alike on every process
        self.order = self._share()
        self.cursor = 0

    def _share(self) -> np.ndarray:
        """This process's part of a new epoch's permutation; every share has the same length (the remainder of
        len(records) / world is left out this epoch, so that all processes start the next one together)."""
        order = self.order_rng.permutation(len(self.records))
        return order[: len(order) - len(order) % self.world][self.rank::self.world]

    def _next_images(self) -> list[int]:
        n = self.cfg.ims_per_batch
        if self.cursor + n > len(self.order):
            self.order = self._share()
            self.cursor = 0
        picked = self.order[self.cursor:self.cursor + n]
        self.cursor += n
        return [int(i) for i in picked]

    def next(self) -> Minibatch:
        cfg = self.cfg
        rois_per_image = cfg.rois_per_batch // cfg.ims_per_batch
        images, rois, labels, targets, weights, keys = [], [], [], [], [], []
        for b, i in enumerate(self._next_images()):
            rec, props = self.records[i], self.proposals[i]
            img, gt = read_tile(rec), rec.boxes  # a tile (--tile): its own pixels, width and boxes
            flipped = bool(cfg.use_flipped and self.rng.random() < 0.5)
            if flipped:
                img, gt = flip_image(img), flip_boxes(gt, rec.width)
                props = flip_boxes(props, rec.width)
            target_size = int(cfg.scales[self.rng.integers(len(cfg.scales))])
            keys.append((i, target_size, flipped))
            im_scale = image_scale(rec.height, rec.width, target_size, cfg.max_size)
            images.append(self.normalize(to_tensor(resize_image(img, im_scale))[None])[0])
            s = sample_rois(gt, rec.labels, props, self.rng, rois_per_image=rois_per_image,
                            fg_fraction=cfg.fg_fraction, fg_thresh=cfg.fg_thresh,
                            bg_thresh_hi=cfg.bg_thresh_hi, bg_thresh_lo=cfg.bg_thresh_lo)
            # RoIs are scaled with the image and not rounded (FR minibatch.py _project_im_rois).
            batch_col = torch.full((len(s.labels), 1), float(b))
            rois.append(torch.cat([batch_col, s.rois.float() * im_scale], dim=1))
            t, w = expand_targets(s.targets.float(), s.labels, self.num_classes, self.means, self.stds)
            labels.append(s.labels)
            targets.append(t)
            weights.append(w)
        return Minibatch(images, keys, torch.cat(rois), torch.cat(labels).long(), torch.cat(targets),
                         torch.cat(weights))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order_rng": self.order_rng.bit_generator.state,
                "order": self.order.tolist(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order_rng.bit_generator.state = state["order_rng"]
        self.order = np.asarray(state["order"], dtype=np.int64)
        self.cursor = int(state["cursor"])
