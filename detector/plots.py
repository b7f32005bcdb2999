"""Pictures people would rather look at than read: loss curves, PR curves and images with their boxes (PNG).

The one place that sets matplotlib up: file output only (the Agg backend; the machines have no display).
Everything that draws imports `plt` from here.
"""

import csv
import math
import zlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_loss_curve(csv_path: str, png_path: str) -> None:
    """Plot the columns `loss`, `loss_cls`, `loss_box` of a training metrics CSV against `iter`."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    iters = [int(r["iter"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "loss_cls", "loss_box"):
        if key in rows[0]:
            ax.plot(iters, [float(r[key]) for r in rows], label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (mean over the last log window)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: list[str], scores: np.ndarray, path: str) -> None:
    """One image (HxWx3 uint8 RGB) at its own resolution with its boxes, labels and scores, as a PNG."""
    height, width = image.shape[:2]
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    ax.imshow(image)
    _draw_boxes(ax, boxes, labels, scores, fontsize=max(6, min(width, height) / 60))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _draw_boxes(ax, boxes: np.ndarray, labels: list[str], scores: np.ndarray | None, fontsize: float = 6) -> None:
    colours = plt.get_cmap("tab10")
    for j, (x1, y1, x2, y2) in enumerate(np.asarray(boxes).reshape(-1, 4)):
        name = labels[j]
        colour = colours(zlib.crc32(name.encode()) % 10)  # stable across runs
        # +1: boxes are inclusive pixel ranges (VOC convention), so a box covers x2 - x1 + 1 pixels.
        ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1, fill=False, lw=1.5,
                                   edgecolor=colour))
        text = name if scores is None else f"{name} {scores[j]:.2f}"
        ax.text(x1, y1 - 2, text, fontsize=fontsize, color="white", va="bottom",
                bbox=dict(facecolor=colour, alpha=0.8, pad=1, lw=0))


def draw_boxes_sheet(
    images: list[np.ndarray],
    boxes: list[np.ndarray],
    labels: list[list[str]],
    path: str,
    scores: list[np.ndarray] | None = None,
    ncols: int = 4,
) -> None:
    """Draw images (HxWx3 uint8 RGB) with their 0-based (x1, y1, x2, y2) boxes and labels on one PNG sheet."""
    n = len(images)
    if n == 0:
        return
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i])
        _draw_boxes(ax, boxes[i], labels[i], None if scores is None else scores[i])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pr_curves(pr: dict, path: str) -> None:
    """Save a grid of per-class precision-recall curves as a PNG.

    Args:
        pr: {name: (rec [D], prec [D])} as returned by voc_eval.evaluate.
        path: output .png path.
    """
    cols = max(1, math.ceil(math.sqrt(len(pr))))
    rows = max(1, math.ceil(len(pr) / cols))
    fig = plt.figure(figsize=(2.6 * cols, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, (rec, prec)) in zip(axes, pr.items()):
        ax.plot(rec, prec, lw=1.2)
        ax.set(title=name, xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.grid(alpha=0.3)
    for ax in axes[len(pr) :]:
        ax.set_axis_off()
    fig.savefig(path, dpi=100)
    plt.close(fig)
