"""Bad input, bad params, bad layouts (issue 13): a clear error before any work, nothing
lost silently, outputs never overwrite inputs. Each case is built in a tmp directory."""

from __future__ import annotations

import json
import os
import re
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
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
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
    "unknown params key": ("config.json", "unknown key 'graph.kk'",  # the card's architecture arguments (format 2)
                           lambda m: _edit_record(m, lambda r: (g := r["architecture"]["args"]["graph"]).update(kk=g.pop("k")))),
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


# -- 9. issue 25: nothing lost, ever --------------------------------------------------------
# The output guard (inputs, input folders, the model folder, unwritable targets), atomic
# writes (a full disk keeps the previous file), link loops and duplicates among the inputs,
# explain = predict, CSV injection, empty folders, describe's URL, Ctrl-C.

TINY = REPO / "tests" / "fixtures" / "tiny_model"  # a saved model: 32 px, text, 8-view TTA


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A copy of the tiny fixture model (a test that fails must not damage the fixture)."""
    import shutil

    return Path(shutil.copytree(TINY, tmp_path / "model"))


def cli(*args: str) -> tuple[int, str]:
    """``multifusion <args>`` in process: (exit code, stdout + stderr)."""
    result = CliRunner().invoke(__import__("multifusion.cli", fromlist=["app"]).app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, result.output


def one_line_error(output: str) -> str:
    """The one line of a refused command (progress bars aside), which starts with "error: "."""
    bar = re.compile(r"^\w+: +\d+%\|")  # tqdm's progress lines
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.strip() and not bar.match(line)]
    assert len(lines) == 1 and "Traceback" not in output and lines[0].startswith("error: "), output
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "new.csv"])
def test_predict_out_inside_the_model_folder_is_refused(tmp_path, tiny, shots, name):
    before = snapshot(tiny)
    code, output = predict_cli(str(shots), "--model", str(tiny), "--out", str(tiny / name))
    line = one_line_error(output)
    assert code == 2 and "--out" in line and "inside the model folder" in line and "--model" in line
    assert snapshot(tiny) == before


@pytest.mark.parametrize("flag, target", [("--out", "shots/p.csv"), ("--contact-sheet", "shots/sub/s.png"),
                                          ("--report", "shots/r.html")])
def test_predict_output_inside_an_input_folder_is_refused(tmp_path, shots, flag, target):
    args = [str(shots), "--model", str(tmp_path / "no_model_here"), flag, str(tmp_path / target)]
    code, output = predict_cli(*args, *([] if flag == "--out" else ["--out", str(tmp_path / "p.csv")]))
    line = one_line_error(output)
    assert code == 2 and flag in line and "input folder" in line and "no_model_here" not in line


def test_unwritable_out_fails_before_inference_naming_the_flag(tmp_path, shots):
    code, output = predict_cli(str(shots), "--model", str(tmp_path / "no_model_here"), "--out", "/proc/x.csv")
    line = one_line_error(output)
    assert code == 2 and line.startswith("error: --out /proc/x.csv: cannot be written") and "no_model_here" not in line


def test_explain_refuses_its_input_folder_an_input_file_and_the_model_folder(tmp_path, tiny, shots):
    before = snapshot(shots)
    for out, problem in [(shots, "is the input folder"), (shots / "overlays", "inside the input folder"),
                         (tiny, "inside the model folder"), (shots / "a.png", "is one of the inputs")]:
        code, output = cli("explain", "--model", str(tiny), str(shots), "--out", str(out))
        line = one_line_error(output)
        assert code == 2 and line.startswith(f"error: --out {out}: ") and problem in line, (out, line)
    code, output = cli("explain", "--model", str(tiny), str(shots / "a.png"), "--out", str(shots))
    assert code == 2 and "holds the input" in one_line_error(output)
    assert snapshot(shots) == before and not (shots / "overlays").exists()


def test_explain_out_onto_an_existing_file_is_one_line(tmp_path, tiny, shots):
    existing = tmp_path / "figure.png"
    existing.write_bytes(b"a figure")
    code, output = cli("explain", "--model", str(tiny), str(shots), "--out", str(existing))
    assert code == 2 and "is a file, not a folder" in one_line_error(output)
    assert existing.read_bytes() == b"a figure"


def test_describe_init_is_guarded_like_every_writer(tmp_path):
    data = tmp_path / "micrographs"
    two_classes(data, per_class=1)
    classes = tmp_path / "classes.json"
    classes.write_text('["Fibres", "Nanowires"]')
    common = ["describe", "--params", str(REPO / "params.yaml"), "--prompts", str(REPO / "prompts")]
    for args, problem in [(["--classes", str(classes), "--init", str(classes)], "is one of the inputs"),
                          (["--classes", str(data), "--init", str(data / "mine.yaml")], "inside the input folder"),
                          (["--classes", str(classes), "--init", str(tmp_path / "mine.yml")], "needs one of the extensions .yaml"),
                          (["--classes", str(classes), "--init", "/proc/mine.yaml"], "cannot be written")]:
        code, output = cli(*common, *args)
        assert code == 2 and "--init" in one_line_error(output) and problem in output, output
    assert classes.read_text() == '["Fibres", "Nanowires"]' and not (data / "mine.yaml").exists()


def test_report_stage_refuses_an_out_folder_among_its_inputs(tmp_path):
    compare = tmp_path / "metrics_compare"
    compare.mkdir()
    result = stage(["stages/report.py", "--compare", str(compare), "--compare-plots", str(tmp_path / "plots"),
                    "--out", str(compare / "report")], tmp_path)
    line = one_clean_line(result, "report")
    assert f"--out {compare / 'report'}" in line and "inside the input folder" in line
    assert list(compare.iterdir()) == []


# -- atomic writes: the previous file survives a failed write, no temp file stays ------------


class FullDisk:
    """A file object that takes ``room`` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Every atomic write gets ``room`` bytes before ENOSPC (set ``full_disk.room``)."""
    import builtins

    from multifusion.core import atomic

    class Control:
        room = 100

    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(f, Control.room) if "w" in mode else f

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)
    return Control


def test_full_disk_keeps_the_previous_csv_and_report_and_says_free_space(tmp_path, tiny, shots, full_disk):
    out, page = tmp_path / "results" / "p.csv", tmp_path / "results" / "r.html"
    out.parent.mkdir()
    out.write_text("path,status\nearlier,ok\n")
    page.write_text("<html>earlier</html>")
    code, output = predict_cli(str(shots), "--model", str(tiny), "--out", str(out), "--report", str(page))
    line = one_line_error(output)
    assert code == 2 and line.startswith(f"error: {out}: no space left") and "free space on /" in line
    assert out.read_text() == "path,status\nearlier,ok\n" and page.read_text() == "<html>earlier</html>"
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.csv", "r.html"]  # no temp file left behind

    full_disk.room = 10**9  # the report's turn: the CSV is written, the page fails
    from multifusion.core import atomic

    real = atomic.atomic_write

    def page_fails(path, *args, **kwargs):
        if str(path).endswith(".html"):
            full_disk.room = 1000
        return real(path, *args, **kwargs)

    import multifusion.inference.screening_report as screening_report

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(screening_report, "atomic_write", page_fails)
        code, output = predict_cli(str(shots), "--model", str(tiny), "--out", str(out), "--report", str(page))
    assert code == 2 and f"{page}: no space left" in one_line_error(output)
    assert page.read_text() == "<html>earlier</html>" and sorted(p.name for p in out.parent.iterdir()) == ["p.csv", "r.html"]
    assert "a.png" in out.read_text()  # the CSV, written before, is whole


def test_failed_writes_of_every_kind_leave_the_previous_file(tmp_path, full_disk):
    from multifusion.core.atomic import DiskFullError, atomic_path, atomic_write, write_text
    from multifusion.core.json_files import write_json

    target = tmp_path / "m.json"
    target.write_text('{"kept": true}\n')
    with pytest.raises(DiskFullError, match=f"^{target}: no space left on the device.*free space on /"):
        write_json(target, {"x": "y" * 500})
    with pytest.raises(ValueError):  # an error of the caller's own, mid-write
        with atomic_write(target) as f:
            f.write("half")
            raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == '{"kept": true}\n' and [p.name for p in tmp_path.iterdir()] == ["m.json"]
    full_disk.room = 10**9
    os.chmod(target, 0o640)
    write_text(target, "new\n")
    assert target.read_text() == "new\n" and (target.stat().st_mode & 0o777) == 0o640  # the mode is kept

    from multifusion.core.atomic import atomic_folder  # a folder a library writes whole (save_pretrained)

    lm = tmp_path / "text_lm"
    with atomic_folder(lm) as staging:
        (staging / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_folder(lm) as staging:
            (staging / "config.json").write_text('{"half"')
            raise RuntimeError("the library failed")
    assert (lm / "config.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "text_lm"]
    with atomic_folder(lm) as staging:
        (staging / "weights.bin").write_bytes(b"1")
    assert sorted(p.name for p in lm.iterdir()) == ["weights.bin"] and len(list(tmp_path.iterdir())) == 2


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs mounted at tmp_path/disk (root only; skipped where mounting is refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(mount.stderr or mount.stdout).strip()}); "
                    "the monkeypatched ENOSPC tests cover the full disk")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_full_disk_on_a_real_tmpfs_keeps_the_earlier_csv(tmp_path, tiny, tiny_disk):
    deep = tmp_path / ("long_folder_name_" * 10)
    for i in range(24):
        image(deep / f"micrograph_with_a_long_name_{i:03d}.png", i, (40, 40))
    out = tiny_disk / "predictions.csv"
    earlier = "path,status\nearlier.png,ok\n"
    out.write_text(earlier)
    with open(tiny_disk / "filler", "wb", buffering=0) as f:  # fill the disk, then leave one page free
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == 28
    os.truncate(tiny_disk / "filler", max(0, (tiny_disk / "filler").stat().st_size - 4096))
    code, output = predict_cli(str(deep), "--model", str(tiny), "--out", str(out))
    line = one_line_error(output)
    assert code == 2 and f"{out}: no space left" in line and f"free space on {tiny_disk}" in line
    assert out.read_text() == earlier and sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "predictions.csv"]


# -- inputs: link loops, duplicates, empty folders, CSV injection --------------------------------


def test_symlink_loop_among_predict_inputs_is_a_skip_row(tmp_path, tiny, shots):
    os.symlink("loop_b.png", shots / "loop_a.png")
    os.symlink("loop_a.png", shots / "loop_b.png")
    os.symlink("gone.png", shots / "broken.png")
    out = tmp_path / "p.csv"
    code, output = predict_cli(str(shots), str(shots / "loop_a.png"), "--model", str(tiny), "--out", str(out))
    assert code == 0 and "Traceback" not in output, output
    table = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert table.loc[str(shots / "a.png"), "status"] == "ok" and table.loc[str(shots / "b.tif"), "status"] == "ok"
    for name in ("loop_a.png", "loop_b.png"):
        assert table.loc[str(shots / name), "status"] == "error" and "symbolic link loop" in table.loc[str(shots / name), "error"]
    assert "broken symbolic link" in table.loc[str(shots / "broken.png"), "error"]
    assert len(table) == 5  # loop_a given twice: one row


def test_the_same_file_spelled_three_ways_gives_one_row(tmp_path, tiny, shots, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p.csv"
    code, output = predict_cli("shots/a.png", str(shots / "a.png"), "shots/../shots/a.png", "shots",
                               "--model", str(tiny), "--out", str(out))
    assert code == 0, output
    assert pd.read_csv(out)["path"].tolist() == ["shots/a.png", "shots/b.tif"]  # the first spelling kept


def test_empty_folder_is_one_line_and_writes_no_csv(tmp_path, tiny):
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    (empty / ".DS_Store").write_bytes(b"")
    code, output = predict_cli(str(empty), "--model", str(tiny), "--out", str(tmp_path / "p.csv"))
    assert code == 2 and one_line_error(output) == f"error: no micrographs found in {empty} (hidden files are skipped)"
    assert not (tmp_path / "p.csv").exists()
    code, output = cli("explain", "--model", str(tiny), str(empty), "--out", str(tmp_path / "figs"))
    assert code == 2 and "no micrographs found" in one_line_error(output) and not (tmp_path / "figs").exists()


def test_formula_like_file_names_are_quoted_in_the_csv_not_in_the_report(tmp_path, tiny, monkeypatch):
    names = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@SUM.png", "\tx.png", "plain.png"]
    for i, name in enumerate(names):
        image(tmp_path / "shots" / name, i)
    monkeypatch.chdir(tmp_path / "shots")
    out, page = tmp_path / "p.csv", tmp_path / "r.html"
    code, output = predict_cli("--model", str(tiny), "--out", str(out), "--report", str(page), "--", *names)
    assert code == 0, output
    assert pd.read_csv(out, keep_default_na=False)["path"].tolist() == ["'" + n for n in names[:-1]] + ["plain.png"]
    html = page.read_text()
    assert ">=HYPERLINK(1).png</a>" in html and ">@SUM.png</a>" in html and "'=HYPERLINK" not in html
    code, _ = cli("explain", "--model", str(tiny), "--out", str(tmp_path / "figs"), "--", *names[:3])
    assert code == 0 and pd.read_csv(tmp_path / "figs" / "explanations.csv")["path"].tolist() == ["'" + n for n in names[:3]]


# -- describe's URL, Ctrl-C ------------------------------------------------------------------


def test_refused_connection_in_describe_names_the_url(tmp_path, make_config):
    import socket

    from multifusion.llm import describe

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    llm = make_config({"llm.provider": "openai", "llm.base_url": url, "llm.max_retries": 0, "llm.model": "m"}).llm
    with pytest.raises(Exception) as err:
        describe(llm, ["Particles"], REPO / "prompts", tmp_path / "cache", {"OPENAI_API_KEY": "sk-test"})
    message = one_line(err.value)
    assert f"could not connect: {url}/chat/completions (Connection refused)" in message and "llm.base_url" in message


def test_ctrl_c_in_predict_is_one_line_saying_what_was_kept(tmp_path, shots, monkeypatch):
    import multifusion.inference.predict as predict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "predict_paths", interrupted)
    code, output = predict_cli(str(shots), "--out", str(tmp_path / "p.csv"))
    assert code == 130 and output.strip() == "predict: interrupted; nothing written"


def test_ctrl_c_during_parallel_work_is_one_line_and_no_worker_traceback(tmp_path):
    import signal
    import time

    script = tmp_path / "work.py"
    script.write_text(
        "import signal, time\n"
        # a shell that starts a job in the background (CI runners, `make test &`) leaves SIGINT
        # ignored in it, and Python keeps it so: restore what a terminal's foreground job has
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from multifusion.core.errors import run_stage\n"
        "from multifusion.core.json_files import write_json\n"
        "from multifusion.data.parallel import parallel_map\n"
        "def slow(i):\n"
        f"    open({str(tmp_path / 'busy')!r}, 'a').close()\n"
        "    time.sleep(0.05)\n"
        "    return i\n"
        "def main():\n"
        f"    write_json({str(tmp_path / 'kept.json')!r}, [1])\n"
        "    print('started', flush=True)\n"
        "    return list(parallel_map(slow, list(range(2000)), 2, progress=False))\n"
        "if __name__ == '__main__':\n"
        "    run_stage('prepare', main)\n"
    )
    env = os.environ | {"MULTIFUSION_DEBUG": ""}
    proc = subprocess.Popen([PY, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    assert proc.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 60
    while not (tmp_path / "busy").exists() and time.monotonic() < deadline:  # the workers are busy
        time.sleep(0.05)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == f"prepare: interrupted; kept, each complete: {tmp_path / 'kept.json'}; nothing else written", err
