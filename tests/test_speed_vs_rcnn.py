"""Tests for bench/speed_vs_rcnn.py, speed_report.py and rcnn_baselines.py: R-CNN crop math, the stock nets, SPP
pooling, the training model, the command line and a tiny end-to-end run."""

import ast
import csv
import json
from pathlib import Path

import pytest
import torch

from bench.rcnn_baselines import (
    RCNN, SPPnet, UnitTimes, spp_pool, stock_backbone, train_estimates, warp_crops, warp_windows,
)
from bench.speed_vs_rcnn import Config, Scene, parse_args, run, spp_rois
from detector.backbones import build_backbone
from detector.model import BoxHead

# Hand-computed with rcnn_im_crop.m's steps (1-based pixels, MATLAB round = halves away from zero):
# (box 0-based x1 y1 x2 y2, image (H, W), crop_size, padding, expected src window, expected dst x0 y0 w h)
WARP_CASES = [
    # Inside the image: 100 px box, scale 227/195, centre 151 (1-based) -> 151 -+ 58.21 -> [93, 209].
    ((100, 100, 199, 199), (375, 500), 227, 16, (92, 92, 208, 208), (0, 0, 227, 227)),
    # Top-left corner: 26 -+ 29.10 -> [-3, 55], 59 px unclipped, 4 px cut -> pad round(4*227/59) = 15,
    # width round(55*227/59) = 212.
    ((0, 0, 49, 49), (375, 500), 227, 16, (0, 0, 54, 54), (15, 15, 212, 212)),
    # Bottom-right corner of a 375x500 image: x [447, 505] clipped at 500 (54 of 59 px) -> round(207.8) = 208;
    # y 338.5 -+ 43.65 -> [295, 382] -> clipped at 375 (81 of 88 px) -> round(208.9) = 209.
    ((450, 300, 499, 374), (375, 500), 227, 16, (446, 294, 499, 374), (0, 0, 208, 209)),
    # A rounding half: scale 20/10 = 2, centre 3.5 -+ 3 -> 0.5 and 6.5 round away from zero to 1 and 7
    # (round-half-even would give 0 and 6, a clipped window and a 1-pixel pad).
    ((1, 1, 3, 3), (10, 10), 20, 5, (0, 0, 6, 6), (0, 0, 20, 20)),
]


@pytest.mark.parametrize("box, image_hw, crop, pad, src, dst", WARP_CASES)
def test_warp_windows_hand_cases(box, image_hw, crop, pad, src, dst):
    got_src, got_dst = warp_windows(torch.tensor([box], dtype=torch.float32), image_hw, crop, pad)
    assert got_src[0].tolist() == list(src)
    assert got_dst[0].tolist() == list(dst)


@pytest.mark.parametrize("seed", range(3))
def test_warp_windows_properties(seed):
    # Random boxes: the window holds the box plus context, stays in the image, and lands inside the crop.
    g = torch.Generator().manual_seed(seed)
    height, width = 375, 500
    x1, y1 = torch.randint(0, width - 1, (50,), generator=g), torch.randint(0, height - 1, (50,), generator=g)
    x2 = x1 + (torch.rand(50, generator=g) * (width - x1)).long().clamp(max=width - 1 - x1)
    y2 = y1 + (torch.rand(50, generator=g) * (height - y1)).long().clamp(max=height - 1 - y1)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    src, dst = warp_windows(boxes, (height, width), 227)
    assert (src[:, :2] <= boxes[:, :2]).all() and (src[:, 2:] >= boxes[:, 2:]).all()
    assert (src[:, :2] >= 0).all() and (src[:, 2] <= width - 1).all() and (src[:, 3] <= height - 1).all()
    assert (dst[:, :2] >= 0).all() and (dst[:, 2:] >= 1).all()
    assert (dst[:, 0] + dst[:, 2] <= 227).all() and (dst[:, 1] + dst[:, 3] <= 227).all()


def test_warp_windows_rejects_bad_shapes():
    with pytest.raises(ValueError, match="boxes must be"):
        warp_windows(torch.zeros(3, 5), (10, 10), 227)
    with pytest.raises(ValueError, match="padding"):
        warp_windows(torch.zeros(1, 4), (10, 10), 20, padding=10)


def test_warp_crops_copies_pixels_at_scale_one():
    # No context, crop side = box side: every crop pixel is the image pixel under it.
    image = torch.arange(3 * 20 * 24, dtype=torch.float32).view(1, 3, 20, 24)
    src, dst = warp_windows(torch.tensor([[2.0, 3.0, 9.0, 10.0]]), (20, 24), 8, padding=0)
    crops = warp_crops(image, src, dst, 8)
    torch.testing.assert_close(crops[0], image[0, :, 3:11, 2:10])


