"""The trunk's leading frozen layers, run once per (image, scale, flip) in training and kept in memory.

Fine-tuning with frozen early layers (paper §4.5: conv1 for S/M, conv1_1..conv2_2 for L; the demo freezes
MobileNetV2's blocks up to stride 8) recomputes, each time an image comes back, a function that never changes:
the frozen layers' output depends only on the image, the scale it was drawn at and whether it was flipped. With
--frozen-cache-mb > 0, training runs those layers on each image alone (not on the zero-padded minibatch), keeps
each result in memory while the budget lasts (first come, first kept) and zero-pads the results into the
minibatch that the trainable layers see.

Exact: a kept map is the tensor that running the same layers on the same input gives again, so the losses are
the same with the cache full, empty or anywhere between (tests/test_frozen_features.py checks it bit for bit).
Per image rather than per padded minibatch: the frozen layers never see the padding that another image's size
imposes, as at test time, where images go through the network one at a time. With the cache off
(--frozen-cache-mb 0, the paper presets) training runs the whole trunk on the padded minibatch, as FR does.
"""

import torch
from torch import Tensor

from detector.data import pad_batch


class FrozenFeatures:
    def __init__(self, backbone, budget_mb: float):
        """backbone: the model's Backbone (its frozen_prefix() layers are the ones kept); budget_mb: memory for
        the kept maps, on the device they are computed on; 0 turns the cache off (self.layers is then 0, as it
        is when the trunk starts with a trainable layer)."""
        self.backbone = backbone
        self.layers = backbone.frozen_prefix() if budget_mb > 0 else 0
        self.budget = int(budget_mb * 2**20)
        self.maps: dict[tuple, Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __call__(self, images: list[Tensor], keys: list[tuple], device: torch.device) -> Tensor:
        """The frozen layers' outputs for a minibatch's images, zero-padded at the bottom and right.

        Args:
            images: normalised (3, h, w) images, unpadded; keys: one hashable key per image that determines
                it (batches.Minibatch.keys: record, scale, flip).
        Returns:
            (N, C, H', W') on `device`, the input of trunk layer `self.layers` (FastRCNN.forward's start).
        """
        maps = []
        for image, key in zip(images, keys, strict=True):
            kept = self.maps.get(key)
            if kept is None:
                self.misses += 1
                with torch.no_grad():
                    kept = self.backbone(image[None].to(device), 0, self.layers)[0]
                size = kept.untyped_storage().nbytes()
                if self.bytes + size <= self.budget:
                    self.maps[key] = kept
                    self.bytes += size
            else:
                self.hits += 1
            maps.append(kept)
        return pad_batch(maps)

    def trunk_input(self, batch, device: torch.device) -> tuple[Tensor, int]:
        """What FastRCNN.forward takes for a minibatch (batches.Minibatch): (input, start layer). The kept maps
        and the first layer after them; with the cache off, the padded images and layer 0."""
        if not self.layers:
            return batch.images.to(device), 0
        return self(batch.unpadded, batch.keys, device), self.layers

    def summary(self) -> str:
        seen = self.hits + self.misses
        return (f"frozen layers 0-{self.layers - 1} kept for {len(self.maps)} (image, scale, flip)s, "
                f"{self.bytes / 2**20:.0f} MiB: {self.hits} of {seen} images reused "
                f"({self.hits / max(seen, 1):.0%})")
