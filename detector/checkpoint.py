"""Checkpoints: the one definition of the files train.py writes (checkpoint.pt while training, final.pt at the end)
and eval.py, `--resume` and `Detector.from_checkpoint` read.

A checkpoint is a dict of tensors and plain values (read back with torch.load(weights_only=True): nothing in it
runs):
    format_version  FORMAT_VERSION
    model_description  everything needed to rebuild the network without its ImageNet weights file:
                    backbone name, number of classes, input normalisation (pixel_format), box-head widths
                    (fc6, fc7) and the truncated-SVD ranks of a compressed head (None when whole)
    model           the state dict; in final.pt the target normalisation is folded into bbox_pred (FR's
                    snapshot), in checkpoint.pt it is kept in the bbox_means / bbox_stds buffers
    classes         the class names, label k = classes[k - 1]
    config          the run's configuration (detector.config.Config as a dict)
    data_root       the data set trained on
    training        None in final.pt; for --resume: iteration, optimizer state, world size and, per rank, the
                    batch loader's state and the CPU / CUDA random-number generator states
"""

from detector.errors import InputError
from detector.model import FastRCNN
from detector.backbones import build_backbone
from detector.svd import head_ranks, svd_compress
from detector.torchfile import UnsafeFileError, key_mismatch, read_torch_file, write_torch_file

FORMAT_VERSION = 2
_KEYS = {"format_version", "model_description", "model", "classes", "config", "data_root", "training"}


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def describe_model(model: FastRCNN) -> dict:
    """The model_description entry: what rebuilds `model`'s architecture and input normalisation."""
    ranks = head_ranks(model)
    return {"backbone": model.backbone.name, "num_classes": model.num_classes,
            "pixel_format": model.backbone.pixel_format, "head_widths": list(model.head.widths),
            "svd_ranks": list(ranks) if ranks else None}


def save_checkpoint(path: str, model: FastRCNN, classes: list[str], config: dict, data_root: str,
                    folded: bool, training: dict | None = None) -> None:
    """Write a checkpoint atomically (detector.torchfile.write_torch_file).

    Args:
        folded: fold the target normalisation into bbox_pred (final models) or keep it in the buffers (resume).
        training: the training state for --resume (module docstring), None for a final model.
    """
    state = model.folded_state_dict() if folded else model.state_dict()
    write_torch_file({"format_version": FORMAT_VERSION, "model_description": describe_model(model),
                      "model": state, "classes": list(classes), "config": dict(config), "data_root": data_root,
                      "training": training}, path)


def read_checkpoint(path: str) -> dict:
    """The checkpoint in `path`, checked; raises CheckpointError with a message naming the file and the problem."""
    try:
        ckpt = read_torch_file(path, "checkpoint")
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(ckpt, dict) or not {"config", "classes", "model"} <= set(ckpt):
        raise CheckpointError(f"checkpoint {path} is not a Fast R-CNN checkpoint of this project (no config, "
                              "classes and model entries)")
    version = ckpt.get("format_version")
    if version is None:
        raise CheckpointError(
            f"checkpoint {path} was written by an earlier version of this project (before checkpoint format "
            f"{FORMAT_VERSION}), which did not record the model's input normalisation, so it cannot be evaluated "
            "reliably; train again with this version")
    if version != FORMAT_VERSION or not _KEYS <= set(ckpt):
        raise CheckpointError(f"checkpoint {path} has format {version!r} with entries {sorted(ckpt)}; this "
                              f"version reads format {FORMAT_VERSION} ({sorted(_KEYS)})")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str) -> FastRCNN:
    """The network a checkpoint describes, with its weights loaded (on the CPU, in training mode)."""
    desc = ckpt["model_description"]
    try:
        backbone = build_backbone(desc["backbone"])
        backbone.pixel_format = desc["pixel_format"]
        model = FastRCNN(backbone, int(desc["num_classes"]), head_widths=tuple(desc["head_widths"]))
        if desc["svd_ranks"]:
            model = svd_compress(model, *desc["svd_ranks"], exact=False)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its model_description {desc} cannot be built ({e})") from None
    if len(ckpt["classes"]) != model.num_classes:
        raise CheckpointError(f"checkpoint {path}: {len(ckpt['classes'])} class names for a "
                              f"{model.num_classes}-class model")
    problems = key_mismatch(model.state_dict(), ckpt["model"])
    if problems:  # checked first: load_state_dict would raise a traceback on shapes
        raise CheckpointError(f"checkpoint {path} does not fit its own description {desc}: {problems}")
    model.load_state_dict(ckpt["model"])
    return model