def test_warp_crops_bilinear_upsampling_matches_imresize():
    # A ramp image (value = x) and a 2-pixel window resized to 4: MATLAB imresize(bilinear, no antialiasing)
    # samples at 3.75, 4.25, 4.75, 5.25 and replicates the edges -> 4, 4.25, 4.75, 5.
    image = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 10).expand(1, 3, 6, 10).contiguous()
    src, dst = warp_windows(torch.tensor([[4.0, 1.0, 5.0, 2.0]]), (6, 10), 4, padding=0)
    crops = warp_crops(image, src, dst, 4)
    expected = torch.tensor([4.0, 4.25, 4.75, 5.0]).expand(3, 4, 4)
    torch.testing.assert_close(crops[0], expected)


def test_warp_crops_fills_context_outside_the_image_with_the_mean():
    # The corner case of WARP_CASES: the 15-pixel band cut off by the image border is 0 (= the mean after
    # mean subtraction); the rest is the constant image.
    image = torch.full((1, 3, 375, 500), 7.0)
    src, dst = warp_windows(torch.tensor([[0.0, 0.0, 49.0, 49.0]]), (375, 500), 227)
    crops = warp_crops(image, src, dst, 227)
    assert crops.shape == (1, 3, 227, 227)
    assert (crops[0, :, :15, :] == 0).all() and (crops[0, :, :, :15] == 0).all()
    torch.testing.assert_close(crops[0, :, 15:, 15:], torch.full((3, 212, 212), 7.0))


def test_spp_pool_shapes_and_global_level():
    # 4 levels -> C * (36 + 9 + 4 + 1) values per RoI; the last C values are the 1x1 level, the max over the
    # RoI's window on the map (coordinates chosen so that x * 1/4 is not a rounding half).
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 12, 16, generator=g)
    rois = torch.tensor([[0, 0.0, 0.0, 63.0, 47.0], [1, 8.0, 4.0, 29.0, 21.0], [1, 40.0, 20.0, 41.0, 21.0]])
    pooled = spp_pool(features, rois, spatial_scale=0.25)
    assert pooled.shape == (3, 5 * 50)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        c1, r1, c2, r2 = (int(v * 0.25 + 0.5) for v in (x1, y1, x2, y2))
        window_max = features[int(b), :, r1 : r2 + 1, c1 : c2 + 1].amax(dim=(1, 2))
        torch.testing.assert_close(pooled[k, -5:], window_max)
    assert spp_pool(features, rois, 0.25, levels=(2, 1)).shape == (3, 5 * 5)


def test_spp_rois_picks_the_level_closest_to_224_squared_and_scales_the_box():
    # Image scale factors 0.5, 1, 2: a 224-px box is right at 1, a 112-px box needs 2, a 448-px box 0.5.
    boxes = torch.tensor([[0.0, 0.0, 223.0, 223.0], [0.0, 0.0, 111.0, 111.0], [0.0, 0.0, 447.0, 447.0]])
    scene = Scene(torch.zeros(1, 3, 500, 500), boxes, 1.0, [0.5, 1.0, 2.0])
    rois = spp_rois(scene, scene.pyramid)
    assert rois[:, 0].tolist() == [1, 2, 0]
    torch.testing.assert_close(rois[:, 1:], boxes * torch.tensor([1.0, 2.0, 0.5])[:, None])


def test_stock_caffenet_gives_13x13_conv5_on_a_227_crop():
    # Stock CaffeNet (conv1 pad 0, pools unpadded): 227 -> 55 -> 27 -> 13; Fast R-CNN's padded one gives 15x15.
    frcn = build_backbone("caffenet").eval()
    stock = stock_backbone(frcn)
    crop = torch.zeros(1, 3, 227, 227)
    with torch.no_grad():
        assert stock(crop).shape[-2:] == (13, 13) and frcn(crop).shape[-2:] == (15, 15)
    assert frcn.trunk.conv1.padding == (5, 5)  # the copy leaves Fast R-CNN's trunk alone
    assert stock_backbone(build_backbone("vgg16")).name == "vgg16"


def test_rcnn_pool5_feeds_the_box_head_and_rejects_other_crop_sizes():
    stock = stock_backbone(build_backbone("caffenet"))
    rcnn = RCNN(stock, BoxHead(stock.pooled_features, 32, 16), num_classes=3).eval()
    with torch.no_grad():
        scores, deltas = rcnn(torch.randn(2, 3, 227, 227))
        assert scores.shape == (2, 3) and deltas.shape == (2, 12)
        with pytest.raises(ValueError, match="crop"):
            rcnn(torch.randn(1, 3, 160, 160))  # 4x4 pool5


def test_sppnet_pools_each_window_from_its_level():
    # Two scales; the output of a window pooled at level 1 equals spp_pool on level 1's feature map.
    stock = stock_backbone(build_backbone("caffenet"))
    spp = SPPnet(stock, num_classes=3).eval()
    images = [torch.randn(1, 3, 96, 96), torch.randn(1, 3, 160, 160)]
    rois = torch.tensor([[0, 0.0, 0.0, 95.0, 95.0], [1, 16.0, 16.0, 127.0, 111.0]])
    with torch.no_grad():
        pooled = spp.pool(images, rois)
        expected = spp_pool(stock(images[1]), torch.tensor([[0, 16.0, 16.0, 127.0, 111.0]]), stock.spatial_scale)
    assert pooled.shape == (2, 256 * 50)
    torch.testing.assert_close(pooled[1:], expected)


