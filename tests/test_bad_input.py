"""Bad input, bad params, bad layouts (issue 13): a clear error before any work, nothing
lost silently, outputs never overwrite inputs. Each case is built in a tmp directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from multifusion.core.errors import UserError, one_line, run_stage
from multifusion.core.config import RULES, ConfigError, load_config
from multifusion.data.layout import scan_folder
from multifusion.data.prepare import MIN_GROUPS, PrepareError, prepare_dataset

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def image(path: Path, seed: int, size: tuple[int, int] = (80, 96)) -> Path:
    """A distinct smooth grey texture (H, W) = size saved at ``path``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[0] // 8, size[1] // 8)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size[::-1], Image.Resampling.BICUBIC).save(path)
    return path


def two_classes(root: Path, per_class: int = 13) -> None:
    for c, name in enumerate(("Fibres", "Nanowires")):
        for i in range(per_class):
            image(root / name / f"{name[0]}{i:02d}.png", 100 * c + i)


def params_copy(tmp_path: Path, **overrides) -> Path:
    """params.yaml with dotted overrides written to tmp_path (no validation on the way)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stage(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MULTIFUSION_DEBUG": ""}
    return subprocess.run([PY, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def one_clean_line(result: subprocess.CompletedProcess, name: str) -> str:
    """The stage failed with exit 1 and one line on stderr (no traceback); returns it."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{name}: error: ")
    return lines[0]


# -- 1. layouts --------------------------------------------------------------------------


@pytest.mark.parametrize("stray", ["Test/a.png", "Test/batch1/a.png", "train/x/a.png"])
def test_split_named_folder_beside_classes_is_refused_naming_it(tmp_path, make_config, stray):
    root = tmp_path / "ds"
    two_classes(root)
    image(root / stray, 999)
    with pytest.raises(PrepareError) as err:
        prepare_dataset(root, tmp_path / "out", make_config().data, 0, progress=False)
    message = str(err.value)
    name = stray.split("/")[0]
    assert f"folder {name} names a split" in message and "Fibres, Nanowires" in message and "rename" in message
    assert not (tmp_path / "out").exists()


def test_split_layout_only_when_splits_are_all_there_is(tmp_path):
    root = tmp_path / "ds"
    for split in ("Train", "TEST"):
        for name in ("A", "B"):
            image(root / split / name / "x.png", hash((split, name)) % 1000)
    image(root / "Train" / "loose.png", 1)  # an image in a split folder but in no class folder
    scan = scan_folder(root)
    assert sorted({(c, s) for _, c, s in scan.files}) == [("A", "test"), ("A", "train"), ("B", "test"), ("B", "train")]
    assert [s["reason"].split(";")[0] for s in scan.skipped] == ["image outside any class folder"]
    only_test = tmp_path / "only_test"
    image(only_test / "test" / "A" / "x.png", 2)
    with pytest.raises(ValueError, match="no train/"):
        scan_folder(only_test)


# -- 2. params: every choice and range, before any work -------------------------------------


