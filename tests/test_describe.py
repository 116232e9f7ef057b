"""The describe step: prompts, curated provider, openai provider against a real local HTTP
server (concurrency, retries, fatal errors), the Parquet cache (kill and resume, cached
rerun), dry run, and that the API key lands in no file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from llm_server import FakeLLMServer, empty_answer, malformed, rate_limited, server_error

from multifusion.llm import LLMFatalError, describe, dry_run, format_dry_run
from multifusion.llm.cache import ResponseCache
from multifusion.llm.curated import CuratedMissingError
from multifusion.llm.describe import COLUMNS, DescribeError
from multifusion.llm.prompts import ClassInfo, MARKER, extract_description, load_classes_file, load_prompt_set, render
from multifusion.llm.requests import cache_key, plan_requests

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "prompts"
NFFA = ["Biological", "Fibres", "Films_Coated_Surface", "MEMS_devices_and_electrodes", "Nanowires",
        "Particles", "Patterned_surface", "Porous_Sponge", "Powder", "Tips"]
NCM = ["333", "333_cycled", "333_formation", "523", "523_cycled", "523_formation",
       "622", "622_formation", "811", "811_cycled", "811_formation"]
KEY = "sk-test-key"


@pytest.fixture
def server():
    with FakeLLMServer(api_key=KEY, lifetime=120) as s:
        yield s


def openai_llm(make_config, server: FakeLLMServer, **overrides):
    values = {"llm.provider": "openai", "llm.model": "test-model", "llm.base_url": server.url,
              "llm.concurrency": 4, "llm.backoff": 0.01, "llm.classes_file": str(PROMPTS / "classes.yaml")}
    values.update({f"llm.{k}": v for k, v in overrides.items()})
    return make_config(values).llm


# -- prompts -------------------------------------------------------------------------------
def test_templates_render_every_field_and_ask_for_the_marker(make_config):
    llm = make_config().llm
    prompts = load_prompt_set(PROMPTS, llm.templates)
    info = load_classes_file(PROMPTS / "classes.yaml", ["MEMS_devices_and_electrodes"])[0]
    assert info.label == "MEMS devices and electrodes" and info.hint
    for name, template in prompts.templates.items():
        text = render(template, info)
        assert "$" not in text and MARKER in text and "step by step" in text, name
        assert "MEMS devices and electrodes" in text and info.hint in text


def test_template_substitution_cannot_execute_code(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "system.txt").write_text("sys")
    (tmp_path / "templates" / "t.txt").write_text("$label $marker")
    prompts = load_prompt_set(tmp_path, ["t"])
    evil = ClassInfo(name="x", label="{__import__('os').system('false')} ${marker} $$", hint="")
    assert render(prompts.templates["t"], evil) == f"{evil.label} {MARKER}"
    (tmp_path / "templates" / "bad.txt").write_text("${label.__class__} $marker")
    with pytest.raises(ValueError, match="bad.txt"):
        load_prompt_set(tmp_path, ["bad"])


def test_extract_description_takes_text_after_the_last_marker():
    assert extract_description("think...\nFINAL DESCRIPTION: Round grains.") == "Round grains."
    assert extract_description("a\n**Final description:** Bright rods.\n") == "Bright rods."
    assert extract_description("FINAL DESCRIPTION: draft\nFINAL DESCRIPTION: final") == "final"
    assert extract_description("no marker at all") == "no marker at all"


def test_cache_key_covers_what_determines_the_answer():
    messages = [{"role": "user", "content": "hi"}]
    params = {"temperature": 0.7, "seed": 0, "max_tokens": 10}
    key = cache_key("openai", "m", messages, params, 0)
    assert key == cache_key("openai", "m", [dict(reversed(list(messages[0].items())))], dict(reversed(list(params.items()))), 0)
    assert len({key, cache_key("openai", "m2", messages, params, 0), cache_key("openai", "m", messages, params, 1),
                cache_key("openai", "m", messages, {**params, "temperature": 0.2}, 0),
                cache_key("curated", "m", messages, params, 0)}) == 5


# -- curated -------------------------------------------------------------------------------
def test_curated_default_covers_nffa_and_ncm_offline(make_config, tmp_path):
    llm = make_config().llm
    assert llm.provider == "curated"
    result = describe(llm, NFFA + NCM, PROMPTS, tmp_path / "cache", env={})
    table = result.table
    assert list(table.columns) == COLUMNS and len(table) == 21 * len(llm.templates) * llm.samples
    assert set(table["provider"]) == {"curated"} and set(table["model"]) == {"curated-v1"}
    assert table["description"].str.split().str.len().min() >= 20  # real paragraphs
    assert table["description"].is_unique
    assert result.metrics["requests_sent"] == 0 and not any((tmp_path / "cache").iterdir())
    two = describe(make_config({"llm.samples": 2, "llm.templates": ["morphology", "distinguish"]}).llm, NFFA, PROMPTS, tmp_path / "c", {})
    assert two.table.groupby(["class_name", "template"])["description"].nunique().eq(2).all()


def test_class_without_curated_text_falls_back_to_its_label(make_config, tmp_path, caplog):
    llm = make_config().llm
    with caplog.at_level("WARNING", logger="multifusion.describe"):
        result = describe(llm, ["Particles", "Graphene_flakes", "Hollow_spheres"], PROMPTS, tmp_path, env={})
    table, m = result.table, result.metrics
    fallback = table[table["class_name"] != "Particles"]
    assert set(fallback["provider"]) == {"label"} and set(fallback["model"]) == {"label"}
    assert set(table.loc[table["class_name"] == "Particles", "provider"]) == {"curated"}
    assert fallback["description"].str.contains("Graphene flakes|Hollow spheres").all()
    assert fallback.groupby("class_name")["description"].nunique().eq(len(llm.templates)).all()  # one per template
    assert m["fallback_classes"] == ["Graphene_flakes", "Hollow_spheres"] and m["fallback_descriptions"] == 2 * len(llm.templates)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "Graphene_flakes, Hollow_spheres" in warnings[0]
    assert "--init" in warnings[0] and "llm.provider=openai" in warnings[0] and "llm.base_url" in warnings[0]
    from multifusion.text.corpus import build_corpus

    only_labels = describe(llm, ["Graphene_flakes", "Hollow_spheres"], PROMPTS, tmp_path, env={}).table
    assert len(build_corpus(only_labels, 0.15, 0).train) >= 5  # enough sentences for the LM on labels alone
    assert describe(llm, ["Particles"], PROMPTS, tmp_path, env={}).metrics["fallback_classes"] == []


def _prompts_copy(tmp_path: Path) -> Path:
    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS, prompts)
    return prompts


def test_partly_curated_class_names_the_gap_and_the_fix(make_config, tmp_path):
    prompts = _prompts_copy(tmp_path)
    (prompts / "curated" / "mine.yaml").write_text("version: curated-v1\nclasses:\n  Rods:\n    morphology: [Long thin rods side by side.]\n")
    with pytest.raises(CuratedMissingError) as err:
        describe(make_config().llm, ["Particles", "Rods"], prompts, tmp_path / "cache", env={})
    message = str(err.value)
    assert "Rods/synthesis/sample 0" in message and "Particles" not in message.split("(")[0]
    assert "prompts/curated" in message and "llm.provider=openai" in message


def test_init_skeleton_merges_with_the_shipped_files_and_fills_from_an_llm_run(make_config, tmp_path):
    from typer.testing import CliRunner

    from multifusion.cli import app
    from multifusion.llm.curated import load_curated

    prompts = _prompts_copy(tmp_path)
    data = tmp_path / "own"
    for name in ("Rods", "Particles", "Hollow_spheres"):
        (data / name).mkdir(parents=True)
        (data / name / "a.png").write_bytes(b"png")
    common = ["describe", "--classes", str(data), "--prompts", str(prompts), "--params", str(REPO / "params.yaml")]
    skeleton = prompts / "curated" / "own.yaml"
    done = CliRunner().invoke(app, [*common, "--init", str(skeleton)])
    assert done.exit_code == 0, done.output
    assert "2 class(es)" in done.output and "already in" in done.output and "Particles" in done.output
    curated = load_curated(prompts)  # merges with nffa.yaml and ncm.yaml: one version, no duplicate class
    assert curated.texts["Rods"] == {t: [] for t in make_config().llm.templates} and "Particles" not in skeleton.read_text()
    rows = describe(make_config().llm, ["Hollow_spheres", "Rods"], prompts, tmp_path / "cache", {}).table
    assert set(rows["provider"]) == {"label"}  # an empty skeleton keeps the fallback
    again = CliRunner().invoke(app, [*common, "--init", str(skeleton)])
    assert again.exit_code == 2 and "already exists" in again.output

    llm_rows = rows.assign(provider="openai", description=[f"Answer {i}: thin # rods, 'quoted': yes" + " word" * 30 for i in range(len(rows))])
    llm_rows.to_parquet(tmp_path / "llm.parquet")
    skeleton.unlink()
    done = CliRunner().invoke(app, [*common, "--init", str(skeleton), "--from-descriptions", str(tmp_path / "llm.parquet")])
    assert done.exit_code == 0 and f"{len(rows)} texts filled in" in done.output, done.output
    curated = load_curated(prompts)
    for row in llm_rows.itertuples():
        assert curated.texts[row.class_name][row.template][row.sample] == row.description  # round trip, verbatim
    filled = describe(make_config().llm, ["Hollow_spheres", "Rods"], prompts, tmp_path / "cache", {})
    assert set(filled.table["provider"]) == {"curated"} and filled.metrics["fallback_classes"] == []


# -- openai provider -----------------------------------------------------------------------
def test_requests_overlap_up_to_concurrency(make_config, server, tmp_path):
    server.delay = 0.2
    llm = openai_llm(make_config, server, concurrency=4, templates=["morphology", "distinguish"], samples=2)
    result = describe(llm, ["Particles", "Powder", "Tips"], PROMPTS, tmp_path, {"OPENAI_API_KEY": KEY})
    assert len(server.records) == 12 and server.max_in_flight == 4  # never more than llm.concurrency
    first_done = min(r.finished for r in server.records)
    assert sum(r.started < first_done for r in server.records) == 4  # the first 4 were in flight together
    assert result.metrics["requests_sent"] == 12 and result.metrics["prompt_tokens"] == 12 * 50
    assert {r.body["seed"] for r in server.records} == {0, 1}  # one seed per sample


def test_retries_429_500_and_malformed_bodies(make_config, server, tmp_path):
    server.inject(rate_limited(retry_after="1"), server_error(500), malformed(), server_error(503), empty_answer())
    llm = openai_llm(make_config, server, concurrency=1, templates=["morphology", "synthesis"])
    result = describe(llm, ["Particles", "Nanowires"], PROMPTS, tmp_path, {"OPENAI_API_KEY": KEY})
    m = result.metrics
    assert (m["failures"], m["retries"], m["requests_sent"]) == (0, 5, 9)
    first, retried = server.records[0], server.records[1]
    assert first.body == retried.body and retried.started - first.finished >= 0.95  # Retry-After: 1 honoured
    assert len(result.table) == 4 and result.table["description"].str.startswith("Answer number").all()


def test_failures_are_not_cached_and_a_rerun_sends_only_them(make_config, server, tmp_path):
    server.inject(server_error(500), server_error(500))
    llm = openai_llm(make_config, server, concurrency=1, max_retries=1, templates=["morphology"])
    env = {"OPENAI_API_KEY": KEY}
    with pytest.raises(DescribeError, match="1 of 3 requests failed"):
        describe(llm, ["Particles", "Nanowires", "Powder"], PROMPTS, tmp_path, env)
    assert len(ResponseCache(tmp_path).load()) == 2
    server.reset_counts()
    result = describe(llm, ["Particles", "Nanowires", "Powder"], PROMPTS, tmp_path, env)
    assert len(server.records) == 1 and result.metrics["cache_hits"] == 2
    server.reset_counts()
    again = describe(llm, ["Particles", "Nanowires", "Powder"], PROMPTS, tmp_path, env)
    assert len(server.records) == 0 and again.metrics == {**again.metrics, "requests_sent": 0, "cache_hits": 3}
    pd.testing.assert_frame_equal(result.table, again.table)
    assert len(ResponseCache(tmp_path).shards()) == 2  # one consolidated shard per run


def test_bad_key_fails_at_once_with_a_clear_error(make_config, server, tmp_path):
    llm = openai_llm(make_config, server, concurrency=2)
    with pytest.raises(LLMFatalError, match="HTTP 401.*OPENAI_API_KEY") as err:
        describe(llm, NFFA, PROMPTS, tmp_path, {"OPENAI_API_KEY": "sk-wrong-secret-123"})
    assert "sk-wrong-secret-123" not in str(err.value)
    assert len(server.records) <= 2  # no retries, the rest cancelled
    assert not ResponseCache(tmp_path).load()


def test_missing_key_fails_before_any_work(make_config, server, tmp_path):
    with pytest.raises(LLMFatalError, match="OPENAI_API_KEY is not set"):
        describe(openai_llm(make_config, server), ["Particles"], PROMPTS, tmp_path / "cache", env={})
    assert not server.records and not (tmp_path / "cache").exists()


def test_unknown_model_is_a_clear_error(make_config, server, tmp_path):
    llm = openai_llm(make_config, server, model="no-such-model", concurrency=1)
    with pytest.raises(LLMFatalError, match="HTTP 404.*llm.model"):
        describe(llm, ["Particles"], PROMPTS, tmp_path, {"OPENAI_API_KEY": KEY})
    assert len(server.records) == 1


def test_dry_run_counts_cached_and_sends_nothing(make_config, server, tmp_path):
    llm = openai_llm(make_config, server, templates=["morphology", "distinguish"])
    describe(llm, ["Particles"], PROMPTS, tmp_path, {"OPENAI_API_KEY": KEY})
    server.reset_counts()
    report = dry_run(llm, ["Particles", "Tips"], PROMPTS, tmp_path, env={})
    assert len(report.requests) == 4 and len(report.cached) == 2 and len(report.to_send) == 2
    assert report.prompt_tokens > 100 and report.completion_tokens_max == 2 * llm.max_tokens
    text = format_dry_run(report)
    assert "2 cached, 2 would be sent" in text and "NOT set" in text and "Tips / distinguish" in text
    assert not server.records


def test_cli_dry_run_reports_label_fallback_and_missing_curated_text(tmp_path):
    from typer.testing import CliRunner

    from multifusion.cli import app

    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["Particles", "Graphene_flakes", "Rods"]))
    prompts = _prompts_copy(tmp_path)
    (prompts / "curated" / "mine.yaml").write_text("version: curated-v1\nclasses:\n  Rods:\n    morphology: [Long thin rods side by side.]\n")
    result = CliRunner().invoke(app, ["describe", "--dry-run", "--classes", str(classes), "--params", str(REPO / "params.yaml"),
                                      "--prompts", str(prompts), "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "0 requests would be sent" in result.output and "MISSING curated text: Rods / synthesis" in result.output
    assert "label fallback (provider=label): 1 class(es)" in result.output and "Graphene_flakes" in result.output
    assert "Particles" not in result.output.split("MISSING", 1)[1]


# -- the stage as a process: kill and resume, and no secret in any file ----------------------
def _stage_setup(tmp_path: Path, server: FakeLLMServer, classes: list[str], **llm) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["llm"].update(provider="openai", model="test-model", base_url=server.url, backoff=0.01,
                         classes_file=str(PROMPTS / "classes.yaml"), **llm)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    return tmp_path


def _stage(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "stages" / "describe.py"), "--classes", "classes.json", "--prompts", str(PROMPTS),
           "--cache", "data/llm/cache", "--out", "data/descriptions.parquet", "--metrics", "metrics/llm.json", "--params", "params.yaml"]
    log = open(tmp_path / "describe.log", "ab")
    return subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def test_sigkill_mid_run_then_resume_loses_and_repeats_nothing(make_config, server, tmp_path):
    server.delay = 0.5
    classes = ["Particles", "Nanowires", "Powder"]
    _stage_setup(tmp_path, server, classes, concurrency=2)
    secret = "sk-test-key"
    proc = _stage(tmp_path, {"OPENAI_API_KEY": secret})
    deadline = time.monotonic() + 60
    while len(server.completed()) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.25)  # answers that arrived get committed; the next ones are 0.5 s away
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    answered = {(json.dumps(r.body["messages"]), r.body["seed"]): r.content for r in server.completed()}
    assert len(answered) >= 6

    llm = make_config({"llm.provider": "openai", "llm.model": "test-model"}).llm
    plan = plan_requests(llm, load_classes_file(PROMPTS / "classes.yaml", classes), load_prompt_set(PROMPTS, llm.templates))
    key_of = {(json.dumps(r.messages), r.params["seed"]): r.key for r in plan}
    cached = ResponseCache(tmp_path / "data/llm/cache").load()
    assert {key_of[a] for a in answered} == set(cached)  # no response lost, nothing else cached

    server.reset_counts()
    server.delay = 0.01
    assert _stage(tmp_path, {"OPENAI_API_KEY": secret}).wait(timeout=60) == 0
    resent = [key_of[(json.dumps(r.body["messages"]), r.body["seed"])] for r in server.records]
    assert sorted(resent) == sorted({r.key for r in plan} - set(cached))  # only the missing, once each
    table = pd.read_parquet(tmp_path / "data/descriptions.parquet").set_index("key")
    for request, content in answered.items():
        assert table.loc[key_of[request], "response"] == content
    assert json.loads((tmp_path / "metrics/llm.json").read_text())["cache_hits"] == len(cached)
    assert not _files_containing([tmp_path], secret)  # data/, metrics/, the log


def _files_containing(roots: list[Path], secret: str) -> list[Path]:
    needle = secret.encode()
    return [p for root in roots if root.exists() for p in root.rglob("*")
            if p.is_file() and ".git" not in p.relative_to(root).parts[:1] and needle in p.read_bytes()]


def test_dvc_push_pull_shares_the_cache_and_no_file_holds_the_key(server, tmp_path):
    """The team workflow with a local-directory remote: repro, push; a teammate clones,
    pulls and reruns the stage with 0 requests. The key is in none of the files."""
    secret = "sk-SECRET-7f3a9c-never-in-files"
    server.api_key = secret
    team, mate, remote = tmp_path / "team", tmp_path / "mate", tmp_path / "remote"
    team.mkdir()
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["describe"]
    for dep in stage["deps"]:  # the stage's code and prompts, as dvc.yaml lists them (data is made below)
        if not dep.startswith("data/"):
            (team / dep).parent.mkdir(parents=True, exist_ok=True)
            if (REPO / dep).is_dir():
                shutil.copytree(REPO / dep, team / dep, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO / dep, team / dep)
    (team / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"describe": stage}}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["llm"].update(provider="openai", model="test-model", base_url=server.url, templates=["morphology", "distinguish"])
    (team / "params.yaml").write_text(yaml.safe_dump(params))
    (team / "data/prepared").mkdir(parents=True)
    (team / "data/prepared/classes.json").write_text(json.dumps(["Particles", "Nanowires", "Tips"]))
    env = {**os.environ, "OPENAI_API_KEY": secret, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = str(Path(sys.executable).parent / "dvc")
    outputs = []

    def run(cwd: Path, *cmd: str) -> None:
        done = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"

    run(team, "git", "init", "-q")
    run(team, dvc, "init", "-q")
    run(team, dvc, "config", "core.analytics", "false")
    run(team, dvc, "remote", "add", "-d", "team", str(remote))
    run(team, dvc, "repro", "describe")
    assert len(server.records) == 6
    run(team, "git", "add", "-A")
    run(team, "git", "commit", "-qm", "describe")
    run(team, dvc, "push")
    server.reset_counts()

    run(tmp_path, "git", "clone", "-q", str(team), str(mate))
    run(mate, dvc, "pull")
    run(mate, dvc, "repro", "describe")          # up to date: skipped
    run(mate, dvc, "repro", "-f", "describe")    # forced: the stage runs on the pulled cache
    assert not server.records
    metrics = json.loads((mate / "metrics/llm.json").read_text())
    assert (metrics["requests_sent"], metrics["cache_hits"]) == (0, 6)
    pd.testing.assert_frame_equal(pd.read_parquet(team / "data/descriptions.parquet"), pd.read_parquet(mate / "data/descriptions.parquet"))

    assert not _files_containing([team, mate, remote], secret)
    assert not any(secret in out for out in outputs)


def test_shards_left_by_a_killed_run_are_merged_on_the_next_run(make_config, server, tmp_path):
    llm = openai_llm(make_config, server, templates=["morphology", "synthesis"])
    env = {"OPENAI_API_KEY": KEY}
    first = describe(llm, ["Particles", "Nanowires", "Powder"], PROMPTS, tmp_path, env)
    cache = ResponseCache(tmp_path)
    (run_shard,) = cache.shards()
    answers = cache.read_shard(run_shard)
    for answer in answers:  # what a run killed before its merge leaves: one batch shard per answer
        cache.append([answer])
    run_shard.unlink()
    assert len(cache.shards()) == 6
    server.reset_counts()
    again = describe(llm, ["Particles", "Nanowires", "Powder"], PROMPTS, tmp_path, env)
    assert not server.records and again.metrics["cache_hits"] == 6
    (merged,) = cache.shards()
    assert merged.name.endswith("-run.parquet") and cache.read_shard(merged) == answers
    pd.testing.assert_frame_equal(first.table, again.table)
