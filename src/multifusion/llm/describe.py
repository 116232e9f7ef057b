"""The describe step: class descriptions for every class x template x sample.

    result = describe(cfg.llm, read_classes("data/prepared/classes.json"), "prompts", "data/llm/cache", os.environ)
    result.table    # one row per request, in plan order (data/descriptions.parquet)
    result.metrics  # requests_sent, cache_hits, failures, prompt_tokens, completion_tokens, ...

``curated`` takes the shipped texts of prompts/curated/ (nothing is sent, nothing cached);
``openai`` answers from the cache first and sends only the missing requests.
:func:`dry_run` reports what a run would send without sending anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from multifusion.config import LLMConfig
from multifusion.llm.cache import ResponseCache
from multifusion.llm.curated import curated_answers, load_curated, missing_requests
from multifusion.llm.openai_provider import LLMFatalError, api_key_from_env, resolve_base_url, run_openai
from multifusion.llm.prompts import extract_description, load_classes_file, load_prompt_set
from multifusion.llm.requests import LLMRequest, plan_requests

PROVIDERS = ("curated", "openai")
COLUMNS = ["class_name", "label", "template", "sample", "provider", "model", "prompt", "response", "description", "key"]
CHARS_PER_TOKEN = 4  # rough English average, for dry-run estimates only


class DescribeError(RuntimeError):
    """The describe step cannot produce a complete set of descriptions."""


@dataclass
class DescribeResult:
    table: pd.DataFrame       # COLUMNS, one row per request in plan order
    metrics: dict[str, object]


def read_classes(path: str | Path) -> list[str]:
    """The ordered class names written by the prepare stage (a JSON list)."""
    path = Path(path)
    if not path.is_file():
        raise DescribeError(f"{path}: class list not found; run `dvc repro prepare` first or pass the right path")
    raw = json.loads(path.read_text())
    classes = raw.get("classes") if isinstance(raw, dict) else raw
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise DescribeError(f"{path}: expected a non-empty JSON list of class names; rerun `dvc repro prepare`")
    return classes


def _plan(llm: LLMConfig, classes: list[str], prompts_dir: str | Path) -> tuple[list[LLMRequest], dict[str, str]]:
    if llm.provider not in PROVIDERS:
        raise DescribeError(f"params.yaml: llm.provider must be one of {PROVIDERS}, got '{llm.provider}'")
    if llm.samples < 1 or llm.concurrency < 1 or llm.max_retries < 0:
        raise DescribeError("params.yaml: llm.samples and llm.concurrency must be >= 1, llm.max_retries >= 0")
    infos = load_classes_file(llm.classes_file, classes)
    requests = plan_requests(llm, infos, load_prompt_set(prompts_dir, llm.templates))
    return requests, {i.name: i.label for i in infos}


def _curated_version(llm: LLMConfig, prompts_dir: str | Path):
    curated = load_curated(prompts_dir)
    if llm.model != curated.version:
        raise DescribeError(
            f"params.yaml: llm.model is '{llm.model}' but the curated texts in {Path(prompts_dir) / 'curated'} are "
            f"'{curated.version}'; set llm.model={curated.version} (or llm.provider=openai for a model's answers)"
        )
    return curated


def _table(requests: list[LLMRequest], labels: dict[str, str], responses: dict[str, str], llm: LLMConfig) -> pd.DataFrame:
    rows = [
        {
            "class_name": r.class_name,
            "label": labels[r.class_name],
            "template": r.template,
            "sample": r.sample,
            "provider": llm.provider,
            "model": llm.model,
            "prompt": r.prompt,
            "response": responses[r.key],
            "description": extract_description(responses[r.key]),
            "key": r.key,
        }
        for r in requests
    ]
    return pd.DataFrame(rows, columns=COLUMNS).astype({"sample": "int64"})


def describe(
    llm: LLMConfig, classes: list[str], prompts_dir: str | Path, cache_dir: str | Path, env: Mapping[str, str]
) -> DescribeResult:
    """Descriptions for ``classes``; sends (openai) only requests missing from the cache."""
    if llm.provider == "openai":
        api_key_from_env(env)  # a missing key fails before any work
    requests, labels = _plan(llm, classes, prompts_dir)
    cache = ResponseCache(cache_dir)
    cache.directory.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, object] = {
        "provider": llm.provider, "model": llm.model, "descriptions": len(requests),
        "requests_sent": 0, "cache_hits": 0, "failures": 0, "retries": 0,
        "prompt_tokens": 0, "completion_tokens": 0,
    }
    if llm.provider == "curated":
        responses = curated_answers(requests, _curated_version(llm, prompts_dir), prompts_dir)
        return DescribeResult(_table(requests, labels, responses, llm), metrics)

    cache.remove_partial_writes()
    cached = cache.load()
    missing = [r for r in requests if r.key not in cached]
    stats = run_openai(missing, llm, cache, env)
    cache.consolidate(stats.shards)
    metrics.update(
        requests_sent=stats.requests_sent, cache_hits=len(requests) - len(missing), failures=stats.failures,
        retries=stats.retries, prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
    )
    if stats.failures:
        first = next(iter(stats.failed.values()))
        raise DescribeError(
            f"{stats.failures} of {len(missing)} requests failed after {llm.max_retries} retries (e.g. {first}); "
            f"the {len(missing) - stats.failures} answers that arrived are cached in {cache.directory}: "
            f"rerun to send only the missing ones"
        )
    cached = cache.load()
    return DescribeResult(_table(requests, labels, {k: v.response for k, v in cached.items()}, llm), metrics)


def write_outputs(result: DescribeResult, out: str | Path, metrics_path: str | Path) -> None:
    out, metrics_path = Path(out), Path(metrics_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    result.table.to_parquet(out, index=False)
    metrics_path.write_text(json.dumps(result.metrics, indent=2) + "\n")


@dataclass
class DryRun:
    provider: str
    model: str
    server: str
    key_set: bool
    requests: list[LLMRequest]
    cached: set[str]                # keys already answered
    missing_curated: list[LLMRequest]
    prompt_tokens: int              # estimate for the uncached requests
    completion_tokens_max: int      # llm.max_tokens x uncached requests

    @property
    def to_send(self) -> list[LLMRequest]:
        return [] if self.provider == "curated" else [r for r in self.requests if r.key not in self.cached]


def dry_run(
    llm: LLMConfig, classes: list[str], prompts_dir: str | Path, cache_dir: str | Path, env: Mapping[str, str]
) -> DryRun:
    """What :func:`describe` would do, without sending anything or writing any file."""
    requests, _ = _plan(llm, classes, prompts_dir)
    cache = ResponseCache(cache_dir)
    cached = set(cache.load()) if cache.directory.is_dir() else set()
    missing_curated = missing_requests(requests, load_curated(prompts_dir)) if llm.provider == "curated" else []
    report = DryRun(
        provider=llm.provider, model=llm.model,
        server=(resolve_base_url(llm, env) or "https://api.openai.com/v1") if llm.provider == "openai" else "none (offline)",
        key_set=bool(env.get("OPENAI_API_KEY", "").strip()),
        requests=requests, cached=cached & {r.key for r in requests}, missing_curated=missing_curated,
        prompt_tokens=0, completion_tokens_max=0,
    )
    to_send = report.to_send
    report.prompt_tokens = sum(sum(len(m["content"]) for m in r.messages) // CHARS_PER_TOKEN for r in to_send)
    report.completion_tokens_max = llm.max_tokens * len(to_send)
    return report


def format_dry_run(report: DryRun, show_prompts: bool = True) -> str:
    lines = [f"provider {report.provider}, model {report.model}, server {report.server}"]
    if report.provider == "curated":
        lines.append(f"{len(report.requests)} descriptions from prompts/curated; 0 requests would be sent")
        for r in report.missing_curated:
            lines.append(f"  MISSING curated text: {r.class_name} / {r.template} / sample {r.sample}")
        return "\n".join(lines)
    to_send = report.to_send
    lines.append(
        f"{len(report.requests)} requests: {len(report.cached)} cached, {len(to_send)} would be sent; "
        f"OPENAI_API_KEY {'set' if report.key_set else 'NOT set (required to run)'}"
    )
    for r in to_send:
        lines.append(f"--- {r.class_name} / {r.template} / sample {r.sample}  key {r.key[:12]}  params {r.params}")
        if show_prompts:
            lines.append(r.prompt)
    lines.append(
        f"estimate for the {len(to_send)} uncached: ~{report.prompt_tokens} prompt tokens "
        f"(~{CHARS_PER_TOKEN} characters per token), at most {report.completion_tokens_max} completion tokens"
    )
    return "\n".join(lines)


__all__ = ["DescribeError", "DescribeResult", "DryRun", "LLMFatalError", "describe", "dry_run", "format_dry_run", "read_classes", "write_outputs"]
