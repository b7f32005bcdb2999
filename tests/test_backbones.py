"""Backbones: Caffe/FR output sizes, layer shapes, normalisation, freezing, FLOPs."""

import copy
import math

import pytest
import torch

from detector.backbones import FrozenBatchNorm2d, build_backbone
from detector.flops import fc_flops, trunk_flops
from detector.model import FastRCNN
from detector.svd import svd_compress

NAMES = ["caffenet", "vgg_cnn_m_1024", "vgg16", "mobilenet_v2"]

# Size-changing layers as (kind, kernel, stride, pad, out_channels, groups), copied from FR's train.prototxt
# files (models/CaffeNet, models/VGG_CNN_M_1024, models/VGG16) and torchvision's mobilenet_v2 (its stride-2
# convs only).
CAFFENET = [("conv", 11, 4, 5, 96, 1), ("pool", 3, 2, 1), ("conv", 5, 1, 2, 256, 2), ("pool", 3, 2, 1),
            ("conv", 3, 1, 1, 384, 1), ("conv", 3, 1, 1, 384, 2), ("conv", 3, 1, 1, 256, 2)]
VGG_CNN_M = [("conv", 7, 2, 0, 96, 1), ("pool", 3, 2, 0), ("conv", 5, 2, 1, 256, 1), ("pool", 3, 2, 0),
             ("conv", 3, 1, 1, 512, 1), ("conv", 3, 1, 1, 512, 1), ("conv", 3, 1, 1, 512, 1)]
VGG16 = [("conv", 3, 1, 1, c, 1) if c else ("pool", 2, 2, 0)
         for c in (64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512)]
MOBILENET_STRIDES = [("conv", 3, 2, 1, 0, 1)] * 4  # stride-1 layers keep the size
LAYERS = dict(caffenet=CAFFENET, vgg_cnn_m_1024=VGG_CNN_M, vgg16=VGG16, mobilenet_v2=MOBILENET_STRIDES)


def caffe_size(n: int, layers: list) -> int:
    """Caffe's output size: convs round down; pools round up, minus a window that starts in the padding."""
    for kind, k, s, p, *_ in layers:
        if kind == "conv":
            n = (n + 2 * p - k) // s + 1
        else:
            out = math.ceil((n + 2 * p - k) / s) + 1
            n = out - 1 if p > 0 and (out - 1) * s >= n + p else out
    return n


def conv_flops_oracle(h: int, w: int, layers: list) -> int:
    total, cin = 0, 3
    for kind, k, s, p, *rest in layers:
        h, w = caffe_size(h, [(kind, k, s, p)]), caffe_size(w, [(kind, k, s, p)])
        if kind == "conv":
            cout, groups = rest
            total += 2 * cout * (cin // groups) * k * k * h * w
            cin = cout
    return total


@pytest.fixture(scope="module")
def nets():
    """One of each, built once: tests must not change their weights (load into fresh builds instead)."""
    return {name: build_backbone(name) for name in NAMES}


# --- shapes ---


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(224, 320), (227, 301), (600, 1000), (1000, 600)])
def test_feature_map_size_matches_caffe(nets, name, size):
    h, w = size
    net = nets[name]
    # meta tensors run torch's shape logic without arithmetic, so paper-size inputs cost nothing
    meta_trunk = copy.deepcopy(net.trunk).to("meta")
    out = meta_trunk(torch.empty(1, 3, h, w, device="meta"))
    assert tuple(out.shape) == (1, net.out_channels, caffe_size(h, LAYERS[name]), caffe_size(w, LAYERS[name]))


def test_vgg16_paper_scale_gives_38x63(nets):
    # 600 -> 300 -> 150 -> 75 -> ceil(75 / 2) = 38 rows, 1000 -> 63 columns (Caffe pools round up)
    out = copy.deepcopy(nets["vgg16"].trunk).to("meta")(torch.empty(1, 3, 600, 1000, device="meta"))
    assert tuple(out.shape[2:]) == (38, 63)


@pytest.mark.parametrize("name, size", [("caffenet", (224, 320)), ("vgg_cnn_m_1024", (227, 301)),
                                        ("vgg16", (67, 99)), ("mobilenet_v2", (224, 320))])
