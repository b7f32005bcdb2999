"""One command for a machine with one NVIDIA GPU: everything the CPU cannot show, in at most 8 minutes.

    python bench/gpu_check.py --prepare                       # once, on a CPU machine with opencv-contrib
    python bench/gpu_check.py --out gpu_report                # on the GPU machine (carry data/ along)
    python bench/gpu_check.py --device cpu --tiny --out DIR   # the same orchestration on tiny sizes, on a CPU

Each section runs in its own subprocess under its own time limit (the limits add up to less than 8 minutes),
so a failing or hanging section costs only its own result. DIR gets gpu_check.md and gpu_check.json (pass /
fail / skip / timeout, key figures and the tail of the output per section), each section's log and files:
    cuda_tests       pytest tests/test_kernels_cuda.py and the CPU kernel tests' -k cuda (skips: not passes)
    bench_roi_pool   bench/bench_roi_pool.py --device cuda, its table, CSV and PNG (written to DIR)
    bench_smooth_l1  bench/bench_smooth_l1.py --device cuda, the same
    kernels          bench/gpu_measure.py kernels: ours vs torchvision / F.smooth_l1_loss at fp32, fp16, bf16,
                     and the bytes-moved floor at the measured device copy bandwidth
    test_time        bench/gpu_measure.py test_time: S, M, L at 600 x 1000, 2000 RoIs, +-SVD, Fig. 2 split
    train            train.py, VGG16 on the built-in data set, 200 iterations: ms/iteration, a falling loss
    speed_vs_rcnn    bench/speed_vs_rcnn.py --device cuda (the paper's Table 4), each method's runs cut at 2 s
--tiny runs every script on its small sizes: the bench scripts' --tiny, speed_vs_rcnn at the sizes of
tests/test_speed_vs_rcnn.py, train.py on a 5-image data set made here.

The GPU machine needs no network and no selective search (plain OpenCV has no cv2.ximgproc): --prepare, run on
a CPU machine, generates the built-in data set and its selective-search proposals; carry data/shapes-v1/ and
data/cache/proposals/ to the GPU machine with the repository. The cache is keyed by the data set's folder
name and each image's bytes (detector.proposals.cache_paths): carried files are found wherever the copy is.
"""

import argparse
import csv
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so that `python bench/...` finds detector/
from detector.config import PRESETS, Config  # noqa: E402  (no torch: the orchestrator starts fast)

PY = sys.executable
BUDGET_S = 470  # 8 minutes, less the orchestrator's own start-up and reporting
DATA = REPO / "data" / "shapes-v1"  # detector.shapes.default_root()
CLASSES = "circle,cross,ring,square,star,triangle"  # detector.shapes.SHAPE_CLASSES
# --max-proposals of the two training runs: the GPU one uses the demo preset's, which its cache was made with
MAX_PROPOSALS, TINY_MAX_PROPOSALS = Config(**PRESETS["demo"]).max_proposals, 300
# bench/speed_vs_rcnn.py --tiny: the sizes of tests/test_speed_vs_rcnn.py's end-to-end run (~20 s on 2 cores,
# most of it the R-CNN crops at MobileNetV2's 224 px, which its --crop-size cannot shrink)
SPEED_TINY = ["--nets", "mobilenet_v2", "--proposals", "6", "--image-size", "48x64", "--scale", "64",
              "--max-size", "100", "--spp-scales", "48,64", "--spp-max-size", "128", "--rcnn-batch-sizes",
              "2,3", "--train-crops", "2", "--train-images", "1", "--rois-per-batch", "4", "--repeats", "2",
              "--warmup", "1", "--svd-ranks", "16,8", "--io-mb", "1", "--budget-s", "0"]
# section: (title, time limit on the GPU, in --tiny), in the order they run; the GPU limits sum to 465 s
SECTIONS = {
    "cuda_tests": ("CUDA kernel tests", 90, 30),
    "bench_roi_pool": ("bench/bench_roi_pool.py", 60, 15),
    "bench_smooth_l1": ("bench/bench_smooth_l1.py", 25, 15),
    "kernels": ("Kernels vs references, fp32/fp16/bf16, bytes-moved floor", 50, 30),
    "test_time": ("Fast R-CNN test time per image (Fig. 2 split)", 50, 30),
    "train": ("Short VGG16 training on the built-in data set", 90, 60),
    "speed_vs_rcnn": ("bench/speed_vs_rcnn.py (Table 4)", 100, 45),
}
TAIL = 3000  # characters of each section's output kept in the report


# --- data and proposals: prepared on a CPU machine, checked before anything runs on the GPU ---


