"""`dvc plots show` renders with no network: .dvc/config points DVC at
plots/offline/template.html, which inlines vega, vega-lite and vega-embed (BSD-3-Clause,
licence texts beside it). Checked with the DVC in the venv, and in headless Chromium
with the network off when Chromium is installed."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from headless import browse

TEMPLATE = Path("plots/offline/template.html")
LIBRARIES = ("vega@5.33.1", "vega-lite@5.23.0", "vega-embed@6.29.0")


def test_template_inlines_the_libraries_with_their_licences(repo_root):
    page = (repo_root / TEMPLATE).read_text(encoding="utf-8")
    assert page.count("{plot_divs}") == 1 and page.count("{refresh_tag}") == 1  # DVC's placeholders
    assert "{scripts}" not in page  # so DVC's CDN script tags are never inserted
    assert not re.search(r"<script[^>]+src=|<link", page)
    for name in LIBRARIES:
        assert f"/*! {name} | BSD-3-Clause" in page
    licence = (repo_root / TEMPLATE.parent / "LICENSE").read_text()
    assert licence.count("Redistribution and use in source and binary forms") == 3
    config = configparser.ConfigParser()
    config.read(repo_root / ".dvc" / "config")
    assert (repo_root / ".dvc" / config["plots"]["html_template"]).resolve() == (repo_root / TEMPLATE).resolve()


def test_dvc_plots_show_writes_a_page_that_renders_offline(repo_root, tmp_path):
    repo = tmp_path / "repo"
    (repo / TEMPLATE.parent).mkdir(parents=True)
    shutil.copy(repo_root / TEMPLATE, repo / TEMPLATE)
    (repo / "acc.csv").write_text("step,accuracy\n0,0.2\n1,0.5\n2,0.7\n")
    (repo / "dvc.yaml").write_text("plots:\n  - acc.csv:\n      x: step\n      y: accuracy\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    shutil.copy(repo_root / ".dvc" / "config", repo / ".dvc" / "config")  # the shipped [plots] html_template
    done = subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = (repo / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in page and not re.search(r"<script[^>]+src=", page)
    assert all(f"/*! {name}" in page for name in LIBRARIES) and "vegaEmbed(" in page

    dom = browse(repo / "dvc_plots" / "index.html", "", tmp_path, "--virtual-time-budget=5000", "--dump-dom")
    assert re.search(r'class="vega-embed[^"]*"', dom) and re.search(r"<svg|<canvas", dom)  # vega drew the chart
