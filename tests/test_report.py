"""The results report, built from fake metric files: every model gets a row, the paper's
published figures sit in their own columns, missing inputs are clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from multifusion.reporting.report import read_metrics, report_from_files

REPO_ROOT = Path(__file__).resolve().parents[1]

# The paper's published figures (arXiv 2408.13661, SEM set; as DESIGN.md quotes them), typed
# here from the paper rather than read back from multifusion.reporting.report: a typo there fails.
# The report's rows: ours, then compare.models' baselines in order, then the ablations.
PAPER_TOPK = {"MultiFusion": ("MultiFusion-LLM (GPT-3.5)", "0.947 0.965 0.986 0.991"), "ResNet-18": ("ResNet", "0.512 0.766 0.891 0.906"),
              "ResNet-50": ("ResNet", "0.512 0.766 0.891 0.906"), "ViT-S": ("T2T-ViT", "0.702 0.859 0.906 0.938"),
              "Swin-T": ("SwinT", "0.675 0.766 0.891 0.938"), "ViG-Ti (isotropic)": ("–", "– – – –")}
PAPER_ABLATION = {"MultiFusion": ("full", "0.941 0.945 0.939"), "w/o HNF (single scale)": ("w/o HNF", "0.776 0.753 0.745"),
                  "w/o LLM text": ("w/o LLM", "0.714 0.726 0.721"), "w/o MHA (concat fusion)": ("w/o MHA (simple fusion)", "0.827 0.831 0.823"),
                  "Transformer instead of Neural ODE": ("–", "– – –"), "w/o patch graph": ("–", "– – –")}


SEEDS = [42, 43, 44]


def fake_metrics(seed: float) -> dict[str, float]:
    keys = ["top1", "top2", "top3", "top5", "macro_precision", "macro_recall", "macro_f1", "ece"]
    return {k: round(0.1 + 0.05 * i + seed, 4) for i, k in enumerate(keys)} | {"n": 160}


def table_rows(md: str, header_start: str) -> list[list[str]]:
    """The body rows of the markdown table whose header starts with ``header_start``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _write_metrics(root: Path, name: str, seed: int, metrics: dict) -> None:
    path = root / "metrics" / "compare" / name / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))


@pytest.fixture
def metric_files(tmp_path: Path, make_config):
    """metrics/compare/<name>/seed<N>.json for every model at 3 seeds: MultiFusion 0.3 above the
    base figures, model i at 0.01 * i, each seed adding 0.001 * (seed - 42) (so means are the
    seed-43 figures and the top-1 std is 0.001)."""
    cfg = make_config({"compare.seeds": SEEDS})
    runs = {}
    for i, name in enumerate(cfg.compare.models):
        offset = 0.3 if name == "multifusion" else 0.01 * i
        runs[name] = fake_metrics(offset + 0.001)
        for seed in SEEDS:
            _write_metrics(tmp_path, name, seed, fake_metrics(offset + 0.001 * (seed - 42)))
    return cfg, tmp_path, runs


def _report(cfg, root: Path, plots: bool = False) -> str:
    return report_from_files(cfg, root / "metrics/compare", root / "reports", root / "plots/compare" if plots else None).read_text()


