"""Benchmark: uncached describe requests against a local OpenAI-compatible server.

    python bench/describe.py [--requests 200] [--latency 0.2] [--levels 1 4 16 64]

The server (tests/llm_server.py, in a process of its own) answers every request after
``latency`` seconds. At each
concurrency the describe provider (retry loop + group-committed Parquet cache) sends
``requests`` uncached requests into a fresh cache; the peer, measured in the same run, is
the bare ``AsyncOpenAI`` client under the same semaphore with no cache. Ideal wall time
is requests / concurrency x latency; the ratio ideal/measured is 1.0 at best.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]

from multifusion.core.config import load_config  # noqa: E402
from multifusion.llm.cache import ResponseCache  # noqa: E402
from multifusion.llm.openai_provider import run_openai  # noqa: E402
from multifusion.llm.prompts import ClassInfo, load_prompt_set  # noqa: E402
from multifusion.llm.requests import LLMRequest, plan_requests  # noqa: E402

KEY = "sk-bench"


def make_requests(n: int, overrides: dict) -> tuple[list[LLMRequest], object]:
    llm = load_config(REPO / "params.yaml", overrides).llm
    per_class = len(llm.templates) * llm.samples
    classes = [ClassInfo(name=f"class_{i:03d}", label=f"material {i}", hint="") for i in range(-(-n // per_class))]
    return plan_requests(llm, classes, load_prompt_set(REPO / "prompts", llm.templates))[:n], llm


def time_provider(requests: list[LLMRequest], llm) -> float:
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        stats = run_openai(requests, llm, ResponseCache(cache_dir), {"OPENAI_API_KEY": KEY})
        elapsed = time.perf_counter() - start
        assert stats.failures == 0 and len(ResponseCache(cache_dir).load()) == len(requests)
    return elapsed


async def _bare(requests: list[LLMRequest], llm) -> None:
    semaphore = asyncio.Semaphore(llm.concurrency)
    async with openai.AsyncOpenAI(api_key=KEY, base_url=llm.base_url, max_retries=0, timeout=llm.timeout) as client:

        async def one(request: LLMRequest) -> None:
            async with semaphore:
                await client.chat.completions.create(model=llm.model, messages=request.messages, **request.params)

        await asyncio.gather(*(one(r) for r in requests))


def time_bare(requests: list[LLMRequest], llm) -> float:
    start = time.perf_counter()
    asyncio.run(_bare(requests, llm))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()

    rows = []
    # The server runs in a process of its own, as a real LLM server would: its threads
    # must not share the client's GIL.
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "llm_server.py"), "--api-key", KEY, "--delay", str(args.latency)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        url = server.stdout.readline().strip()
        for concurrency in args.levels:
            overrides = {"llm.provider": "openai", "llm.model": "test-model", "llm.base_url": url,
                         "llm.concurrency": concurrency, "llm.samples": 2}
            requests, llm = make_requests(args.requests, overrides)
            ideal = args.requests / concurrency * args.latency
            ours = time_provider(requests, llm)
            bare = time_bare(requests, llm)
            rows.append((concurrency, ideal, ours, ideal / ours, bare, ideal / bare, bare / ours))
            print(f"  concurrency {concurrency}: done", file=sys.stderr, flush=True)
    finally:
        server.stdin.close()
        server.wait(timeout=30)

    print(f"\n{args.requests} uncached requests, server latency {args.latency * 1000:.0f} ms\n")
    print("| concurrency | ideal s | describe s | ideal/describe | bare client s | ideal/bare | bare/describe |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c, ideal, ours, r_ours, bare, r_bare, rel in rows:
        print(f"| {c} | {ideal:.2f} | {ours:.2f} | {r_ours:.2f} | {bare:.2f} | {r_bare:.2f} | {rel:.2f} |")


if __name__ == "__main__":
    main()
