"""The results report: our measured table beside the paper's published figures.

Inputs are metric JSON files with the keys of ``multifusion.evaluation.evaluate.classification_metrics``
(``top1 .. top5, macro_precision, macro_recall, macro_f1, ece``): ``metrics/eval.json``
for the full MultiFusion model and ``metrics/compare/<name>.json`` for every baseline and
ablation. Output: ``reports/results.md`` (two tables), ``reports/summary.json`` (every
model's scores in one file), ``reports/results.csv`` (bar plots in ``dvc plots show``) and
two PNG bar charts; the per-model metric files are what ``dvc metrics show`` lists.
With the per-image predictions (``plots/evaluate/confusion.csv``, ``plots/compare/<name>/
confusion.csv``) every run is also set against the full model image by image: the exact
McNemar test (``multifusion.evaluation.paired_test``) says whether a gap is more than chance.

    runs = collect_runs("metrics/compare", ["resnet18", "mf_no_text"])
    for name, paired in paired_against_full("plots/evaluate/confusion.csv", csvs).items():
        runs[name] |= paired                          # only_multifusion_right, only_model_right, mcnemar_p
    write_report(ours, runs, out_dir, dataset="data/raw/synthetic")
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np

from multifusion.core.config import Config
from multifusion.core.json_files import write_json
from multifusion.evaluation.paired_test import mcnemar_exact, paired_counts, read_confusion_csv
from multifusion.core.plotting import pyplot

FULL = "multifusion"
SIGNIFICANCE = 0.05  # two-sided level at which a paired gap counts as more than chance
TOPK = ("top1", "top2", "top3", "top5")
PRF = ("macro_precision", "macro_recall", "macro_f1")

# Srinivas, Sannidhi, Runkana, arXiv 2408.13661 (NeurIPS 2023 RO-FoMo), SEM dataset of
# Aversa et al. 2018 (21,272 images, 10 classes). Facts of the paper, not knobs.
PAPER_DATASET = "SEM (Aversa et al. 2018), 21,272 images, 10 classes"
PAPER_TOPK: dict[str, tuple[str, tuple[float, float, float, float]]] = {
    FULL: ("MultiFusion-LLM (GPT-3.5)", (0.947, 0.965, 0.986, 0.991)),
    "resnet18": ("ResNet", (0.512, 0.766, 0.891, 0.906)),
    "resnet50": ("ResNet", (0.512, 0.766, 0.891, 0.906)),
    "swin_tiny": ("SwinT", (0.675, 0.766, 0.891, 0.938)),
    "vit_small": ("T2T-ViT", (0.702, 0.859, 0.906, 0.938)),
}
PAPER_ABLATION: dict[str, tuple[str, tuple[float, float, float]]] = {
    FULL: ("full", (0.941, 0.945, 0.939)),
    "mf_single_scale": ("w/o HNF", (0.776, 0.753, 0.745)),
    "mf_no_text": ("w/o LLM", (0.714, 0.726, 0.721)),
    "mf_concat": ("w/o MHA (simple fusion)", (0.827, 0.831, 0.823)),
}
LABELS = {
    FULL: "MultiFusion",
    "resnet18": "ResNet-18",
    "resnet50": "ResNet-50",
    "vit_small": "ViT-S",
    "swin_tiny": "Swin-T",
    "vig": "ViG-Ti (isotropic)",
    "mf_single_scale": "w/o HNF (single scale)",
    "mf_no_text": "w/o LLM text",
    "mf_concat": "w/o MHA (concat fusion)",
    "mf_transformer": "Transformer instead of Neural ODE",
    "mf_no_graph": "w/o patch graph",
}


def is_ablation(name: str) -> bool:
    return name == FULL or name.startswith("mf_")


def read_metrics(path: str | Path) -> dict[str, float]:
    """One metrics JSON (flat, or nested under "test"); a clear error when keys are missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file missing; run its stage first (dvc repro)")
    data = json.loads(path.read_text())
    if "top1" not in data and isinstance(data.get("test"), dict):
        data = data["test"]
    missing = [k for k in TOPK + PRF if k not in data]
    if missing:
        raise ValueError(f"{path}: missing metric keys {missing}; re-run the stage that writes it")
    return data


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _seconds(m: dict[str, float]) -> str:
    return f"{m['train_seconds']:.0f}" if "train_seconds" in m else "–"


def paired_cell(m: dict[str, float]) -> str:
    """'b / c (p = ...)' of a run's paired test against the full model, or a dash."""
    if "only_multifusion_right" not in m:
        return "–"
    return f"{m['only_multifusion_right']:.0f} / {m['only_model_right']:.0f} (p = {m['mcnemar_p']:.2f})"


