"""Stage describe: zero-shot chain-of-thought descriptions of every class, cached.

    python stages/describe.py --classes data/prepared/classes.json --prompts prompts \
        --cache data/llm/cache --out data/descriptions.parquet --metrics metrics/llm.json

llm.provider=curated (default) takes the shipped texts of prompts/curated/ (a class with
none gets descriptions built from its label, provider=label, with one warning); =openai asks
any OpenAI-compatible server (OPENAI_API_KEY, OPENAI_BASE_URL from the environment only)
and sends only the requests missing from the cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from multifusion.core.errors import run_stage
from multifusion.core.config import load_config
from multifusion.llm.curated import CuratedMissingError
from multifusion.llm.describe import DescribeError, describe, read_classes, write_outputs
from multifusion.llm.openai_provider import LLMFatalError
from multifusion.llm.prompts import PromptError

# The openai 3.x client sends through httpx2 (logger "httpx2": one INFO line per request,
# URL included) over httpcore2 ("httpcore2.*", DEBUG traces) and logs as "openai".
# Warnings only: the log shows describe's own progress, never request lines.
QUIET_LOGGERS = ("httpx2", "httpcore2", "openai")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=Path, default=Path("data/prepared/classes.json"))
    parser.add_argument("--prompts", type=Path, default=Path("prompts"))
    parser.add_argument("--cache", type=Path, default=Path("data/llm/cache"))
    parser.add_argument("--out", type=Path, default=Path("data/descriptions.parquet"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/llm.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="describe: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)

    cfg = load_config(args.params)
    try:
        result = describe(cfg.llm, read_classes(args.classes), args.prompts, args.cache, os.environ)
    except (DescribeError, LLMFatalError, CuratedMissingError, PromptError) as err:
        sys.exit(f"describe: {err}")
    write_outputs(result, args.out, args.metrics)
    m = result.metrics
    print(
        f"describe: {m['descriptions']} descriptions ({m['provider']}, {m['model']}): {m['requests_sent']} requests sent, "
        f"{m['cache_hits']} cache hits, {m['failures']} failures -> {args.out}"
    )


if __name__ == "__main__":
    run_stage("describe", main)
