"""Conv trunks of the paper's S / M / L nets and a CPU MobileNetV2: the trunk, its input normalisation and the
geometry of the RoI pooling that follows it (weights.py loads weights; model.py owns RoI pooling and the box head).

Layer shapes follow FR's `models/{CaffeNet,VGG_CNN_M_1024,VGG16}/train.prototxt`: the last max pooling (pool5)
is replaced by RoI pooling at stride 16, and Caffe pools round output sizes up (ceil_mode=True, e.g. VGG16 on
600x1000 gives a 38x63 map). The fc6/fc7 widths of each net are recorded here (`head_widths`) because the
pretrained files hold those layers; model.py builds them. Module names are Caffe's layer names for S/M and
torchvision's indices for VGG16 and MobileNetV2, so torchvision's ImageNet files load by renaming alone (see
weights.py for the key formats).
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# FR config.py: mean pixel of the Caffe ImageNet models, BGR order, subtracted from 0..255 BGR images.
PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)
# torchvision's ImageNet normalisation, RGB order, applied to images scaled to 0..1.
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always uses its running statistics and never trains its affine parameters.

    Batch statistics over 2 images are too noisy to normalise with (detectron2's FrozenBatchNorm2d);
    subclassing BatchNorm2d keeps torchvision's state-dict keys (incl. num_batches_tracked): its files load.
    """

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.training = False  # from the start, not only after the first .train() / .eval()

    def train(self, mode: bool = True) -> "FrozenBatchNorm2d":
        return super().train(False)  # model.train() must not switch BN to batch statistics


PIXEL_FORMATS = ("torchvision", "caffe")


class Backbone(nn.Module):
    """A stride-16 conv trunk, the input normalisation its weights expect, and the RoI pooling geometry after it."""

    def __init__(self, name: str, trunk: nn.Sequential, out_channels: int, pool_size: int,
                 head_widths: tuple[int, int], frozen_layers: tuple[str, ...], pixel_format: str):
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.out_channels = out_channels
        self.pool_size = pool_size
        self.spatial_scale = 1.0 / 16  # four stride-2 stages; FR roi_pooling_param spatial_scale 0.0625
        self.head_widths = head_widths  # (fc6, fc7) outputs of the net's box head (model.BoxHead)
        self.frozen_layers = frozen_layers  # trunk submodule names the paper does not train
        self.pixel_format = pixel_format  # set by weights.load_weights; saved in checkpoints
        he_init(self)

    @property
    def pooled_features(self) -> int:
        """Inputs of fc6: one RoI pooled to pool_size x pool_size over out_channels."""
        return self.out_channels * self.pool_size * self.pool_size

    def forward(self, images: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Feature map (N, out_channels, ~H/16, ~W/16) of normalize()d images (N, 3, H, W).

        start / stop: run only trunk layers start..stop-1, on what layer start - 1 gave (frozen_features.py runs
        the frozen prefix once per image and the rest per step).
        """
        if images.device.type == "cpu":  # oneDNN's channels-last convolutions are ~30% faster on a CPU
            images = images.contiguous(memory_format=torch.channels_last)
        if start == 0 and stop is None:
            return self.trunk(images)
        for layer in self.trunk[start:stop]:
            images = layer(images)
        return images

    def frozen_prefix(self) -> int:
        """How many leading trunk layers are a fixed function of their input in training: no trainable
        parameter, no dropout, no batch norm that uses batch statistics."""
        count = 0
        for layer in self.trunk:
            moving = any(isinstance(m, nn.Dropout) or (isinstance(m, nn.BatchNorm2d) and m.training)
                         for m in layer.modules())
            if moving or any(p.requires_grad for p in layer.parameters()):
                break
            count += 1
        return count

    def normalize(self, images: Tensor) -> Tensor:
        """The input normalisation that matches the weights.

        Args:
            images: (N, 3, H, W) float RGB in 0..255.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"normalize expects RGB images (N, 3, H, W), got shape {tuple(images.shape)}")
        if self.pixel_format == "torchvision":
            mean = images.new_tensor(TORCHVISION_MEAN).view(1, 3, 1, 1)
            std = images.new_tensor(TORCHVISION_STD).view(1, 3, 1, 1)
            return (images / 255.0 - mean) / std
        if self.pixel_format == "caffe":  # Caffe models were trained on OpenCV's BGR, 0..255, mean-subtracted
            return images.flip(1) - images.new_tensor(PIXEL_MEANS_BGR).view(1, 3, 1, 1)
        raise ValueError(f"pixel_format must be one of {PIXEL_FORMATS}, got {self.pixel_format!r}")

    def freeze(self, layers: tuple[str, ...] | None = None) -> None:
        """Stop gradients into the layers the paper keeps fixed (conv1 for S/M, conv1_1..conv2_2 for L).

        Args:
            layers: trunk submodule names to freeze instead of the paper's; the convs outside them train again
                (frozen batch norm stays frozen).
        """
        if layers is not None:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.requires_grad_(True)
            self.frozen_layers = tuple(layers)
        for layer in self.frozen_layers:
            for p in self.trunk.get_submodule(layer).parameters():
                p.requires_grad_(False)


