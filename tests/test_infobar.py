"""Info-bar detection on real NCM micrographs (tests/fixtures/ncm) and synthetic ones."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multifusion.data.infobar import find_info_bar
from multifusion.data.preprocess import load_micrograph
from multifusion.data.synthesize import CLASSES, burn_info_bar, render_image

NCM = sorted((Path(__file__).parent / "fixtures" / "ncm").glob("*.jpg"))


def black_rows(image: np.ndarray) -> np.ndarray:
    """Rows at least 90% black (< 6): the bar's border rows. The darkest NCM content
    (333__ncm_0015) reaches 75%."""
    return (image < 6).mean(axis=1) >= 0.9


@pytest.mark.parametrize("path", NCM, ids=lambda p: p.name)
def test_ncm_bar_found_and_not_stored(path, make_config):
    grey = np.asarray(Image.open(path).convert("L"))
    assert grey.shape == (384, 512)
    assert black_rows(grey[360:]).any()  # the fixture really shows the bar
    top = find_info_bar(grey)
    assert 355 <= top <= 359
    assert not black_rows(grey[:top]).any()
    stored = load_micrograph(path, make_config().data)
    assert stored.shape == (64, 64) and stored.dtype == np.uint8
    assert not black_rows(stored).any()


@pytest.mark.parametrize("path", NCM[:2], ids=lambda p: p.name)
def test_ncm_without_bar_is_not_cropped(path):
    grey = np.asarray(Image.open(path).convert("L"))[:350]
    assert find_info_bar(grey) == 350
    assert find_info_bar(np.ascontiguousarray(grey[::-1])) == 350  # bright/dark content at the bottom


def test_synthetic_dark_and_light_bars_found():
    seen = set()
    for i, class_name in enumerate(CLASSES * 2):
        image = render_image(7, class_name, i, 240, 180, info_bar=False)
        rng = np.random.default_rng(i)
        with_bar, bar_h = burn_info_bar(image, rng)
        seen.add("dark" if with_bar[-1, 0] < 128 else "light")
        top = find_info_bar(with_bar)
        # Exact, or up to 2 content rows more when the content just above is bar-coloured.
        assert 180 - bar_h - 2 <= top <= 180 - bar_h, (class_name, bar_h, top)
        assert find_info_bar(image) == 180, class_name  # no bar, no crop
    assert seen == {"dark", "light"}


def test_flat_image_is_not_cropped():
    assert find_info_bar(np.zeros((100, 120), np.uint8)) == 100
    assert find_info_bar(np.full((100, 120), 255, np.uint8)) == 100


def test_blockwise_search_matches_all_rows(monkeypatch):
    """The bottom-up block search gives the answer of computing every row's share at once,
    on bars under content of every kind, including content as dark as the bar."""
    from multifusion.data import infobar

    cases = [np.asarray(Image.open(p).convert("L")) for p in NCM]
    for i, class_name in enumerate(CLASSES * 3):
        image = render_image(11, class_name, i, 400, 300, info_bar=False)
        if i % 3 == 2:
            image[150:] = image[150:] // 8  # a dark lower half: bar-coloured content above the bar
        cases.append(burn_info_bar(image, np.random.default_rng(i))[0])
        cases.append(image)
    blockwise = [find_info_bar(grey) for grey in cases]
    monkeypatch.setattr(infobar, "BLOCK", 10**6)
    assert blockwise == [find_info_bar(grey) for grey in cases]
    assert sum(top < len(grey) for top, grey in zip(blockwise, cases)) >= len(NCM) + len(CLASSES) * 3 - 2
