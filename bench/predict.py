"""Throughput of `multifusion predict` beside a plain-PyTorch ResNet-18 screening loop.

    python bench/predict.py                      # 1,000 synthetic 1024x768 micrographs, CPU (+ CUDA if visible)
    python bench/predict.py --n 200 --cli        # fewer files, also time the CLI end to end
    python bench/predict.py --report             # also time `predict --report` (HTML page with overlays)
    python bench/predict.py --model WS/models/hnf --prepared WS/data/prepared   # the test split's originals of a real set
    python bench/predict.py ... --precisions fp32,auto     # predict at each predict.precision, in the same run

With ``--prepared`` the files timed are the originals of that prepared set's test split (for
a model trained on it: its adaptive views then take the share of eight-view passes they take
on real, unseen micrographs; on synthetic shots a trained model's confidence means nothing).

Both paths decode every file with the same preprocessing (``load_micrograph`` with the
model's data section: grey, info-bar crop, square, resize) and normalise with
``to_model_input``. The peer is the simplest loop a user would write: decode one file at a
time, then one batched forward pass of engineer F's plain-PyTorch ResNet-18. The model is
``--model`` if it exists, else an untrained HNF built from params.yaml (throughput does
not depend on the weights, except through adaptive views: ``predict`` runs with
``predict.first_views`` / ``predict.view_confidence``, and an untrained model, never confident, takes all
eight views on every image: pass a trained ``--model`` to measure the adaptive policy). Prints a table with images/s and the ratio to the peer; with
``--report`` also the time of ``predict --report`` over plain ``predict`` (target: <= 2).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from multifusion.core.config import load_config
from multifusion.data.dataset import to_model_input
from multifusion.data.preprocess import load_micrograph
from multifusion.evaluation.evaluate import predict_probs
from multifusion.model import build_model
from multifusion.model.baselines import build_baseline
from multifusion.inference.predict import predict_paths
from multifusion.inference.views import ViewPolicy
from multifusion.model.card import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]


def write_micrographs(folder: Path, n: int, width: int, height: int, suffix: str) -> list[Path]:
    """n grey SEM-like images (smooth texture + shot-like noise, black info bar with text)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bases = []
    for i in range(8):
        fx, fy = rng.uniform(0.01, 0.08, 2)
        bases.append(120 + 70 * np.sin(xx * fx + i) * np.cos(yy * fy - i))
    bar = max(8, height // 12)
    paths = []
    for i in range(n):
        image = bases[i % 8] + rng.normal(0, 10, (height, width)).astype(np.float32)
        image[-bar:] = 0
        image[-bar // 2 - 3 : -bar // 2 + 3, 20 : width // 3 : 7] = 255  # "text"
        path = folder / f"shot_{i:04d}{suffix}"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def resnet_loop(model: torch.nn.Module, paths: list[Path], policy, batch_size: int, device: str) -> None:
    """The peer: sequential decode, then batched forward + softmax."""
    for start in range(0, len(paths), batch_size):
        images = np.stack([load_micrograph(p, policy) for p in paths[start : start + batch_size]])  # (B, S, S)
        x = to_model_input(images).to(device)  # (B, 1, S, S)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            model(x).float().softmax(dim=1).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--format", default=".tif", choices=[".tif", ".png"])
    parser.add_argument("--model", default=str(ROOT / "models/hnf"))
    parser.add_argument("--prepared", type=Path, default=None,
                        help="time the originals of this prepared set's test split instead of synthetic shots (--n: at most)")
    parser.add_argument("--cli", action="store_true", help="also time the `multifusion predict` command")
    parser.add_argument("--report", action="store_true", help="also time predict with --report (HTML page, explanation overlays)")
    parser.add_argument("--rounds", type=int, default=3, help="with --report: best of this many alternating runs")
    parser.add_argument("--views", default=None, metavar="FIRST,CONFIDENCE",
                        help="the view policy predict runs with (default: params.yaml's predict.first_views, predict.view_confidence)")
    parser.add_argument("--precisions", default=None, metavar="P[,P...]",
                        help="time predict at each of these predict.precision values in the same run, e.g. fp32,auto "
                             "(default: params.yaml's)")
    args = parser.parse_args()

    cfg = load_config(ROOT / "params.yaml")
    views = ViewPolicy.of(cfg.predict)
    if args.views:
        first, confidence = args.views.split(",")
        views = ViewPolicy(int(first), float(confidence), views.precision)
    policies = [replace(views, precision=p) for p in (args.precisions.split(",") if args.precisions else [views.precision])]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            model_dir = tmp_path / "hnf_untrained"
            classes = [f"class_{i}" for i in range(10)]
            text = random_text(cfg, classes) if cfg.fusion.text else None
            model = build_model(cfg, classes, text)
            save_model(model_dir, model, cfg, classes, text, 1.0, "hnf")
        loaded = load_model(model_dir)
        policy, classes = loaded.input, loaded.classes
        S, batch = policy.image_size, cfg.predict.batch_size
        if args.prepared is not None:
            manifest = pd.read_parquet(args.prepared / "manifest.parquet")
            paths = [Path(p) for p in manifest.loc[manifest["split"] == "test", "path"]][: args.n]
            folder = tmp_path / "shots"  # links to the originals: predict reads one folder, as a lab points it at one
            folder.mkdir()
            for i, path in enumerate(paths):
                (folder / f"{i:05d}_{path.name}").symlink_to(path.resolve())
            paths = sorted(folder.iterdir())
            with Image.open(paths[0]) as first:
                args.width, args.height = first.size
            args.n, args.format = len(paths), paths[0].suffix
        else:
            folder = tmp_path / "shots"
            folder.mkdir()
            print(f"writing {args.n} synthetic {args.width}x{args.height} {args.format} micrographs ...", flush=True)
            paths = write_micrographs(folder, args.n, args.width, args.height, args.format)
        decoded = np.stack([load_micrograph(p, policy) for p in paths[:batch]])  # (B, S, S) warm-up
        decode_s = timed(lambda: [load_micrograph(p, policy) for p in paths])
        images = np.stack([decoded] * (args.n // batch + 1))[: args.n].reshape(-1, S, S)  # (n, S, S)

        rows = [("decode only (load_micrograph, 1 thread)", "cpu", args.n / decode_s, None)]
        for device in devices:
            hnf = load_model(model_dir, device=device)
            resnet = build_baseline("resnet18", len(classes), S).to(device).eval()
            predict_probs(hnf.model, images[:batch], batch, device)  # warm-up
            resnet_loop(resnet, paths[:batch], policy, batch, device)
            peer_s = timed(lambda: resnet_loop(resnet, paths, policy, batch, device))
            ours_s = {policy: timed(lambda policy=policy: predict_paths(
                model_dir, [folder], tmp_path / "p.csv", top_k=3, uncertain_threshold=0.5, batch_size=batch, device=device,
                progress=False, views=policy)) for policy in policies}
            hnf_fwd = timed(lambda: predict_probs(hnf.model, images, batch, device))
            with torch.no_grad():
                res_fwd = timed(lambda: [resnet(to_model_input(images[i : i + batch]).to(device)).cpu()
                                         for i in range(0, args.n, batch)])
            rows += [
                ("ResNet-18 plain loop (peer)", device, args.n / peer_s, 1.0),
                *((f"multifusion predict (library, {p.precision}: {'bf16' if p.bf16_on(torch.device(device)) else 'fp32'})",
                   device, args.n / t, peer_s / t) for p, t in ours_s.items()),
                *(report_rows(model_dir, folder, tmp_path, batch, device, args.n, peer_s, args.rounds,
                              views) if args.report else []),
                ("  forward only: HNF", device, args.n / hnf_fwd, None),
                ("  forward only: ResNet-18", device, args.n / res_fwd, None),
            ]
            if args.cli:
                cmd = [sys.executable, "-m", "multifusion.cli", "predict", "--model", str(model_dir), str(folder),
                       "--out", str(tmp_path / "c.csv"), "--device", device, "--params", str(ROOT / "params.yaml")]
                cli_s = timed(lambda: subprocess.run(cmd, check=True, capture_output=True))
                rows.append(("multifusion predict (CLI, incl. start-up)", device, args.n / cli_s, peer_s / cli_s))

    print(f"\n{args.n} images {args.width}x{args.height}{args.format} -> {S}x{S}, batch {batch}, "
          f"torch threads {torch.get_num_threads()}, model {model_dir.name}, views: first {views.first} at {views.confidence:g}, "
          f"precision {', '.join(p.precision for p in policies)}")
    print(f"{'pipeline':44s} {'device':6s} {'images/s':>10s} {'vs peer':>8s}")
    for name, device, rate, ratio in rows:
        print(f"{name:44s} {device:6s} {'' if rate is None else f'{rate:10.1f}':>10s} {'' if ratio is None else f'{ratio:7.2f}x':>8s}")


def report_rows(model_dir: Path, folder: Path, tmp_path: Path, batch: int, device: str, n: int, peer_s: float, rounds: int,
                views: ViewPolicy) -> list:
    """Rows for `predict --report`: its rate, and in the ratio column its time over plain
    predict's, each the best of ``rounds`` runs taken alternately (a busy machine skews one
    run); also the ratio of the CPU time the process used (all threads), which other
    processes on a busy machine disturb far less than wall time."""
    page = tmp_path / "report.html"
    run = lambda **kw: predict_paths(model_dir, [folder], tmp_path / "r.csv", top_k=3, uncertain_threshold=0.5,  # noqa: E731
                                     batch_size=batch, device=device, progress=False,
                                     views=views, **kw)
    plain, report = [float("inf")] * 2, [float("inf")] * 2  # (wall s, cpu s)
    for _ in range(rounds):
        plain = [min(a, b) for a, b in zip(plain, timed_both(run))]
        report = [min(a, b) for a, b in zip(report, timed_both(lambda: run(report=page)))]
    print(f"report page: {page.stat().st_size / 1e6:.1f} MB for {n} images", flush=True)
    return [("multifusion predict --report (library)", device, n / report[0], peer_s / report[0]),
            (f"  --report / plain predict, wall (best of {rounds})", device, None, report[0] / plain[0]),
            ("  --report / plain predict, CPU time", device, None, report[1] / plain[1])]


def timed_both(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process over all its threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def random_text(cfg, classes: list[str]):
    """Random text features of a plausible shape, for an untrained text-fused model."""
    from multifusion.text.features import random_text_features

    return random_text_features(classes, cfg.llm.templates, length=32, dim=cfg.text.hidden)


if __name__ == "__main__":
    main()