def test_report_has_every_row_and_the_published_columns(metric_files) -> None:
    cfg, root, runs = metric_files
    md = _report(cfg, root)
    assert f"- Dataset: `{cfg.compare.set}` (`{cfg.data.root}`)" in md and "Date:" in md
    assert "3 training seeds (42, 43, 44)" in md and "cannot go below p = 0.125 one-sided (0.25 two-sided)" in md

    topk = table_rows(md, "| model |")
    baselines = [n for n in cfg.compare.models if n != "multifusion" and not n.startswith("mf_")]
    assert [r[0] for r in topk] == list(PAPER_TOPK)
    assert topk[0][1:6] == ["0.401 ± 0.001", "0.451", "0.501", "0.551", "0.701 ± 0.001"]  # ours: means over the seeds, ± std
    for row, name in zip(topk[1:], baselines):
        assert row[1] == f"{runs[name]['top1']:.3f} ± 0.001"
        assert row[5] == f"{runs[name]['macro_f1']:.3f} ± 0.001"  # macro-F1 beside top-k
    for row in topk:  # the paper's figures in the published columns, "–" where it has no such row
        assert row[7] == "–"  # no per-image predictions given: no paired test
        assert (row[8], " ".join(row[9:13])) == PAPER_TOPK[row[0]], row[0]

    ablation = table_rows(md, "| variant |")
    variants = ["multifusion"] + [n for n in cfg.compare.models if n.startswith("mf_")]
    assert [r[0] for r in ablation] == list(PAPER_ABLATION)
    for row, name in zip(ablation[1:], variants[1:]):  # each component's effect, with its sign
        assert row[5] == f"{0.401 - runs[name]['top1']:+.3f}" and row[6] == f"{0.701 - runs[name]['macro_f1']:+.3f}"
        assert row[5].startswith("+")  # fake ablations all score below the full model
    for row in ablation:
        assert (row[8], " ".join(row[9:12])) == PAPER_ABLATION[row[0]], row[0]
    assert ablation[0][2:5] == ["0.601", "0.651", "0.701 ± 0.001"]  # ours: macro P/R/F1

    seeds = {r[0]: r for r in table_rows(md, "| model | seed 42")}
    assert seeds["**MultiFusion**"][1:6] == ["0.400 / 0.700", "0.401 / 0.701", "0.402 / 0.702", "0.401 ± 0.001", "0.400–0.402"]

    assert "falls short of" not in md  # ours 0.401 beats every fake baseline (top1 <= 0.15)
    summary = json.loads((root / "reports/summary.json").read_text())
    assert list(summary) == cfg.compare.models  # multifusion first, as in params.yaml
    assert summary["resnet18"]["n_seeds"] == 3 and summary["resnet18"]["per_seed"]["44"]["top1"] == pytest.approx(0.112)
    for png in ("topk.png", "ablation.png"):
        assert (root / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = (root / "reports/results.csv").read_text().splitlines()
    assert len(csv) == 1 + len(cfg.compare.models)
    assert csv[1].startswith("MultiFusion,ours,0.4010,")  # the full model's row is named MultiFusion
    assert csv[1].endswith(",0.0010,0.0010,3")  # top-1 and macro-F1 std, seeds


def test_one_seed_report_has_no_spread(tmp_path, make_config) -> None:
    """compare.seeds: [42] keeps a one-seed run possible: plain figures, no ± and no range."""
    cfg = make_config({"compare.seeds": [42], "compare.models": ["multifusion", "resnet18"]})
    for i, name in enumerate(cfg.compare.models):
        _write_metrics(tmp_path, name, 42, fake_metrics(0.1 * i))
    md = _report(cfg, tmp_path)
    assert "one training seed (42)" in md
    assert not any("±" in cell for table in ("| model |", "| variant |") for row in table_rows(md, table) for cell in row)
    assert table_rows(md, "| model | seed 42")[1][1:4] == ["0.200 / 0.500", "0.200", "–"]


def test_report_names_the_set_never_an_absolute_path(metric_files, tmp_path) -> None:
    """Issue 26: a data.root outside the repository is not printed; one inside it is, relative."""
    from multifusion.reporting.report import dataset_label

    cfg, root, _ = metric_files
    outside = "/abs/machine/path/ncm-sem"
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=outside))
    md = _report(cfg, root)
    assert outside not in md and f"- Dataset: `{cfg.compare.set}` (a folder outside the repository)" in md
    assert dataset_label("ncm", str(tmp_path / "data" / "x"), tmp_path) == "`ncm` (`data/x`)"


def test_missing_or_incomplete_metrics_are_clear_errors(metric_files) -> None:
    cfg, root, _ = metric_files
    (root / "metrics" / "compare" / "vig" / "seed43.json").unlink()
    with pytest.raises(FileNotFoundError, match="vig/seed43.json"):
        _report(cfg, root)
    (root / "bad.json").write_text(json.dumps({"top1": 0.5}))
    with pytest.raises(ValueError, match="missing metric keys"):
        read_metrics(root / "bad.json")