def check_inputs(root: Path, max_boxes: int, splits=("trainval",), cache_dir: str | None = None) -> list[str]:
    """What stops train.py from running without selective search: a missing data set, or an image of the
    splits whose "fast" proposals are not in the cache (detector.proposals.cache_paths; cache_dir None: the
    default data/cache/proposals, train.py's). Empty when ready."""
    hint = ("on a CPU machine with opencv-contrib run `python bench/gpu_check.py --prepare`, then carry "
            "data/shapes-v1/ and data/cache/proposals/ along with the repository")
    if not (root / "shapes.json").is_file():
        return [f"no built-in data set at {root} (shapes.json missing): {hint}"]
    from detector.data import load_voc
    from detector.proposals import cache_paths

    for split in splits:
        records, _ = load_voc(str(root), split, CLASSES.split(","), log=lambda *_: None)
        paths = cache_paths(records, "fast", max_boxes, cache_dir=cache_dir)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            return [f"{len(missing)} of {len(paths)} {split} images have no cached proposals in "
                    f"{os.path.dirname(missing[0])} (e.g. {os.path.basename(missing[0])}): {hint}"]
    return []


def prepare(root: Path, max_boxes: int, tiny: bool = False, log=print) -> None:
    """Generate the data set (tiny: 4 + 1 images of ~96 px) and cache selective search for both splits."""
    from detector import shapes
    from detector.data import load_voc
    from detector.proposals import compute_proposals

    if tiny:
        shapes.generate(str(root), seed=0, n_train=4, n_test=1, size=96)
    else:
        shapes.ensure_dataset(str(root), log=log)
    for split in ("trainval", "test"):
        records, _ = load_voc(str(root), split, CLASSES.split(","), log=lambda *_: None)
        t0 = time.time()
        compute_proposals(records, mode="fast", max_boxes=max_boxes, workers=1 if tiny else None,
                          progress=not tiny)
        log(f"{split}: {len(records)} images, proposals cached in {time.time() - t0:.0f}s")


# --- running a section ---


def run_command(argv: list[str], limit_s: float, log_path: Path, env: dict | None = None) -> dict:
    """Run argv from the repository root, output to log_path, killed (with its children) after limit_s."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # own process group: a timeout kills its workers too
        try:
            rc = proc.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    text = log_path.read_text(errors="replace")
    return {"command": " ".join(argv), "rc": rc, "seconds": time.perf_counter() - start, "tail": text[-TAIL:],
            "output": text}


def _pytest_counts(text: str) -> dict:
    """{"passed": 3, "skipped": 6, ...} from pytest's last summary line."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def _metrics(csv_path: Path) -> dict:
    """ms/iteration (median; the first logged window, which holds start-up, left out); did the loss fall?"""
    rows = list(csv.DictReader(open(csv_path)))
    if not rows:
        return {}
    losses = [float(r["loss"]) for r in rows]
    ms = [float(r["ms_per_iter"]) for r in rows[1:] or rows]
    return {"iters": int(rows[-1]["iter"]), "ms_per_iter": statistics.median(ms), "loss_first": losses[0],
            "loss_last": losses[-1], "loss_fell": losses[-1] < losses[0], "logged": len(rows)}


