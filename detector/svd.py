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


def svd_compress(model: nn.Module, fc6_rank: int = 1024, fc7_rank: int = 256) -> nn.Module:
    """A deep copy of `model` with fc6 and fc7 replaced by their truncated-SVD factorisations.

    The layers are found as attributes `fc6`/`fc7` of `model` (model.py's FastRCNN has them directly), else of
    `model.backbone`. Where the backbone holds the same module too, it is replaced there as well, so the copy
    keeps no stale full-rank weights. A rank >= min(in, out) saves nothing, so that layer is left as is (with
    a warning that says so).

    Args:
        model: a module with Linear attributes fc6 and fc7 (or a `backbone` that has them).
        fc6_rank, fc7_rank: singular values kept (paper: 1024 and 256).
    """
    compressed = copy.deepcopy(model)
    holder = compressed if hasattr(compressed, "fc6") else getattr(compressed, "backbone", None)
    if holder is None or not hasattr(holder, "fc7"):
        raise ValueError(f"{type(model).__name__} has no fc6/fc7 attributes (nor a backbone with them)")
    backbone = getattr(compressed, "backbone", None)
    for name, rank in (("fc6", fc6_rank), ("fc7", fc7_rank)):
        layer = getattr(holder, name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name} is a {type(layer).__name__}, not a Linear (already compressed?)")
        if rank >= min(layer.in_features, layer.out_features):
            warnings.warn(f"svd: {name} rank {rank} >= min{tuple(layer.weight.shape)}: left uncompressed")
            continue
        small = compress_linear(layer, rank)
        setattr(holder, name, small)
        if backbone is not None and backbone is not holder and getattr(backbone, name, None) is layer:
            setattr(backbone, name, small)
    return compressed


def param_count(module: nn.Module) -> int:
    """Number of parameters (shared modules counted once), e.g. for the before/after line of a report."""
    return sum(p.numel() for p in module.parameters())
