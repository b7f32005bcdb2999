"""Reference implementations the tests compare the library with: written out scalar by scalar, independent of it."""


def iou_loop(a, b) -> float:
    """VOC devkit overlap of two (x1, y1, x2, y2) boxes with inclusive pixels: area = (x2 - x1 + 1)(y2 - y1 + 1)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - iw * ih
    return iw * ih / union