def test_train_estimates_multiply_unit_times_by_counts():
    u = UnitTimes(proposals=2000, rcnn_step_s=1.0, rcnn_step_crops=8, rcnn_crop_conv_s=0.01, rcnn_crop_fc_s=0.001,
                  pool5_mb=74.0, spp_step_s=0.5, spp_step_windows=128, spp_pyramid_s=3.0, conv5_mb=100.0,
                  spp_head_s=2.0, frcn_step_s=2.0, frcn_step_images=2, frcn_step_rois=128)
    rows = {(e.method, e.stage): e for e in train_estimates(u, {"write_mb_s": 100.0, "read_mb_s": 200.0})}
    assert rows["R-CNN", "fine-tune"].unit_s == 16.0  # 1 s per 8 crops -> 128 crops
    assert rows["R-CNN", "fine-tune"].hours == pytest.approx(16.0 * 70_000 / 3600)
    assert rows["R-CNN", "pool5 cache"].unit_s == pytest.approx(2000 * 0.01 + 74.0 / 100.0)
    assert rows["SPPnet", "SVM training"].unit_s == pytest.approx(100.0 / 200.0 + 2.0)
    assert rows["Fast R-CNN", "fine-tune"].hours == pytest.approx(2.0 * 40_000 / 3600)
    assert all(e.formula for e in rows.values())


def test_parse_args_types_fields():
    cfg = parse_args(["--nets=S,L", "--proposals", "300", "--budget-s=0.5", "--svd-exact", "true",
                      "--rcnn-batch-sizes", "4,32"])
    assert (cfg.nets, cfg.proposals, cfg.budget_s, cfg.svd_exact) == (("S", "L"), 300, 0.5, True)
    assert cfg.rcnn_batch_sizes == (4, 32)


def test_no_import_circle():
    # The script imports the report and the baselines; neither imports the script (the report takes plain data).
    bench = Path(__file__).resolve().parents[1] / "bench"
    for name in ("speed_report.py", "rcnn_baselines.py"):
        tree = ast.parse((bench / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "bench.speed_vs_rcnn" not in imported, name
        if name == "rcnn_baselines.py":
            assert "bench.speed_report" not in imported


def test_tiny_benchmark_runs_end_to_end(tmp_path):
    # MobileNetV2 (its small box head keeps the training steps short; the stock-CaffeNet path of S is tested above)
    # on a 48x64 image with 6 proposals: every stage must produce a positive time, and the outputs the issue asks
    # for must exist with their keys.
    cfg = Config(nets=("mobilenet_v2",), device="cpu", proposals=6, image_size="48x64", scale=64, max_size=100,
                 spp_scales=(48, 64), spp_max_size=128, rcnn_batch_sizes=(2, 3), train_crops=2, train_images=1,
                 rois_per_batch=4, repeats=2, warmup=1, svd_ranks=(16, 8), io_mb=1, out=str(tmp_path))
    res = run(cfg)
    saved = json.loads((tmp_path / "speed_vs_rcnn.json").read_text())
    assert isinstance(saved["device"], str) and saved["device"]
    assert set(saved["test_speedup"]) == {"mobilenet_v2", "mobilenet_v2_svd"}
    assert set(saved["train_speedup"]) == {"mobilenet_v2"}
    assert all(v > 0 for v in saved["test_speedup"].values()) and saved["train_speedup"]["mobilenet_v2"] > 0
    net = res["nets"]["mobilenet_v2"]
    assert set(net["probes"]) == {"frcn", "frcn_svd", "spp5", "spp1", "rcnn_b2", "rcnn_b3", "rcnn_train",
                                  "spp_train", "frcn_train"}
    for probe in net["probes"].values():  # interleaved rounds: every probe ran twice
        assert probe["total"]["runs"] == 2 and probe["total"]["min"] <= probe["total"]["median"]
        assert all(s["median"] > 0 for s in probe["stages"].values()) and probe["peak_mb"] > 0
    assert set(net["probes"]["frcn"]["stages"]) == {"rest", "conv", "roi_pool", "fc6", "fc7"}
    assert set(net["test_s"]) == {"rcnn", "spp5", "spp1", "frcn", "frcn_svd"}
    assert all(v > 0 for v in net["test_s"].values()) and all(v > 0 for v in net["train_h"].values())
    assert "EXTRAPOLATED" in net["test_how"]["rcnn"]  # one batch per run, and the label says so
    assert saved["peak"]["sgemm_gflop_s"] > 0 and saved["peak"]["conv_gflop_s"] > 0
    assert net["gflops"]["rcnn"] > net["gflops"]["frcn"] > net["gflops"]["frcn_svd"] > 0
    rows = list(csv.DictReader(open(tmp_path / "speed_vs_rcnn.csv")))
    assert {r["method"] for r in rows} == {"rcnn", "spp5", "spp1", "frcn", "frcn_svd"}
    assert (tmp_path / "speed_vs_rcnn.png").stat().st_size > 0