def test_readme_tables_come_from_the_report_files(metric_files) -> None:
    from multifusion.reporting.readme_tables import BEGIN, END, update_readme

    cfg, root, runs = metric_files
    report_from_files(cfg, root / "metrics/compare", root / "reports" / "tiny")
    readme = root / "README.md"
    readme.write_text(f"# Title\n\n{BEGIN}\nstale hand-typed table\n{END}\n\nmore text\n")
    assert update_readme(readme, root / "reports")
    text = readme.read_text()
    assert "stale" not in text and text.endswith("\n\nmore text\n") and text.startswith("# Title")
    assert "| **MultiFusion** | 0.401 | 0.551 | 0.701 | – | – |" in text  # from summary.json
    name = cfg.compare.models[1]
    assert f"{runs[name]['top1']:.3f}" in text
    assert not update_readme(readme, root / "reports")  # a second run changes nothing
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        update_readme(readme, root / "reports")


def test_verdict_calls_a_gap_that_rounds_to_zero_a_tie():
    """The sentence prints 3 decimals, so 0.92217 against 0.92180 is a tie, not 'beats by 0.000'
    (the NCM macro-F1 of MultiFusion and ViG-Ti, 2026-11-30)."""
    from multifusion.reporting.report import verdict

    text = verdict({"top1": 0.94198, "macro_f1": 0.92217}, {"vig": {"top1": 0.95222, "macro_f1": 0.92180}})
    assert "top-1 (0.942) falls short of the best baseline's (ViG-Ti (isotropic), 0.952) by 0.010" in text
    assert "macro-F1 (0.922) ties the best baseline's (ViG-Ti (isotropic), 0.922)." in text
    assert "by 0.000" not in text


def test_mcnemar_exact_matches_scipy_binomtest() -> None:
    """The exact McNemar p is scipy's two-sided binomial test on the discordant pairs."""
    from scipy.stats import binomtest

    from multifusion.evaluation.paired_test import mcnemar_exact

    rng = np.random.default_rng(0)
    for b, c in [(0, 0), (0, 1), (3, 0), (5, 5), (2, 9), *rng.integers(0, 60, size=(30, 2)).tolist()]:
        expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12, abs=1e-15), (b, c)


def test_paired_counts_on_random_predictions() -> None:
    from multifusion.evaluation.paired_test import paired_counts

    rng = np.random.default_rng(1)
    labels, a, b = rng.integers(0, 4, size=(3, 200))
    only_a, only_b = paired_counts(labels, a, b)
    assert only_a == sum(x == y != z for x, y, z in zip(a, labels, b))
    assert only_b == sum(z == y != x for x, y, z in zip(a, labels, b))
    assert only_a - only_b == int((a == labels).sum() - (b == labels).sum())  # the accuracy gap, in images


def _write_predictions(path: Path, labels: list[str], preds: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in zip(labels, preds)))


