"""The front door and the documentation: the README is short and its commands, links and
Python example work as written; the site builds strictly; every generated table, figure copy
and shape in it matches the files it is generated from; the CLI says what it does and which
version it is; the version lives in one place."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIXTURE_MODEL = "tests/fixtures/tiny_model"


def readme() -> str:
    return README.read_text()


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_is_a_short_front_door() -> None:
    text = readme()
    assert len(text.splitlines()) <= 200, "README.md over 200 lines: move the detail into docs/"
    assert not re.search(r"\bissues? \d+", text, flags=re.I), "README.md names an issue number"
    assert not re.search(r"/work/|/home/|/tmp/|\bload ~?\d", text), "README.md holds a machine-specific path or load remark"
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    order = ["Two commands", "Your own micrographs", "Screening", "Results", "What the text and the hierarchy", "Documentation"]
    positions = [next(i for i, h in enumerate(headings) if h[3:].startswith(o)) for o in order]
    assert positions == sorted(positions), headings


def slug(heading: str) -> str:
    """The anchor MkDocs (toc) and GitHub give a heading."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def test_readme_links_point_at_files_and_headings_that_exist() -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", readme()):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), f"README.md links to {target}, which does not exist"
        if anchor:
            headings = [slug(h) for h in re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), flags=re.M)]
            assert anchor in headings, f"README.md links to {target}: no such heading in {path}"


@pytest.mark.parametrize("target, runs", [("run", "dvc repro"), ("test", "pytest")])
def test_readme_two_commands_are_make_targets(target: str, runs: str) -> None:
    first_block = code_blocks(readme(), "bash")[0]
    assert re.search(rf"^make {target}\b", first_block, flags=re.M), first_block
    done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)  # -n: print, run nothing
    assert done.returncode == 0, done.stderr
    assert runs in done.stdout


def test_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    """The README's Python block, verbatim, in a fresh folder that sees the repository's tests/."""
    (example,) = code_blocks(readme(), "python")
    assert FIXTURE_MODEL in example and len(example.strip().splitlines()) <= 8
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    script = tmp_path / "example.py"
    script.write_text(example)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "top1_class" in done.stdout and "333__ncm_0000.jpg" in done.stdout
    assert (tmp_path / "figures" / "explanations.csv").is_file()
    assert (tmp_path / "figures" / "333__ncm_0000.png").is_file()


def test_api_predict_defaults_are_params_yaml_predict_section() -> None:
    from multifusion.api import Classifier
    from multifusion.core.config import load_config

    settings = load_config(ROOT / "params.yaml").predict
    defaults = inspect.signature(Classifier.predict).parameters
    assert defaults["top_k"].default == settings.top_k
    assert defaults["uncertain_threshold"].default == settings.uncertain_threshold
    assert defaults["batch_size"].default == settings.batch_size
    for method in (Classifier.predict, Classifier.explain):  # the views: explain's call is predict's
        views = inspect.signature(method).parameters
        assert ((views["first_views"].default, views["view_confidence"].default, views["precision"].default)
                == (settings.first_views, settings.view_confidence, settings.precision))


def test_generated_tables_and_figures_match_the_reports() -> None:
    """README.md's summary, docs/results.md and docs/img/results/ are what the committed
    reports/ and plots/ give; regenerate with the command in the message."""
    from multifusion.reporting.readme_tables import COMMAND, SUMMARY_BEGIN, stale_files

    assert SUMMARY_BEGIN in readme()
    stale = stale_files(ROOT)
    assert not stale, f"stale: {', '.join(str(p.relative_to(ROOT)) for p in stale)}; run `{COMMAND}` and commit"


