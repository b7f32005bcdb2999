"""Paper Table 4 from speed_vs_rcnn.py's measurements: built, printed, written to JSON / CSV / PNG.

Takes plain data (speed_vs_rcnn.measure_net's dicts, the config as a dict): it imports nothing from the script
that measures. Per net: test totals with their spread, speedups over R-CNN, the MODELLED training times (unit
times x counts, rcnn_baselines.train_estimates), each stage's achieved GFLOP/s against this machine's peak, and
peak memory per method; printed above the paper's figures (one K40 GPU).
"""

import csv
import json
from dataclasses import asdict
from pathlib import Path

import torch

from bench.rcnn_baselines import UnitTimes, train_estimates
from detector.plots import plt

# Paper Table 4 (one K40 GPU; SPPnet only for L). summarize() builds ours in this method -> row -> net layout.
PAPER = {
    "frcn": {"train_h": {"S": 1.2, "M": 2.0, "L": 9.5}, "train_speedup": {"S": 18.3, "M": 14.0, "L": 8.8},
             "test_s": {"S": 0.10, "M": 0.15, "L": 0.32}, "test_speedup": {"S": 98, "M": 80, "L": 146}},
    "frcn_svd": {"test_s": {"S": 0.06, "M": 0.08, "L": 0.22}, "test_speedup": {"S": 169, "M": 150, "L": 213}},
    "rcnn": {"train_h": {"S": 22, "M": 28, "L": 84}, "train_speedup": {"S": 1, "M": 1, "L": 1},
             "test_s": {"S": 9.8, "M": 12.1, "L": 47.0}, "test_speedup": {"S": 1, "M": 1, "L": 1}},
    "spp5": {"train_h": {"L": 25}, "train_speedup": {"L": 3.4}, "test_s": {"L": 2.3},
             "test_speedup": {"L": 20}},
}
METHODS = {"rcnn": "R-CNN", "spp5": "SPPnet 5 scales", "spp1": "SPPnet 1 scale", "frcn": "Fast R-CNN",
           "frcn_svd": "Fast R-CNN + SVD"}
TRAINED = {"rcnn": "R-CNN", "spp5": "SPPnet", "frcn": "Fast R-CNN"}  # method key -> Estimate.method
# Which layers each method runs at test time (printed with the table).
LAYERS = {"rcnn": "per warped crop: stock trunk, pool5, fc6, fc7, SVMs; regressors on pool5",
          "spp5": "per image: stock trunk at 5 scales; per window: SPP (6,3,2,1), fc6, fc7, SVMs",
          "spp1": "as SPPnet 5 scales, trunk at 1 scale",
          "frcn": "per image: Fast R-CNN's trunk at 1 scale; per RoI: RoI pool, fc6, fc7, cls_score, bbox_pred",
          "frcn_svd": "as Fast R-CNN, fc6/fc7 as truncated-SVD factor pairs"}


def summarize(per_net: dict, disk: dict, peak: dict, config: dict, device_name: str, wall_s: float) -> dict:
    """Totals, speedups and the modelled training rows per net, in the JSON layout (`table` mirrors PAPER)."""
    table = {m: {"test_s": {}, "test_speedup": {}} for m in METHODS}
    res = {"device": device_name, "torch": torch.__version__, "config": config, "disk": disk, "peak": peak,
           "wall_s": wall_s, "test_speedup": {}, "train_speedup": {}, "table": table, "paper": PAPER,
           "nets": {}}
    for net, m in per_net.items():
        estimates = train_estimates(UnitTimes(**m["units"]), disk)
        hours = {k: sum(e.hours for e in estimates if e.method == name) for k, name in TRAINED.items()}
        test = {k: v["s"] for k, v in m["test"].items()}
        for k in METHODS:
            table[k]["test_s"][net], table[k]["test_speedup"][net] = test[k], test["rcnn"] / test[k]
        for k in TRAINED:
            table[k].setdefault("train_h", {})[net] = hours[k]
            table[k].setdefault("train_speedup", {})[net] = hours["rcnn"] / hours[k]
        res["test_speedup"][net] = test["rcnn"] / test["frcn"]
        res["test_speedup"][f"{net}_svd"] = test["rcnn"] / test["frcn_svd"]
        res["train_speedup"][net] = hours["rcnn"] / hours["frcn"]
        res["nets"][net] = {"test_s": test, "test": m["test"], "test_how": m["test_how"], "train_h": hours,
                            "train_estimates": [{**asdict(e), "hours": e.hours} for e in estimates],
                            "probes": m["probes"], "gflops": {k: v / 1e9 for k, v in m["flops"].items()},
                            "units": m["units"]}
    return res


