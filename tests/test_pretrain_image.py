"""Stage pretrain_image and the low-label subsets (issue 29): BYOL lowers its own loss; the
trunk `train` starts from is the pretrained one, tensor for tensor; no val or test image, nor
an exact or near-copy of one put in data.unlabeled, reaches the pretraining pool; a trunk for
another architecture is refused in one line; the disabled stage writes a fixed marker; the
low-label subsets are fixed by seed, count groups, and keep val and test image for image."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from multifusion.core.config import apply_overrides, load_config
from multifusion.data.hashes import perceptual_hash
from multifusion.data.low_label import low_label_mask, write_low_label

REPO = Path(__file__).resolve().parents[1]

# A tiny graph trunk on 16 px images (the default stem, scaled down), no text, one quick epoch.
TINY = {
    "data.image_size": 16, "data.infobar": "none", "data.workers": 1,
    "hnf.layers": 2, "hnf.dim": 16, "hnf.heads": 2, "hnf.stem_width": 16, "hnf.stem_depth": 2, "fusion.text": False,
    "train.epochs": 1, "train.batch_size": 8, "train.lr": 0.0, "train.warmup_epochs": 0, "evaluate.tta": False,
    "pretrain.enabled": True, "pretrain.epochs": 2, "pretrain.batch_size": 8, "pretrain.warmup_epochs": 0,
    "pretrain.hidden_dim": 32, "pretrain.projection_dim": 16, "pretrain.shift": 2, "pretrain.lr": 0.003,
}


def texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A smooth random grey texture (a few random plane waves) plus mild noise: uint8 (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size))
    for _ in range(4):
        fy, fx = rng.integers(1, 4, 2)
        image += np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
    image = 128 + 30 * image + rng.normal(0, 3, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_params(path: Path, overrides: dict) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    path.write_text(yaml.safe_dump(apply_overrides(raw, overrides)))
    return path


def run_stage(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "stages" / script), *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture
def labelled_root(tmp_path) -> Path:
    """data root: 3 classes x 10 texture PNGs of 64 px."""
    rng = np.random.default_rng(7)
    root = tmp_path / "root"
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(texture(rng)).save(root / f"class_{c}" / f"img{i:02d}.png")
    return root


@pytest.fixture
def prepared(labelled_root, tmp_path) -> Path:
    from multifusion.data.prepare import prepare_dataset

    cfg = load_config(REPO / "params.yaml", TINY)
    out = tmp_path / "work" / "data" / "prepared"
    prepare_dataset(labelled_root, out, cfg.data, cfg.seed, progress=False)
    return out


def held_out(prepared: Path) -> pd.DataFrame:
    manifest = pd.read_parquet(prepared / "manifest.parquet")
    return manifest[manifest["split"].isin(["val", "test"])]


def copies_of_held_out(prepared: Path, folder: Path) -> dict[str, str]:
    """Put in ``folder``: an exact copy (same file) of a test image, a near-copy (JPEG
    re-encode plus noise, other pixels) of a test image and of a val image, and 3 new
    micrographs. -> {file name: what it is}."""
    rng = np.random.default_rng(11)
    folder.mkdir(parents=True)
    manifest = pd.read_parquet(prepared / "manifest.parquet")
    test = manifest[manifest["split"] == "test"].iloc[0]
    val = manifest[manifest["split"] == "val"].iloc[0]
    shutil.copy(test["path"], folder / "exact_test.png")
    for name, row in (("near_test.png", manifest[manifest["split"] == "test"].iloc[1]), ("near_val.png", val)):
        pixels = np.asarray(Image.open(row["path"]), dtype=np.float64)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
        noisy = np.asarray(Image.open(buffer), dtype=np.float64) + rng.normal(0, 1, pixels.shape)
        near = np.clip(noisy, 0, 255).astype(np.uint8)
        assert not np.array_equal(near, pixels)
        bits = bin(perceptual_hash(near) ^ perceptual_hash(pixels.astype(np.uint8))).count("1")
        assert bits <= load_config(REPO / "params.yaml").data.near_duplicate_bits  # a near-copy by the project's own rule
        Image.fromarray(near).save(folder / name)
    sub = folder / "more"  # any nesting
    sub.mkdir()
    for i in range(3):
        Image.fromarray(texture(rng)).save(sub / f"new{i}.png")
    return {"exact_test.png": test["id"], "near_test.png": "near", "near_val.png": val["id"]}


# ---------------------------------------------------------------------------------------
# BYOL


def test_pretraining_lowers_its_own_loss():
    from multifusion.training.pretrain_image import pretrain_trunk

    torch.set_num_threads(1)
    cfg = load_config(REPO / "params.yaml", {**TINY, "pretrain.batch_size": 16})
    rng = np.random.default_rng(0)
    images = np.stack([texture(rng, 16) for _ in range(48)])  # (48, 16, 16)
    result = pretrain_trunk(images, cfg, max_steps=30)
    losses = np.array(result.step_losses)
    assert result.steps == 30 and np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses.round(3)
    again = pretrain_trunk(images, cfg, max_steps=30)
    assert again.step_losses == result.step_losses  # seeded: the same run gives the same losses


def test_views_keep_grey_levels_and_pixel_scale():
    from multifusion.training.pretrain_image import shift_crop, view

    cfg = load_config(REPO / "params.yaml", {**TINY, "pretrain.noise": 0.0, "pretrain.shift": 3})
    x = torch.rand(4, 1, 16, 16)
    gen = torch.Generator().manual_seed(0)
    shifted = shift_crop(x, 3, gen)
    # a shift moves pixels, it never re-samples them: the centre 10x10 of every view is a window of the padded input
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3), mode="reflect")
    for b in range(4):
        windows = padded[b, 0].unfold(0, 16, 1).unfold(1, 16, 1)  # (7, 7, 16, 16)
        assert (windows == shifted[b, 0]).all(dim=(-2, -1)).any()
    v = view(x, cfg.pretrain, gen) * 0.25 + 0.5  # back to [0, 1]
    # without noise a view only moves pixels (shift, flips, rot90): no grey level is made or changed
    assert v.shape == x.shape
    for b in range(4):
        gap = (v[b].flatten()[:, None] - padded[b].flatten()[None, :]).abs().min(dim=1).values  # (S*S,)
        assert gap.max() < 1e-6


# ---------------------------------------------------------------------------------------
# No val / test image, nor a copy of one, is pretrained on


def test_no_val_or_test_image_or_copy_reaches_the_pretraining_pool(prepared, tmp_path):
    from multifusion.data.dataset import load_prepared
    from multifusion.data.unlabeled import pretrain_pool

    unlabeled = tmp_path / "unlabeled"
    planted = copies_of_held_out(prepared, unlabeled)
    cfg = load_config(REPO / "params.yaml", TINY)
    data = load_prepared(prepared)
    pool = pretrain_pool(data, unlabeled, cfg.data)

    held = held_out(prepared)
    assert not set(pool.sha256) & set(held["sha256"])
    excluded = {Path(item["source"].split(":", 1)[1]).name: item["reason"] for item in pool.report["excluded"]}
    assert set(excluded) == set(planted)
    assert excluded["exact_test.png"] == f"exact copy of test image {planted['exact_test.png']}"
    assert excluded["near_test.png"].startswith("near-copy (") and " of test image " in excluded["near_test.png"]
    assert excluded["near_val.png"].endswith(f" of val image {planted['near_val.png']}")
    n_train = int((data.manifest["split"] == "train").sum())
    assert pool.report["train_images"] == n_train and pool.report["unlabeled_images"] == 3 and len(pool.images) == n_train + 3
    # the near-copies really are other images (their stored sha256 is no val/test image's): only the pHash caught them
    from multifusion.data.ingest import prepare_file
    for name in ("near_test.png", "near_val.png"):
        assert prepare_file(str(unlabeled / name), cfg.data).sha256 not in set(held["sha256"])


def test_a_missing_unlabeled_folder_is_one_line(prepared, tmp_path):
    from multifusion.data.dataset import load_prepared
    from multifusion.data.unlabeled import UnlabeledError, pretrain_pool

    cfg = load_config(REPO / "params.yaml", TINY)
    with pytest.raises(UnlabeledError, match=r"nowhere: data.unlabeled is not a folder; .* set it to null$"):
        pretrain_pool(load_prepared(prepared), tmp_path / "nowhere", cfg.data)


# ---------------------------------------------------------------------------------------
# The stage, and train starting from its trunk


def test_train_starts_from_the_pretrained_trunk(prepared, tmp_path):
    from multifusion.training.trunk import CARD, WEIGHTS

    work = prepared.parents[1]
    copies_of_held_out(prepared, work / "unlabeled")
    params = write_params(work / "params.yaml", {**TINY, "data.unlabeled": "unlabeled"})
    done = run_stage("pretrain_image.py", work, "--params", str(params))
    assert done.returncode == 0, done.stderr
    card = json.loads((work / "models/image_trunk" / CARD).read_text())
    assert card["enabled"] and card["method"] == "byol" and card["architecture"]["stem_width"] == 16
    assert not set(card["images"]["sha256"]) & set(held_out(prepared)["sha256"])  # the card's list: no val/test image
    assert card["images"]["unlabeled"] == 3 and len(card["excluded"]) == 3
    assert (work / "dvclive/pretrain_image/metrics.json").is_file()
    trunk = load_file(str(work / "models/image_trunk" / WEIGHTS))

    # train.lr 0: one epoch leaves every parameter where it started, so the saved stem is the start
    done = run_stage("train.py", work, "--params", str(params), "--text", "none")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "train: trunk from models/image_trunk (byol" in done.stdout
    saved = load_file(str(work / "models/hnf/model.safetensors"))
    stem_params = [k for k in trunk if "running_" not in k and "num_batches" not in k]  # BatchNorm statistics move in train mode
    assert stem_params and all(torch.equal(saved[f"embed.stem.{k}"], trunk[k]) for k in stem_params)

    # a fresh model of the same seed does not hold them: the equality above is the load, not the init
    from multifusion.data.dataset import load_prepared
    from multifusion.model import build_model
    from multifusion.training.trunk import start_from_trunk

    cfg = load_config(params)
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg, load_prepared(prepared).classes, None)
    assert not all(torch.equal(fresh.embed.stem.state_dict()[k], trunk[k]) for k in stem_params)
    start_from_trunk(fresh, cfg, work / "models/image_trunk")
    assert all(torch.equal(fresh.embed.stem.state_dict()[k], trunk[k]) for k in trunk)


def test_a_trunk_of_another_architecture_is_one_line(prepared, tmp_path):
    from multifusion.data.dataset import load_prepared
    from multifusion.model import build_model
    from multifusion.training.pretrain_image import TrunkEncoder
    from multifusion.training.trunk import TrunkError, save_trunk, start_from_trunk, trunk_args

    cfg = load_config(REPO / "params.yaml", TINY)
    save_trunk(tmp_path / "trunk", TrunkEncoder(cfg).stem, {"method": "byol", "epochs": 1, "architecture": trunk_args(cfg),
                                                             "images": {"count": 0}})
    other = load_config(REPO / "params.yaml", {**TINY, "hnf.stem_width": 24})
    model = build_model(other, load_prepared(prepared).classes, None)
    with pytest.raises(TrunkError, match=r"pretrained for another architecture than params.yaml's \(stem_width 16 vs 24; "
                                         r"trunk vs params\); re-run `dvc repro pretrain_image`"):
        start_from_trunk(model, other, tmp_path / "trunk")


def test_disabled_stage_writes_a_fixed_marker_and_train_ignores_it(prepared, tmp_path):
    from multifusion.data.dataset import load_prepared
    from multifusion.model import build_model
    from multifusion.training.trunk import TrunkError, start_from_trunk

    work = prepared.parents[1]
    params = write_params(work / "params.yaml", {**TINY, "pretrain.enabled": False})
    for _ in range(2):
        done = run_stage("pretrain_image.py", work, "--params", str(params))
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in (work / "models/image_trunk").iterdir()) == ["trunk.json"]
        assert (work / "models/image_trunk/trunk.json").read_text() == '{\n  "enabled": false\n}\n'
    cfg = load_config(params)
    torch.manual_seed(0)
    model = build_model(cfg, load_prepared(prepared).classes, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start_from_trunk(model, cfg, work / "models/image_trunk")  # disabled: not read at all
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    enabled = load_config(params, {"pretrain.enabled": True})
    with pytest.raises(TrunkError, match="was not pretrained \\(its stage ran disabled\\); re-run `dvc repro pretrain_image`"):
        start_from_trunk(model, enabled, work / "models/image_trunk")


# ---------------------------------------------------------------------------------------
# Low-label subsets


def grouped_manifest() -> pd.DataFrame:
    """Train: class 0 in groups of sizes 5, 1, 1, 1 (crops of one micrograph, then singles),
    class 1 in 5 single-file groups; val and test 2 files per class."""
    rows = []
    sizes = {0: [5, 1, 1, 1], 1: [1, 1, 1, 1, 1]}
    for label, groups in sizes.items():
        for g, size in enumerate(groups):
            rows += [{"label": label, "split": "train", "group": 100 * label + g} for _ in range(size)]
    for split in ("val", "test"):
        rows += [{"label": label, "split": split, "group": 1000 + len(rows) + i} for label in (0, 1) for i in range(2)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=3).reset_index(drop=True)  # rows in no particular order


def test_low_label_counts_groups_and_is_fixed_by_seed():
    manifest = grouped_manifest()
    masks = {seed: low_label_mask(manifest, per_class=2, seed=seed) for seed in range(8)}
    for seed, keep in masks.items():
        train = manifest[keep & (manifest["split"] == "train").to_numpy()]
        assert train.groupby("label")["group"].nunique().tolist() == [2, 2]  # k groups per class, not k files
        for group in train["group"].unique():  # a chosen group comes whole
            assert (train["group"] == group).sum() == (manifest["group"] == group).sum()
        assert keep[(manifest["split"] != "train").to_numpy()].all()
        np.testing.assert_array_equal(low_label_mask(manifest, per_class=2, seed=seed), keep)  # fixed by the seed
    assert len({tuple(k) for k in masks.values()}) > 1  # and another seed draws other groups
    assert low_label_mask(manifest, per_class=10, seed=0).all()  # k above a class's groups keeps them all
    with pytest.raises(ValueError, match="at least 1"):
        low_label_mask(manifest, per_class=0, seed=0)


def test_low_label_set_keeps_val_and_test_image_for_image(make_prepared, tmp_path):
    from multifusion.data.dataset import load_prepared

    source = make_prepared(per_class={"train": 6, "val": 2, "test": 3}, classes=3)
    manifest = pd.read_parquet(source / "manifest.parquet")
    train = manifest.index[manifest["split"] == "train"]
    manifest.loc[train, "group"] = [f"micrograph{i // 3}" for i in range(len(train))]  # 3 crops per micrograph
    manifest.to_parquet(source / "manifest.parquet", index=False)
    counts = write_low_label(source, tmp_path / "k1", per_class=1, seed=0)
    assert counts == {"test": 9, "train": 9, "val": 6}  # one micrograph (3 crops) per class
    full, small = load_prepared(source), load_prepared(tmp_path / "k1")
    for split in ("val", "test"):
        np.testing.assert_array_equal(np.asarray(small.images)[small.split_indices(split)], np.asarray(full.images)[full.split_indices(split)])
        assert small.manifest.loc[small.split_indices(split), "id"].tolist() == full.manifest.loc[full.split_indices(split), "id"].tolist()
    rows = {row_id: i for i, row_id in enumerate(full.manifest.id)}
    np.testing.assert_array_equal(np.asarray(small.images), np.asarray(full.images)[[rows[i] for i in small.manifest.id]])
    assert write_low_label(source, tmp_path / "again", per_class=1, seed=0) == counts
    assert load_prepared(tmp_path / "again").manifest.id.tolist() == small.manifest.id.tolist()


def test_the_comparison_runs_every_model_and_seed_at_each_k(tmp_path):
    """compare.labels_per_class: DVC expands a subset stage per k, a comparison run per model, seed
    and k on that subset (its own outputs), and a page per k; none of them by default."""
    from dvc.repo import Repo

    def comparison_stages(overrides: dict) -> dict:
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        (root / "comparison").mkdir(parents=True)
        shutil.copy(REPO / "comparison" / "dvc.yaml", root / "comparison" / "dvc.yaml")
        write_params(root / "params.yaml", overrides)
        Repo.init(root, no_scm=True)
        with Repo(root) as repo:
            return {s.name: s for s in repo.index.stages if s.path_in_repo == "comparison/dvc.yaml"}

    default = comparison_stages({})
    assert not [name for name in default if "low_label" in name]  # [] by default: the comparison as it was
    stages = comparison_stages({"compare.models": ["multifusion", "resnet18"], "compare.seeds": [42, 7],
                                "compare.labels_per_class": [10, 25]})
    low = {name for name in stages if "low_label" in name}
    assert low == ({f"low_label@{k}" for k in (10, 25)} | {f"report_low_label@{k}" for k in (10, 25)}
                   | {f"compare_low_label@{m}-{s}-{k}" for m in ("multifusion", "resnet18") for s in (42, 7) for k in (10, 25)})
    run = stages["compare_low_label@resnet18-7-10"]
    assert "--model resnet18 --seed 7 --prepared data/low_label/k10 " in run.cmd
    assert "data/low_label/k10" in {str(Path(d.def_path)) for d in run.deps}
    outs = {str(Path(o.def_path)) for o in run.outs}
    assert {"models/compare_low_label/k10/resnet18/seed7", "metrics/compare_low_label/k10/resnet18/seed7.json"} <= outs
    assert not outs & {str(Path(o.def_path)) for o in stages["compare@resnet18-7"].outs}  # the full-label run keeps its own
    assert "--per-class 25 " in stages["low_label@25"].cmd
    assert str(Path(stages["report_low_label@25"].outs[0].def_path)).endswith("labels_k25.md")


def test_low_label_and_report_stages(make_prepared, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    params = write_params(work / "params.yaml", {"compare.models": ["multifusion", "resnet18"], "compare.seeds": [42],
                                                 "compare.labels_per_class": [1]})
    source = make_prepared(per_class={"train": 6, "val": 2, "test": 3}, classes=3)
    done = run_stage("low_label.py", work, "--prepared", str(source), "--per-class", "1", "--out", "data/low_label/k1",
                     "--params", str(params))
    assert done.returncode == 0, done.stderr
    assert pd.read_parquet(work / "data/low_label/k1/manifest.parquet")["split"].value_counts().to_dict() == {"test": 9, "val": 6, "train": 3}
    metrics = {"top1": 0.5, "top2": 0.6, "top3": 0.7, "top5": 0.8, "macro_precision": 0.5, "macro_recall": 0.5, "macro_f1": 0.4, "n": 4}
    for name, preds in (("multifusion", [0, 1, 2, 0]), ("resnet18", [0, 1, 1, 1])):
        (work / "m" / name).mkdir(parents=True)
        (work / "m" / name / "seed42.json").write_text(json.dumps({**metrics, "model": name}))
        (work / "p" / name / "seed42").mkdir(parents=True)
        pd.DataFrame({"actual": [0, 1, 2, 0], "predicted": preds}).to_csv(work / "p" / name / "seed42" / "confusion.csv", index=False)
    done = run_stage("report_low_label.py", work, "--per-class", "1", "--compare", "m", "--compare-plots", "p",
                     "--out", "reports/x/labels_k1.md", "--params", str(params))
    assert done.returncode == 0, done.stderr
    page = (work / "reports/x/labels_k1.md").read_text()
    assert page.startswith("# 1 labelled groups per class") and "(4 images)" in page
    assert "| seed 42: top-1 / macro F1 |" in page and "0.500 / 0.400" in page


def test_data_unlabeled_leaves_trains_checkpoint_fingerprint_alone(make_config):
    """pretrain_image's folder reaches train only as the initial weights (hashed in the fingerprint):
    with the stage off, train's checkpoint keeps its bytes whatever data.unlabeled says."""
    from multifusion.training.train_state import run_fingerprint

    state = {"w": torch.ones(2)}
    base = run_fingerprint(make_config(), "hnf", state, "data", 1)
    assert run_fingerprint(make_config({"data.unlabeled": "/lab/unlabelled"}), "hnf", state, "data", 1) == base
    assert run_fingerprint(make_config({"data.image_size": 32}), "hnf", state, "data", 1) != base
    assert run_fingerprint(make_config(), "hnf", {"w": torch.zeros(2)}, "data", 1) != base  # another trunk: another run
