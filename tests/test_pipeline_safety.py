"""Issue 25, the pipeline half: nothing lost under `dvc repro` / `dvc exp run`.

- bad params or a bad data root stop in the first stage (`validate`, `validate_data`),
  before DVC removes any output; the marker they write does not change with the params'
  values, so nothing downstream re-runs for it (a real DVC repository, fast);
- every YAML file a user edits gives one line with file, line and column;
- a class in val/ or test/ but not in train/ is refused, by name;
- the trainer stops when params.yaml is rewritten under it (a second `dvc exp run`);
- a stage dies with the DVC process that started it (kill -9 of the parent), also through
  an intermediate shell and in forked workers; never a script started by hand;
- the checkpoint folder is held by one trainer; a stale temp file breaks nothing.
The whole pipeline under `dvc repro` and `dvc exp run -S data.image_size=17`: slow test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from multifusion.core.config import ConfigError, check_params_unchanged, load_config, read_yaml
from multifusion.data.layout import LayoutError, check_data_root, scan_folder

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
       "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def image(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    return path


def params_copy(tmp_path: Path, edit=None) -> Path:
    """The repository's params.yaml in tmp_path, optionally edited (a dict -> dict function)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    if edit:
        edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_script(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=120)


# --- YAML: one line with file, line and column ---------------------------------------------

BROKEN = "seed: 1\ndata:\n  root: [a, b\n  image_size: 64\n"


def test_a_broken_params_yaml_is_one_line_with_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(BROKEN)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and f"{path}:4:" in message and "line 3, column 9" in message, message
    path.write_text("seed: 1\n\ttrain: 2\n")
    with pytest.raises(ConfigError, match=r"params\.yaml:2:1: invalid YAML: found character '\\t'"):
        load_config(path)


def test_a_stage_script_run_by_hand_on_a_broken_params_yaml_prints_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(BROKEN)
    done = run_script(tmp_path, str(REPO / "stages/validate.py"), "params", "--root", "data", "--out", "v.json")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr  # one line, no traceback
    assert done.stderr.startswith("validate: error: params.yaml:4:") and not (tmp_path / "v.json").exists()


def test_predict_on_a_broken_params_yaml_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from multifusion.cli import app

    (tmp_path / "params.yaml").write_text(BROKEN)
    shot = image(tmp_path / "a.png", 0)
    result = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "no_model"), "--params", str(tmp_path / "params.yaml"),
                                      str(shot), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "params.yaml:4:" in lines[0], result.output


def test_broken_curated_and_classes_files_name_the_file_line_and_column(tmp_path):
    from multifusion.llm.curated import CuratedMissingError, load_curated
    from multifusion.llm.prompts import PromptError, load_classes_file

    curated = tmp_path / "prompts" / "curated"
    curated.mkdir(parents=True)
    (curated / "a.yaml").write_text("version: v1\nclasses:\n  Tips:\n    morphology: [fine\n")
    with pytest.raises(CuratedMissingError) as err:
        load_curated(tmp_path / "prompts")
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{curated / 'a.yaml'}:5:1: invalid YAML")
    classes = tmp_path / "classes.yaml"
    classes.write_text("Tips:\n  label: tips\n   hint: x: y\n")
    with pytest.raises(PromptError, match=rf"^{classes}:3:\d+: invalid YAML"):
        load_classes_file(classes, ["Tips"])


def test_read_yaml_names_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_yaml(path)


# --- layout ----------------------------------------------------------------------------------


def split_root(tmp_path: Path, layout: dict[str, list[str]]) -> Path:
    root = tmp_path / "root"
    for i, (split, classes) in enumerate(layout.items()):
        for j, name in enumerate(classes):
            image(root / split / name / f"{split}{j}.png", 10 * i + j)
    return root


