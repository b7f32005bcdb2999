"""Truncated SVD of fc layers: exact at full rank, the Eckart-Young error, swapping fc6/fc7 in a model."""

import pytest
import torch
from torch import nn

from detector.svd import compress_linear, head_ranks, param_count, svd_compress


def low_rank_linear(in_features: int, out_features: int, rank: int) -> nn.Linear:
    """A Linear whose weight has exactly `rank` (a product of two thin random matrices), and a random bias."""
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, rank) @ torch.randn(rank, in_features) / rank**0.5)
    return layer


class Model(nn.Module):
    """A stand-in for FastRCNN: a conv backbone, a box head with fc6/fc7, and a classifier."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 3, 1)
        self.head = nn.Module()
        self.head.fc6 = low_rank_linear(12, 10, rank=4)
        self.head.fc7 = low_rank_linear(10, 8, rank=3)
        self.cls_score = nn.Linear(8, 3)

    def forward(self, x):
        return self.cls_score(torch.relu(self.head.fc7(torch.relu(self.head.fc6(x)))))


def test_full_rank_is_exact():
    layer = nn.Linear(7, 5)
    small = compress_linear(layer, rank=5)
    first, second = small  # Linear(in, rank, no bias), Linear(rank, out), nothing between (FR fc6_L, fc6_U)
    assert len(small) == 2 and first.bias is None
    assert first.weight.shape == (5, 7) and second.weight.shape == (5, 5)
    assert torch.equal(second.bias, layer.bias)
    x = torch.randn(4, 7)
    torch.testing.assert_close(small(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape, rank", [((30, 50), 10), ((50, 30), 1), ((17, 17), 16)])
def test_truncation_error_is_the_dropped_singular_values(seed, shape, rank):
    torch.manual_seed(seed)
    out_features, in_features = shape
    layer = nn.Linear(in_features, out_features, dtype=torch.float64)
    small = compress_linear(layer, rank)
    approx = small[1].weight @ small[0].weight  # U_t (Sigma_t V_t^T), (out, in)
    # Eckart-Young: ||W - W_t||_F^2 = sum of the dropped s_i^2; s_i^2 = eigenvalues of W W^T (no SVD used)
    s_squared = torch.linalg.eigvalsh(layer.weight @ layer.weight.T).flip(0)[: min(shape)]
    torch.testing.assert_close((layer.weight - approx).square().sum(), s_squared[rank:].sum())
    # the bias is carried over, so outputs differ exactly by the dropped part of W
    x = torch.randn(6, in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x) - small(x), x @ (layer.weight - approx).T)


def test_dtype_kept_and_bad_rank_rejected():
    layer = nn.Linear(8, 6)
    assert compress_linear(layer, 3)[0].weight.dtype == torch.float32
    for rank in (0, 7):
        with pytest.raises(ValueError, match=r"rank must be in \[1, min\(in, out\) = 6\]"):
            compress_linear(layer, rank)


def test_svd_compress_swaps_only_fc6_fc7():
    model = Model()
    x = torch.randn(5, 12)
    compressed = svd_compress(model, fc6_rank=4, fc7_rank=3)  # the weights' exact ranks: no truncation error
    head = compressed.head
    assert isinstance(model.head.fc6, nn.Linear) and isinstance(model.head.fc7, nn.Linear)  # original untouched
    assert isinstance(head.fc6, nn.Sequential) and head.fc6[0].out_features == 4
    assert isinstance(head.fc7, nn.Sequential) and head.fc7[0].out_features == 3
    assert head_ranks(compressed) == (4, 3) and head_ranks(model) is None
    for name in ("cls_score.weight", "cls_score.bias", "backbone.weight", "backbone.bias"):
        assert torch.equal(compressed.state_dict()[name], model.state_dict()[name])
        assert compressed.get_parameter(name) is not model.get_parameter(name)  # a copy, not shared
    torch.testing.assert_close(compressed(x), model(x), atol=1e-5, rtol=1e-5)
    # paper §3.1: u*v weights become t*(u+v); biases stay
    assert param_count(model) - param_count(compressed) == (12 * 10 - 4 * 22) + (10 * 8 - 3 * 18)


def test_svd_compress_skips_useless_ranks_and_shapes_only():
    model = Model()
    with pytest.warns(UserWarning, match=r"fc7 rank 8 >= min\(8, 10\): left uncompressed"):
        compressed = svd_compress(model, fc6_rank=5, fc7_rank=8)
    assert isinstance(compressed.head.fc6, nn.Sequential)
    assert isinstance(compressed.head.fc7, nn.Linear)
    assert torch.equal(compressed.head.fc7.weight, model.head.fc7.weight)
    assert head_ranks(compressed) == (5, 0)
    with pytest.raises(ValueError, match="not a Linear"):
        svd_compress(compressed, fc6_rank=2, fc7_rank=2)
    # exact=False: the factor layers' shapes (for loading a compressed checkpoint), the same state-dict keys
    shaped = svd_compress(model, fc6_rank=4, fc7_rank=0, exact=False)
    exact = svd_compress(model, fc6_rank=4, fc7_rank=0)
    assert {k: v.shape for k, v in shaped.state_dict().items()} == {k: v.shape for k, v in exact.state_dict().items()}
