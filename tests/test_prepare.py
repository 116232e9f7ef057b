"""prepare: decoding of every supported kind, bad input, duplicates, groups and splits."""

import json
import os
import shutil
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multifusion.data.decode import decode_grey
from multifusion.data.hashes import image_sha256, perceptual_hash
from multifusion.data.prepare import PrepareError, prepare_dataset
from multifusion.data.grey_levels import GREY_MEAN, GREY_STD, standardize_grey_levels
from multifusion.data.preprocess import load_micrograph
from multifusion.data.split import assign_splits, connected_groups, near_duplicate_pairs, pattern_pairs

NCM = Path(__file__).parent / "fixtures" / "ncm"
RNG = np.random.default_rng(0)


def texture(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """A distinct random grey micrograph-like texture, uint8 (h, w)."""
    rng = np.random.default_rng(seed)
    from scipy import ndimage as ndi

    field = ndi.gaussian_filter(rng.standard_normal((h, w)), rng.uniform(2, 6))
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    return (field * 200 + 25).astype(np.uint8)


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def test_decode_modes(tmp_path):
    grey = texture(1)
    ramp16 = (np.arange(96 * 128, dtype=np.uint32).reshape(96, 128) * 5).astype(np.uint16)  # 0..61435
    Image.fromarray(ramp16).save(tmp_path / "g16.tif")
    out16 = decode_grey(tmp_path / "g16.tif", 10**8)
    assert out16.dtype == np.uint8 and out16.min() == 0 and out16.max() == 255
    assert np.all(np.diff(out16.ravel().astype(int)) >= 0)  # stretched, order kept
    Image.fromarray(ramp16).save(tmp_path / "g16.png")
    assert np.array_equal(decode_grey(tmp_path / "g16.png", 10**8), out16)
    rgb = np.stack([grey, np.roll(grey, 5, 1), 255 - grey], -1)
    rgba = Image.fromarray(np.concatenate([rgb, np.full((96, 128, 1), 128, np.uint8)], -1), "RGBA")
    rgba.save(tmp_path / "rgba.png")
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(decode_grey(tmp_path / "rgba.png", 10**8), expected)
    palette = Image.fromarray(rgb).quantize(64)
    palette.save(tmp_path / "pal.png")
    assert np.array_equal(decode_grey(tmp_path / "pal.png", 10**8), np.asarray(palette.convert("RGB").convert("L")))
    save(tmp_path / "g.bmp", grey)
    assert np.array_equal(decode_grey(tmp_path / "g.bmp", 10**8), grey)
    save(tmp_path / "g.jpeg", grey, quality=95)
    assert np.abs(decode_grey(tmp_path / "g.jpeg", 10**8).astype(int) - grey).mean() < 3
    import tifffile  # 16-bit RGB TIFF: a mode PIL cannot decode

    tifffile.imwrite(tmp_path / "rgb48.tif", (rgb.astype(np.uint16) * 257))
    rgb48 = decode_grey(tmp_path / "rgb48.tif", 10**8)
    assert rgb48.shape == (96, 128) and np.corrcoef(rgb48.ravel(), expected.ravel())[0, 1] > 0.99


def make_bad_folder(root: Path) -> dict[str, str]:
    """A class folder layout holding one of each bad input; returns {bad path: reason word}."""
    for i in range(4):
        save(root / "Alpha" / f"a{i}.png", texture(10 + i))
        save(root / "Beta" / f"b{i}.tif", texture(20 + i))
    save(root / "Solo" / "only.jpg", texture(30))  # a class with a single image
    (root / "Empty").mkdir()
    bad = {}
    good = (root / "Alpha" / "a0.png").read_bytes()
    (root / "Beta" / "truncated.png").write_bytes(good[: len(good) // 2])
    bad["Beta/truncated.png"] = "truncated"
    (root / "Beta" / "zero.tif").write_bytes(b"")
    bad["Beta/zero.tif"] = "empty file"
    (root / "Beta" / "notes.jpg").write_text("these are my notes, not an image\n")
    bad["Beta/notes.jpg"] = "not an image"
    save(root / "Alpha" / "tiny.png", texture(40, 40, 50))
    bad["Alpha/tiny.png"] = "smaller than data.image_size"
    save(root / "Alpha" / "bomb.png", np.zeros((2000, 1500), np.uint8))  # 3 Mpx, compresses to ~3 kB
    bad["Alpha/bomb.png"] = "decompression bomb"
    (root / "Alpha" / "readme.txt").write_text("x")
    bad["Alpha/readme.txt"] = "unsupported extension"
    bad["Empty"] = "empty class folder"
    return bad


def test_bad_input_folder(tmp_path, make_config):
    root = tmp_path / "raw"
    bad = make_bad_folder(root)
    data = make_config({"data.max_pixels": 1_000_000}).data
    report = prepare_dataset(root, tmp_path / "out", data, seed=0, progress=False)
    skipped = {str(Path(s["path"]).relative_to(root)): s["reason"] for s in report["skipped"]}
    assert set(skipped) == set(bad)
    for path, word in bad.items():
        assert word in skipped[path], (path, skipped[path])
        assert "\n" not in skipped[path]
    assert report["kept"] == 9 and report["scanned"] == 15
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["Alpha", "Beta", "Solo"]
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert {"id", "path", "sha256", "label", "class_name", "split", "group"} <= set(manifest.columns)
    assert manifest.loc[manifest.class_name == "Solo", "split"].tolist() == ["train"]
    images = np.load(tmp_path / "out" / "images.npy", mmap_mode="r")
    assert images.shape == (9, 64, 64) and images.dtype == np.uint8
    first = manifest.iloc[0]
    assert np.array_equal(images[0], load_micrograph(first.path, data))


def test_fails_only_without_usable_data(tmp_path, make_config):
    data = make_config().data
    with pytest.raises(PrepareError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", tmp_path / "out", data, 0, progress=False)
    save(tmp_path / "one" / "A" / "a.png", texture(1))
    (tmp_path / "one" / "B").mkdir()
    (tmp_path / "one" / "B" / "b.png").write_bytes(b"")
    with pytest.raises(PrepareError, match="only 1 class"):
        prepare_dataset(tmp_path / "one", tmp_path / "out", data, 0, progress=False)
    result = subprocess.run([sys.executable, "stages/prepare.py", "--root", str(tmp_path / "missing"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1])
    assert result.returncode != 0
    assert "does not exist" in result.stderr.strip().splitlines()[-1]


def test_duplicates_near_copies_and_groups_share_a_split(tmp_path, make_config):
    root = tmp_path / "raw"
    for c in range(3):
        for i in range(12):
            base = texture(100 * c + i)
            save(root / f"C{c}" / f"shot{i}_crop0.png", base)
            if i % 3 == 0:  # a near-copy: fresh noise
                noisy = np.clip(base + RNG.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
                save(root / f"C{c}" / f"again{i}.png", noisy)
            if i % 4 == 0:  # a second crop of the same shot: grouped by name only
                save(root / f"C{c}" / f"shot{i}_crop1.png", texture(999 + 100 * c + i))
    shutil.copy(root / "C0" / "shot1_crop0.png", root / "C0" / "copy.png")
    data = make_config({"data.group_pattern": r"^(shot\d+)_crop"}).data
    report = prepare_dataset(root, tmp_path / "out", data, seed=3, progress=False)
    assert report["duplicates"] == [{"path": str(root / "C0" / "shot1_crop0.png"), "duplicate_of": str(root / "C0" / "copy.png")}]
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert manifest.groupby("group")["split"].nunique().max() == 1
    assert report["groups_across_splits"] == 0
    by_name = manifest.set_index(manifest.id)
    for c in range(3):
        for i in range(0, 12, 3):
            assert by_name.loc[f"C{c}/again{i}.png", "group"] == by_name.loc[f"C{c}/shot{i}_crop0.png", "group"]
        for i in range(0, 12, 4):
            assert by_name.loc[f"C{c}/shot{i}_crop1.png", "group"] == by_name.loc[f"C{c}/shot{i}_crop0.png", "group"]
    assert set(manifest.split) == {"train", "val", "test"}
    again = prepare_dataset(root, tmp_path / "out2", data, seed=3, progress=False)
    assert pd.read_parquet(tmp_path / "out2" / "manifest.parquet").equals(manifest) and again["kept"] == report["kept"]


def test_exact_duplicates_are_same_pixels_in_any_format(tmp_path, make_config):
    """Same pixels as PNG, TIFF and BMP are one image; one changed pixel is another image
    (kept, and grouped with it as a near-copy)."""
    root = tmp_path / "raw"
    for c in range(2):
        for i in range(6):
            save(root / f"C{c}" / f"m{i}.png", texture(10 * c + i))
    base = texture(0)
    save(root / "C0" / "m0_again.tif", base)
    save(root / "C0" / "m0_again.bmp", base)
    one_pixel = base.copy()
    one_pixel[40, 50] ^= 1
    save(root / "C0" / "m0_one_pixel.png", one_pixel)
    report = prepare_dataset(root, tmp_path / "out", make_config().data, seed=0, progress=False)
    assert sorted(d["path"] for d in report["duplicates"]) == [str(root / "C0" / "m0_again.bmp"), str(root / "C0" / "m0_again.tif")]
    assert {d["duplicate_of"] for d in report["duplicates"]} == {str(root / "C0" / "m0.png")}
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("id")
    assert manifest.loc["C0/m0_one_pixel.png", "pixel_hash"] != manifest.loc["C0/m0.png", "pixel_hash"]
    assert manifest.loc["C0/m0_one_pixel.png", "group"] == manifest.loc["C0/m0.png", "group"]
    assert manifest["sha256"].str.fullmatch("[0-9a-f]{64}").all() and manifest["pixel_hash"].str.fullmatch("[0-9a-f]{32}").all()


def test_grey_pixels_shared_or_copied_and_outlives_the_image(tmp_path):
    """Zero-copy where Pillow exports Arrow; a copy for images Pillow keeps in several
    blocks (over 16 MB); either way equal to np.asarray and valid after the image is gone."""
    import gc

    from multifusion.data.decode import grey_pixels

    small = texture(3, 120, 160)
    path = save(tmp_path / "small.tif", small)
    view = decode_grey(path, 10**8)
    gc.collect()
    assert np.array_equal(view, small)
    big = np.random.default_rng(1).integers(0, 256, (4200, 4200), dtype=np.uint8)  # 17.6 MB: several blocks
    image = Image.fromarray(big).copy()
    pixels = grey_pixels(image)
    del image
    gc.collect()
    assert pixels.shape == (4200, 4200) and np.array_equal(pixels, big)


def test_split_stratified_deterministic_and_given_layout():
    labels = np.repeat(np.arange(5), [100, 50, 20, 7, 2])
    groups = np.arange(len(labels))
    ratios = {"train": 0.7, "val": 0.1, "test": 0.2}
    a = assign_splits(labels, groups, ratios, seed=1)
    assert np.array_equal(a, assign_splits(labels, groups, ratios, seed=1))
    assert not np.array_equal(a, assign_splits(labels, groups, ratios, seed=2))
    for label, n in enumerate([100, 50, 20, 7, 2]):
        counts = {s: int((a[labels == label] == s).sum()) for s in ratios}
        if n >= 20:
            for s, r in ratios.items():
                assert abs(counts[s] - r * n) <= 1
        assert counts["train"] >= 1 and counts["test"] >= 1
    given = ["train"] * 150 + ["test"] * 29
    b = assign_splits(labels, groups, ratios, seed=1, given=given)
    assert (b[150:] == "test").all() and set(b[:150]) == {"train", "val"}
    assert abs((b[:150] == "val").sum() - 150 * 0.125) <= 3


def test_given_split_folders_respected(tmp_path, make_config):
    root = tmp_path / "raw"
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        for c in ("A", "B"):
            for i in range(n):
                save(root / split / c / f"{split}{i}.png", texture(hash((split, c, i)) % 10_000))
    prepare_dataset(root, tmp_path / "out", make_config().data, 0, progress=False)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert (manifest.split == manifest.id.str.split("/").str[0]).all()
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["A", "B"]


def test_near_duplicate_pairs_match_bruteforce():
    hashes = RNG.integers(0, 2**63, 300, dtype=np.uint64)
    hashes[10] = hashes[3] ^ np.uint64(0b1011)  # 3 bits apart
    fast = set(near_duplicate_pairs(hashes, 12, chunk=64))
    slow = {(i, j) for i, j in combinations(range(300), 2) if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 12}
    assert fast == slow and (3, 10) in fast
    assert connected_groups(5, [(0, 3), (3, 4)]).tolist() == [0, 1, 2, 0, 0]
    assert pattern_pairs(["s1_a", "s2_a", "s1_b", "x"], r"^(s\d)_") == [(0, 2)]


def _bfs_groups(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    """Reference: components by breadth-first search, numbered in order of first item."""
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for i, j in pairs:
        neighbours[i].append(j)
        neighbours[j].append(i)
    group, label = [-1] * n, 0
    for start in range(n):
        if group[start] >= 0:
            continue
        group[start], queue = label, [start]
        while queue:
            for k in neighbours[queue.pop(0)]:
                if group[k] < 0:
                    group[k] = label
                    queue.append(k)
        label += 1
    return group


def test_connected_groups_match_breadth_first_search():
    """Random edge lists (self-loops, repeats, either order, isolated items): the same
    group ids as a plain BFS, numbered by first item -- the ids the split's RNG sees."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(1, 120))
        pairs = [(int(a), int(b)) for a, b in rng.integers(0, n, (int(rng.integers(0, 2 * n)), 2))]
        groups = connected_groups(n, pairs)
        assert groups.dtype == np.int64 and groups.tolist() == _bfs_groups(n, pairs)
    assert connected_groups(0, []).tolist() == [] and connected_groups(3, []).tolist() == [0, 1, 2]


def test_perceptual_hash_robust():
    a = texture(5, 200, 200)
    noisy = np.clip(a * 0.8 + 30 + RNG.normal(0, 6, a.shape), 0, 255).astype(np.uint8)
    assert bin(perceptual_hash(a) ^ perceptual_hash(noisy)).count("1") <= 6
    assert bin(perceptual_hash(a) ^ perceptual_hash(texture(6, 200, 200))).count("1") > 12


def test_ncm_fixtures_prepared_without_bar(tmp_path, make_config):
    for path in NCM.glob("*.jpg"):
        target = tmp_path / "raw" / path.name.split("__")[0] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    report = prepare_dataset(tmp_path / "raw", tmp_path / "out", make_config().data, 0, progress=False)
    assert report["kept"] == 5 and report["infobar_cropped"] == 5
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert manifest.bar_rows.between(25, 29).all()
    images = np.load(tmp_path / "out" / "images.npy")
    assert not ((images < 6).mean(axis=2) >= 0.9).any()


def test_standardized_grey_levels_hide_brightness_and_contrast():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (6, 32, 32))
    images = np.clip(base * rng.uniform(20, 40, (6, 1, 1)) + rng.uniform(60, 190, (6, 1, 1)), 0, 255).astype(np.uint8)
    out = standardize_grey_levels(images)
    assert out.dtype == np.uint8 and out.shape == images.shape
    flat = out.reshape(6, -1).astype(float)
    np.testing.assert_allclose(flat.mean(1), GREY_MEAN, atol=1.5)
    np.testing.assert_allclose(flat.std(1), GREY_STD, rtol=0.05)
    # a brightness and contrast change of the input does not show in the output (up to rounding)
    brighter = np.clip(images.astype(float) * 0.7 + 30, 0, 255).astype(np.uint8)
    change = np.abs(standardize_grey_levels(brighter).astype(int) - out.astype(int))  # the input's 8-bit steps, scaled up
    assert change.mean() < 1.5 and change.max() <= 6
    assert standardize_grey_levels(np.full((1, 4, 4), 77, np.uint8)).tolist() == [[[128] * 4] * 4]  # flat: level moved only
    np.testing.assert_array_equal(standardize_grey_levels(images[2]), out[2])  # one image as in a batch


def test_grey_levels_policy_is_the_same_in_prepare_and_predict(tmp_path, make_config):
    """data.grey_levels=standardize: prepare stores each image standardized, bit for bit what
    standardizing the raw prepared image gives, and a darker, flatter exposure of a micrograph
    reaches the model as the original does (predict reads files through load_micrograph)."""
    for c, name in enumerate(["Alpha", "Beta"]):
        for i in range(4):
            save(tmp_path / "raw" / name / f"{i}.png", texture(10 * c + i))
    raw = make_config({"data.grey_levels": "raw"}).data
    std = make_config({"data.grey_levels": "standardize"}).data
    prepare_dataset(tmp_path / "raw", tmp_path / "out_raw", raw, 0, progress=False)
    prepare_dataset(tmp_path / "raw", tmp_path / "out_std", std, 0, progress=False)
    raw_images, std_images = np.load(tmp_path / "out_raw" / "images.npy"), np.load(tmp_path / "out_std" / "images.npy")
    np.testing.assert_array_equal(std_images, standardize_grey_levels(raw_images))
    raw_rows, std_rows = (pd.read_parquet(tmp_path / out / "manifest.parquet") for out in ("out_raw", "out_std"))
    assert raw_rows.drop(columns="sha256").equals(std_rows.drop(columns="sha256"))  # split, groups, hashes of the files
    assert std_rows.sha256.tolist() == [image_sha256(image) for image in std_images]  # of what the model sees

    original = texture(3)
    darker = save(tmp_path / "darker.png", (original.astype(float) * 0.6 + 20).astype(np.uint8))
    source = save(tmp_path / "original.png", original)
    as_model_sees = np.abs(load_micrograph(darker, std).astype(int) - load_micrograph(source, std).astype(int))
    assert as_model_sees.mean() < 1.5  # rounding of the 8-bit levels only
    assert abs(load_micrograph(darker, raw).mean() - load_micrograph(source, raw).mean()) > 20


def _blas_threads(_: str) -> tuple[list[int], int]:
    """In a worker, after a BLAS product: (BLAS libraries' thread limits, OS threads)."""
    from threadpoolctl import threadpool_info

    np.ones((64, 233), np.float32) @ np.ones((233, 233), np.float32)
    tasks = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"], tasks


def test_parallel_map_runs_in_order_with_one_blas_thread_per_worker():
    """Workers inherit the one-thread BLAS limit set before they fork: no BLAS thread of
    their own (a limit set in a pool initializer leaves one per worker, spinning at ~50%
    of a core while idle: measured). Results come back in input order; the parent's limit
    is restored afterwards."""
    from threadpoolctl import threadpool_info

    from multifusion.data.parallel import parallel_map

    np.ones((300, 300)) @ np.ones((300, 300))  # the parent's BLAS threads are running
    before = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
    paths = [f"p{i}" for i in range(40)]
    for workers in (1, 2):
        for limits, tasks in parallel_map(_blas_threads, paths, workers, progress=False):
            assert limits == [1] * len(before)
            assert workers == 1 or tasks == 1
        assert list(parallel_map(str.upper, paths, workers, progress=False)) == [p.upper() for p in paths]
    assert [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"] == before