def test_real_forward_shape(nets, name, size):
    net = nets[name]
    with torch.no_grad():
        out = net(net.normalize(torch.rand(2, 3, *size) * 255))
    h, w = (caffe_size(n, LAYERS[name]) for n in size)
    assert out.shape == (2, net.out_channels, h, w) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, channels, pool, fc6_in, fc6_out, fc7_out", [
    ("caffenet", 256, 6, 256 * 6 * 6, 4096, 4096),  # 9216, as FR's fc6 blob
    ("vgg_cnn_m_1024", 512, 6, 512 * 6 * 6, 4096, 1024),
    ("vgg16", 512, 7, 512 * 7 * 7, 4096, 4096),  # 25088, as torchvision's classifier.0
    ("mobilenet_v2", 96, 7, 96 * 7 * 7, 1024, 1024),
])  # fmt: skip
def test_channels_and_fc_shapes(nets, name, channels, pool, fc6_in, fc6_out, fc7_out):
    net = nets[name]
    assert (net.out_channels, net.pool_size, net.spatial_scale) == (channels, pool, 1 / 16)
    assert net.pooled_features == fc6_in and net.head_widths == (fc6_out, fc7_out)
    head = FastRCNN(net, 20).head  # the model builds the box head the pretrained fc6/fc7 load into
    assert head.fc6.weight.shape == (fc6_out, fc6_in) and head.fc7.weight.shape == (fc7_out, fc6_out)
    assert head.out_features == fc7_out


def test_caffe_weight_shapes(nets):
    # Caffe blob shapes (out, in / group, kh, kw): a converted .caffemodel must fit these exactly
    expected = {  # conv1..conv5
        "caffenet": [(96, 3, 11, 11), (256, 48, 5, 5), (384, 256, 3, 3), (384, 192, 3, 3), (256, 192, 3, 3)],
        "vgg_cnn_m_1024": [
            (96, 3, 7, 7), (256, 96, 5, 5), (512, 256, 3, 3), (512, 512, 3, 3), (512, 512, 3, 3),
        ],
    }
    for name, shapes in expected.items():
        got = [tuple(getattr(nets[name].trunk, f"conv{i}").weight.shape) for i in range(1, 6)]
        assert got == shapes


def test_mobilenet_fc_dim_and_aliases():
    assert build_backbone("mobilenet_v2", fc_dim=256).head_widths == (256, 256)
    assert build_backbone("mobilenet_v2", fc_dim=0).head_widths == (1024, 1024)  # config's 0 = default
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        build_backbone("resnet")
    with pytest.raises(ValueError, match="only configurable for mobilenet_v2"):
        build_backbone("S", fc_dim=512)


def test_lrn_matches_caffe_formula(nets):
    # Caffe LRN ACROSS_CHANNELS: y_c = x_c / (k + alpha / n * sum_{|c'-c| <= 2} x_c'^2)^beta, 0 past the ends
    x = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    for net, k, alpha in ((nets["caffenet"], 1.0, 1e-4), (nets["vgg_cnn_m_1024"], 2.0, 5e-4)):
        expected = torch.empty_like(x)
        for c in range(7):
            window = x[:, max(c - 2, 0) : c + 3]
            expected[:, c] = x[:, c] / (k + alpha / 5 * (window**2).sum(1)) ** 0.75
        torch.testing.assert_close(net.trunk.norm1(x), expected)


# --- normalisation ---


def test_normalize_both_formats():
    net = build_backbone("mobilenet_v2")
    image = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)  # R, G, B
    tv = net.normalize(image)[0, :, 0, 0]
    expected = [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225]
    torch.testing.assert_close(tv, torch.tensor(expected))
    net.pixel_format = "caffe"  # BGR order, minus FR's PIXEL_MEANS
    torch.testing.assert_close(net.normalize(image)[0, :, 0, 0],
                               torch.tensor([30 - 102.9801, 20 - 115.9465, 10 - 122.7717]))
    with pytest.raises(ValueError, match=r"\(3, 2, 2\)"):
        net.normalize(image[0])


# --- freezing ---