def test_report_sets_every_run_against_ours_image_by_image_at_each_seed(metric_files) -> None:
    """With per-image predictions, each model is set against MultiFusion at the same seed: the
    per-seed counts, and one exact McNemar test on the pairs pooled over the seeds."""
    cfg, root, _ = metric_files
    labels = ["a"] * 40 + ["b"] * 40
    wrong = {"resnet18": {42: 4, 43: 4, 44: 4}}  # 12 images over 3 seeds; every other model 1, 0, 1
    for name in cfg.compare.models:
        for seed in SEEDS:
            preds = list(labels)
            if name != "multifusion":  # ours: all right at every seed
                for i in range(wrong.get(name, {42: 1, 43: 0, 44: 1})[seed]):
                    preds[i + seed - 42] = "b"  # a different image first at each seed
            _write_predictions(root / f"plots/compare/{name}/seed{seed}/confusion.csv", labels, preds)
    md = _report(cfg, root, plots=True)
    rows = {r[0]: r for r in table_rows(md, "| model |")}
    assert rows["ResNet-18"][7] == "12 / 0 (p = 0.00)" and rows["ViG-Ti (isotropic)"][7] == "2 / 0 (p = 0.50)"
    seeds = {r[0]: r for r in table_rows(md, "| model | seed 42")}
    assert seeds["ResNet-18"][6:8] == ["4 / 0, 4 / 0, 4 / 0", "12 / 0 (p = 0.00)"]
    assert seeds["**MultiFusion**"][6:8] == ["–", "–"]  # ours is the reference
    summary = json.loads((root / "reports/summary.json").read_text())
    assert summary["resnet18"]["mcnemar_p"] == pytest.approx(2 * 0.5**12)
    assert [summary["vig"]["per_seed"][str(s)]["only_multifusion_right"] for s in SEEDS] == [1, 0, 1]
    # the best fake baseline by metrics is the last baseline in compare.models; its gap of 2 images is chance
    assert "over 3 seeds: 2 test images only MultiFusion gets right" in md and "exact McNemar p = 0.50 (within chance" in md
    from multifusion.reporting.readme_tables import BEGIN, END, update_readme

    readme = root / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    update_readme(readme, root)  # root/reports holds this report
    assert "| ResNet-18 | 0.111 | 0.261 | 0.411 | – | 12 / 0 (p = 0.00) |" in readme.read_text()
    # the seed table, from summary.json (no per-image files beside the report)
    assert "| ResNet-18 | 0.110 / 0.410 | 0.111 / 0.411 | 0.112 / 0.412 | 0.111 ± 0.001 | 0.110–0.112 | 4 / 0, 4 / 0, 4 / 0 | 12 / 0 (p = 0.00) |" \
        in readme.read_text()

    _write_predictions(root / "plots/compare/vig/seed44/confusion.csv", labels[::-1], labels[::-1])
    with pytest.raises(ValueError, match="vig/seed44/confusion.csv: its test images differ"):
        _report(cfg, root, plots=True)


def test_seed_spread_matches_numpy() -> None:
    from multifusion.reporting.seed_stats import spread

    values = [0.93, 0.95, 0.96]
    got = spread(values)
    assert got["mean"] == pytest.approx(np.mean(values)) and got["std"] == pytest.approx(np.std(values, ddof=1))
    assert (got["min"], got["max"]) == (0.93, 0.96) and spread([0.5])["std"] == 0.0


def test_a_sign_test_over_three_seeds_cannot_reach_five_percent() -> None:
    """Why the report pools the pairs: three seeds all in one direction is the strongest a sign
    test over 3 seeds can see, p = 0.25 two-sided (0.125 one-sided), where the pooled McNemar
    test on a few images a seed already can."""
    from multifusion.evaluation.paired_test import mcnemar_exact

    assert mcnemar_exact(3, 0) == pytest.approx(0.25)  # the sign test: 3 seeds, all one way
    assert mcnemar_exact(4 + 4 + 4, 0) < 0.05          # pooled: 4 images a seed, 12 in all


def _write_robustness(root: Path, name: str, seed: int, clean: float, noise: list[float]) -> None:
    """models/compare/<name>/seed<N>/robustness.json in evaluate_under_shifts' layout: one shift, len(noise) levels."""
    path = root / "models" / "compare" / name / f"seed{seed}" / "robustness.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    shifts = {"gaussian_noise": {str(0.02 * (i + 1)): {"severity": 0.02 * (i + 1), "level": i + 1, "accuracy": a, "macro_f1": a}
                                 for i, a in enumerate(noise)}}
    path.write_text(json.dumps({"n_images": 100, "clean": {"accuracy": clean, "macro_f1": clean}, "shifts": shifts}))