def _peak_share(stage: str, gflop_s: float, peak: dict) -> str:
    """Achieved rate as a share of the machine's: conv stages against the conv peak, fc layers against sgemm."""
    ref = {"conv": peak["conv_gflop_s"], "fc6": peak["sgemm_gflop_s"], "fc7": peak["sgemm_gflop_s"]}.get(stage)
    return f"{100 * gflop_s / ref:5.0f}%" if ref else ""


def print_report(res: dict) -> None:
    """Table 4 (ours above the paper's), the test totals, the per-stage rates and memory, the training model."""
    nets, table, peak = list(res["nets"]), res["table"], res["peak"]
    nw = max(4, *(len(n) + 1 for n in nets))  # the net column of the breakdowns
    groups = [("frcn", "Fast R-CNN"), ("rcnn", "R-CNN"), ("spp5", "SPPnet 5-scale")]
    width = max(10 * len(nets), 16)
    print(f"\nTable 4 on {res['device']} (paper: one K40 GPU). Train times are MODELLED (unit times measured here x"
          " counts, formulas below); R-CNN test times are EXTRAPOLATED from one batch per run.")
    print(" " * 24 + "".join(f"{title:<{width}}" for _, title in groups))
    print(" " * 24 + "".join("".join(f"{n:<10}" for n in nets).ljust(width) for _ in groups))
    rows = (("Train time (h)", "train_h", False, ""), ("Train speedup", "train_speedup", False, "x"),
            ("Test rate (s/im)", "test_s", False, ""), (" with SVD", "test_s", True, ""),
            ("Test speedup", "test_speedup", False, "x"), (" with SVD", "test_speedup", True, "x"))
    for label, row, svd, unit in rows:
        for who, source in (("ours", table), ("paper", PAPER)):
            cells = ""
            for method, _ in groups:
                method = ("frcn_svd" if method == "frcn" else None) if svd else method
                values = [source.get(method, {}).get(row, {}).get(n) for n in nets]
                cells += "".join(f"{'-' if v is None else f'{v:.3g}{unit}':<10}" for v in values).ljust(width)
            print(f"{label if who == 'ours' else '':<17}{who:>6} {cells}")

    print("\nLayers run at test time:")
    for m, title in METHODS.items():
        print(f"  {title:<17}{LAYERS[m]}")
    print("\nTest time per image (median of the interleaved runs, min..max) and FLOPs. FLOP ratio = R-CNN FLOPs /"
          " method FLOPs, the arithmetic a method saves; a speedup above or below it comes from the implementation.")
    print(f"{'net':<{nw}}{'method':<17}{'s/image':>9}{'min..max':>19}{'runs':>5}{'GFLOP/im':>10}{'FLOP ratio':>11}"
          f"{'speedup':>9}{'GFLOP/s':>9}  how")
    for n in nets:
        r = res["nets"][n]
        for m, title in METHODS.items():
            t, g = r["test"][m], r["gflops"][m]
            spread = f"{t['min']:.4g}..{t['max']:.4g}"
            print(f"{n:<{nw}}{title:<17}{t['s']:>9.4g}{spread:>19}{t['runs']:>5}{g:>10.4g}"
                  f"{r['gflops']['rcnn'] / g:>11.3g}{r['test_s']['rcnn'] / t['s']:>9.3g}{g / t['s']:>9.3g}"
                  f"  {r['test_how'][m]}")

    print("\nPer stage (median s, min..max) and achieved GFLOP/s; machine peak in this run (best of start and end):"
          f" {peak['sgemm_gflop_s']:.0f} GFLOP/s sgemm ({peak['sgemm']}), {peak['conv_gflop_s']:.0f} GFLOP/s conv "
          f"({peak['conv']}). conv is rated against the conv peak, fc6/fc7 against sgemm; 'rest' is resizing or "
          "warping plus the output layers. Peak memory: resident set (CPU) or max_memory_allocated (GPU) during the"
          " method's runs, process total and above what was allocated before it ran (all models stay resident).")
    print(f"{'net':<{nw}}{'probe':<12}{'stage':<10}{'median s':>10}{'min..max':>19}{'GFLOP':>9}{'GFLOP/s':>9}"
          f"{'of peak':>8}{'peak MiB':>10}{'added':>8}")
    for n in nets:
        for name, p in res["nets"][n]["probes"].items():
            for i, (stage, s) in enumerate(p["stages"].items()):
                flop = p["flops"].get(stage)
                rate = flop / 1e9 / s["median"] if flop else None
                memory = f"{p['peak_mb']:>10.0f}{p['added_mb']:>8.0f}" if i == 0 else ""
                spread = f"{s['min']:.4g}..{s['max']:.4g}"
                print(f"{n:<{nw}}{name if i == 0 else '':<12}{stage:<10}{s['median']:>10.4g}"
                      f"{spread:>19}{'' if flop is None else f'{flop / 1e9:.4g}':>9}"
                      f"{'' if rate is None else f'{rate:.4g}':>9}{_peak_share(stage, rate or 0, peak):>8}{memory}")

    print("\nTraining, MODELLED: hours = unit time measured here x count. Not modelled, so the R-CNN and SPPnet"
          " totals are lower bounds: liblinear solves, box-regressor fitting, data loading.")
    for n in nets:
        for e in res["nets"][n]["train_estimates"]:
            print(f"{n:<{nw}}{e['method']:<11}{e['stage']:<15}{e['unit_s']:>10.4g} s x {e['count']:>7} "
                  f"= {e['hours']:>9.3g} h  [unit = {e['formula']}; count: {e['count_source']}]")
    d = res["disk"]
    print(f"(disk {d['write_mb_s']:.0f} MB/s write, {d['read_mb_s']:.0f} MB/s read; wall {res['wall_s']:.0f} s)")


