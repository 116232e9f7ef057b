"""The README's results summary and the documentation's results page, generated from the
committed comparison reports and pipeline plots.

    python -m multifusion.reporting.readme_tables --write    # rewrite README.md, docs/results.md, docs/img/results/
    python -m multifusion.reporting.readme_tables --check    # exit 1 naming every stale file

For every ``reports/<set>/`` (written by the comparison pipeline's report stage) it reads
``summary.json`` (every model's test scores), the date and machine lines of
``results.md`` (per model, ``summary.json`` holds the scores at every seed of ``compare.seeds``
and the paired counts against MultiFusion at each: the seed table), and rewrites

- ``README.md`` between ``<!-- summary:begin -->`` and ``<!-- summary:end -->``: per set,
  MultiFusion against the best baseline and the text and hierarchy ablations, with paired counts;
- ``docs/results.md`` between ``<!-- results:begin -->`` and ``<!-- results:end -->``: every
  table of every set, and the figures;
- ``docs/img/results/``: copies of the figures the pipelines write (``reports/<set>/topk.png``,
  ``ablation.png``, ``plots/evaluate/confusion.png``, ``plots/robustness/accuracy_vs_severity.png``):
  MkDocs serves only files under ``docs/``.

so the tables a reader sees are the measured files, never hand-typed. ``tests/test_docs.py``
fails when a committed copy differs from what this module generates.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from multifusion.core.atomic import write_bytes, write_text
from multifusion.reporting.report import FULL, LABELS, is_ablation, paired_cell, seed_table

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- summary:begin -->", "<!-- summary:end -->"
COMMAND = "python -m multifusion.reporting.readme_tables --write"
DOCS_RESULTS = Path("docs/results.md")
DOCS_FIGURES = Path("docs/img/results")
TEXT_ABLATION, HIERARCHY_ABLATION = "mf_no_text", "mf_single_scale"
# Every PNG the root pipeline writes under plots/<stage>/ and the comparison under reports/<set>/ is
# shown; these are the captions of the known ones (another figure is shown under its file name).
PIPELINE_FIGURES = {
    "plots/evaluate/confusion.png": "Confusion matrix of the default run's test split (`evaluate`)",
    "plots/robustness/accuracy_vs_severity.png": "Accuracy under the shifts of real micrographs, by severity (`robustness`)",
    "plots/evaluate/risk_coverage.png": "Risk-coverage: the error of the calls kept as the least confident ones are "
                                        "refused, test split (`evaluate`)",
}
SET_FIGURES = {"topk.png": "Top-k accuracy, every model", "ablation.png": "Ablations: macro precision / recall / F1",
               "robustness.png": "Accuracy under the shifts, every model (compare.robustness)"}


def _header_line(results_md: str, prefix: str) -> str:
    return next((line[len(prefix):].strip() for line in results_md.splitlines() if line.startswith(prefix)), "")


def _no_machine_paths(text: str) -> str:
    """An absolute path in backticks (the data folder of the machine that ran the report)
    shortened to its last component: `/data/ncm-sem` -> `ncm-sem`."""
    return re.sub(r"`(/[^`]*)`", lambda m: f"`{Path(m.group(1)).name}`", text)


def _source(path: str, links: bool) -> str:
    """A repository file named in a table: a link from the README, a plain name in the docs
    (MkDocs serves only docs/, so a link there would be a broken one)."""
    return f"[`{path}`]({path})" if links else f"`{path}`"


def set_table(set_dir: Path, links: bool = True) -> str:
    """Markdown for one data set: baselines table, then ablations with the component's effect.
    Files are named by their path in the repository, ``reports/<set>/...``."""
    shown = f"reports/{set_dir.name}"
    summary = json.loads((set_dir / "summary.json").read_text())
    md = (set_dir / "results.md").read_text()
    full = summary[FULL]
    lines = [
        f"#### `{set_dir.name}`: {_no_machine_paths(_header_line(md, '- Dataset:'))}",
        "",
        f"{_header_line(md, '- Date:')}. Source: {_source(f'{shown}/results.md', links)}.",
        "",
        "| model | top-1 | top-5 | macro F1 | train s | test images only MF / only it gets right (McNemar p) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in summary.items():
        if is_ablation(name) and name != FULL:
            continue
        seconds = f"{m['train_seconds']:.0f}" if "train_seconds" in m else "–"
        label = f"**{LABELS.get(name, name)}**" if name == FULL else LABELS.get(name, name)
        lines.append(f"| {label} | {m['top1']:.3f} | {m['top5']:.3f} | {m['macro_f1']:.3f} | {seconds} | {paired_cell(m)} |")
    ablations = [n for n in summary if is_ablation(n) and n != FULL]
    if ablations:
        lines += ["", "| ablation | top-1 | macro F1 | component's effect on top-1 / macro F1 | only full / only ablation right (McNemar p) |",
                  "|---|---|---|---|---|"]
        for name in ablations:
            m = summary[name]
            lines.append(
                f"| {LABELS.get(name, name)} | {m['top1']:.3f} | {m['macro_f1']:.3f} | "
                f"{full['top1'] - m['top1']:+.3f} / {full['macro_f1'] - m['macro_f1']:+.3f} | {paired_cell(m)} |"
            )
    seeds = sorted({int(seed) for m in summary.values() for seed in m.get("per_seed", {})})
    if len(seeds) > 1:  # a report of the seeds axis (compare.seeds): every model at every seed
        lines += ["", f"Training seeds (from {_source(f'{shown}/summary.json', links)}; the same split at every seed, "
                  "each model against MultiFusion at the same seed, then the exact McNemar test on the pairs pooled over the seeds):",
                  "", seed_table(summary, seeds)]
    return "\n".join(lines)


def report_sets(reports_dir: Path) -> list[Path]:
    """Every ``reports_dir/<set>/`` with a summary.json and a results.md, by name."""
    sets = sorted(p for p in reports_dir.iterdir() if (p / "summary.json").is_file() and (p / "results.md").is_file())
    if not sets:
        raise FileNotFoundError(f"{reports_dir}: no reports/<set>/summary.json; run `dvc repro comparison/dvc.yaml` first")
    return sets


def results_section(reports_dir: Path, links: bool = True) -> str:
    sets = report_sets(reports_dir)
    note = f"_Generated by `{COMMAND}` from the files named below._"
    return "\n\n".join([note, *(set_table(p, links) for p in sets)])


def best_baseline(summary: dict[str, dict[str, float]]) -> str | None:
    """The baseline with the highest top-1 (macro-F1 breaks a tie), or None without baselines."""
    baselines = [n for n in summary if not is_ablation(n)]
    return max(baselines, key=lambda n: (round(summary[n]["top1"], 3), summary[n]["macro_f1"])) if baselines else None


def _test_images(results_md: str) -> str:
    """': 293 test images' from the report's dataset line, or nothing."""
    found = re.search(r"test split: (\d+) images", _header_line(results_md, "- Dataset:"))
    return f": {found.group(1)} test images" if found else ""


