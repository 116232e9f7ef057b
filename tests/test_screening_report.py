"""`multifusion predict --report`: one self-contained page, a row per input matching the CSV,
images that decode, no network; opened in a real headless Chromium (Debian package) with
the network off, where it loads, sorts and filters; `multifusion explain` writes overlays."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from headless import body_attrs, browse
from PIL import Image
from test_predict import BAD, GOOD, folder  # noqa: F401 -- the shared folder of good and bad files
from typer.testing import CliRunner

from multifusion.cli import app
from multifusion.model import build_model
from multifusion.inference.predict import predict_paths
from multifusion.model.card import save_model
from multifusion.text.features import random_text_features

CLASSES = ["Fibres", "Particles", "Powder"]
S = 32
ROW = re.compile(r'<tr class="[^"]*" data-i="(\d+)" data-status="(\w+)" data-cls="([^"]*)" data-conf="([^"]*)" data-uncertain="(\d)"[^>]*>')


@pytest.fixture
def text_model(tmp_path, make_config) -> Path:
    """A small text-fused MultiFusion (random description features) saved as predict loads it."""
    cfg = make_config({"hnf.layers": 2, "hnf.dim": 16, "data.image_size": S, "fusion.text": True, "fusion.mode": "mha"})
    L = 4  # tokens per description
    torch.manual_seed(0)
    text = random_text_features(CLASSES, ["morphology", "distinguish"], length=L, dim=cfg.text.hidden)
    save_model(tmp_path / "model", build_model(cfg, CLASSES, text), cfg, CLASSES, text, 1.5, "hnf")
    return tmp_path / "model"


@pytest.fixture
def screened(text_model, folder, tmp_path):  # noqa: F811
    """(CSV table, report path) of one predict run over the shared folder."""
    report = tmp_path / "out" / "report.html"
    predict_paths(text_model, [folder], tmp_path / "out" / "p.csv", top_k=2, uncertain_threshold=0.5, batch_size=2,
                  report=report, progress=False)
    return pd.read_csv(tmp_path / "out" / "p.csv", dtype=str, keep_default_na=False), report


def test_report_rows_match_the_csv_and_images_are_inline(screened):
    table, report = screened
    page = report.read_text()
    rows = ROW.findall(page)
    assert [int(i) for i, *_ in rows] == list(range(len(table))) == list(range(len(GOOD + BAD)))
    for (_, status, cls, conf, uncertain), csv_row in zip(rows, table.itertuples()):
        assert status == csv_row.status
        if status == "ok":
            assert cls == csv_row.top1_class and float(conf) == pytest.approx(float(csv_row.top1_prob), abs=1e-6)
            assert uncertain == str(int(csv_row.uncertain == "True"))
        else:
            assert html.escape(csv_row.error) in page  # the reason, on the page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 * len(GOOD) and all(s.startswith("data:image/png;base64,") for s in sources)
    for s in sources:
        with Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.size == (S, S)
    assert not re.search(r"<link|<script[^>]+src=|https?://", page)  # nothing to fetch
    assert "morphology" in page or "distinguish" in page or "attention flat" in page  # attended descriptions named, or why not
    assert "over" in page and "descriptions +" in page or "descriptions -" in page  # what the call used: the margin's terms


def test_report_in_headless_chromium_offline_loads_sorts_filters(screened, tmp_path):
    table, report = screened
    ok = table[table["status"] == "ok"]
    dom = browse(report, "?sort=confidence&order=asc", tmp_path, "--dump-dom")
    body = body_attrs(dom)
    assert int(body["images"]) == 2 * len(ok) and body["decoded"] == body["images"]  # every overlay decodes
    assert len(ROW.findall(dom)) == len(table)  # one row per input
    least_first = sorted(ok.index, key=lambda i: (float(ok.loc[i, "top1_prob"]), i))
    expected = [*least_first, *table.index[table["status"] == "error"]]  # unreadable files last
    assert body["order"] == ",".join(map(str, expected))
    assert [int(i) for i, *_ in ROW.findall(dom)] == expected  # the rows themselves moved
    most_first = body_attrs(browse(report, "?sort=confidence&order=desc", tmp_path, "--dump-dom"))["order"]
    assert most_first.split(",")[: len(ok)] == [str(i) for i in least_first[::-1]]

    call = ok["top1_class"].iloc[0]
    shown = body_attrs(browse(report, f"?class={call}", tmp_path, "--dump-dom"))["order"]
    assert shown == ",".join(str(i) for i in ok.index[ok["top1_class"] == call])  # filter, input order

    shot = tmp_path / "report.png"
    browse(report, "?sort=confidence&order=asc", tmp_path, "--window-size=1400,900", f"--screenshot={shot}")
    print(f"\nscreening report screenshot: {shot}")
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.shape == (900, 1400) and pixels.std() > 20  # a rendered page, not a blank one


def test_cli_predict_report_and_explain_overlays(text_model, folder, tmp_path):  # noqa: F811
    runner = CliRunner()
    report = tmp_path / "r.html"
    done = runner.invoke(app, ["predict", "--model", str(text_model), str(folder), "--out", str(tmp_path / "p.csv"),
                               "--report", str(report), "--params", str(Path(__file__).parents[1] / "params.yaml")])
    assert done.exit_code == 0, done.output
    assert len(ROW.findall(report.read_text())) == len(GOOD + BAD)

    figures = tmp_path / "figures"
    done = runner.invoke(app, ["explain", "--model", str(text_model), str(folder), "--out", str(figures), "--size", "128"])
    assert done.exit_code == 0, done.output
    listed = pd.read_csv(figures / "explanations.csv", dtype=str, keep_default_na=False)
    assert len(listed) == len(GOOD + BAD) and (listed["error"] != "").sum() == len(BAD)
    for _, row in listed[listed["error"] == ""].iterrows():
        with Image.open(figures / row["overlay"]) as im:
            assert im.size == (128, 128) and im.mode == "RGB"
        assert row["method"] == "grad-cam" and row["class"] in CLASSES
        assert row["attended"].count("/") == 3  # three attended descriptions, class/template each
    wrong = runner.invoke(app, ["explain", "--model", str(text_model), str(folder), "--out", str(figures), "--target", "Nope"])
    assert wrong.exit_code == 2 and "Nope" in wrong.output and "Particles" in wrong.output
