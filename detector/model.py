"""FastRCNN: conv trunk -> RoI max pooling -> box head (fc6 -> fc7) -> softmax classifier and box regressor.

Paper §2 (Fig. 1): the whole image goes through the conv layers once; each RoI is max-pooled from the last conv map
into a fixed grid (our Triton kernel), then two fc layers feed two sibling outputs. The multi-task loss (Eq. 1) is
softmax log loss plus smooth-L1 on the true class's box deltas, both normalised by the number of RoIs (FR's Caffe
layers divide by R, fast_rcnn.md §2). `build_model` makes one from a backbone name and an ImageNet weights file.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detector.backbones import Backbone, build_backbone, he_init
from detector.weights import load_weights
from kernels import RoIPool, smooth_l1_loss


class BoxHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout on pooled RoIs (torchvision's TwoMLPHead, with Caffe's
    dropout). svd.py replaces fc6 / fc7 by their two-layer factorisations; the forward pass stays this one."""

    def __init__(self, in_features: int, fc6_out: int, fc7_out: int):
        super().__init__()
        # skip_init: he_init below sets the weights; skip nn.Linear's own init (100M numbers in VGG16's fc6)
        self.fc6 = nn.utils.skip_init(nn.Linear, in_features, fc6_out)
        self.fc7 = nn.utils.skip_init(nn.Linear, fc6_out, fc7_out)
        self.dropout = nn.Dropout(0.5)  # Caffe's dropout is inverted too: scaled at train time, identity at test
        he_init(self)

    @property
    def out_features(self) -> int:
        return self.widths[1]

    @property
    def widths(self) -> tuple[int, int]:
        """(fc6, fc7) output widths, whether or not the layers are SVD-factored."""
        return _out_features(self.fc6), _out_features(self.fc7)

    def forward(self, pooled: Tensor) -> Tensor:
        """(R, C, P, P) pooled RoIs -> (R, fc7 width)."""
        x = self.dropout(F.relu(self.fc6(pooled.flatten(1))))
        return self.dropout(F.relu(self.fc7(x)))


def _out_features(layer: nn.Module) -> int:
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]  # a Linear, or its SVD factors
    return linears[-1].out_features