def summary_table(set_dir: Path) -> str:
    """Markdown for one set, README-sized: MultiFusion, the best baseline, and the ablations
    without the text and without the hierarchy, each with its score (the mean ± std over the
    seeds when the report has several), the test images only MultiFusion / only that model
    gets right (summed over the seeds) and the exact McNemar p."""
    summary = json.loads((set_dir / "summary.json").read_text())
    md = (set_dir / "results.md").read_text()
    rows = [(FULL, "")]
    best = best_baseline(summary)
    if best is not None:
        rows.append((best, "best baseline"))
    rows += [(name, "ablation") for name in (TEXT_ABLATION, HIERARCHY_ABLATION) if name in summary]
    lines = [
        f"**`{set_dir.name}`**{_test_images(md)}, {_header_line(md, '- Date:').split(';')[0]}; "
        f"source [`reports/{set_dir.name}/results.md`](reports/{set_dir.name}/results.md).",
        "",
        "| model | role | seeds | top-1 | macro F1 | test images only MultiFusion / only it gets right (McNemar p) |",
        "|---|---|---|---|---|---|",
    ]
    for name, role in rows:
        m = summary[name]
        label = f"**{LABELS.get(name, name)}**" if name == FULL else LABELS.get(name, name)
        lines.append(f"| {label} | {role} | {int(m.get('n_seeds', 1))} | {_mean(m, 'top1')} | {_mean(m, 'macro_f1')} | "
                     f"{paired_cell(m)} |")
    return "\n".join(lines)


