"""Synthetic SEM-10: long-tailed counts, determinism, file format, near-duplicate re-shots."""

import numpy as np
import pytest
from PIL import Image

from multifusion.data.hashes import perceptual_hash
from multifusion.data.preprocess import preprocess
from multifusion.data.synthesize import (CLASSES, NFFA_COUNTS, class_counts, file_name, generate_dataset,
                                         render_image, scene_index)


def test_class_counts_long_tailed_with_floor():
    counts = class_counts(800, 24)
    assert sum(counts.values()) == 800
    assert min(counts.values()) == 24
    assert counts["Fibres"] == counts["Porous_Sponge"] == 24  # the rare ones sit on the floor
    big = sorted((c for c in CLASSES if counts[c] > 24), key=NFFA_COUNTS.get)
    assert [counts[c] for c in big] == sorted(counts[c] for c in big)  # proportions kept in order
    assert counts["Patterned_surface"] / counts["Tips"] == pytest.approx(4748 / 1625, rel=0.05)
    assert sum(class_counts(21_272, 1).values()) == 21_272
    with pytest.raises(ValueError, match="synthesize.total"):
        class_counts(100, 24)


def test_render_is_deterministic_and_seeded():
    a = render_image(42, "Powder", 3, 160, 120)
    assert a.dtype == np.uint8 and a.shape == (120, 160)
    assert np.array_equal(a, render_image(42, "Powder", 3, 160, 120))
    assert not np.array_equal(a, render_image(43, "Powder", 3, 160, 120))
    assert not np.array_equal(a, render_image(42, "Powder", 4, 160, 120))


def test_the_info_bar_covers_only_the_bottom_rows_and_prepare_finds_it():
    """info_bar=False renders the same micrograph without its bar; with it, the bar replaces
    a block of bottom rows only (6-15% of the height), on about 85% of the images, and the
    detector prepare crops with finds exactly its top row."""
    from multifusion.data.infobar import find_info_bar

    bars = []
    for c in CLASSES:
        for i in range(4):
            barred, bare = render_image(42, c, i, 160, 120), render_image(42, c, i, 160, 120, info_bar=False)
            rows = np.flatnonzero((barred != bare).any(axis=1))  # the rows the bar overwrote
            assert find_info_bar(bare) == 120, (c, i)  # no bar: nothing cropped
            if len(rows):
                assert rows.tolist() == list(range(120 - len(rows), 120)) and 12 <= len(rows) <= 18, (c, i, rows)
                assert find_info_bar(barred) == 120 - len(rows), (c, i)
            bars.append(len(rows) > 0)
    assert 0.7 <= np.mean(bars) <= 0.95


def test_generate_order_free(tmp_path, make_config):
    cfg = make_config({"synthesize.total": 20, "synthesize.min_per_class": 2,
                       "synthesize.width": 96, "synthesize.height": 72}).synthesize
    serial = generate_dataset(cfg, 5, tmp_path / "serial", workers=1)
    parallel = generate_dataset(cfg, 5, tmp_path / "parallel", workers=2)
    assert serial == parallel and sum(serial.values()) == 20
    assert sorted(p.name for p in (tmp_path / "serial").iterdir()) == CLASSES
    for c in CLASSES:
        for i in range(serial[c]):
            one = (tmp_path / "serial" / c / file_name(c, i)).read_bytes()
            assert one == (tmp_path / "parallel" / c / file_name(c, i)).read_bytes()
    with Image.open(tmp_path / "serial" / "Tips" / file_name("Tips", 0)) as image:
        assert image.mode == "L" and image.size == (96, 72) and image.format == "TIFF"


def test_reshots_are_near_duplicates(make_config):
    data = make_config().data
    reshots = [(c, i) for c in ("Particles", "Nanowires") for i in range(1, 120) if scene_index(42, c, i) != i]
    assert 2 <= len(reshots) <= 30  # about 6%
    close = 0
    for c, i in reshots:
        a = perceptual_hash(preprocess(Image.fromarray(render_image(42, c, i, 320, 240)), data).reduced)
        b = perceptual_hash(preprocess(Image.fromarray(render_image(42, c, scene_index(42, c, i), 320, 240)), data).reduced)
        close += bin(a ^ b).count("1") <= data.near_duplicate_bits
    assert close >= 0.8 * len(reshots)