def test_robustness_section_sets_every_model_against_ours_per_shift_level(tmp_path, make_config) -> None:
    """With compare.robustness: the accuracy table (means over seeds), MultiFusion minus each
    model per level with the seeds it is at or above, the levels where it is behind named,
    and robustness.png; without it, no section and a figure that says so."""
    cfg = make_config({"compare.seeds": [42, 43], "compare.models": ["multifusion", "resnet18"], "compare.robustness": True})
    for name in cfg.compare.models:
        for seed in (42, 43):
            _write_metrics(tmp_path, name, seed, fake_metrics(0.3 if name == "multifusion" else 0.1))
    _write_robustness(tmp_path, "multifusion", 42, 0.90, [0.80, 0.50])
    _write_robustness(tmp_path, "multifusion", 43, 0.92, [0.84, 0.54])
    _write_robustness(tmp_path, "resnet18", 42, 0.85, [0.70, 0.60])
    _write_robustness(tmp_path, "resnet18", 43, 0.87, [0.86, 0.60])
    md = report_from_files(cfg, tmp_path / "metrics/compare", tmp_path / "reports", None, tmp_path / "models/compare").read_text()
    assert "## Robustness under shifts" in md
    accuracy = table_rows(md, "| shift (level, severity) | MultiFusion | ResNet-18")
    assert accuracy[0] == ["clean", "**0.910**", "0.860"]
    assert accuracy[2] == ["gaussian_noise 2 (0.04)", "0.520", "**0.600**"]
    gaps = table_rows(md, "| shift (level, severity) | ResNet-18")
    assert gaps[0] == ["clean", "+0.050 (2/2)"]
    assert gaps[1] == ["gaussian_noise 1 (0.02)", "+0.040 (1/2)"]  # +0.10 at seed 42, -0.02 at seed 43
    assert gaps[2] == ["gaussian_noise 2 (0.04)", "-0.080 (0/2)"]
    assert "Where MultiFusion is behind on average: ResNet-18 at gaussian_noise 2 (0.04) (-0.080)." in md
    assert (tmp_path / "reports" / "robustness.png").stat().st_size > 0

    (tmp_path / "models/compare/resnet18/seed43/robustness.json").unlink()
    with pytest.raises(FileNotFoundError, match="robustness.json"):
        report_from_files(cfg, tmp_path / "metrics/compare", tmp_path / "reports", None, tmp_path / "models/compare")
    off = make_config({"compare.seeds": [42, 43], "compare.models": ["multifusion", "resnet18"]})
    md = report_from_files(off, tmp_path / "metrics/compare", tmp_path / "reports2", None, tmp_path / "models/compare").read_text()
    assert "Robustness" not in md and (tmp_path / "reports2" / "robustness.png").is_file()


def test_robustness_section_tests_each_shift_level_image_by_image(tmp_path, make_config) -> None:
    """Runs that stored their per-image calls: per level, the images only MultiFusion / only the
    model gets right, pooled over the seeds, and the exact McNemar p (against a direct count)."""
    from multifusion.evaluation.paired_test import mcnemar_exact

    cfg = make_config({"compare.seeds": [42, 43], "compare.models": ["multifusion", "resnet18"], "compare.robustness": True})
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    calls = {}
    for name, right_rate in (("multifusion", 0.9), ("resnet18", 0.6)):
        for seed in (42, 43):
            _write_metrics(tmp_path, name, seed, fake_metrics(0.3))
            preds = {lv: np.where(rng.random(40) < right_rate - 0.2 * lv, labels, (labels + 1) % 3) for lv in (0, 1)}
            calls[name, seed] = preds
            path = tmp_path / "models" / "compare" / name / f"seed{seed}" / "robustness.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            acc = {lv: float(np.mean(p == labels)) for lv, p in preds.items()}
            path.write_text(json.dumps({
                "n_images": 40, "labels": labels.tolist(),
                "clean": {"accuracy": acc[0], "macro_f1": acc[0], "predictions": preds[0].tolist()},
                "shifts": {"brightness": {"0.1": {"severity": 0.1, "level": 1, "accuracy": acc[1], "macro_f1": acc[1],
                                                  "predictions": preds[1].tolist()}}}}))
    md = report_from_files(cfg, tmp_path / "metrics/compare", tmp_path / "reports", None, tmp_path / "models/compare").read_text()
    gaps = table_rows(md, "| shift (level, severity) | ResNet-18")
    for row, lv in zip(gaps, (0, 1)):
        b = sum(int(np.sum((calls["multifusion", s][lv] == labels) & (calls["resnet18", s][lv] != labels))) for s in (42, 43))
        c = sum(int(np.sum((calls["multifusion", s][lv] != labels) & (calls["resnet18", s][lv] == labels))) for s in (42, 43))
        assert row[1].endswith(f"({b} / {c}, p = {mcnemar_exact(b, c):.2g})"), row
    assert "exact McNemar p" in md