def _mean(m: dict, key: str) -> str:
    """A score, or its mean over the seeds ± their standard deviation (a report of several seeds)."""
    if m.get("n_seeds", 1) > 1 and f"{key}_std" in m:
        return f"{m[key]:.3f} ± {m[key + '_std']:.3f}"
    return f"{m[key]:.3f}"


def readme_summary(reports_dir: Path) -> str:
    note = (f"_Generated by `{COMMAND}` from `reports/<set>/summary.json`; every model, seed and figure: "
            "[results](docs/results.md)._")
    return "\n\n".join([note, *(summary_table(p) for p in report_sets(reports_dir))])


def figure_copies(root: Path, reports_dir: Path) -> list[tuple[Path, Path, str]]:
    """(source, copy under docs/img/results/, caption) of every figure the results page shows."""
    plots = sorted(p for p in (root / "plots").glob("*/*.png") if p.parent.name != "offline")
    copies = [(src, root / DOCS_FIGURES / src.name, PIPELINE_FIGURES.get(src.relative_to(root).as_posix(), f"`{src.name}`"))
              for src in plots]
    for set_dir in report_sets(reports_dir):
        copies += [(src, root / DOCS_FIGURES / set_dir.name / src.name, f"`{set_dir.name}`: {SET_FIGURES.get(src.name, src.name)}")
                   for src in sorted(set_dir.glob("*.png"), key=lambda p: (list(SET_FIGURES).index(p.name) if p.name in SET_FIGURES else len(SET_FIGURES), p.name))]
    return copies


def _figure(root: Path, src: Path, copy: Path, caption: str) -> list[str]:
    rel = copy.relative_to((root / DOCS_RESULTS).parent).as_posix()
    return [f"![{caption}]({rel})", "", f"_{caption}. Source: `{src.relative_to(root).as_posix()}`._", ""]


def eval_table(eval_json: Path) -> str:
    """The default run's test metrics (``metrics/eval.json``) as one markdown table."""
    m = json.loads(eval_json.read_text())
    keys = [("top1", "top-1"), ("top2", "top-2"), ("top3", "top-3"), ("top5", "top-5"), ("macro_precision", "macro P"),
            ("macro_recall", "macro R"), ("macro_f1", "macro F1"), ("ece_uncalibrated", "ECE before T"), ("ece", "ECE after T"),
            ("aurc", "AURC"), ("coverage_at_0.99", "coverage at 99% accuracy"), ("coverage_at_0.95", "coverage at 95% accuracy")]
    keys = [(k, name) for k, name in keys if k in m]
    return "\n".join(["| " + " | ".join(name for _, name in keys) + " |", "|" + "---|" * len(keys),
                      "| " + " | ".join(f"{m[k]:.3f}" for k, _ in keys) + " |"])


