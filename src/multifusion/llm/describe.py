"""The describe step: class descriptions for every class x template x sample.

    result = describe(cfg.llm, read_classes("data/prepared/classes.json"), "prompts", "data/llm/cache", os.environ)
    result.table    # one row per request, in plan order (data/descriptions.parquet)
    result.metrics  # requests_sent, cache_hits, failures, prompt_tokens, completion_tokens, ...

``curated`` takes the shipped texts of prompts/curated/ (nothing is sent, nothing cached);
a class with no curated text at all falls back to descriptions built from its label
(``provider=label``, listed in the metrics' ``fallback_classes``, one warning logged).
``openai`` answers from the cache first and sends only the missing requests.
:func:`dry_run` reports what a run would send without sending anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from multifusion.core.config import LLM_PROVIDERS, LLMConfig
from multifusion.core.atomic import atomic_path
from multifusion.core.json_files import write_json
from multifusion.llm.cache import ResponseCache
from multifusion.llm.curated import CuratedTexts, curated_answers, load_curated, missing_requests, uncurated_classes
from multifusion.llm.label import PROVIDER as LABEL_PROVIDER
from multifusion.llm.label import MODEL as LABEL_MODEL
from multifusion.llm.label import fallback_warning, label_answers
from multifusion.llm.openai_provider import LLMFatalError, api_key_from_env, resolve_base_url, run_openai
from multifusion.llm.prompts import ClassInfo, extract_description, load_classes_file, load_prompt_set
from multifusion.llm.requests import LLMRequest, plan_requests

PROVIDERS = LLM_PROVIDERS  # the allowed llm.provider values live with the params (multifusion.core.config)
COLUMNS = ["class_name", "label", "template", "sample", "provider", "model", "prompt", "response", "description", "key"]
CHARS_PER_TOKEN = 4  # rough English average, for dry-run estimates only
log = logging.getLogger("multifusion.describe")


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


def _plan(llm: LLMConfig, classes: list[str], prompts_dir: str | Path) -> tuple[list[LLMRequest], dict[str, ClassInfo]]:
    if llm.provider not in PROVIDERS:
        raise DescribeError(f"params.yaml: llm.provider must be one of {PROVIDERS}, got '{llm.provider}'")
    if llm.samples < 1 or llm.concurrency < 1 or llm.max_retries < 0:
        raise DescribeError("params.yaml: llm.samples and llm.concurrency must be >= 1, llm.max_retries >= 0")
    infos = load_classes_file(llm.classes_file, classes)
    requests = plan_requests(llm, infos, load_prompt_set(prompts_dir, llm.templates))
    return requests, {i.name: i for i in infos}


def _curated_version(llm: LLMConfig, prompts_dir: str | Path):
    curated = load_curated(prompts_dir)
    if llm.model != curated.version:
        raise DescribeError(
            f"params.yaml: llm.model is '{llm.model}' but the curated texts in {Path(prompts_dir) / 'curated'} are "
            f"'{curated.version}'; set llm.model={curated.version} (or llm.provider=openai for a model's answers)"
        )
    return curated


def _table(
    requests: list[LLMRequest], infos: dict[str, ClassInfo], responses: dict[str, str], llm: LLMConfig,
    fallback: frozenset[str] = frozenset(),
) -> pd.DataFrame:
    """One row per request; rows of the ``fallback`` classes say provider=label, model=label."""
    rows = [
        {
            "class_name": r.class_name,
            "label": infos[r.class_name].label,
            "template": r.template,
            "sample": r.sample,
            "provider": LABEL_PROVIDER if r.class_name in fallback else llm.provider,
            "model": LABEL_MODEL if r.class_name in fallback else llm.model,
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
    requests, infos = _plan(llm, classes, prompts_dir)
    cache = ResponseCache(cache_dir)
    cache.directory.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, object] = {
        "provider": llm.provider, "model": llm.model, "descriptions": len(requests),
        "requests_sent": 0, "cache_hits": 0, "failures": 0, "retries": 0,
        "prompt_tokens": 0, "completion_tokens": 0, "fallback_classes": [], "fallback_descriptions": 0,
    }
    if llm.provider == "curated":
        return _describe_curated(llm, requests, infos, _curated_version(llm, prompts_dir), prompts_dir, metrics)

    cache.remove_partial_writes()
    cache.merge_leftovers()  # the batch shards of a killed run become one shard
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
    return DescribeResult(_table(requests, infos, {k: v.response for k, v in cached.items()}, llm), metrics)


def _describe_curated(
    llm: LLMConfig, requests: list[LLMRequest], infos: dict[str, ClassInfo], curated: CuratedTexts,
    prompts_dir: str | Path, metrics: dict[str, object],
) -> DescribeResult:
    """Curated texts; classes with none at all get label descriptions (one warning)."""
    fallback = frozenset(uncurated_classes(list(infos), curated))
    covered = [r for r in requests if r.class_name not in fallback]
    responses = curated_answers(covered, curated, prompts_dir)  # raises on a partly curated class
    responses |= label_answers([r for r in requests if r.class_name in fallback], infos)
    if fallback:
        ordered = [name for name in infos if name in fallback]
        metrics.update(fallback_classes=ordered, fallback_descriptions=len(requests) - len(covered))
        log.warning("warning: %s", fallback_warning(ordered))
    return DescribeResult(_table(requests, infos, responses, llm, fallback), metrics)


def write_outputs(result: DescribeResult, out: str | Path, metrics_path: str | Path) -> None:
    with atomic_path(out) as tmp:
        result.table.to_parquet(tmp, index=False)
    write_json(metrics_path, result.metrics)


@dataclass
class DryRun:
    provider: str
    model: str
    server: str
    key_set: bool
    requests: list[LLMRequest]
    cached: set[str]                # keys already answered
    missing_curated: list[LLMRequest]  # requests of partly curated classes with no text (an error at run time)
    fallback_classes: list[str]        # classes with no curated text: label descriptions
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
    missing_curated: list[LLMRequest] = []
    fallback: list[str] = []
    if llm.provider == "curated":
        curated = load_curated(prompts_dir)
        fallback = uncurated_classes(classes, curated)
        missing_curated = missing_requests([r for r in requests if r.class_name not in fallback], curated)
    report = DryRun(
        provider=llm.provider, model=llm.model,
        server=(resolve_base_url(llm, env) or "https://api.openai.com/v1") if llm.provider == "openai" else "none (offline)",
        key_set=bool(env.get("OPENAI_API_KEY", "").strip()),
        requests=requests, cached=cached & {r.key for r in requests}, missing_curated=missing_curated,
        fallback_classes=fallback,
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
        if report.fallback_classes:
            lines.append("  label fallback (provider=label): " + fallback_warning(report.fallback_classes))
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