def test_a_class_in_test_but_not_in_train_is_an_error_naming_it(tmp_path):
    root = split_root(tmp_path, {"train": ["A", "B"], "val": ["A", "B", "C"], "test": ["A", "B", "C", "D"]})
    with pytest.raises(LayoutError) as err:
        scan_folder(root)
    assert "C (in test/val)" in str(err.value) and "D (in test)" in str(err.value) and "train/" in str(err.value)
    ok = split_root(tmp_path / "ok", {"train": ["A", "B", "C"], "test": ["A", "C"]})
    assert check_data_root(ok)["classes"] == ["A", "B", "C"]


def test_prepare_refuses_a_class_whose_train_files_are_all_unusable(tmp_path, make_config):
    from multifusion.data.prepare import PrepareError, prepare_dataset

    root = split_root(tmp_path, {"train": ["A", "B"], "test": ["A", "B", "C"]})
    (root / "train" / "C").mkdir()
    (root / "train" / "C" / "broken.png").write_bytes(b"not a png")  # the layout has C in train: decoding drops it
    with pytest.raises(PrepareError, match=r"class\(es\) C \(in test\) have no usable image in train/"):
        prepare_dataset(root, tmp_path / "out", make_config({"data.image_size": 16}).data, 0, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_data_root_that_is_a_file_says_so(tmp_path):
    (tmp_path / "root.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_data_root(tmp_path / "root.txt")


# --- the validate stage ----------------------------------------------------------------------


@pytest.mark.parametrize("edit, problem", [
    (lambda p: p["data"].update(image_size=17), "params.yaml: data.image_size"),
    (lambda p: p["train"].update(foo=1), "unknown key 'train.foo'"),
    (lambda p: p["synthesize"].update(total=5), "synthesize.total=5 is below"),
])
def test_validate_refuses_bad_params_in_one_line(tmp_path, edit, problem):
    params_copy(tmp_path, edit)
    shutil.copytree(REPO / "prompts", tmp_path / "prompts")
    done = run_script(tmp_path, str(REPO / "stages/validate.py"), "params", "--root", "data/raw/synthetic",
                      "--out", "data/validated/params.json")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and problem in done.stderr, done.stderr
    assert not (tmp_path / "data/validated/params.json").exists()


def test_validate_marker_does_not_change_with_param_values(tmp_path):
    shutil.copytree(REPO / "prompts", tmp_path / "prompts")
    root = split_root(tmp_path, {"train": ["A", "B"], "test": ["A", "B"]})
    markers = []
    for lr in (0.001, 0.002):
        params_copy(tmp_path, lambda p: p["train"].update(lr=lr))
        done = run_script(tmp_path, str(REPO / "stages/validate.py"), "params", "--root", str(root), "--out", "m.json")
        assert done.returncode == 0, done.stderr
        markers.append((tmp_path / "m.json").read_bytes())
    assert markers[0] == markers[1]
    # an external root is checked by `params` too (a changed data.root is checked before prepare)
    bad = split_root(tmp_path / "bad", {"train": ["A"], "test": ["A", "B"]})
    done = run_script(tmp_path, str(REPO / "stages/validate.py"), "params", "--root", str(bad), "--out", "m.json")
    assert done.returncode == 1 and "B (in test)" in done.stderr


def test_validate_data_checks_the_layout(tmp_path):
    bad = split_root(tmp_path, {"train": ["A"], "test": ["A", "B"]})
    done = run_script(tmp_path, str(REPO / "stages/validate.py"), "data", "--root", str(bad), "--out", "d.json")
    assert done.returncode == 1 and "B (in test)" in done.stderr and len(done.stderr.strip().splitlines()) == 1


DVC_YAML = """
stages:
  validate:
    cmd: python {script} params --root data/root --prompts prompts --out data/validated/params.json
    params:
      - params.yaml:
    outs:
      - data/validated/params.json
  downstream:
    cmd: python -c "import pathlib, time; pathlib.Path('out').mkdir(exist_ok=True); pathlib.Path('out/x').write_text(str(time.time_ns()))"
    deps:
      - data/validated/params.json
    params:
      - train.lr
      - data.image_size
    outs:
      - out:
          cache: false
"""


def test_under_dvc_a_refused_param_deletes_nothing_and_a_valid_change_reruns_only_its_stages(tmp_path):
    """A real DVC repository: validate's stage as in dvc.yaml, and a stage downstream of it
    whose output DVC cannot restore (cache: false)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "prompts", repo / "prompts")
    split_root(repo / "data", {"train": ["A", "B"], "test": ["A", "B"]})
    params_copy(repo)
    (repo / "dvc.yaml").write_text(DVC_YAML.format(script=REPO / "stages/validate.py"))

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=ENV, capture_output=True, text=True, timeout=300)

    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert dvc("init", "-q").returncode == 0
    assert dvc("repro").returncode == 0
    before = (repo / "out/x").read_text()

    params_copy(repo, lambda p: p["data"].update(image_size=17))
    failed = dvc("repro")
    assert failed.returncode != 0 and "validate: error: params.yaml: data.image_size" in failed.stdout + failed.stderr
    assert (repo / "out/x").read_text() == before                     # not removed, not re-run

    params_copy(repo, lambda p: p["evaluate"].update(batch_size=7))   # valid, and no concern of `downstream`
    again = dvc("repro")
    assert again.returncode == 0 and "Running stage 'validate'" in again.stdout
    assert "Running stage 'downstream'" not in again.stdout and (repo / "out/x").read_text() == before


# --- params rewritten mid-run ------------------------------------------------------------------


def test_check_params_unchanged_notices_a_rewrite_but_not_a_comment(tmp_path):
    path = params_copy(tmp_path)
    load_config(path)
    path.write_text(path.read_text() + "# a comment\n")
    check_params_unchanged("train")
    params_copy(tmp_path, lambda p: p["train"].update(epochs=1))
    with pytest.raises(ConfigError) as err:
        check_params_unchanged("train")
    message = str(err.value)
    assert "params.yaml changed while train was running" in message and "dvc exp run --queue" in message
    assert "\n" not in message


def test_the_trainer_stops_before_saving_when_params_yaml_is_rewritten(tmp_path, make_prepared, monkeypatch):
    import torch
    import torch.nn as nn

    from multifusion.training import train as train_module

    params = params_copy(tmp_path)
    cfg = load_config(params, {"data.image_size": 16, "hnf.stem": "conv", "train.batch_size": 8, "train.epochs": 3})
    real_epoch = train_module.train_epoch

    def epoch_then_rewrite(run, epoch):
        scores = real_epoch(run, epoch)
        if epoch == 1:  # a second `dvc exp run -S train.epochs=1` rewrites the file
            params_copy(tmp_path, lambda p: p["train"].update(epochs=1))
        return scores

    monkeypatch.setattr(train_module, "train_epoch", epoch_then_rewrite)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 3))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="changed while training tiny was running"):
        train_module.fit(model, cfg, make_prepared(), out / "model", out / "checkpoints", out / "live", "tiny")
    assert not (out / "model").exists()                                   # nothing saved with the wrong params
    state = torch.load(out / "checkpoints/last.pt", weights_only=False)
    assert state["epoch"] == 0                                            # epoch 1's checkpoint never written


# --- the checkpoint folder ------------------------------------------------------------------------


HOLD = """
import sys, time
from multifusion.training.train_state import checkpoint_lock
with checkpoint_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_trainer_on_the_same_checkpoints_is_refused(tmp_path):
    from multifusion.training.train_state import CheckpointBusyError, checkpoint_lock, save_training_state

    folder = tmp_path / "checkpoints"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointBusyError, match="another training is writing checkpoints here"):
            with checkpoint_lock(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    (folder / "last.pt.tmp").write_text("stale, from a killed run")          # the fixed name of older versions
    (folder / ".last.pt.abc.tmp").write_text("stale")
    with checkpoint_lock(folder):                                          # the holder is gone: free again
        assert sorted(p.name for p in folder.iterdir()) == []              # stale temp files swept
        save_training_state(folder, {"epoch": 0})
    assert [p.name for p in folder.iterdir()] == ["last.pt"]


# --- a stage dies with its DVC parent ---------------------------------------------------------------

CHILD = """
import os, signal, sys, time
import multifusion.core.lifeline as lifeline
if os.environ.get("NO_PRCTL"):                           # the portable fallback alone (forked workers keep theirs)
    real = lifeline._prctl_pdeathsig
    lifeline._prctl_pdeathsig = lambda sig: False if sig == signal.SIGTERM else real(sig)
if os.environ.get("ARM") == "run_stage":
    from multifusion.core.errors import run_stage
    arm = lambda: run_stage("child", lambda: None)
else:
    arm = lambda: lifeline.watch_parent(interval=0.2)
arm()
worker = os.fork()                                       # a decoding worker, forked after arming
if worker == 0:
    time.sleep(60)
    os._exit(0)
print(os.getpid(), worker, flush=True)
time.sleep(60)
"""

PARENT = """
import subprocess, sys, time
child = subprocess.Popen(sys.argv[1:], stdout=sys.stdout)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True


def start_family(tmp_path: Path, env: dict, through_shell: bool = False,
                 grandparent: bool = False) -> tuple[subprocess.Popen, int, int]:
    """(grandparent ->) parent -> (shell ->) child stage -> forked worker; returns (the first
    process, child pid, worker pid)."""
    (tmp_path / "child.py").write_text(CHILD)
    child = [sys.executable, str(tmp_path / "child.py")]
    if through_shell:  # `; true`: the shell cannot exec the command, it stays in between
        child = ["/bin/bash", "-c", f"{sys.executable} {tmp_path / 'child.py'}; true"]
    parent = [sys.executable, "-c", PARENT, *child]
    if grandparent:  # the terminal that ran `nohup dvc repro &`
        parent = [sys.executable, "-c", PARENT, *parent]
    first = subprocess.Popen(parent, env=env, stdout=subprocess.PIPE, text=True)
    child_pid, worker_pid = map(int, first.stdout.readline().split())
    return first, child_pid, worker_pid


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("case", ["prctl", "fallback", "shell in between", "run_stage under DVC"])
def test_kill_9_of_the_parent_stops_the_stage_and_its_workers(tmp_path, case):
    env = {**ENV, "NO_PRCTL": "1" if case == "fallback" else ""}
    if case == "run_stage under DVC":
        env.update(ARM="run_stage", DVC_STAGE="train")
    parent, child, worker = start_family(tmp_path, env, through_shell=case == "shell in between")
    try:
        assert alive(child) and alive(worker)
        time.sleep(0.3)
        assert alive(child)                                  # the parent lives: nothing happens
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_gone([child, worker], 5.0) == [], f"{case}: still running after the parent's kill -9"
    finally:
        for pid in (child, worker):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("through_shell", [False, True], ids=["direct", "shell in between"])
def test_a_stage_outlives_the_terminal_that_started_dvc(tmp_path, through_shell):
    """`nohup dvc repro &`, then the terminal closes: DVC is re-parented and runs on, and so do
    its stages (the portable fallback alone watches ancestors)."""
    env = {**ENV, "NO_PRCTL": "1", "ARM": "run_stage", "DVC_STAGE": "train"}
    terminal, child, worker = start_family(tmp_path, env, through_shell=through_shell, grandparent=True)
    try:
        os.kill(terminal.pid, signal.SIGKILL)
        terminal.wait()
        assert wait_gone([child], 1.0) == [child], "the stage stopped when the terminal above DVC closed"
    finally:
        for pid in (child, worker):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "child.py")], check=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stage_started_by_hand_outlives_its_shell(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "DVC_STAGE"} | {"ARM": "run_stage"}
    parent, child, worker = start_family(tmp_path, env)
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_gone([child], 1.0) == [child]             # `nohup python stages/...` keeps running
    finally:
        for pid in (child, worker):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- two `dvc exp run` at once --------------------------------------------------------------------


def test_the_workspace_entry_blocks_a_second_exp_run_and_is_released(tmp_path, monkeypatch):
    """DVC's experiment lock, as a second `dvc exp run` takes it before it stashes anything."""
    from dvc.fs import localfs
    from dvc.lock import LockError
    from dvc.rwlock import rwlock

    from multifusion.core import exp_lock

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert exp_lock.workspace_run_root() is None                                 # `dvc repro`: holds nothing
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))
    assert exp_lock.workspace_run_root() is None                                 # a queued run in a temp copy
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert exp_lock.workspace_run_root() == tmp_path.resolve()
    queued_copy = tmp_path / ".dvc/tmp/exps/tmpabc123"                            # where `dvc queue start` runs one
    queued_copy.mkdir(parents=True)
    monkeypatch.chdir(queued_copy)
    assert exp_lock.workspace_run_root() is None
    monkeypatch.chdir(tmp_path)

    lock_dir = tmp_path / exp_lock.LOCK_DIR
    dvc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # stands for the running dvc
    try:
        assert exp_lock._edit(lock_dir, "hold", exp_lock.entry_for(dvc.pid))
        assert not exp_lock._edit(lock_dir, "hold", exp_lock.entry_for(dvc.pid))   # a later stage: already held
        with pytest.raises(LockError, match=r"'workspace' is busy(.|\n)*dvc exp run --queue"):
            with rwlock(str(lock_dir), localfs, "dvc exp run -S x=1", [], ["workspace", "refs/exps/stash"], False):
                pass
        releaser = subprocess.Popen([sys.executable, "-m", "multifusion.core.exp_lock", str(lock_dir), str(dvc.pid)], env=ENV)
        time.sleep(0.5)
        assert releaser.poll() is None                                           # waits while dvc runs
    finally:
        dvc.kill()
        dvc.wait()
    assert releaser.wait(timeout=10) == 0
    assert json.loads((lock_dir / "rwlock").read_text()).get("read", {}) == {}   # released: no stale reader
    with rwlock(str(lock_dir), localfs, "dvc exp run -S x=1", [], ["workspace"], False):
        pass


