"""Experiments and caches shared between two machines over a real SSH remote (docs/sharing.md).

An OpenSSH server (Debian's openssh-server: `.ci/run` installs it) is started on 127.0.0.1 at
a free port with a throwaway host key and an authorized key made here; the DVC remote is
``ssh://127.0.0.1:<port>/<folder>`` through the dvc-ssh plugin, the Git remote a bare repository.
Two clones play two machines:

- machine A runs an experiment (the pipeline up to `describe`, the descriptions asked of an
  OpenAI-compatible server) and shares it: `dvc exp push`, then the applied result on main with
  `git push` and `dvc push`;
- machine B clones, `dvc pull`s and `dvc exp pull`s: the same metrics, `dvc status` clean,
  `dvc repro` runs no stage, and `describe` forced to run again sends 0 requests: every answer
  comes from the description cache that travelled over SSH.

Skips, saying why, where sshd, ssh-keygen or dvc-ssh is missing.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from llm_server import FakeLLMServer
from tiny_experiments import dvc, exp_metrics, git, read_json
from test_pipeline import make_tiny_repo

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").is_file() else None)
KEY = "sk-test-ssh-remote"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path: Path):
    """A running sshd on 127.0.0.1 -> (port, private key of the authorized user)."""
    if SSHD is None or shutil.which("ssh-keygen") is None:
        pytest.skip("sshd or ssh-keygen missing: install the Debian package openssh-server (.ci/run does)")
    pytest.importorskip("dvc_ssh", reason="dvc-ssh missing: pip install 'dvc[ssh]' (the dev dependencies)")
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege separation folder
    if not privsep.is_dir():
        if os.geteuid() != 0:
            pytest.skip("sshd needs /run/sshd; create it as root (mkdir -p /run/sshd) or run as root")
        privsep.mkdir(mode=0o755, parents=True, exist_ok=True)
    folder = tmp_path / "sshd"
    folder.mkdir()
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    authorized = folder / "authorized_keys"
    shutil.copy(folder / "user_key.pub", authorized)
    authorized.chmod(0o600)
    port = _free_port()
    log = (folder / "sshd.log").open("w")
    server = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", "/dev/null", "-p", str(port), "-o", "ListenAddress=127.0.0.1", "-h", str(folder / "host_key"),
         "-o", f"AuthorizedKeysFile={authorized}", "-o", "StrictModes=no", "-o", "UsePAM=no", "-o", "PasswordAuthentication=no",
         "-o", "KbdInteractiveAuthentication=no", "-o", "PermitRootLogin=prohibit-password", "-o", "Subsystem=sftp internal-sftp",
         "-o", f"PidFile={folder / 'sshd.pid'}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while "Server listening" not in (folder / "sshd.log").read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start:\n{(folder / 'sshd.log').read_text()}")
            time.sleep(0.1)
        yield port, folder / "user_key"
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def _use_remote(repo: Path, port: int, key: Path, store: Path) -> None:
    """The SSH remote as a lab adds it: the URL and user in .dvc/config (committed), the key
    file in .dvc/config.local (each machine its own)."""
    dvc(repo, "remote", "add", "-d", "-f", "lab", f"ssh://127.0.0.1:{port}{store}")
    dvc(repo, "remote", "modify", "lab", "user", getpass.getuser())
    dvc(repo, "remote", "modify", "--local", "lab", "keyfile", str(key))


def test_an_experiment_pushed_over_ssh_is_pulled_with_its_outputs_and_nothing_reruns(tmp_path: Path, repo_root: Path, sshd) -> None:
    port, key = sshd
    store, origin = tmp_path / "store", tmp_path / "origin.git"
    store.mkdir()
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)

    # machine A: the tiny pipeline, descriptions from an OpenAI-compatible server
    (tmp_path / "a").mkdir()
    a = make_tiny_repo(tmp_path / "a", repo_root)
    with FakeLLMServer(api_key=KEY, lifetime=120) as server:
        params = yaml.safe_load((a / "params.yaml").read_text())
        params["llm"].update({"provider": "openai", "model": "test-model", "base_url": server.url, "concurrency": 8, "backoff": 0.01})
        (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        _use_remote(a, port, key, store)
        git(a, "add", "-A")
        git(a, "commit", "-qm", "the lab's SSH remote; descriptions from the lab's LLM server")
        git(a, "remote", "add", "origin", str(origin))
        dvc(a, "exp", "run", "describe", "-n", "shared", OPENAI_API_KEY=KEY)
        asked = len(server.completed())
    llm_a = read_json(a / "metrics" / "llm.json")
    assert llm_a["requests_sent"] == asked > 0 and llm_a["failures"] == 0
    pushed = dvc(a, "exp", "push", "origin", "shared")  # the experiment's Git ref and its cached outputs
    assert "shared" in pushed
    git(a, "add", "-A")
    git(a, "commit", "-qm", "descriptions")  # the experiment's result, applied, on main
    git(a, "push", "-q", "origin", "HEAD:main")
    dvc(a, "push")
    assert any(store.rglob("*")), "nothing reached the SSH remote"

    # machine B: a clone elsewhere, its own key file, no server
    b = tmp_path / "b" / "repo"
    subprocess.run(["git", "clone", "-q", "-b", "main", str(origin), str(b)], check=True)
    dvc(b, "remote", "modify", "--local", "lab", "keyfile", str(key))
    dvc(b, "pull", "--with-deps", "describe")  # the stages the experiment ran (the rest of the pipeline never ran)
    assert read_json(b / "metrics" / "llm.json") == llm_a
    assert (b / "data" / "descriptions.parquet").read_bytes() == (a / "data" / "descriptions.parquet").read_bytes()
    dvc(b, "exp", "pull", "origin", "shared")
    shown_b = exp_metrics(json.loads(dvc(b, "exp", "show", "--json", "--all-commits")))  # its baseline is main~1
    shown_a = exp_metrics(json.loads(dvc(a, "exp", "show", "--json", "--all-commits")))
    shared = shown_b["shared"]["metrics/llm.json"]  # `dvc exp show` lists the scalars of llm.json
    assert shared == shown_a["shared"]["metrics/llm.json"] and shared["requests_sent"] == asked
    assert all(llm_a[k] == v for k, v in shared.items())

    status = dvc(b, "status", "--with-deps", "describe")
    assert "up to date" in status.lower(), status
    repro = dvc(b, "repro", "describe", OPENAI_API_KEY=KEY)
    assert "Running stage" not in repro, repro
    # describe forced to run again, its server gone: every answer from the cache pulled over SSH
    dvc(b, "repro", "-f", "-s", "describe", OPENAI_API_KEY=KEY)
    llm_b = read_json(b / "metrics" / "llm.json")
    assert (llm_b["requests_sent"], llm_b["failures"], llm_b["cache_hits"]) == (0, 0, asked)
    assert (b / "data" / "descriptions.parquet").read_bytes() == (a / "data" / "descriptions.parquet").read_bytes()
