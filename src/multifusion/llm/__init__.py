"""LLM class descriptions: prompts, providers (curated, openai), the Parquet response cache.

Entry points: :func:`multifusion.llm.describe.describe` (the describe stage) and
:func:`multifusion.llm.describe.dry_run` (``multifusion describe --dry-run``).
"""

from multifusion.llm.describe import DescribeError, DescribeResult, describe, dry_run, format_dry_run, read_classes, write_outputs
from multifusion.llm.openai_provider import LLMFatalError

__all__ = ["DescribeError", "DescribeResult", "LLMFatalError", "describe", "dry_run", "format_dry_run", "read_classes", "write_outputs"]