def test_frozen_layers_flags(nets):
    frozen = {name for name, p in nets["vgg16"].named_parameters() if not p.requires_grad}
    assert frozen == {f"trunk.{i}.{t}" for i in (0, 2, 5, 7) for t in ("weight", "bias")}  # conv1_1..conv2_2
    frozen = {name for name, p in nets["caffenet"].named_parameters() if not p.requires_grad}
    assert frozen == {"trunk.conv1.weight", "trunk.conv1.bias"}


@pytest.mark.parametrize("name", ["vgg_cnn_m_1024", "mobilenet_v2"])
def test_frozen_layers_get_no_gradient(nets, name):
    trunk = nets[name].trunk
    try:
        trunk.train()
        trunk(torch.randn(1, 3, 64, 64)).square().sum().backward()
        for pname, p in trunk.named_parameters():
            stem = pname.split(".")[0] in ("conv1", "0", "1")  # M's conv1, MobileNetV2's features.0-1
            is_bn = isinstance(trunk.get_submodule(pname.rsplit(".", 1)[0]), FrozenBatchNorm2d)
            assert p.requires_grad == (not stem and not is_bn), pname
            assert (p.grad is None) == (stem or is_bn), pname
    finally:
        trunk.zero_grad(set_to_none=True)  # leave the shared fixture as it was


def test_mobilenet_batchnorm_stays_in_eval_mode():
    net = build_backbone("mobilenet_v2")
    for m in net.modules():  # non-trivial statistics, so using batch statistics would change the output
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 48, 64)
    net.eval()
    eval_out = net(x)
    net.train()
    assert all(not m.training for m in net.modules() if isinstance(m, FrozenBatchNorm2d))
    torch.testing.assert_close(net(x), eval_out)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # running stats untouched



def unfolded_forward(trunk: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """MobileNetV2 the textbook way, every conv, BN and ReLU6 a separate step (no folding), as an oracle."""
    def run(seq, y):
        for m in seq:
            y = m(y)  # Conv2d, FrozenBatchNorm2d and ReLU6 modules called one by one
        return y

    x = run(trunk[0], x)
    for block in trunk[1:]:
        y = x
        for layer in block.conv:
            y = run(layer, y) if isinstance(layer, torch.nn.Sequential) else layer(y)
        x = x + y if block.use_residual else y
    return x


def test_mobilenet_folded_batchnorm_matches_unfolded_oracle():
    torch.manual_seed(0)
    net = build_backbone("mobilenet_v2")
    net.freeze(("0", "1", "2"))
    for m in net.modules():  # statistics far from the identity, so a wrong fold shows
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    net = net.double()
    ours = net.trunk(x)
    expected = unfolded_forward(net.trunk, x)
    torch.testing.assert_close(ours, expected)
    # the gradient reaches the convs' own weights as without folding; frozen layers get none
    g = torch.randn_like(ours)
    trained = [p for p in net.trunk.parameters() if p.requires_grad]
    ours_grads = torch.autograd.grad(ours, trained, g)
    expected_grads = torch.autograd.grad(expected, trained, g)
    for a, b in zip(ours_grads, expected_grads):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in net.trunk[:3].parameters())


# --- FLOPs ---


@pytest.mark.parametrize("name, size", [("vgg16", (224, 224)), ("vgg16", (600, 1000)),
                                        ("caffenet", (227, 227)), ("vgg_cnn_m_1024", (600, 800))])
def test_trunk_flops_match_layer_oracle(nets, name, size):
    assert trunk_flops(nets[name], *size) == conv_flops_oracle(*size, LAYERS[name])


def test_vgg16_flops_match_published_count(nets):
    # VGG16's 13 convs at 224x224: 15.35 G multiply-adds (the usual published figure, pool5 has no MACs)
    assert abs(trunk_flops(nets["vgg16"], 224, 224) / 2 - 15.35e9) < 0.01e9


def test_fc_flops_before_and_after_svd(nets):
    assert fc_flops(FastRCNN(nets["vgg16"], 20).head) == 2 * (25088 * 4096 + 4096 * 4096)
    small = svd_compress(FastRCNN(build_backbone("mobilenet_v2", fc_dim=64), 3), fc6_rank=32, fc7_rank=16)
    assert fc_flops(small.head) == 2 * (4704 * 32 + 32 * 64 + 64 * 16 + 16 * 64)