class Check:
    """The run: its settings, the output folder and the sections' records."""

    def __init__(self, args):
        self.args, self.out, self.tiny, self.device = args, Path(args.out).resolve(), args.tiny, args.device
        self.start = time.perf_counter()
        self.sections: list[dict] = []

    def limit(self, name: str) -> float:
        """The section's own limit, cut to what is left of the whole run's budget (GPU runs)."""
        own = SECTIONS[name][2 if self.tiny else 1]
        left = BUDGET_S - (time.perf_counter() - self.start)
        return own if self.tiny else max(min(own, left), 1)

    def record(self, name: str, result: dict | None, status: str, figures: dict | None = None,
               notes: list[str] | None = None) -> dict:
        sec = {"name": name, "title": SECTIONS[name][0], "status": status, "figures": figures or {},
               "notes": notes or [], "limit_s": self.limit(name)}
        if result:
            sec.update({k: result[k] for k in ("command", "rc", "seconds", "limit_s", "tail")})
            sec["log"] = f"{name}.log"
        took = f" ({result['seconds']:.0f}s)" if result else ""
        print(f"[{time.perf_counter() - self.start:6.0f}s] {name}: {status}{took}"
              + "".join(f"\n    {n}" for n in notes or []), flush=True)
        self.sections.append(sec)
        return sec

    def run(self, name: str, argv: list[str], env: dict | None = None) -> dict:
        limit = self.limit(name)
        result = dict(run_command(argv, limit, self.out / f"{name}.log", env), limit_s=limit)
        if result["rc"] is None:
            result["status"] = "timeout"
        else:
            result["status"] = "pass" if result["rc"] == 0 else "fail"
        return result

    # --- the sections ---

    def cuda_tests(self) -> None:
        files = ["tests/test_kernels_cuda.py", "tests/test_roi_pool.py", "tests/test_smooth_l1.py"]
        # -k matches file names too: all of test_kernels_cuda, the CPU files' CUDA-parametrized cases
        argv = [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files, "-k", "cuda"]
        r = self.run("cuda_tests", argv)
        counts = _pytest_counts(r["output"])
        status, notes = r["status"], []
        failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
        if r["rc"] == 5 or (status == "pass" and not counts.get("passed")):  # 5: pytest selected nothing
            # no CUDA test ran: expected without a GPU (skips are not passes), a failure with one
            status = "skip" if self.device == "cpu" else "fail"
            counted = ", ".join(f"{n} {k}" for k, n in counts.items())
            notes.append(f"no CUDA test passed: {counted or 'none selected'}")
        elif failed and status == "pass":
            status = "fail"
        self.record("cuda_tests", r, status, counts, notes)

    def bench_script(self, name: str, stem: str) -> None:
        """bench/<name>.py on this device (on CUDA without its CPU runs), its CSV and PNG written to DIR."""
        argv = [PY, f"bench/{name}.py", "--device", self.device, "--out", str(self.out)]
        r = self.run(name, argv + (["--tiny"] if self.tiny else []))
        files = [f"{stem}.{ext}" for ext in ("csv", "png") if (self.out / f"{stem}.{ext}").is_file()]
        figures = {"files": files}
        if f"{stem}.csv" in files:
            figures["rows"] = list(csv.DictReader(open(self.out / f"{stem}.csv")))
        status, notes = r["status"], []
        if len(files) < 2:
            notes.append(f"{stem}.csv / {stem}.png not written")
            status = "fail" if status == "pass" else status
        self.record(name, r, status, figures, notes)

    def measured(self, name: str) -> None:
        """A bench/gpu_measure.py measurement; its JSON is the section's figures."""
        path = self.out / f"{name}.json"
        argv = [PY, "bench/gpu_measure.py", name, "--device", self.device, "--out", str(path)]
        r = self.run(name, argv + (["--tiny"] if self.tiny else []))
        figures = json.loads(path.read_text()) if r["status"] == "pass" and path.is_file() else {}
        status, notes = r["status"], []
        if status == "pass" and not figures:
            status, notes = "fail", [f"{path.name} not written"]
        cases = figures.get("roi_pool", []) + figures.get("smooth_l1", [])
        if any("error" in row for row in cases):
            notes.append("some cases raised errors (see the tables)")
        self.record(name, r, status, figures, notes)

    def train(self) -> None:
        if not self.tiny:
            self._train(DATA, MAX_PROPOSALS)
            return
        # a tiny data set of its own, prepared here exactly as --prepare does; its cache goes to
        # data/cache/proposals/<folder name>/, a name of this run's own, removed afterwards whatever happened
        root = self.out / f"gpu-check-tiny-{os.getpid()}"
        try:
            prepare(root, TINY_MAX_PROPOSALS, tiny=True, log=lambda *_: None)
            self._train(root, TINY_MAX_PROPOSALS)
        finally:
            from detector.proposals import default_cache_dir

            shutil.rmtree(Path(default_cache_dir()) / root.name, ignore_errors=True)

    def _train(self, root: Path, max_boxes: int) -> None:
        notes = []
        if self.tiny:
            size = ["--backbone", "mobilenet_v2", "--fc-dim", "64", "--scales", "128", "--max-size", "200",
                    "--test-scales", "128", "--test-max-size", "200", "--iters", "4", "--log-every", "2",
                    "--lr", "0.01", "--workers", "1"]
        else:
            size = ["--iters", "200", "--log-every", "20"]
            if self.args.vgg16_weights:  # ImageNet VGG16 (torchvision format), carried along: no downloads
                size += ["--weights", str(Path(self.args.vgg16_weights).resolve())]
            else:
                # From random init the paper's lr 0.001 diverges (CPU, scale 160: loss 4e5, NaN at iter 4);
                # 1e-5 falls (scale 128: 126 -> 21 in 10 iterations). ms/iteration does not depend on it.
                size += ["--lr", "0.00001"]
                notes.append("VGG16 from random init at lr 1e-5 (the paper's 0.001 diverges without ImageNet "
                             "weights; pass --vgg16-weights to train from them at 0.001)")
        problems = check_inputs(root, max_boxes)
        if problems:
            self.record("train", None, "fail", {}, notes + problems)
            return
        run_dir = self.out / "train"
        argv = [PY, "train.py", "--preset", "voc07_vgg16", "--data", str(root), "--classes", CLASSES,
                "--train-proposals", "fast", "--test-proposals", "fast", "--max-proposals", str(max_boxes),
                "--lr-steps", "100000", "--checkpoint-every", "100000", "--evaluate", "false",
                "--out", str(run_dir), "--device", self.device, *size]
        r = self.run("train", argv)
        for pt in run_dir.glob("*.pt"):  # VGG16 checkpoints are ~1.6 GB: not part of the report
            pt.unlink()
        figures = _metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else {}
        status = r["status"]
        if status == "pass" and not figures:
            status, notes = "fail", notes + ["no metrics.csv"]
        elif status == "pass" and not figures["loss_fell"]:
            notes.append("the loss did not fall")
            status = "pass" if self.tiny else "fail"  # 4 tiny iterations prove the path, not the learning
        self.record("train", r, status, figures, notes)

    def speed_vs_rcnn(self) -> None:
        out = self.out / "speed"
        argv = [PY, "bench/speed_vs_rcnn.py", "--device", self.device, "--out", str(out)]
        # GPU: S, M and L at the paper's sizes, each method's timed runs capped at 2 s, to fit the slot
        r = self.run("speed_vs_rcnn", argv + (SPEED_TINY if self.tiny else ["--budget-s", "2"]))
        path, figures = out / "speed_vs_rcnn.json", {}
        if path.is_file():
            saved = json.loads(path.read_text())
            # its headline figures (the script is changing: whatever of them it writes, else its keys)
            figures = {k: saved[k] for k in ("device", "test_speedup", "train_speedup") if k in saved}
            nets = saved.get("nets", {})
            if isinstance(nets, dict):
                figures["test_s"] = {n: v.get("test_s") for n, v in nets.items() if isinstance(v, dict)}
            figures = figures if len(figures) > 2 else {"keys": sorted(saved)}
        status = r["status"]
        if status == "pass" and not figures:
            status = "fail"
        notes = [] if figures else ["speed_vs_rcnn.json not written"]
        self.record("speed_vs_rcnn", r, status, figures, notes)


