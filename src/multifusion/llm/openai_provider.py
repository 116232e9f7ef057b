"""The ``openai`` provider: chat completions from any OpenAI-compatible server.

The official async client (``openai.AsyncOpenAI``) with its own retries switched off; this
module retries instead, so the policy is explicit and testable:
- ``llm.concurrency`` requests in flight (an asyncio semaphore);
- 429, 408, 409, 5xx, timeouts, dropped connections and malformed bodies are retried up
  to ``llm.max_retries`` times, waiting Retry-After (or retry-after-ms) when the server
  sends it, else ``llm.backoff`` doubling per retry with jitter; every wait is capped at
  ``llm.backoff_max``. A request still failing then counts as a failure: never cached;
- 400, 401, 403, 404 and 422 stop the whole run at once with a one-line reason (bad key,
  unknown model, wrong URL): retrying cannot help.
Answers are committed to the cache by one writer task as they arrive: whatever has
arrived when a batch write starts goes into that shard, so a kill loses only requests in
flight. The API key goes to the client and nowhere else; error text is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import openai

from multifusion.core.config import LLMConfig
from multifusion.llm.cache import CachedResponse, ResponseCache
from multifusion.llm.prompts import extract_description
from multifusion.llm.requests import LLMRequest, canonical_json

log = logging.getLogger(__name__)

FATAL_HINTS = {
    400: "the server refused the request parameters (llm.model, llm.max_tokens, llm.temperature, llm.seed)",
    401: "the server rejected the API key; export a valid OPENAI_API_KEY",
    403: "the API key may not use this model or endpoint",
    404: "unknown model or wrong URL; check llm.model and llm.base_url / OPENAI_BASE_URL (most servers end in /v1)",
    422: "the server refused the request parameters (llm.model, llm.max_tokens, llm.temperature, llm.seed)",
}
RETRY_STATUSES = frozenset({408, 409, 429})


class LLMFatalError(RuntimeError):
    """The run cannot succeed as configured (missing or bad key, unknown model, wrong URL)."""


class MalformedResponseError(ValueError):
    """The server answered 200 with a body that is not a usable chat completion."""


@dataclass
class RunStats:
    requests_sent: int = 0      # HTTP requests, retries included
    retries: int = 0
    failures: int = 0           # requests that never got an answer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # key -> last error
    shards: list[Path] = field(default_factory=list)      # cache shards written


def api_key_from_env(env: Mapping[str, str]) -> str:
    key = env.get("OPENAI_API_KEY", "").strip()
    if not key:
        raise LLMFatalError(
            "OPENAI_API_KEY is not set: export it in the shell that runs the pipeline (never put it in "
            "params.yaml or any file), or set llm.provider=curated to use the shipped descriptions"
        )
    return key


def resolve_base_url(llm: LLMConfig, env: Mapping[str, str]) -> str | None:
    """llm.base_url, else OPENAI_BASE_URL, else None (the client's default, api.openai.com)."""
    return llm.base_url or env.get("OPENAI_BASE_URL") or None


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """The server-directed wait: retry-after-ms, else Retry-After in seconds or as an HTTP date."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / scale)
        except ValueError:  # an HTTP date, parsed below
            continue
    value = headers.get("retry-after")
    parsed = email.utils.parsedate_to_datetime(value) if value else None
    return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def retry_delay(llm: LLMConfig, retry: int, headers: Mapping[str, str] | None) -> float:
    """Seconds to wait before retry number ``retry`` (0-based)."""
    directed = retry_after_seconds(headers)
    if directed is not None:
        return min(directed, llm.backoff_max)
    return min(llm.backoff * 2.0**retry, llm.backoff_max) * (1.0 - 0.25 * random.random())


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def connection_error(err: BaseException, base_url: object) -> str:
    """One line for a request that reached no server: the URL it went to, why (the socket
    error underneath, e.g. "Connection refused"), and what to check."""
    request = getattr(err, "request", None)
    url = getattr(request, "url", None) or base_url
    why, cause = str(err), err.__cause__ or err.__context__
    while cause is not None:  # the innermost reason: "Connection refused" rather than "Connection error."
        if isinstance(cause, OSError) and (cause.errno or cause.strerror):
            why = os.strerror(cause.errno) if cause.errno else cause.strerror
            break
        why = str(cause).strip() or type(cause).__name__
        cause = cause.__cause__ or cause.__context__
    kind = "timed out" if isinstance(err, openai.APITimeoutError) else "could not connect"
    return (f"{kind}: {url} ({why}); check llm.base_url (or OPENAI_BASE_URL) and that the server "
            f"is running and reachable")


def _parse(completion: object) -> tuple[str, str, int, int]:
    """(content, finish_reason, prompt_tokens, completion_tokens) of a chat completion."""
    choices = getattr(completion, "choices", None)
    if not choices:
        raise MalformedResponseError(f"no choices in the response ({type(completion).__name__})")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str) or not extract_description(content):
        raise MalformedResponseError("empty message content or nothing after the final marker")
    usage = getattr(completion, "usage", None)
    return (
        content,
        str(getattr(choices[0], "finish_reason", "") or ""),
        int(getattr(usage, "prompt_tokens", 0) or 0),
        int(getattr(usage, "completion_tokens", 0) or 0),
    )


async def complete(
    client: openai.AsyncOpenAI, request: LLMRequest, llm: LLMConfig, stats: RunStats, api_key: str
) -> CachedResponse | None:
    """One request with retries; None when it failed (recorded in ``stats``)."""
    for attempt in range(llm.max_retries + 1):
        headers: Mapping[str, str] | None = None
        stats.requests_sent += 1
        try:
            completion = await client.chat.completions.create(
                model=llm.model, messages=request.messages, **request.params
            )
            content, finish_reason, prompt_tokens, completion_tokens = _parse(completion)
        except openai.APIStatusError as err:
            status = err.status_code
            if status in FATAL_HINTS:
                raise LLMFatalError(
                    f"HTTP {status} from {client.base_url} for model '{llm.model}': {FATAL_HINTS[status]} "
                    f"(server said: {_scrub(str(err.message), api_key)[:200]})"
                ) from None
            if status not in RETRY_STATUSES and status < 500:
                error = f"HTTP {status}: {_scrub(str(err.message), api_key)[:200]}"
                break
            error, headers = f"HTTP {status}", err.response.headers
        except openai.APIConnectionError as err:  # refused, unreachable, timed out: name where
            error = _scrub(connection_error(err, client.base_url), api_key)[:300]
        except (openai.APIResponseValidationError, MalformedResponseError, ValueError) as err:
            error = f"{type(err).__name__}: {_scrub(str(err), api_key)[:200]}"
        else:
            stats.prompt_tokens += prompt_tokens
            stats.completion_tokens += completion_tokens
            return CachedResponse(
                key=request.key,
                provider="openai",
                model=llm.model,
                class_name=request.class_name,
                template=request.template,
                sample=request.sample,
                messages=canonical_json(request.messages),
                params=canonical_json(request.params),
                response=content,
                finish_reason=finish_reason,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                created=time.time(),
            )
        if attempt == llm.max_retries:
            break
        stats.retries += 1
        delay = retry_delay(llm, attempt, headers)
        log.info("%s/%s sample %d: %s; retry %d in %.2f s", request.class_name, request.template, request.sample, error, attempt + 1, delay)
        await asyncio.sleep(delay)
    stats.failures += 1
    stats.failed[request.key] = error
    log.warning("%s/%s sample %d failed: %s", request.class_name, request.template, request.sample, error)
    return None


async def _write_batches(queue: asyncio.Queue, cache: ResponseCache, stats: RunStats) -> None:
    """Group commit: each write takes every answer that has arrived meanwhile."""
    done = False
    while not done:
        batch = [await queue.get()]
        while not queue.empty():
            batch.append(queue.get_nowait())
        done = batch[-1] is None
        answers = [a for a in batch if a is not None]
        if answers:
            stats.shards.append(await asyncio.to_thread(cache.append, answers))


async def _run(requests: list[LLMRequest], llm: LLMConfig, api_key: str, base_url: str | None, cache: ResponseCache) -> RunStats:
    stats = RunStats()
    queue: asyncio.Queue = asyncio.Queue()
    writer = asyncio.create_task(_write_batches(queue, cache, stats))
    semaphore = asyncio.Semaphore(llm.concurrency)
    stop = asyncio.Event()  # set on a fatal error, before its slot frees: nothing new is sent

    async def one(client: openai.AsyncOpenAI, request: LLMRequest) -> None:
        async with semaphore:
            if stop.is_set():
                return
            if writer.done():  # the cache cannot be written: stop sending
                writer.result()
            try:
                answer = await complete(client, request, llm, stats, api_key)
            except LLMFatalError:
                stop.set()
                raise
        if answer is not None:
            queue.put_nowait(answer)

    try:
        async with openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=llm.timeout, max_retries=0) as client:
            async with asyncio.TaskGroup() as group:
                for request in requests:
                    group.create_task(one(client, request))
    finally:
        queue.put_nowait(None)
        await writer
    return stats


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def run_openai(
    requests: list[LLMRequest], llm: LLMConfig, cache: ResponseCache, env: Mapping[str, str]
) -> RunStats:
    """Send ``requests`` (all uncached), commit answers to ``cache``, return the counts.
    Raises :class:`LLMFatalError` before any request when the key is missing."""
    api_key = api_key_from_env(env)
    if not requests:
        return RunStats()
    try:
        return asyncio.run(_run(requests, llm, api_key, resolve_base_url(llm, env), cache))
    except BaseExceptionGroup as group:
        fatal = group.subgroup(LLMFatalError)
        if fatal is not None:
            raise _first_leaf(fatal) from None
        raise
