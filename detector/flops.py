"""FLOPs for the speed benchmark: 2 x the multiply-adds of convolutions and fully connected layers.

Elementwise work (biases, ReLU, pooling, LRN, BN, residual adds) is not counted: <1% for VGG16, ~10% for
MobileNetV2.
"""

import copy

import torch
from torch import Tensor, nn

from detector.backbones import Backbone


def trunk_flops(backbone: Backbone, height: int, width: int) -> int:
    """FLOPs of the trunk's convolutions on one (3, height, width) image, from shapes on the meta device."""
    trunk = copy.deepcopy(backbone.trunk).to("meta")  # meta tensors carry shapes only: no compute, no memory
    total = 0

    def count(conv: nn.Conv2d, inputs, output: Tensor) -> None:
        nonlocal total
        kh, kw = conv.kernel_size
        total += 2 * output.numel() * (conv.in_channels // conv.groups) * kh * kw

    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(count)
    with torch.no_grad():
        trunk(torch.empty(1, 3, height, width, device="meta"))
    return total


def fc_flops(head: nn.Module) -> int:
    """FLOPs of a box head (fc6 + fc7, model.BoxHead) for one RoI; counts every Linear inside it, so SVD-compressed
    heads work too."""
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return sum(2 * m.in_features * m.out_features for m in layers)
