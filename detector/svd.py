"""Truncated SVD of fc6 and fc7 for faster detection (paper §3.1, FR tools/compress_net.py).

A u x v weight W is approximated by U_t diag(s_t) V_t^T, keeping the t largest singular values. The layer
becomes two: Linear(v, t, no bias) with weight diag(s_t) V_t^T, then Linear(t, u) with weight U_t and the
original bias, with no nonlinearity between them. Parameters drop from uv to t(u + v); the paper uses t = 1024
for fc6 and 256 for fc7 on all three nets, with no fine-tuning afterwards (-0.3 mAP, >30% faster on VGG16,
paper Fig. 2).
"""

import copy
import warnings

import torch
from torch import nn


def compress_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Rank-`rank` factorisation of `layer` as Sequential(Linear(in, rank, bias=False), Linear(rank, out)).

    Args:
        layer: Linear with weight (out, in).
        rank: singular values kept, 1 <= rank <= min(in, out); min(in, out) reproduces the layer exactly.
    """
    out_features, in_features = layer.weight.shape
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(f"rank must be in [1, min(in, out) = {min(in_features, out_features)}], got {rank}")
    weight = layer.weight.detach()
    # float64: the dropped tail of a 4096 x 25088 matrix is small, and fp32 SVD error would blur it.
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)  # (out, k), (k,), (k, in)
    first = nn.Linear(in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
    has_bias = layer.bias is not None
    second = nn.Linear(rank, out_features, bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        first.weight.copy_(s[:rank, None] * vh[:rank])  # FR fc6_L: Sigma_t V_t^T, (rank, in)
        second.weight.copy_(u[:, :rank])  # FR fc6_U: U_t, (out, rank)
        if has_bias:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


def _factors(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Sequential(Linear(in, rank, no bias), Linear(rank, out)) with compress_linear's shapes, values unset."""
    first = nn.utils.skip_init(nn.Linear, layer.in_features, rank, bias=False)
    second = nn.utils.skip_init(nn.Linear, rank, layer.out_features, bias=layer.bias is not None)
    return nn.Sequential(first, second)


def svd_compress(model: nn.Module, fc6_rank: int = 1024, fc7_rank: int = 256, exact: bool = True) -> nn.Module:
    """A deep copy of `model` (a FastRCNN) with its box head's fc6 and fc7 replaced by truncated-SVD factors.

    A rank >= min(in, out) saves nothing, so that layer is left as is (with a warning that says so).

    Args:
        model: a model.FastRCNN, or anything whose `.head` has Linear layers fc6 and fc7.
        fc6_rank, fc7_rank: singular values kept (paper: 1024 and 256); 0 leaves that layer whole.
        exact: False gives the factor layers' shapes with uninitialised values, for loading a compressed
            checkpoint's weights into, or for timing (a float64 SVD of VGG16's fc6 takes minutes on 2 cores).
    """
    compressed = copy.deepcopy(model)
    for name, rank in (("fc6", fc6_rank), ("fc7", fc7_rank)):
        layer = getattr(compressed.head, name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"head.{name} is a {type(layer).__name__}, not a Linear (already compressed?)")
        if rank == 0:
            continue
        if rank >= min(layer.in_features, layer.out_features):
            warnings.warn(f"svd: {name} rank {rank} >= min{tuple(layer.weight.shape)}: left uncompressed")
            continue
        small = compress_linear(layer, rank) if exact else _factors(layer, rank).to(layer.weight.device)
        setattr(compressed.head, name, small)
    return compressed


def head_ranks(model: nn.Module) -> tuple[int, int] | None:
    """(fc6 rank, fc7 rank) of an SVD-compressed box head (0 for a layer left whole), None if not compressed."""
    ranks = tuple(0 if isinstance(layer, nn.Linear) else layer[0].out_features
                  for layer in (model.head.fc6, model.head.fc7))
    return None if ranks == (0, 0) else ranks


def param_count(module: nn.Module) -> int:
    """Number of parameters (shared modules counted once), e.g. for the before/after line of a report."""
    return sum(p.numel() for p in module.parameters())
