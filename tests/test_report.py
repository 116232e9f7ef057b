"""The results report, built from fake metric files: every model gets a row, the paper's
published figures sit in their own columns, missing inputs are clear errors."""

from __future__ import annotations

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


@pytest.fixture
def metric_files(tmp_path: Path, make_config):
    cfg = make_config()
    (tmp_path / "metrics" / "compare").mkdir(parents=True)
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(fake_metrics(0.3)))
    runs = {}
    for i, name in enumerate(cfg.compare.models):
        runs[name] = fake_metrics(0.01 * i)
        (tmp_path / "metrics" / "compare" / f"{name}.json").write_text(json.dumps(runs[name]))
    return cfg, tmp_path, runs


def test_report_has_every_row_and_the_published_columns(metric_files) -> None:
    cfg, root, runs = metric_files
    md_path = report_from_files(cfg, root / "metrics/eval.json", root / "metrics/compare", root / "reports")
    md = md_path.read_text()
    assert cfg.data.root in md and "Date:" in md

    topk = table_rows(md, "| model |")
    baselines = [n for n in cfg.compare.models if not n.startswith("mf_")]
    assert [r[0] for r in topk] == list(PAPER_TOPK)
    assert topk[0][1:5] == ["0.400", "0.450", "0.500", "0.550"]  # ours, from eval.json
    for row, name in zip(topk[1:], baselines):
        assert row[1] == f"{runs[name]['top1']:.3f}"
        assert row[5] == f"{runs[name]['macro_f1']:.3f}"  # macro-F1 beside top-k
    for row in topk:  # the paper's figures in the published columns, "–" where it has no such row
        assert row[7] == "–"  # no per-image predictions given: no paired test
        assert (row[8], " ".join(row[9:13])) == PAPER_TOPK[row[0]], row[0]

    ablation = table_rows(md, "| variant |")
    variants = ["multifusion"] + [n for n in cfg.compare.models if n.startswith("mf_")]
    assert [r[0] for r in ablation] == list(PAPER_ABLATION)
    for row, name in zip(ablation[1:], variants[1:]):  # each component's effect, with its sign
        assert row[5] == f"{0.4 - runs[name]['top1']:+.3f}" and row[6] == f"{0.7 - runs[name]['macro_f1']:+.3f}"
        assert row[5].startswith("+")  # fake ablations all score below the full model
    for row in ablation:
        assert (row[8], " ".join(row[9:12])) == PAPER_ABLATION[row[0]], row[0]
    assert ablation[0][2:5] == ["0.600", "0.650", "0.700"]  # ours: macro P/R/F1

    assert "falls short of" not in md  # ours 0.400 beats every fake baseline (top1 <= 0.14)
    summary = json.loads((root / "reports/summary.json").read_text())
    assert set(summary) == {"multifusion", *cfg.compare.models}
    for png in ("topk.png", "ablation.png"):
        assert (root / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = (root / "reports/results.csv").read_text().splitlines()
    assert len(csv) == 1 + 1 + len(cfg.compare.models)
    assert csv[1].startswith("MultiFusion,ours,0.4000,")  # the full model's row is named MultiFusion


def test_report_says_when_ours_falls_short(metric_files) -> None:
    cfg, root, _ = metric_files
    (root / "metrics" / "compare" / "resnet18.json").write_text(json.dumps(fake_metrics(0.4)))
    md = report_from_files(cfg, root / "metrics/eval.json", root / "metrics/compare", root / "reports").read_text()
    assert "falls short of the best baseline's (ResNet-18, 0.500) by 0.100" in md
    assert "its macro-F1 (0.700) falls short of the best baseline's (ResNet-18, 0.800) by 0.100." in md


def test_missing_or_incomplete_metrics_are_clear_errors(metric_files) -> None:
    cfg, root, _ = metric_files
    (root / "metrics" / "compare" / "vig.json").unlink()
    with pytest.raises(FileNotFoundError, match="vig.json"):
        report_from_files(cfg, root / "metrics/eval.json", root / "metrics/compare", root / "reports")
    (root / "bad.json").write_text(json.dumps({"top1": 0.5}))
    with pytest.raises(ValueError, match="missing metric keys"):
        read_metrics(root / "bad.json")


def test_readme_tables_come_from_the_report_files(metric_files) -> None:
    from multifusion.reporting.readme_tables import BEGIN, END, update_readme

    cfg, root, runs = metric_files
    report_from_files(cfg, root / "metrics/eval.json", root / "metrics/compare", root / "reports" / "tiny")
    readme = root / "README.md"
    readme.write_text(f"# Title\n\n{BEGIN}\nstale hand-typed table\n{END}\n\nmore text\n")
    assert update_readme(readme, root / "reports")
    text = readme.read_text()
    assert "stale" not in text and text.endswith("\n\nmore text\n") and text.startswith("# Title")
    assert "| **MultiFusion** | 0.400 | 0.550 | 0.700 | – | – |" in text  # from eval.json via summary.json
    name = cfg.compare.models[0]
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


def test_report_sets_every_run_against_ours_image_by_image(metric_files) -> None:
    """With per-image predictions, each row says how many images only MultiFusion / only that
    model gets right and the exact McNemar p; the verdict says whether the gap is chance."""
    cfg, root, _ = metric_files
    labels = ["a"] * 40 + ["b"] * 40
    _write_predictions(root / "plots/evaluate/confusion.csv", labels, labels)  # ours: all right
    for name in cfg.compare.models:
        preds = list(labels)
        for i in range(12 if name == "resnet18" else 2):  # resnet18: 12 wrong, the rest 2 wrong
            preds[i] = "b"
        _write_predictions(root / f"plots/compare/{name}/confusion.csv", labels, preds)
    md = report_from_files(
        cfg, root / "metrics/eval.json", root / "metrics/compare", root / "reports", root / "plots/evaluate", root / "plots/compare"
    ).read_text()
    rows = {r[0]: r for r in table_rows(md, "| model |")}
    assert rows["ResNet-18"][7] == "12 / 0 (p = 0.00)" and rows["ViG-Ti (isotropic)"][7] == "2 / 0 (p = 0.50)"
    summary = json.loads((root / "reports/summary.json").read_text())
    assert summary["resnet18"]["mcnemar_p"] == pytest.approx(2 * 0.5**12)
    # the best fake baseline by metrics is the last in compare.models; its gap of 2 images is chance
    assert "exact McNemar p = 0.50 (within chance" in md
    from multifusion.reporting.readme_tables import BEGIN, END, update_readme

    readme = root / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    update_readme(readme, root)  # root/reports holds this report
    assert "| ResNet-18 | 0.100 | 0.250 | 0.400 | – | 12 / 0 (p = 0.00) |" in readme.read_text()

    _write_predictions(root / "plots/compare/vig/confusion.csv", labels[::-1], labels[::-1])
    with pytest.raises(ValueError, match="test images differ"):
        report_from_files(
            cfg, root / "metrics/eval.json", root / "metrics/compare", root / "reports", root / "plots/evaluate", root / "plots/compare"
        )


def test_seed_table_is_computed_from_the_per_image_predictions(tmp_path) -> None:
    from sklearn.metrics import f1_score

    from multifusion.reporting.seed_runs import read_seed_runs, seed_table

    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b", "c"], size=60).tolist()
    preds = {}
    for name, seed in [("multifusion", 42), ("multifusion", 43), ("vig", 42), ("vig", 43), ("mf_no_text", 43)]:
        p = [y if rng.random() < 0.8 else rng.choice(["a", "b", "c"]) for y in labels]
        preds[name, seed] = p
        _write_predictions(tmp_path / "seeds" / name / f"seed{seed}.csv", labels, p)
    assert list(read_seed_runs(tmp_path)) == ["multifusion", "vig", "mf_no_text"]  # ours, baselines, ablations
    rows = {r[0]: r for r in table_rows(seed_table(tmp_path), "| model |")}

    def scores(name, seed):
        y, p = np.array(labels), np.array(preds[name, seed])
        return (p == y).mean(), f1_score(y, p, average="macro")

    for name, label in [("multifusion", "**MultiFusion**"), ("vig", "ViG-Ti (isotropic)")]:
        (t42, f42), (t43, f43) = scores(name, 42), scores(name, 43)
        assert rows[label][1:4] == [f"{t42:.3f} / {f42:.3f}", f"{t43:.3f} / {f43:.3f}", f"{(t42 + t43) / 2:.3f} / {(f42 + f43) / 2:.3f}"]
    y = np.array(labels)
    only = [(int(((np.array(preds["multifusion", s]) == y) & (np.array(preds["vig", s]) != y)).sum()),
             int(((np.array(preds["multifusion", s]) != y) & (np.array(preds["vig", s]) == y)).sum())) for s in (42, 43)]
    assert rows["ViG-Ti (isotropic)"][4] == f"{only[0][0]} / {only[0][1]}, {only[1][0]} / {only[1][1]}"
    assert rows["w/o LLM text"][1] == "–" and rows["w/o LLM text"][3] == "–"  # no seed 42 of it: one run is no mean
    assert rows["**MultiFusion**"][4] == "–"  # ours is the reference

    _write_predictions(tmp_path / "seeds" / "vig" / "seed44.csv", labels[::-1], labels[::-1])
    with pytest.raises(ValueError, match="seed44.csv: its test images differ"):
        read_seed_runs(tmp_path)
    (tmp_path / "seeds" / "vig" / "seed44.csv").rename(tmp_path / "seeds" / "vig" / "notes.csv")
    with pytest.raises(ValueError, match="notes.csv: not a seed<N>.csv"):
        read_seed_runs(tmp_path)


def test_committed_seed_files_reproduce_their_comparison_reports() -> None:
    """The seed-<params seed> files under reports/<set>/seeds/ are the comparison's own runs:
    they give the report's top-1, macro-F1 and paired counts exactly."""
    import yaml

    from multifusion.evaluation.evaluate import macro_scores
    from multifusion.evaluation.paired_test import paired_counts
    from multifusion.reporting.seed_runs import read_seed_runs

    checked = 0
    for set_dir in sorted((REPO_ROOT / "reports").iterdir()):
        if not (set_dir / "seeds").is_dir():
            continue
        summary = json.loads((set_dir / "summary.json").read_text())
        seed = yaml.safe_load((set_dir / "params.yaml").read_text())["seed"]
        runs = read_seed_runs(set_dir)
        labels, ours = runs["multifusion"][seed]
        for name, by_seed in runs.items():
            if seed not in by_seed:
                continue
            _, preds = by_seed[seed]
            assert (preds == labels).mean() == pytest.approx(summary[name]["top1"], abs=1e-12), (set_dir.name, name)
            assert macro_scores(labels, preds)[2] == pytest.approx(summary[name]["macro_f1"], abs=1e-12), (set_dir.name, name)
            if name != "multifusion":
                assert paired_counts(labels, ours, preds) == (summary[name]["only_multifusion_right"], summary[name]["only_model_right"])
            checked += 1
    assert checked >= 2 * 4  # both sets: ours, ViG-Ti, w/o text, single scale at least
