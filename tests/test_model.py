"""FastRCNN: loss normalisation, folding of the target normalisation, frozen layers, SGD groups, SVD."""

import torch
import torch.nn.functional as F

from detector.backbones import build_backbone
from detector.model import FastRCNN, param_groups
from detector.svd import svd_compress

NUM_CLASSES = 3


def tiny_model() -> FastRCNN:
    torch.manual_seed(0)
    model = FastRCNN(build_backbone("mobilenet_v2", fc_dim=64), NUM_CLASSES)
    model.backbone.freeze()
    return model


def inputs():
    images = torch.randn(2, 3, 64, 80)
    rois = torch.tensor([[0, 0, 0, 40, 30], [0, 10, 5, 70, 60], [1, 3, 3, 20, 20], [1, 30, 10, 79, 63]], dtype=torch.float)
    return images, rois


def test_loss_is_caffe_normalised():
    model = tiny_model().eval()
    images, rois = inputs()
    labels = torch.tensor([1, 0, 3, 2])
    targets = torch.randn(4, 4 * (NUM_CLASSES + 1))
    weights = torch.zeros_like(targets)
    for r, c in enumerate(labels.tolist()):
        if c > 0:
            weights[r, 4 * c:4 * c + 4] = 1
    losses = model(images, rois, {"labels": labels, "bbox_targets": targets, "bbox_weights": weights})
    scores, deltas = model.predict(model.features(images), rois)
    # Independent formulas: mean log loss over R RoIs; smooth-L1 (beta 1) on the true class's 4 columns, / R.
    expected_cls = -torch.log_softmax(scores, 1)[torch.arange(4), labels].mean()
    d = (deltas - targets) * weights
    elementwise = torch.where(d.abs() < 1, 0.5 * d**2, d.abs() - 0.5)
    torch.testing.assert_close(losses["loss_cls"], expected_cls)
    torch.testing.assert_close(losses["loss_box"], elementwise.sum() / 4)
    torch.testing.assert_close(losses["loss_box"], (F.smooth_l1_loss(deltas, targets, reduction="none") * weights).sum() / 4)


def test_folded_model_decodes_the_same_boxes():
    model = tiny_model().eval()
    means = torch.randn(NUM_CLASSES + 1, 4) * 0.1
    stds = torch.rand(NUM_CLASSES + 1, 4) + 0.1
    model.set_target_stats(means, stds)
    images, rois = inputs()
    probs, deltas = model(images, rois)
    folded = tiny_model().eval()
    folded.load_state_dict(model.folded_state_dict())
    probs2, deltas2 = folded(images, rois)
    torch.testing.assert_close(probs2, probs)
    torch.testing.assert_close(deltas2, deltas, rtol=1e-5, atol=1e-6)
    # The folded model's bbox_pred alone outputs raw deltas: no normalisation left in the buffers.
    assert torch.equal(folded.bbox_stds, torch.ones_like(folded.bbox_stds))


def test_frozen_layers_stay_frozen():
    model = tiny_model().train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    assert frozen, "the backbone freezes its first layers"
    images, rois = inputs()
    opt = torch.optim.SGD(param_groups(model, 5e-4, 2.0), lr=0.1, momentum=0.9)
    labels = torch.tensor([1, 0, 3, 2])
    targets = torch.randn(4, 4 * (NUM_CLASSES + 1))
    for _ in range(2):
        losses = model(images, rois, {"labels": labels, "bbox_targets": targets, "bbox_weights": torch.ones_like(targets)})
        opt.zero_grad()
        (losses["loss_cls"] + losses["loss_box"]).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    for n, b in model.named_buffers():
        if n in buffers:
            assert torch.equal(b, buffers[n]), f"batch-norm statistics {n} changed in train mode"


def test_param_groups_follow_the_prototxt():
    model = tiny_model()
    weights, biases = param_groups(model, 5e-4, 2.0)
    assert weights["lr_mult"] == 1 and weights["weight_decay"] == 5e-4
    assert biases["lr_mult"] == 2 and biases["weight_decay"] == 0
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in weights["params"] + biases["params"]} == trainable


def test_svd_model_stays_close_to_the_full_model():
    model = tiny_model().eval()
    # Trained fc layers have fast-decaying spectra (why truncation costs the paper only 0.3 mAP); give these
    # random ones that shape: rank 16 plus a small full-rank remainder.
    with torch.no_grad():
        for fc in (model.head.fc6, model.head.fc7):
            out_f, in_f = fc.weight.shape
            low = torch.randn(out_f, 16) @ torch.randn(16, in_f) / in_f**0.5
            fc.weight.copy_(low + 1e-5 * torch.randn(out_f, in_f))
    images, rois = inputs()
    probs, deltas = model(images, rois)
    small = svd_compress(model, fc6_rank=16, fc7_rank=16)
    assert isinstance(small.head.fc6, torch.nn.Sequential) and small.head.fc6[0].out_features == 16
    p2, d2 = small(images, rois)
    torch.testing.assert_close(p2, probs, rtol=0, atol=2e-3)
    torch.testing.assert_close(d2, deltas, rtol=0, atol=2e-3)


def test_freeze_replaces_the_papers_frozen_set():
    backbone = build_backbone("mobilenet_v2", fc_dim=32)  # the paper's choice applied: blocks 0 and 1 frozen
    backbone.freeze(("2", "3"))
    trunk = backbone.trunk
    assert all(p.requires_grad for n, p in trunk[0].named_parameters() if p.ndim == 4)  # block 0 trains again
    assert not any(p.requires_grad for p in trunk[2].parameters())
    assert not any(p.requires_grad for p in trunk[4].parameters() if p.ndim == 1)  # batch norm stays frozen