def test_generated_summary_is_the_reports_numbers(tmp_path: Path) -> None:
    """The README table's MultiFusion row carries summary.json's figures, and a changed report
    makes the committed README stale."""
    import json
    import shutil

    from multifusion.reporting.readme_tables import readme_summary, stale_files

    summary = json.loads((ROOT / "reports/ncm/summary.json").read_text())
    mf = summary["multifusion"]
    row = next(line for line in readme_summary(ROOT / "reports").splitlines() if line.startswith("| **MultiFusion** |"))
    assert f"| {mf['top1']:.3f}" in row and f"| {mf['macro_f1']:.3f}" in row, row
    for name in ("README.md", "reports", "plots", "metrics", "docs"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    assert stale_files(tmp_path) == []
    summary["multifusion"]["top1"] = 0.5
    (tmp_path / "reports/ncm/summary.json").write_text(json.dumps(summary))
    assert tmp_path / "README.md" in stale_files(tmp_path)


def test_model_page_shapes_match_a_forward_pass() -> None:
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "docs" / "make_figures.py")
    make_figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_figures)
    rows, _ = make_figures.measured_shapes()
    page = (ROOT / "docs" / "model.md").read_text()
    section = page.split(make_figures.SHAPES_BEGIN, 1)[1].split(make_figures.SHAPES_END, 1)[0]
    assert section.strip() == make_figures.shapes_table(rows).strip(), "run `python docs/make_figures.py architecture`"


def test_docs_build_strict(tmp_path: Path) -> None:
    """A broken link, a missing page or a bad anchor fails the build (strict: true in mkdocs.yml).
    Not -q: with the log level raised, mkdocs no longer counts the warnings that strict turns into errors."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs / mkdocs-material not installed (pip install -e '.[dev]')")
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("load_model") > 1  # mkdocstrings rendered


def test_cli_version_and_help_say_what_each_command_does() -> None:
    from typer.testing import CliRunner

    import multifusion
    from multifusion.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["--version"])
    assert done.exit_code == 0 and done.output.strip() == f"multifusion {multifusion.__version__}"
    import typer

    commands = sorted(typer.main.get_command(app).commands)
    assert {"predict", "explain", "describe"} <= set(commands)
    for command in commands:  # every command, those added later too
        help_text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert f"Example: multifusion {command} " in help_text, help_text
    listing = runner.invoke(app, ["--help"], terminal_width=200).output
    assert "Example: multifusion predict" in listing and all(c in listing for c in ("predict", "explain", "describe"))


def test_docs_name_no_machine_paths_or_issue_numbers() -> None:
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        found = re.findall(r"/work/\S*|/home/\S*", text)
        assert not found, f"{page.relative_to(ROOT)}: machine-specific paths {found}"
        found = re.findall(r"\bissues? \d+", text, flags=re.I)
        assert not found, f"{page.relative_to(ROOT)}: {found}: a reader has no issue tracker; say what it was"


def test_version_lives_in_one_place() -> None:
    import tomllib

    import multifusion

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "multifusion.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(multifusion.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, flags=re.M), \
        "CHANGELOG.md has no section for the package's version"


def test_summary_table_of_a_three_seed_report(tmp_path: Path) -> None:
    """A report of the seeds axis: means ± std, the seed count, the paired counts summed over seeds;
    the best baseline by top-1; the text and hierarchy ablations."""
    import json

    from multifusion.reporting.readme_tables import summary_table

    def row(top1: float, f1: float, **more: float) -> dict:
        return {"top1": top1, "top1_std": 0.01, "macro_f1": f1, "macro_f1_std": 0.02, "n_seeds": 3, **more}

    set_dir = tmp_path / "toy"
    set_dir.mkdir()
    (set_dir / "results.md").write_text("# r\n\n- Dataset: `/data/toy` (test split: 50 images)\n- Date: 2026-12-07; machine: x\n")
    paired = {"only_multifusion_right": 7, "only_model_right": 2, "mcnemar_p": 0.18}
    (set_dir / "summary.json").write_text(json.dumps({
        "multifusion": row(0.9, 0.8), "resnet18": row(0.7, 0.6, **paired), "vig": row(0.85, 0.75, **paired),
        "mf_no_text": row(0.88, 0.79, **paired), "mf_single_scale": row(0.87, 0.78, **paired), "mf_concat": row(0.5, 0.4)}))
    table = summary_table(set_dir)
    assert "**`toy`**: 50 test images, 2026-12-07" in table and "/data" not in table
    assert "| **MultiFusion** |  | 3 | 0.900 ± 0.010 | 0.800 ± 0.020 | – |" in table
    assert "| ViG-Ti (isotropic) | best baseline | 3 | 0.850 ± 0.010 | 0.750 ± 0.020 | 7 / 2 (p = 0.18) |" in table
    assert "w/o LLM text" in table and "w/o HNF" in table and "ResNet-18" not in table and "concat" not in table