def topk_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per model (ours first, then baselines): top-k, macro-F1, training
    seconds, the paired test against ours (images only MultiFusion / only this model gets
    right, exact McNemar p), then the paper's top-k."""
    head = ("| model | top-1 | top-2 | top-3 | top-5 | macro F1 | train s | only MF / only it right (McNemar p) "
            "| paper: model | paper top-1 | paper top-2 | paper top-3 | paper top-5 |")
    lines = [head, "|" + "---|" * 13]
    for name, m in rows.items():
        paper_name, paper = PAPER_TOPK.get(name, ("–", (None,) * 4))
        cells = [LABELS.get(name, name), *(_f(m[k]) for k in TOPK), _f(m["macro_f1"]), _seconds(m), paired_cell(m),
                 paper_name, *(_f(v) for v in paper)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _signed(v: float) -> str:
    return f"{v:+.3f}"


def ablation_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown: full model and each ablation, macro P/R/F1 (+ top-1), the component's
    effect with its sign (full minus ablation: positive = the component helps), the paper's
    avg P/R/F1."""
    head = ("| variant | top-1 | macro P | macro R | macro F1 | component's effect on top-1 | on macro F1 "
            "| only full / only variant right (McNemar p) | paper: variant | paper P | paper R | paper F1 |")
    lines = [head, "|" + "---|" * 12]
    full = rows[FULL]
    for name, m in rows.items():
        paper_name, paper = PAPER_ABLATION.get(name, ("–", (None,) * 3))
        effect = ["–", "–"] if name == FULL else [_signed(full["top1"] - m["top1"]), _signed(full["macro_f1"] - m["macro_f1"])]
        cells = [LABELS.get(name, name), _f(m["top1"]), *(_f(m[k]) for k in PRF), *effect, paired_cell(m), paper_name,
                 *(_f(v) for v in paper)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(ours: dict[str, float], baselines: dict[str, dict[str, float]]) -> str:
    """One sentence: does the full model's top-1 reach the best baseline's, and by how much. Gaps
    are compared at the 3 decimals printed: a gap that rounds to 0.000 is a tie."""
    if not baselines:
        return "No baseline results yet."
    best = max(baselines, key=lambda n: baselines[n]["top1"])
    gap = round(ours["top1"] - baselines[best]["top1"], 3)
    word = "beats" if gap > 0 else ("ties" if gap == 0 else "falls short of")
    best_f1 = max(baselines, key=lambda n: baselines[n]["macro_f1"])
    gap_f1 = round(ours["macro_f1"] - baselines[best_f1]["macro_f1"], 3)
    word_f1 = "beats" if gap_f1 > 0 else ("ties" if gap_f1 == 0 else "falls short of")
    sentence = (
        f"MultiFusion's top-1 ({ours['top1']:.3f}) {word} the best baseline's "
        f"({LABELS.get(best, best)}, {baselines[best]['top1']:.3f})" + (f" by {abs(gap):.3f}" if gap else "")
        + f"; its macro-F1 ({ours['macro_f1']:.3f}) {word_f1} the best baseline's "
        f"({LABELS.get(best_f1, best_f1)}, {baselines[best_f1]['macro_f1']:.3f})"
        + (f" by {abs(gap_f1):.3f}." if gap_f1 else ".")
    )
    m = baselines[best]
    if "mcnemar_p" not in m:
        return sentence
    b, c, p = int(m["only_multifusion_right"]), int(m["only_model_right"]), m["mcnemar_p"]
    meaning = "a difference beyond chance" if p < SIGNIFICANCE else "within chance: the two are not told apart by this test set"
    return (
        f"{sentence} Image by image against {LABELS.get(best, best)}: {b} test images only MultiFusion gets right, "
        f"{c} only {LABELS.get(best, best)}; exact McNemar p = {p:.2f} ({meaning}, at {SIGNIFICANCE})."
    )


def machine() -> str:
    """The machine the figures were measured on, in words (CPU model, cores, torch, device)."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores usable, {device}, torch {torch.__version__}"


def render_results(
    ours: dict[str, float], runs: dict[str, dict[str, float]], dataset: str, date: str, where: str = ""
) -> str:
    """The whole reports/results.md text. ``runs``: name -> metrics for baselines and ablations."""
    baselines = {n: m for n, m in runs.items() if not is_ablation(n)}
    ablations = {n: m for n, m in runs.items() if is_ablation(n)}
    n_test = ours.get("n")
    return "\n".join(
        [
            "# MultiFusion: results",
            "",
            f"- Dataset: `{dataset}`" + (f" (test split: {int(n_test)} images)" if n_test else ""),
            f"- Date: {date}" + (f"; machine: {where}" if where else ""),
            "- Every model is trained from scratch on the same prepared splits, epoch budget and augmentation",
            "  as `train`, and scored on the test split under the same test-time policy (`evaluate.tta`),",
            "  with temperature-calibrated probabilities. `train s`: wall-clock seconds of training.",
            f"- Published columns: the paper (arXiv 2408.13661) on {PAPER_DATASET}; a different data set,",
            "  shown for reference, not measured here. T2T-ViT is the paper's nearest row to ViT-S.",
            "",
            "## Top-k accuracy",
            "",
            topk_table({FULL: ours, **baselines}),
            "",
            verdict(ours, baselines),
            "",
            "![top-k accuracy](topk.png)",
            "",
            "## Ablations (macro precision / recall / F1)",
            "",
            ablation_table({FULL: ours, **ablations}),
            "",
            "![ablations](ablation.png)",
            "",
        ]
    )


def plot_bars(rows: dict[str, dict[str, float]], keys: tuple[str, ...], path: str | Path, title: str) -> None:
    """Grouped bar chart, one group per model, one bar per metric key; PNG."""
    plt = pyplot()

    names = list(rows)
    x = np.arange(len(names))
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.0))
    for i, key in enumerate(keys):
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, [rows[n][key] for n in names], width, label=key)
    ax.set_xticks(x, [LABELS.get(n, n) for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=len(keys))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    ours: dict[str, float], runs: dict[str, dict[str, float]], out_dir: str | Path, dataset: str, date: str | None = None
) -> Path:
    """Write results.md, summary.json, results.csv, topk.png and ablation.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = date or dt.date.today().isoformat()
    rows = {FULL: ours, **runs}
    (out_dir / "results.md").write_text(render_results(ours, runs, dataset, date, machine()))
    keys = TOPK + PRF + ("ece", "train_seconds", "only_multifusion_right", "only_model_right", "mcnemar_p")
    summary = {name: {k: float(m[k]) for k in keys if k in m} for name, m in rows.items()}
    write_json(out_dir / "summary.json", summary)
    csv = ["model,kind," + ",".join(TOPK + PRF)]
    for name, m in rows.items():
        kind = "ablation" if is_ablation(name) and name != FULL else ("ours" if name == FULL else "baseline")
        csv.append(f"{LABELS.get(name, name)},{kind}," + ",".join(f"{m[k]:.4f}" for k in TOPK + PRF))
    (out_dir / "results.csv").write_text("\n".join(csv) + "\n")
    plot_bars({FULL: ours, **{n: m for n, m in runs.items() if not is_ablation(n)}}, TOPK, out_dir / "topk.png", "Top-k accuracy, test split")
    plot_bars({FULL: ours, **{n: m for n, m in runs.items() if is_ablation(n)}}, PRF, out_dir / "ablation.png", "Ablations: macro P / R / F1")
    return out_dir / "results.md"


def collect_runs(compare_dir: str | Path, models: list[str]) -> dict[str, dict[str, float]]:
    """``metrics/compare/<name>.json`` for every name in ``compare.models``, in that order."""
    return {name: read_metrics(Path(compare_dir) / f"{name}.json") for name in models}


def paired_against_full(full_csv: str | Path, run_csvs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """name -> {only_multifusion_right, only_model_right, mcnemar_p}: each run's per-image
    predictions against the full model's, on the same test images in the same order."""
    labels, ours = read_confusion_csv(full_csv)
    paired = {}
    for name, path in run_csvs.items():
        their_labels, theirs = read_confusion_csv(path)
        if not np.array_equal(labels, their_labels):
            raise ValueError(f"{path}: its test images differ from {full_csv}'s; rerun both on the same data/prepared")
        b, c = paired_counts(labels, ours, theirs)
        paired[name] = {"only_multifusion_right": b, "only_model_right": c, "mcnemar_p": mcnemar_exact(b, c)}
    return paired


def report_from_files(
    cfg: Config, eval_json: str | Path, compare_dir: str | Path, out_dir: str | Path,
    eval_plots: str | Path | None = None, compare_plots: str | Path | None = None,
) -> Path:
    """The report stage: read every metrics file named by params (and, given the plots folders
    of evaluate and compare, every run's per-image predictions), write the report."""
    runs = collect_runs(compare_dir, cfg.compare.models)
    if eval_plots is not None and compare_plots is not None:
        csvs = {name: Path(compare_plots) / name / "confusion.csv" for name in runs}
        for name, paired in paired_against_full(Path(eval_plots) / "confusion.csv", csvs).items():
            runs[name] = {**runs[name], **paired}
    return write_report(read_metrics(eval_json), runs, out_dir, cfg.data.root)