@pytest.mark.parametrize("key, value, allowed", [
    ("data.aspect", "foo", "crop, pad"),
    ("data.infobar", "foo", "auto, none"),
    ("graph.k", 0, ">= 1"),
    ("train.batch_size", 0, ">= 1"),
    ("hnf.layers", 0, "[1, 4]"),
    ("hnf.layers", 7, "[1, 4]"),
    ("hnf.ode.solver", "foo", "rk4, euler, dopri5"),
    ("data.image_size", 63, "data.image_size"),
])
def test_issue_cases_name_key_value_and_allowed(make_config, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        make_config({key: value})
    message = str(err.value)
    assert key in message and str(value) in message and allowed in message and "\n" not in message


def test_every_rule_refuses_its_bad_value_naming_the_key(repo_root, make_config):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    for key, check in RULES.items():
        node = raw
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"RULES names {key}, which params.yaml lacks"
            node = node[part]
        bad = [check.bad] if isinstance(node, list) and not check.whole_list else check.bad
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            make_config({key: bad})


def test_cross_key_checks(make_config):
    with pytest.raises(ConfigError, match="sum to 1"):
        make_config({"data.split.val": 0.3})
    with pytest.raises(ConfigError, match=r"hnf\.dim = 30 is not divisible by hnf\.heads = 4"):
        make_config({"hnf.dim": 30})
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        make_config({"data.group_pattern": "(unclosed"})
    for layers in (1, 2, 3, 4):
        assert make_config({"hnf.layers": layers}).hnf.layers == layers


def test_bad_image_size_fails_before_prepare_touches_its_output(tmp_path):
    root, out = tmp_path / "ds", tmp_path / "prepared"
    two_classes(root, per_class=3)
    out.mkdir()
    (out / "manifest.parquet").write_bytes(b"the previous run's output")
    params = params_copy(tmp_path, **{"data.image_size": 63})
    result = stage(["stages/prepare.py", "--root", str(root), "--out", str(out), "--params", str(params)], tmp_path)
    line = one_clean_line(result, "prepare")
    assert "data.image_size" in line and "63" in line
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet"]
    assert (out / "manifest.parquet").read_bytes() == b"the previous run's output"


# -- 3. predict refuses outputs that destroy inputs, before inference ------------------------


@pytest.fixture
def shots(tmp_path) -> Path:
    image(tmp_path / "shots" / "a.png", 1)
    image(tmp_path / "shots" / "b.tif", 2)
    return tmp_path / "shots"


def predict_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(__import__("multifusion.cli", fromlist=["app"]).app,
                                ["predict", "--params", str(REPO / "params.yaml"), *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("flag, target, problem", [
    ("--out", "shots/a.png", "is one of the inputs"),
    ("--contact-sheet", "shots/a.png", "is one of the inputs"),
    ("--out", "new.png", "image extension"),
    ("--out", "some_folder/", "is a folder"),
    ("--out", "shots", "is a folder"),
    ("--contact-sheet", "sheet.csv", "needs one of the extensions"),
    ("--report", "shots/b.tif", "is one of the inputs"),
    ("--report", "report.png", "needs one of the extensions"),
    ("--out", "shots/a.png/x.csv", "is a file"),
])
def test_output_that_would_destroy_an_input_is_refused_before_inference(tmp_path, shots, flag, target, problem):
    before = {p: p.read_bytes() for p in shots.iterdir()}
    args = [str(shots), "--model", str(tmp_path / "no_model_here"), flag, f"{tmp_path}/{target}"]
    if flag != "--out":
        args += ["--out", str(tmp_path / "p.csv")]
    code, output = predict_cli(*args)
    assert code == 2 and problem in output and flag in output, output
    assert "no_model_here" not in output  # refused before the model was even looked at
    assert {p: p.read_bytes() for p in shots.iterdir()} == before


@pytest.mark.parametrize("flag", ["--top-k", "--batch-size"])
def test_zero_top_k_or_batch_size_is_refused(tmp_path, shots, flag):
    code, output = predict_cli(str(shots), "--model", str(tmp_path / "no_model_here"), "--out", str(tmp_path / "p.csv"), flag, "0")
    assert code == 2 and flag in output and "must be >= 1" in output and "no_model_here" not in output, output


# -- 4. a corrupt model directory: the file, what is wrong, what to do ----------------------


@pytest.fixture
def model_dir(tmp_path, make_config) -> Path:
    from multifusion.model.card import save_model
    from multifusion.model import build_model

    cfg = make_config({"hnf.layers": 1, "hnf.dim": 16, "hnf.stem": "conv", "data.image_size": 32, "fusion.text": False})
    save_model(tmp_path / "model", build_model(cfg, ["A", "B", "C"], None), cfg, ["A", "B", "C"], None, 1.0, "hnf")
    return tmp_path / "model"


def _edit_record(model: Path, edit) -> None:
    record = json.loads((model / "config.json").read_text())
    edit(record)
    (model / "config.json").write_text(json.dumps(record))


CORRUPTIONS = {
    "truncated weights": ("model.safetensors", "damaged or truncated",
                          lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:300])),
    "wrong shapes": ("model.safetensors", "does not match config.json: size mismatch",
                     lambda m: _edit_record(m, lambda r: r["classes"].append("D"))),
    "unknown params key": ("config.json", "does not know (graph.kk)",  # a missing key takes params.yaml's value
                           lambda m: _edit_record(m, lambda r: r["config"]["graph"].update(kk=r["config"]["graph"].pop("k")))),
    "missing entry": ("config.json", "no 'temperature' entry", lambda m: _edit_record(m, lambda r: r.pop("temperature"))),
    "broken JSON": ("config.json", "not valid JSON", lambda m: (m / "config.json").write_text('{"model_name": ')),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_model_dir_names_file_problem_and_fix(model_dir, case):
    from multifusion.model.card import ModelDirError, load_model

    name, problem, corrupt = CORRUPTIONS[case]
    corrupt(model_dir)
    with pytest.raises(ModelDirError) as err:
        load_model(model_dir)
    message = str(err.value)
    assert message.startswith(str(model_dir / name)) and problem in message and "\n" not in message
    assert "dvc repro train" in message and "describe" not in message


# -- 5. prepare: links, loops, hidden folders, label conflicts, thin classes ---------------


def test_links_loops_hidden_folders_are_reported_or_ignored(tmp_path, make_config):
    root = tmp_path / "ds"
    two_classes(root, per_class=6)
    fibres = root / "Fibres"
    os.symlink("gone.png", fibres / "broken.png")
    os.symlink("loop_b.png", fibres / "loop_a.png")
    os.symlink("loop_a.png", fibres / "loop_b.png")
    os.symlink("..", fibres / "parent")  # a folder link leading back up
    image(tmp_path / "elsewhere" / "e.png", 9)
    os.symlink(tmp_path / "elsewhere", fibres / "more")  # a folder link elsewhere: followed
    for hidden in (".ipynb_checkpoints", ".git"):
        image(fibres / hidden / "copy.png", 7)
    image(root / "loose.png", 8)
    report = prepare_dataset(root, tmp_path / "out", make_config().data, 0, progress=False)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"broken.png", "loop_a.png", "loop_b.png", "parent", "loose.png"}
    assert "broken symbolic link" in reasons["broken.png"] and "loop" in reasons["loop_a.png"]
    assert "leads back" in reasons["parent"] and "outside any class folder" in reasons["loose.png"]
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert not manifest.path.str.contains("ipynb|/\\.git/").any()
    assert manifest.loc[manifest.id == "Fibres/more/e.png", "class_name"].tolist() == ["Fibres"]
    assert report["kept"] == 13 and not report["duplicates"] and not report["label_conflicts"]


def test_label_conflict_keeps_neither_and_lists_it(tmp_path, make_config):
    root = tmp_path / "ds"
    two_classes(root)
    same = image(root / "Fibres" / "shared.png", 4242)
    (root / "Nanowires" / "shared_copy.png").write_bytes(same.read_bytes())
    image(root / "Fibres" / "dup.png", 0)  # same pixels as Fibres/F00.png: a plain duplicate
    report = prepare_dataset(root, tmp_path / "out", make_config().data, 0, progress=False)
    assert report["label_conflicts"] == [{"paths": [str(same), str(root / "Nanowires" / "shared_copy.png")],
                                          "classes": ["Fibres", "Nanowires"]}]
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert not manifest.path.str.contains("shared").any() and report["kept"] == 26
    assert [d["path"] for d in report["duplicates"]] == [str(root / "Fibres" / "dup.png")]


def test_single_image_class_and_few_groups_are_warned(tmp_path, make_config, caplog):
    root = tmp_path / "ds"
    two_classes(root)
    image(root / "Solo" / "only.png", 77)
    with caplog.at_level("WARNING", logger="multifusion.prepare"):
        report = prepare_dataset(root, tmp_path / "out", make_config().data, 0, progress=False)
    assert report["single_image_classes"] == ["Solo"]
    assert report["splits"]["train"]["Solo"] == 1
    assert report["few_groups"]["val"]["Solo"] == 0 and report["few_groups"]["test"]["Solo"] == 0
    assert all(n < MIN_GROUPS for split in report["few_groups"].values() for n in split.values())
    text = caplog.text
    assert "Solo have a single image: it can only be in train" in text
    assert "val holds fewer than 3 independent groups" in text and "temperature" in text


# -- 6. every stage: one clean line and exit 1 ----------------------------------------------


def test_run_stage_turns_user_errors_into_one_line(capsys):
    def bad_params():
        raise ConfigError("params.yaml: graph.k is 0; allowed: >= 1")

    with pytest.raises(SystemExit) as exit_:
        run_stage("train", bad_params)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "train: error: params.yaml: graph.k is 0; allowed: >= 1\n"

    def missing_file():
        open("/no/such/file.json")

    with pytest.raises(SystemExit):
        run_stage("evaluate", missing_file)
    assert "No such file or directory: '/no/such/file.json'" in capsys.readouterr().err

    def bug():
        return [][1]

    with pytest.raises(IndexError):  # a bug keeps its traceback
        run_stage("train", bug)
    with pytest.raises(ValueError):  # so does a ValueError raised by a library, not by this project
        run_stage("train", lambda: int("x"))
    assert one_line(UserError("a\n  b\n")) == "a b"


def test_describe_stage_with_truncated_cache_shard_is_one_line(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "shard-00000000000000000001-1-00001-run.parquet").write_bytes(b"PAR1 truncated")
    (tmp_path / "classes.json").write_text(json.dumps(["Fibres", "Particles"]))
    params = params_copy(tmp_path, **{"llm.provider": "openai", "llm.base_url": "http://127.0.0.1:9/v1",
                                      "llm.classes_file": str(REPO / "prompts" / "classes.yaml")})
    result = subprocess.run(
        [PY, "stages/describe.py", "--classes", str(tmp_path / "classes.json"), "--cache", str(cache),
         "--out", str(tmp_path / "d.parquet"), "--metrics", str(tmp_path / "llm.json"), "--params", str(params)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env=os.environ | {"OPENAI_API_KEY": "sk-test", "MULTIFUSION_DEBUG": ""},
    )
    line = one_clean_line(result, "describe")
    assert "unreadable cache shard" in line and "delete that file and rerun" in line
    assert not (tmp_path / "d.parquet").exists()


def test_describe_quiets_the_loggers_the_openai_client_really_uses():
    import importlib.util
    import logging

    import httpx2._client
    import openai

    openai.AsyncOpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1")  # builds its transport: its loggers exist

    spec = importlib.util.spec_from_file_location("describe_stage", REPO / "stages" / "describe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert httpx2._client.logger.name in module.QUIET_LOGGERS  # the logger of the request lines
    known = set(logging.root.manager.loggerDict)
    assert all(name in known for name in module.QUIET_LOGGERS), set(module.QUIET_LOGGERS) - known


# -- 8. the training checkpoint: weights_only, and this run's fingerprint first --------------


class Exploit:
    """Unpickling this runs ``touch`` on a marker file: what weights_only=False would allow."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_training_state_loads_weights_only_and_checks_the_fingerprint(tmp_path, capsys):
    from multifusion.training.train_state import TRAIN_STATE, load_training_state, rng_states, save_training_state

    state = {"fingerprint": "run-a", "epoch": 3, "model": {"w": torch.ones(2)}, "rng": rng_states(),
             "history": [{"val/acc": np.float64(0.5), "lr": 0.001}], "best_f1": 0.4}
    save_training_state(tmp_path, state)
    loaded = load_training_state(tmp_path, "run-a")
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))
    assert np.array_equal(loaded["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert load_training_state(tmp_path, "run-b") is None and "other params" in capsys.readouterr().out

    marker = tmp_path / "pwned"
    torch.save({"fingerprint": "run-a", "payload": Exploit(marker)}, tmp_path / TRAIN_STATE)
    assert load_training_state(tmp_path, "run-a") is None
    assert not marker.exists() and "unreadable checkpoint" in capsys.readouterr().out
    save_training_state(tmp_path, state)
    (tmp_path / TRAIN_STATE).write_bytes((tmp_path / TRAIN_STATE).read_bytes()[:200])  # killed mid-copy
    assert load_training_state(tmp_path, "run-a") is None


def test_predict_defaults_from_a_broken_model_config_name_the_file(tmp_path, shots, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"config": ')
    (model / "model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # no ./params.yaml: the defaults come from the model's config.json
    result = CliRunner().invoke(__import__("multifusion.cli", fromlist=["app"]).app,
                                ["predict", str(shots), "--model", str(model), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and f"{model / 'config.json'}: damaged, not valid JSON" in result.output