def he_init(module: nn.Module) -> None:
    """He-normal weights (fan_in, ReLU gain), zero biases, for every conv and linear layer inside `module`."""
    # Keeps activations at unit scale through ReLUs; this only matters without pretrained weights (tests,
    # from-scratch runs) and for MobileNetV2's new fc6/fc7.
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _conv(cin: int, cout: int, k: int, stride: int = 1, pad: int = 0, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups)


def _caffe_pool(pad: int = 0) -> nn.MaxPool2d:
    return nn.MaxPool2d(3, stride=2, padding=pad, ceil_mode=True)  # Caffe pooling rounds the output size up


def caffenet_trunk() -> nn.Sequential:
    # FR models/CaffeNet/train.prototxt: conv1 pad 5 (stock CaffeNet has 0) and pool1/pool2 pad 1 (stock: 0);
    # groups of 2 are AlexNet's two-GPU split and fix the weight shapes, e.g. conv2 (256, 48, 5, 5).
    return nn.Sequential(OrderedDict([
        ("conv1", _conv(3, 96, 11, stride=4, pad=5)), ("relu1", nn.ReLU(inplace=True)),
        ("pool1", _caffe_pool(pad=1)), ("norm1", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)),
        ("conv2", _conv(96, 256, 5, pad=2, groups=2)), ("relu2", nn.ReLU(inplace=True)),
        ("pool2", _caffe_pool(pad=1)), ("norm2", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)),
        ("conv3", _conv(256, 384, 3, pad=1)), ("relu3", nn.ReLU(inplace=True)),
        ("conv4", _conv(384, 384, 3, pad=1, groups=2)), ("relu4", nn.ReLU(inplace=True)),
        ("conv5", _conv(384, 256, 3, pad=1, groups=2)), ("relu5", nn.ReLU(inplace=True)),
    ]))  # fmt: skip


def vgg_cnn_m_1024_trunk() -> nn.Sequential:
    # FR models/VGG_CNN_M_1024/train.prototxt: LRN comes *before* pooling (k 2, alpha 5e-4), pools unpadded.
    # torch's LocalResponseNorm divides alpha by size like Caffe's ACROSS_CHANNELS LRN does.
    return nn.Sequential(OrderedDict([
        ("conv1", _conv(3, 96, 7, stride=2)), ("relu1", nn.ReLU(inplace=True)),
        ("norm1", nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)), ("pool1", _caffe_pool()),
        ("conv2", _conv(96, 256, 5, stride=2, pad=1)), ("relu2", nn.ReLU(inplace=True)),
        ("norm2", nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)), ("pool2", _caffe_pool()),
        ("conv3", _conv(256, 512, 3, pad=1)), ("relu3", nn.ReLU(inplace=True)),
        ("conv4", _conv(512, 512, 3, pad=1)), ("relu4", nn.ReLU(inplace=True)),
        ("conv5", _conv(512, 512, 3, pad=1)), ("relu5", nn.ReLU(inplace=True)),
    ]))  # fmt: skip