# --- the report ---


def environment(device: str) -> dict:
    import torch

    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except Exception:  # not installed, or broken: either way not usable here
            return None

    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10)
            return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    cv2 = version("cv2")
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "python": platform.python_version(), "torch": torch.__version__, "triton": version("triton"),
        "torchvision": version("torchvision"), "opencv": cv2,
        "cv2.ximgproc": bool(cv2) and hasattr(__import__("cv2"), "ximgproc"),
        "cuda": torch.version.cuda, "commit": git("rev-parse", "HEAD") or "unknown (no git)",
        "uncommitted_files": len((git("status", "--porcelain") or "").splitlines()),
    }


def _fmt(v, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return out + ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]


def _figures_md(sec: dict) -> list[str]:
    f, name = sec["figures"], sec["name"]
    if name == "kernels" and f:
        lines = [f"Device copy bandwidth {f['copy_GBps']:.0f} GB/s (read + write); torchvision "
                 f"{f['torchvision'] or 'not installed'}. Floor: output bytes (forward + backward: also the "
                 "output gradient read and the input gradient written) at that bandwidth.", ""]
        lines += _table(f["roi_pool"], ["shape", "mode", "dtype", "provider", "ms", "floor_ms", "x_floor",
                                        "max_diff_vs_ours", "grad_max_diff_vs_ours", "error"])
        return lines + [""] + _table(f["smooth_l1"], ["rois", "dtype", "form", "mode", "provider", "ms",
                                                      "rel_diff_vs_torch", "error"])
    if name == "test_time" and f:
        rows = []
        for net, v in f["nets"].items():
            for variant in ("full", "svd"):
                rows.append(dict(net=f"{net} ({v['backbone']})", svd=variant == "svd",
                                 total_ms=v[variant]["total_ms"], **v[variant]["stages_ms"]))
        return [f"Image {f['image']}, {f['rois']} RoIs, SVD ranks fc6 {f['svd_ranks'][0]} / fc7 "
                f"{f['svd_ranks'][1]}, random weights, median of {f['repeats']} runs, ms per image; stages "
                "timed by synchronising hooks, total_ms without them.", ""] + _table(
            rows, ["net", "svd", "total_ms", "conv", "roi_pool", "fc6", "fc7", "rest"])
    if name in ("bench_roi_pool", "bench_smooth_l1") and f.get("files"):
        return [f"Files: {', '.join(f['files'])} (the table is in the output below)."]
    if f:
        flat = {k: v for k, v in f.items() if not isinstance(v, (dict, list))}
        nested = {k: v for k, v in f.items() if isinstance(v, (dict, list))}
        lines = ["; ".join(f"{k} {_fmt(v)}" for k, v in flat.items())] if flat else []
        return lines + [f"- {k}: `{json.dumps(v)[:400]}`" for k, v in nested.items()]
    return []


