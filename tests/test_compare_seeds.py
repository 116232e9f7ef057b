"""Seeds as an axis of the comparison: compare.seeds is checked when params.yaml loads,
comparison/dvc.yaml crosses every model with every seed (outputs per model and seed), and a
run at a seed is that seed's run: the same seed gives the same predictions, another seed other
initial weights, and the metrics record it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file


def test_compare_seeds_must_be_distinct_seeds(make_config) -> None:
    from multifusion.core.config import ConfigError

    assert make_config({"compare.seeds": [42]}).compare.seeds == [42]  # a one-seed run
    for bad in ([], [42, 42], [-1, 3]):
        with pytest.raises(ConfigError, match=r"compare.seeds is .*allowed: a non-empty list of distinct seeds >= 0"):
            make_config({"compare.seeds": bad})


def test_the_comparison_crosses_every_model_with_every_seed(tmp_path: Path, repo_root: Path) -> None:
    """DVC's own expansion of comparison/dvc.yaml's matrix: a stage per model and seed, each with
    its own outputs; one report over all of them."""
    from dvc.repo import Repo

    (tmp_path / "comparison").mkdir()
    shutil.copy(repo_root / "comparison" / "dvc.yaml", tmp_path / "comparison" / "dvc.yaml")
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["compare"].update({"models": ["multifusion", "resnet18"], "seeds": [42, 7]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    Repo.init(tmp_path, no_scm=True)
    with Repo(tmp_path) as repo:
        stages = {s.name: s for s in repo.index.stages if s.path_in_repo == "comparison/dvc.yaml"}
    assert set(stages) == {f"compare@{m}-{s}" for m in ("multifusion", "resnet18") for s in (42, 7)} | {"report"}
    stage = stages["compare@resnet18-7"]
    assert "--model resnet18 --seed 7" in stage.cmd
    outs = {str(Path(o.def_path)) for o in stage.outs}
    assert {"models/compare/resnet18/seed7", "metrics/compare/resnet18/seed7.json", "plots/compare/resnet18/seed7"} <= outs
    keys = {key for dep in stage.params for key in dep.params}
    assert "train" in keys and not {"seed", "compare.seeds"} & keys  # adding a seed re-runs no model
    assert "compare.seeds" in {key for dep in stages["report"].params for key in dep.params}


def test_a_run_at_a_seed_is_that_seeds_run(make_prepared, make_config, tmp_path: Path) -> None:
    from multifusion.training.compare import run_comparison

    prepared = make_prepared(per_class={"train": 6, "val": 3, "test": 3})
    cfg = make_config({"data.image_size": 16, "train.epochs": 1, "train.batch_size": 8, "evaluate.tta": False})

    def run(seed: int, name: str):
        out = tmp_path / name
        metrics, labels, preds = run_comparison("resnet18", cfg, prepared, tmp_path / "no_text", out / "model", out / "ck", out / "live", seed=seed)
        return metrics, preds, load_file(out / "model" / "model.safetensors")

    first, again, other = run(3, "a"), run(3, "b"), run(4, "c")
    assert first[0]["seed"] == again[0]["seed"] == 3 and other[0]["seed"] == 4
    np.testing.assert_array_equal(first[1], again[1])
    assert all(np.array_equal(first[2][k].numpy(), again[2][k].numpy()) for k in first[2])
    assert not all(np.array_equal(first[2][k].numpy(), other[2][k].numpy()) for k in first[2])