def vgg16_trunk() -> nn.Sequential:
    # torchvision's vgg16 `features` indices 0..29 (conv at 0, 2, 5, ...; "M" = 2x2 max pool); index 30,
    # pool5, is dropped for RoI pooling. ceil_mode as in Caffe: a 600-pixel side has 75 -> 38 rows at pool4.
    layers, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
        else:
            layers += [_conv(cin, v, 3, pad=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


def conv_frozen_bn(x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> Tensor:
    """bn(conv(x)) as one convolution: the frozen BN's per-channel affine map is folded into the conv's weight and
    bias on every call. The activation is then written once instead of twice (the frozen blocks run ~1.7x faster
    on a CPU, bench/RESULTS.md), and the gradient still reaches the conv's own weight: training is unchanged.
    """
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    return F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, groups=groups, bias=False)
        super().__init__(conv, FrozenBatchNorm2d(cout), nn.ReLU6(inplace=True))  # keys as torchvision's

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(conv_frozen_bn(x, self[0], self[1]), inplace=True)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [ConvBNReLU6(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), FrozenBatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)  # keys features.N.conv.* as in torchvision
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        *expand_and_depthwise, project, project_bn = self.conv  # unpacked: slicing would build a Sequential
        y = x
        for layer in expand_and_depthwise:
            y = layer(y)
        y = conv_frozen_bn(y, project, project_bn)  # the linear projection and its BN
        return x + y if self.use_residual else y


def mobilenet_v2_trunk() -> nn.Sequential:
    # torchvision's mobilenet_v2 features.0..13 (Sandler et al. Table 2: t, c, n, s rows up to the 96-channel
    # stage): stride 16. Blocks 14..18 (stride 32, 160/320/1280 channels) are left out, like VGG16's pool5.
    layers, cin = [ConvBNReLU6(3, 32, 3, stride=2)], 32
    stages = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    for expand, cout, repeats, stride in stages:
        for i in range(repeats):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    return nn.Sequential(*layers)


_ALIASES = {"s": "caffenet", "m": "vgg_cnn_m_1024", "l": "vgg16"}


def build_backbone(name: str, fc_dim: int | None = None) -> Backbone:
    """The named backbone with random weights and the paper's frozen layers already applied (freeze()).

    Args:
        name: "caffenet" (S), "vgg_cnn_m_1024" (M), "vgg16" (L) or "mobilenet_v2".
        fc_dim: fc6/fc7 width of the box head for mobilenet_v2 (default 1024); None/0 for the paper nets (their
            pretrained fc6/fc7 fix the sizes).
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if fc_dim and key != "mobilenet_v2":
        raise ValueError(f"fc_dim is only configurable for mobilenet_v2; {key} has the paper's fc sizes")
    # paper §2.2: RoI pooling sized to fc6's input (6x6 for S/M, 7x7 for L); §4.5: S/M train conv2 and up
    if key == "caffenet":
        b = Backbone(key, caffenet_trunk(), 256, 6, (4096, 4096), ("conv1",), "caffe")
    elif key == "vgg_cnn_m_1024":
        b = Backbone(key, vgg_cnn_m_1024_trunk(), 512, 6, (4096, 1024), ("conv1",), "caffe")
    elif key == "vgg16":  # §4.5 / FR prototxt: conv1_1..conv2_2 have lr_mult 0 (trunk indices 0, 2, 5, 7)
        b = Backbone(key, vgg16_trunk(), 512, 7, (4096, 4096), ("0", "2", "5", "7"), "caffe")
    elif key == "mobilenet_v2":  # not in the paper: freeze its stem (features.0-1) as the paper freezes conv1
        dim = fc_dim or 1024
        b = Backbone(key, mobilenet_v2_trunk(), 96, 7, (dim, dim), ("0", "1"), "torchvision")
    else:
        raise ValueError(f"unknown backbone {name!r}: use caffenet (S), vgg_cnn_m_1024 (M), vgg16 (L) or "
                         "mobilenet_v2")
    b.freeze()
    return b