class FastRCNN(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, head_widths: tuple[int, int] | None = None):
        """num_classes: object classes K, without background; the outputs have K + 1 columns (0 = background).

        head_widths: (fc6, fc7) outputs; default the backbone's (the paper's nets: what their weights hold).
        """
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.roi_pool = RoIPool(backbone.pool_size, backbone.spatial_scale)
        self.head = BoxHead(backbone.pooled_features, *(head_widths or backbone.head_widths))
        self.cls_score = nn.Linear(self.head.out_features, num_classes + 1)
        self.bbox_pred = nn.Linear(self.head.out_features, 4 * (num_classes + 1))
        # FR train.prototxt: new layers are Gaussian with std 0.01 (cls_score) and 0.001 (bbox_pred), biases 0.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        # Regression targets are normalised per class during training (fast_rcnn.md §4); the statistics are kept so
        # that `folded_state_dict` can fold them into bbox_pred and saved models output raw deltas.
        self.register_buffer("bbox_means", torch.zeros(num_classes + 1, 4))
        self.register_buffer("bbox_stds", torch.ones(num_classes + 1, 4))

    def features(self, images: Tensor, start: int = 0) -> Tensor:
        """Conv feature map of normalised images (N, 3, H, W), or of trunk layer start - 1's output."""
        return self.backbone(images, start)

    def predict(self, features: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """(R, 5) rois in input-image pixels -> class logits (R, K+1) and normalised box deltas (R, 4(K+1))."""
        x = self.head(self.roi_pool(features, rois))
        return self.cls_score(x), self.bbox_pred(x)

    def forward(self, images: Tensor, rois: Tensor, targets: dict | None = None, start: int = 0):
        """images (N, 3, H, W) normalised; rois (R, 5) (batch index, x1, y1, x2, y2) in the images' pixels.

        With targets ({"labels" (R,), "bbox_targets" (R, 4(K+1)), "bbox_weights" (R, 4(K+1))}) returns the loss
        dict; without, the softmax probabilities (R, K+1) and raw box deltas (R, 4(K+1)). start > 0: `images` is
        trunk layer start - 1's output (frozen_features.py), not images.
        """
        scores, deltas = self.predict(self.features(images, start), rois)
        if targets is None:
            return F.softmax(scores, dim=1), self.unnormalize(deltas)
        return self.loss(scores, deltas, targets)

    def loss(self, scores: Tensor, deltas: Tensor, targets: dict) -> dict:
        if scores.shape[0] == 0:
            # No RoI in the minibatch (images without proposals and objects): a zero loss that still reaches every
            # parameter, so the step runs (with zero gradients) on every process; cross_entropy's mean would be NaN.
            zero = scores.sum() * 0 + deltas.sum() * 0
            return {"loss_cls": zero, "loss_box": zero}
        num_rois = scores.shape[0]
        loss_cls = F.cross_entropy(scores, targets["labels"])  # mean over the R RoIs (SoftmaxWithLoss, normalize)
        # Caffe's SmoothL1Loss: sum over all RoIs and coordinates, divided by R (not by the foreground count);
        # the 0/1 weights switch off background RoIs and the other classes' columns (Eq. 2-3, sigma = 1).
        loss_box = smooth_l1_loss(deltas, targets["bbox_targets"], beta=1.0, reduction="sum",
                                  weight=targets["bbox_weights"]) / num_rois
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def unnormalize(self, deltas: Tensor) -> Tensor:
        """Raw deltas from normalised ones: the inverse of the training-time target normalisation."""
        return deltas * self.bbox_stds.flatten() + self.bbox_means.flatten()

    def set_target_stats(self, means: Tensor, stds: Tensor) -> None:
        self.bbox_means.copy_(torch.as_tensor(means, dtype=torch.float32))
        self.bbox_stds.copy_(torch.as_tensor(stds, dtype=torch.float32))

    def folded_state_dict(self) -> dict:
        """State dict whose bbox_pred outputs raw deltas (FR train.py snapshot): W' = W * std, b' = b * std + mean.

        The buffers become the identity (means 0, stds 1) so that a model loaded from it decodes the same boxes.
        """
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        stds, means = self.bbox_stds.flatten(), self.bbox_means.flatten()
        state["bbox_pred.weight"] = state["bbox_pred.weight"] * stds[:, None]
        state["bbox_pred.bias"] = state["bbox_pred.bias"] * stds + means
        state["bbox_means"] = torch.zeros_like(self.bbox_means)
        state["bbox_stds"] = torch.ones_like(self.bbox_stds)
        return state


def build_model(backbone: str, num_classes: int, weights: str = "", fc_dim: int = 0, freeze: str = "",
                log=print) -> FastRCNN:
    """A FastRCNN on the named backbone, with an ImageNet weights file loaded into its trunk (and fc6/fc7 where
    the file has them), and the paper's frozen layers (or `freeze`, comma-separated trunk layers, instead).

    Args:
        backbone: caffenet, vgg_cnn_m_1024, vgg16 or mobilenet_v2 (build_backbone).
        num_classes: object classes, without background.
        weights: a weights file (weights.py formats); empty: random initialisation.
        fc_dim: box-head width for mobilenet_v2 (0: its default).
    """
    net = build_backbone(backbone, fc_dim=fc_dim or None)
    model = FastRCNN(net, num_classes)
    if weights:
        load_weights(model, weights)
        log(f"weights: {weights} (input normalisation: {net.pixel_format})")
    net.freeze(tuple(name.strip() for name in freeze.split(",")) if freeze else None)
    return model


def param_groups(model: nn.Module, weight_decay: float, bias_lr_mult: float) -> list[dict]:
    """SGD groups as the prototxts set them: weights lr x1 with decay, biases lr x2 with no decay; frozen excluded."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith(".bias") else weights).append(p)
    return [
        {"params": weights, "lr_mult": 1.0, "weight_decay": weight_decay},
        {"params": biases, "lr_mult": bias_lr_mult, "weight_decay": 0.0},
    ]