STAGE = """
import time
from pathlib import Path
import yaml
from multifusion.core.errors import run_stage

def main():
    start = yaml.safe_load(Path("params.yaml").read_text())
    Path("started").write_text("")
    deadline = time.monotonic() + 60
    while not Path("go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    Path("out.json").write_text(repr((start, yaml.safe_load(Path("params.yaml").read_text()))))

run_stage("s", main)
"""


@pytest.mark.slow
def test_a_second_exp_run_is_refused_before_it_touches_params_and_the_first_completes(tmp_path):
    """Two real `dvc exp run` in one workspace (about 15 s)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("a: 1\nepochs: 30\n")
    (repo / "stage.py").write_text(STAGE)
    (repo / ".gitignore").write_text("started\ngo\n")
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n"
                                   "    params: [a, epochs]\n    outs: [out.json]\n")

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=ENV, capture_output=True, text=True, timeout=120)

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    assert dvc("init", "-q").returncode == 0
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)

    first = subprocess.Popen([sys.executable, "-m", "dvc", "exp", "run", "-S", "a=2"], cwd=repo, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (repo / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    second = dvc("exp", "run", "-S", "epochs=1")
    assert second.returncode != 0 and "'workspace' is busy" in second.stderr, second.stderr
    assert yaml.safe_load((repo / "params.yaml").read_text()) == {"a": 2, "epochs": 30}   # untouched
    (repo / "go").write_text("")
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert (repo / "out.json").read_text() == repr(({"a": 2, "epochs": 30}, {"a": 2, "epochs": 30}))
    third = dvc("exp", "run", "-S", "a=3")
    assert third.returncode == 0 and "killed" not in third.stderr, third.stderr  # the entry was released


def test_loading_params_again_makes_them_the_reference(tmp_path):
    """A notebook: edit params.yaml, load it again, train: no false alarm."""
    path = params_copy(tmp_path)
    load_config(path)
    params_copy(tmp_path, lambda p: p["train"].update(epochs=2))
    load_config(path)
    check_params_unchanged("train")