def write_report(out: Path, env: dict, sections: list[dict], args, total_s: float) -> None:
    report = {"command": " ".join(sys.argv), "tiny": args.tiny, "total_s": total_s, "environment": env,
              "sections": sections}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    lines = [f"# gpu_check: {env['device']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, torchvision "
             f"{env['torchvision']}, "
             f"OpenCV {env['opencv']} (ximgproc: {env['cv2.ximgproc']}), Python {env['python']}; commit "
             f"{env['commit']} ({env['uncommitted_files']} files uncommitted). `{report['command']}`: "
             f"{total_s:.0f} s{' (tiny sizes)' if args.tiny else ''}.", "",
             "| section | status | s | limit s |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {_fmt(s.get('seconds', 0.0))} | {s['limit_s']:.0f} |"
              for s in sections]
    for s in sections:
        lines += ["", f"## {s['name']}: {s['title']} ({s['status']})", ""]
        if "command" in s:
            lines += [f"`{s['command']}` (rc {s['rc']}, {s['seconds']:.1f} s, log `{s['log']}`)", ""]
        lines += [f"- {n}" for n in s["notes"]] + ([""] if s["notes"] else [])
        lines += _figures_md(s)
        if s.get("tail"):
            lines += ["", "<details><summary>output (tail)</summary>", "", "```", s["tail"].rstrip(), "```",
                      "", "</details>"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", help="report folder (created)")
    parser.add_argument("--device", default="cuda", help="cuda (the point of it) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the same orchestration on a CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    parser.add_argument("--vgg16-weights", default="",
                        help="torchvision VGG16 weights (vgg16-397923af.pth) for train; default random init")
    parser.add_argument("--prepare", action="store_true",
                        help="on a CPU machine: make data/shapes-v1, cache its selective-search proposals")
    args = parser.parse_args()
    if args.prepare:
        prepare(DATA, MAX_PROPOSALS)
        problems = check_inputs(DATA, MAX_PROPOSALS, ("trainval", "test"))
        print("\n".join(problems) or "ready: carry data/shapes-v1/ and data/cache/proposals/ along")
        return 1 if problems else 0
    if not args.out:
        parser.error("--out DIR is required (or --prepare)")
    wanted = args.sections.split(",")
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.device == "cuda" and not args.tiny and "train" in wanted:
        problems = check_inputs(DATA, MAX_PROPOSALS)  # fail before the GPU time is spent, not 6 min in
        if problems:
            sys.exit("gpu_check: " + "\n".join(problems) + "\n(or leave train out: --sections ...)")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_check: CUDA is not available here (torch " + torch.__version__ + "); on a CPU use "
                     "--device cpu --tiny")
    check = Check(args)
    check.out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    print(f"gpu_check: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit'][:12]}")
    steps = {
        "cuda_tests": check.cuda_tests,
        "bench_roi_pool": lambda: check.bench_script("bench_roi_pool", "roi_pool"),
        "bench_smooth_l1": lambda: check.bench_script("bench_smooth_l1", "smooth_l1"),
        "kernels": lambda: check.measured("kernels"),
        "test_time": lambda: check.measured("test_time"),
        "train": check.train,
        "speed_vs_rcnn": check.speed_vs_rcnn,
    }
    for name in SECTIONS:
        if name in wanted:
            try:
                steps[name]()
            except Exception as e:  # the orchestrator's own slip in one section must not lose the others
                check.record(name, None, "fail", {}, [f"gpu_check error: {type(e).__name__}: {e}"])
    total = time.perf_counter() - check.start
    write_report(check.out, env, check.sections, args, total)
    bad = [s["name"] for s in check.sections if s["status"] in ("fail", "timeout")]
    failed = f"; failed: {', '.join(bad)}" if bad else ""
    print(f"{total:.0f}s; report: {check.out / 'gpu_check.md'}{failed}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
