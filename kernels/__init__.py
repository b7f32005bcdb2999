"""Triton kernels for Fast R-CNN: RoI max pooling and a fused smooth-L1 loss (each with a CPU path)."""

from kernels.roi_pool import RoIPool, roi_pool
from kernels.smooth_l1 import smooth_l1_loss

__all__ = ["RoIPool", "roi_pool", "smooth_l1_loss"]
