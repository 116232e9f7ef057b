"""The results report: our measured table beside the paper's published figures.

Inputs: the comparison's metric JSON files, one per model and training seed,
``metrics/compare/<name>/seed<N>.json`` (keys of ``classification_metrics``: ``top1 .. top5,
macro_precision, macro_recall, macro_f1, ece``), for ``multifusion`` (the full model) and every
baseline and ablation, and their per-image predictions ``plots/compare/<name>/seed<N>/confusion.csv``.
Every figure is a mean over ``compare.seeds`` with its spread; every run is set against the full
model at the same seed image by image, and the exact McNemar test on the pairs pooled over the
seeds says whether a gap is more than chance (why that test: ``multifusion.reporting.seed_stats``).
Output: ``reports/<set>/results.md`` (three tables, and with ``compare.robustness`` the accuracy
under every shift: ``multifusion.reporting.robustness_report``), ``summary.json`` (every model's
means, spreads, per-seed scores and paired counts), ``results.csv`` (bar plots in ``dvc plots
show``), two PNG bar charts and ``robustness.png``; the per-run metric files are what ``dvc
metrics show`` lists.

    stats = summarize(read_runs("metrics/compare", cfg.compare.models, cfg.compare.seeds, "plots/compare"))
    write_report(stats, "reports/ncm", dataset="`ncm`")
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np

from multifusion.core.config import FULL_MODEL as FULL
from multifusion.core.config import Config
from multifusion.core.atomic import write_text
from multifusion.core.json_files import write_json
from multifusion.core.plotting import pyplot, save_figure
from multifusion.reporting.robustness_report import Results, plot_robustness, read_robustness, robustness_markdown
from multifusion.reporting.seed_stats import PRF, TOPK, read_metrics, read_runs, summarize

__all__ = ["FULL", "LABELS", "read_metrics", "report_from_files", "write_report"]

SIGNIFICANCE = 0.05  # two-sided level at which a paired gap counts as more than chance

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


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _seconds(m: dict[str, float]) -> str:
    return f"{m['train_seconds']:.0f}" if "train_seconds" in m else "–"


def paired_cell(m: dict[str, float]) -> str:
    """'b / c (p = ...)' of a run's paired test against the full model (pooled over the seeds), or a dash."""
    if "only_multifusion_right" not in m:
        return "–"
    return f"{m['only_multifusion_right']:.0f} / {m['only_model_right']:.0f} (p = {m['mcnemar_p']:.2f})"


def mean_cell(m: dict[str, float], key: str) -> str:
    """The mean over seeds, '± std' beside it when there are two seeds or more."""
    if m.get("n_seeds", 1) > 1 and f"{key}_std" in m:
        return f"{m[key]:.3f} ± {m[key + '_std']:.3f}"
    return _f(m[key])


def range_cell(m: dict[str, float], key: str) -> str:
    """'min–max' over the seeds (a dash for one seed)."""
    if m.get("n_seeds", 1) > 1 and f"{key}_min" in m:
        return f"{m[key + '_min']:.3f}–{m[key + '_max']:.3f}"
    return "–"