def write_outputs(res: dict, out: Path) -> None:
    """speed_vs_rcnn.json (everything), .csv (a row per net and method), .png (ours vs paper, log scale)."""
    (out / "speed_vs_rcnn.json").write_text(json.dumps(res, indent=1))
    rows = ("test_s", "test_speedup", "train_h", "train_speedup")
    with open(out / "speed_vs_rcnn.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "net", "method", *rows, "test_min_s", "test_max_s", "test_runs", "gflops",
                    *(f"paper_{r}" for r in rows), "test_how"])
        for n, r in res["nets"].items():
            for m in METHODS:
                ours = [res["table"][m].get(row, {}).get(n, "") for row in rows]
                paper = [PAPER.get(m, {}).get(row, {}).get(n, "") for row in rows]
                t = r["test"][m]
                w.writerow([res["device"], n, m, *ours, t["min"], t["max"], t["runs"], f"{r['gflops'][m]:.4g}",
                            *paper, r["test_how"][m]])

    nets = list(res["nets"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, row, methods, ylabel in ((axes[0], "test_s", list(METHODS), "test time (s / image)"),
                                     (axes[1], "train_h", list(TRAINED), "train time (hours, modelled)")):
        bar = 0.8 / len(methods)
        for j, m in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * bar for i in range(len(nets))]
            color = f"C{list(METHODS).index(m)}"  # one colour per method in both panels
            heights = [res["table"][m][row][n] for n in nets]
            spread = None
            if row == "test_s":  # min..max of the runs
                spread = [[h - res["nets"][n]["test"][m]["min"] for h, n in zip(heights, nets)],
                          [res["nets"][n]["test"][m]["max"] - h for h, n in zip(heights, nets)]]
            ax.bar(xs, heights, bar, yerr=spread, label=METHODS[m], color=color, capsize=2)
            paper = [(x, PAPER.get(m, {}).get(row, {}).get(n)) for x, n in zip(xs, nets)]
            paper = [(x, v) for x, v in paper if v]
            ax.scatter([x for x, _ in paper], [v for _, v in paper], marker="_", s=200, c="k", zorder=3)
        ax.set(xticks=range(len(nets)), xticklabels=nets, yscale="log", ylabel=ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(f"Table 4 re-measured on {res['device']} (bars, min..max), the paper on a K40 (ticks)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "speed_vs_rcnn.png", dpi=120)
    plt.close(fig)