def docs_results_section(root: Path, reports_dir: Path) -> str:
    """docs/results.md's generated part: per set every table and its figures, then the default
    pipeline run's test metrics, confusion matrix and robustness curve."""
    copies = figure_copies(root, reports_dir)
    lines = [f"_Generated by `{COMMAND}` from the files named below; the figures are copies of them._", ""]
    for set_dir in report_sets(reports_dir):
        lines += [set_table(set_dir, links=False), ""]
        for src, copy, caption in copies:
            if src.parent == set_dir:
                lines += _figure(root, src, copy, caption)
    eval_json = root / "metrics/eval.json"
    lines += ["## The default pipeline run", "",
              "`dvc repro` on the embedded default (the synthetic set): the `evaluate` stage's test metrics "
              "(source: `metrics/eval.json`; ECE before and after temperature scaling; the area under the "
              "risk-coverage curve and the share of images called at a target accuracy, see "
              "[abstention](screening.md#abstaining-at-a-target-accuracy)), its confusion matrix and the "
              "`robustness` stage's accuracy under shifts.", ""]
    if eval_json.is_file():
        lines += [eval_table(eval_json), ""]
    for src, copy, caption in copies:
        if src.parent.parent == root / "plots":
            lines += _figure(root, src, copy, caption)
    return "\n".join(lines).rstrip() + "\n"


def replace_section(text: str, begin: str, end: str, body: str, where: str) -> str:
    """``text`` with everything between the markers replaced by ``body``."""
    if begin not in text or end not in text or text.index(begin) > text.index(end):
        raise ValueError(f"{where}: no '{begin}' ... '{end}' section; add both markers where the tables go")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def update_readme(readme: Path, reports_dir: Path) -> bool:
    """Rewrite the full results section between the results markers; True when the file changed."""
    text = readme.read_text()
    new = replace_section(text, BEGIN, END, results_section(reports_dir), str(readme))
    write_text(readme, new)
    return new != text


def generated_files(root: Path = Path(".")) -> dict[Path, bytes]:
    """{path: the bytes it should hold} for the README, the results page and the figure copies."""
    reports_dir = root / "reports"
    readme, page = root / "README.md", root / DOCS_RESULTS
    out = {
        readme: replace_section(readme.read_text(), SUMMARY_BEGIN, SUMMARY_END, readme_summary(reports_dir), str(readme)).encode(),
        page: replace_section(page.read_text(), BEGIN, END, docs_results_section(root, reports_dir), str(page)).encode(),
    }
    for src, copy, _ in figure_copies(root, reports_dir):
        out[copy] = src.read_bytes()
    return out


def orphan_figures(root: Path, generated: dict[Path, bytes]) -> list[Path]:
    """Files under docs/img/results/ that no longer copy any figure (removed by --write)."""
    folder = root / DOCS_FIGURES
    return sorted(p for p in folder.rglob("*") if p.is_file() and p not in generated) if folder.is_dir() else []


def stale_files(root: Path = Path(".")) -> list[Path]:
    """The generated files whose committed content differs from what the reports give, and
    figure copies whose source is gone."""
    generated = generated_files(root)
    stale = [path for path, data in generated.items() if not path.is_file() or path.read_bytes() != data]
    return stale + orphan_figures(root, generated)


def write_generated(root: Path = Path(".")) -> list[Path]:
    """Write every stale generated file; returns those written."""
    written = []
    generated = generated_files(root)
    for orphan in orphan_figures(root, generated):
        orphan.unlink()
        written.append(orphan)
    for path, data in generated.items():
        if not path.is_file() or path.read_bytes() != data:
            write_bytes(path, data)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multifusion.reporting.readme_tables", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=".", help="the repository root (default: the current directory)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the stale files (the default)")
    mode.add_argument("--check", action="store_true", help="write nothing; exit 1 naming every stale file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.root)
    if args.check:
        stale = stale_files(root)
        for path in stale:
            print(f"{path}: stale; run `{COMMAND}`", file=sys.stderr)
        return 1 if stale else 0
    written = write_generated(root)
    print(f"{len(written)} file(s) rewritten from {root / 'reports'}/" + "".join(f"\n  {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
