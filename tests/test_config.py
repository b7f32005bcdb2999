"""Presets, command-line overrides and the learning-rate schedule."""

import argparse

import pytest

from detector.config import PRESETS, Config, UsageError, build_parser, resolve
from train import lr_at


def parse(*argv: str) -> Config:
    return resolve(build_parser("test").parse_args(list(argv)))


def test_paper_defaults():
    cfg = parse("--preset", "voc07_vgg16")
    # FR config.py and solver.prototxt: 2 images x 64 RoIs, 25% fg, lr 0.001 stepped at 30k of 40k.
    assert (cfg.ims_per_batch, cfg.rois_per_batch, cfg.fg_fraction) == (2, 128, 0.25)
    assert (cfg.lr, cfg.lr_steps, cfg.iters, cfg.momentum, cfg.weight_decay) == (0.001, (30000,), 40000, 0.9, 0.0005)
    assert (cfg.scales, cfg.max_size, cfg.nms) == ((600,), 1000, 0.3)


def test_overrides_win_over_presets():
    cfg = parse("--preset", "demo", "--lr", "0.5", "--scales", "480,576", "--use-flipped", "no", "--iters", "7")
    assert (cfg.lr, cfg.scales, cfg.use_flipped, cfg.iters) == (0.5, (480, 576), False, 7)
    assert cfg.backbone == PRESETS["demo"]["backbone"]
    assert cfg.out == "runs/demo"


@pytest.mark.parametrize("args, message", [
    (("--iters", "many"), "--iters 'many': invalid literal"),
    (("--preset", "nope"), "--preset 'nope' is unknown"),
    (("--iters", "0"), "--iters 0: must be at least 1"),
    (("--lr", "-0.1"), "--lr -0.1: must be positive"),
    (("--fg-fraction", "2"), "--fg-fraction 2.0: must be in [0, 1]"),
    (("--scales", "0,600"), "--scales (0, 600): must be one or more positive sizes"),
    (("--use-flipped", "maybe"), "--use-flipped 'maybe': expected true or false"),
    (("--bg-thresh-lo", "0.6"), "--bg-thresh-lo 0.6 is above --bg-thresh-hi 0.5"),
    (("--train-proposals", "boxes.npy"), "--train-proposals 'boxes.npy': must be fast, quality or a .mat file"),
])
def test_bad_values_are_named(args, message):
    with pytest.raises(UsageError) as err:
        parse(*args)
    assert message in str(err.value)


def test_resume_base_config():
    base = vars(parse("--preset", "demo", "--lr", "0.3"))
    cfg = resolve(argparse.Namespace(iters="9"), base={**base, "scales": [384]})
    assert (cfg.lr, cfg.iters, cfg.scales) == (0.3, 9, (384,))


def test_step_schedule_with_warmup():
    cfg = Config(lr=0.01, lr_steps=(10, 20), gamma=0.1, warmup_iters=4)
    assert lr_at(cfg, 0) == pytest.approx(0.0025)
    assert lr_at(cfg, 3) == pytest.approx(0.01)
    assert lr_at(cfg, 9) == pytest.approx(0.01)
    assert lr_at(cfg, 10) == pytest.approx(0.001)
    assert lr_at(cfg, 25) == pytest.approx(0.0001)