def seed_table(rows: dict[str, dict], seeds: list[int]) -> str:
    """Markdown: per model, top-1 / macro-F1 at each seed, top-1's mean ± std and min–max, and image
    by image against MultiFusion trained with the same seed (only MF / only it right), then the
    exact McNemar test on the pairs pooled over the seeds."""
    header = ["model", *(f"seed {s}: top-1 / macro F1" for s in seeds), "top-1 mean ± std", "top-1 min–max",
              "only MF / only it right, per seed", "pooled (McNemar p)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows.items():
        per_seed = m.get("per_seed", {})
        cells = [f"{per_seed[str(s)]['top1']:.3f} / {per_seed[str(s)]['macro_f1']:.3f}" if str(s) in per_seed else "–" for s in seeds]
        paired = [f"{per_seed[str(s)]['only_multifusion_right']} / {per_seed[str(s)]['only_model_right']}"
                  for s in seeds if "only_multifusion_right" in per_seed.get(str(s), {})]
        label = f"**{LABELS.get(name, name)}**" if name == FULL else LABELS.get(name, name)
        lines.append(f"| {label} | {' | '.join(cells)} | {mean_cell(m, 'top1')} | {range_cell(m, 'top1')} | "
                     f"{', '.join(paired) or '–'} | {paired_cell(m)} |")
    return "\n".join(lines)


def topk_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per model (ours first, then baselines): top-k and macro-F1 (means over the
    seeds, top-1 and macro-F1 ± std), training seconds, the paired test against ours (images only
    MultiFusion / only this model gets right, pooled over the seeds, exact McNemar p), then the paper's top-k."""
    head = ("| model | top-1 | top-2 | top-3 | top-5 | macro F1 | train s | only MF / only it right (McNemar p) "
            "| paper: model | paper top-1 | paper top-2 | paper top-3 | paper top-5 |")
    lines = [head, "|" + "---|" * 13]
    for name, m in rows.items():
        paper_name, paper = PAPER_TOPK.get(name, ("–", (None,) * 4))
        cells = [LABELS.get(name, name), mean_cell(m, "top1"), *(_f(m[k]) for k in TOPK[1:]), mean_cell(m, "macro_f1"),
                 _seconds(m), paired_cell(m), paper_name, *(_f(v) for v in paper)]
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
        cells = [LABELS.get(name, name), mean_cell(m, "top1"), *(_f(m[k]) for k in PRF[:2]), mean_cell(m, "macro_f1"), *effect,
                 paired_cell(m), paper_name,
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
    seeds = int(m.get("n_seeds", 1))
    over = f", over {seeds} seeds" if seeds > 1 else ""
    return (
        f"{sentence} Image by image against {LABELS.get(best, best)}{over}: {b} test images only MultiFusion gets right, "
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


def dataset_label(set_name: str, root: str, repo: str | Path = ".") -> str:
    """The data set in words for the report: its name (``compare.set``) and ``data.root`` relative to
    the repository, never an absolute path of the machine that made the report (issue 26)."""
    path = Path(root)
    if not path.is_absolute():
        return f"`{set_name}` (`{path.as_posix()}`)"
    try:
        return f"`{set_name}` (`{path.resolve().relative_to(Path(repo).resolve()).as_posix()}`)"
    except ValueError:
        return f"`{set_name}` (a folder outside the repository)"


def render_results(rows: dict[str, dict], seeds: list[int], dataset: str, date: str, where: str = "",
                   robustness: Results | None = None) -> str:
    """The whole results.md text. ``rows``: name -> summary (``seed_stats.summarize``), MultiFusion first;
    ``robustness``: every run's shifted accuracies (``robustness_report.read_robustness``) or None."""
    ours = rows[FULL]
    baselines = {n: m for n, m in rows.items() if not is_ablation(n)}
    ablations = {n: m for n, m in rows.items() if is_ablation(n) and n != FULL}
    n_test = ours.get("n")
    if len(seeds) > 1:
        seed_lines = [
            f"- Seeds: every model at {len(seeds)} training seeds ({', '.join(map(str, seeds))}); scores are means over them",
            "  (top-1 and macro F1 ± the sample standard deviation). Paired counts set each model against",
            "  MultiFusion trained with the same seed, image by image; the test is the exact McNemar test on",
            "  the pairs pooled over the seeds: it uses every test image at every seed, where a sign test over",
            f"  {len(seeds)} seeds cannot go below p = {0.5 ** len(seeds):.3g} one-sided ({min(1.0, 2 * 0.5 ** len(seeds)):.3g} two-sided).",
        ]
    else:
        seed_lines = [f"- Seed: every model at one training seed ({seeds[0]}); paired counts set each model against",
                      "  MultiFusion at that seed, image by image (exact McNemar test)."]
    return "\n".join(
        [
            "# MultiFusion: results",
            "",
            f"- Dataset: {dataset}" + (f" (test split: {int(n_test)} images)" if n_test else ""),
            f"- Date: {date}" + (f"; machine: {where}" if where else ""),
            "- Every model is trained from scratch on the same prepared splits, epoch budget and augmentation",
            "  as `train`, and scored on the test split under the same test-time policy (`evaluate.tta`),",
            "  with temperature-calibrated probabilities. `train s`: wall-clock seconds of training.",
            *seed_lines,
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
            "## Seeds",
            "",
            seed_table(rows, seeds),
            "",
            *([robustness_markdown(robustness, LABELS)] if robustness is not None else []),
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
    save_figure(fig, path, dpi=110)


def write_report(rows: dict[str, dict], seeds: list[int], out_dir: str | Path, dataset: str, date: str | None = None,
                 robustness: Results | None = None) -> Path:
    """Write results.md, summary.json, results.csv, topk.png, ablation.png and robustness.png into
    ``out_dir``. ``rows``: ``seed_stats.summarize`` of every model, MultiFusion (``FULL``) among
    them; ``robustness``: the runs' shifted accuracies, or None (the comparison ran without them)."""
    if FULL not in rows:
        raise ValueError(f"compare.models lacks {FULL!r}: the report sets every model against it; add it in params.yaml")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = date or dt.date.today().isoformat()
    rows = {FULL: rows[FULL], **{n: m for n, m in rows.items() if n != FULL}}
    atomic_text(out_dir / "results.md", render_results(rows, seeds, dataset, date, machine(), robustness))
    write_json(out_dir / "summary.json", rows)
    spreads = ("top1_std", "macro_f1_std")
    csv = ["model,kind," + ",".join(TOPK + PRF + spreads) + ",seeds"]
    for name, m in rows.items():
        kind = "ablation" if is_ablation(name) and name != FULL else ("ours" if name == FULL else "baseline")
        values = [f"{m[k]:.4f}" for k in TOPK + PRF] + [f"{m[k]:.4f}" if k in m else "" for k in spreads]
        csv.append(f"{LABELS.get(name, name)},{kind}," + ",".join(values) + f",{m.get('n_seeds', 1)}")
    atomic_text(out_dir / "results.csv", "\n".join(csv) + "\n")
    plot_bars({n: m for n, m in rows.items() if not is_ablation(n) or n == FULL}, TOPK, out_dir / "topk.png", "Top-k accuracy, test split")
    plot_bars({n: m for n, m in rows.items() if is_ablation(n)}, PRF, out_dir / "ablation.png", "Ablations: macro P / R / F1")
    plot_robustness(robustness, out_dir / "robustness.png", LABELS)
    return out_dir / "results.md"


def atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`multifusion.core.atomic.write_text`)."""
    write_text(path, text)


def report_from_files(cfg: Config, compare_dir: str | Path, out_dir: str | Path, compare_plots: str | Path | None = None,
                      compare_models: str | Path | None = None) -> Path:
    """The report stage: every model of ``compare.models`` at every seed of ``compare.seeds``
    (metrics, with ``compare_plots`` the per-image predictions, with ``compare_models`` and
    ``compare.robustness`` the shifted accuracies), summarized and written."""
    runs = read_runs(compare_dir, cfg.compare.models, cfg.compare.seeds, compare_plots)
    robustness = None
    if cfg.compare.robustness and compare_models is not None:
        robustness = read_robustness(compare_models, cfg.compare.models, cfg.compare.seeds)
        if robustness is None:
            raise FileNotFoundError(f"compare.robustness is true but a run under {compare_models} has no robustness.json; "
                                    "re-run the comparison (`dvc repro comparison/dvc.yaml`)")
    return write_report(summarize(runs), cfg.compare.seeds, out_dir, dataset_label(cfg.compare.set, cfg.data.root),
                        robustness=robustness)
