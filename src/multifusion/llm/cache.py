"""Append-only Parquet cache of LLM responses, keyed by request hash.

Each write is one new shard ``shard-<time>-<pid>-<n>.parquet``, written to a temporary
name, fsynced and moved into place with ``os.replace``: a reader (or a run killed
mid-write) sees a whole shard or none. Shards are never edited; the same key in two
shards (a run killed between :meth:`ResponseCache.consolidate` steps) reads as the first.
Only successful answers are written: a failure is never cached.

A finished run merges its batch shards into one ``shard-...-run.parquet``. A run killed
before that leaves its batch shards behind (one per batch of answers); the next run
merges them first (:meth:`ResponseCache.merge_leftovers`), so the cache keeps one shard
per run. A damaged shard raises :class:`CacheError`, naming the file and the fix.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from multifusion.core.errors import UserError

SHARD_GLOB = "shard-*.parquet"
RUN_SUFFIX = "-run.parquet"  # a run's merged shard; any other shard is a batch of an unfinished run
TMP_PREFIX = ".tmp-"


class CacheError(UserError, ValueError):
    """A cache shard that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class CachedResponse:
    key: str
    provider: str
    model: str
    class_name: str
    template: str
    sample: int
    messages: str           # canonical JSON of the chat messages
    params: str             # canonical JSON of the sampling parameters
    response: str           # raw model output, reasoning included
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    created: float          # unix time the answer arrived


SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("provider", pa.string()),
        ("model", pa.string()),
        ("class_name", pa.string()),
        ("template", pa.string()),
        ("sample", pa.int64()),
        ("messages", pa.string()),
        ("params", pa.string()),
        ("response", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("created", pa.float64()),
    ]
)


class ResponseCache:
    """The shards under one directory; :meth:`load` reads them, :meth:`append` adds one."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._written = 0

    def shards(self) -> list[Path]:
        return sorted(self.directory.glob(SHARD_GLOB))

    @staticmethod
    def read_shard(shard: Path) -> list[CachedResponse]:
        """The answers in one shard, in order; CacheError when it is damaged."""
        try:
            table = pq.read_table(shard, schema=SCHEMA)
        except (pa.ArrowException, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CacheError(f"{shard}: unreadable cache shard ({reason}); delete that file and rerun "
                             "(only its answers are asked again)") from None
        return [CachedResponse(**row) for row in table.to_pylist()]

    def load(self) -> dict[str, CachedResponse]:
        """Every cached answer by key (first occurrence wins, shards in name order)."""
        entries: dict[str, CachedResponse] = {}
        for shard in self.shards():
            for response in self.read_shard(shard):
                entries.setdefault(response.key, response)
        return entries

    def remove_partial_writes(self) -> None:
        """Delete temporary files left by a run killed in the middle of a write."""
        for tmp in self.directory.glob(TMP_PREFIX + "*"):
            tmp.unlink(missing_ok=True)

    def append(self, responses: list[CachedResponse], merged: bool = False) -> Path | None:
        """Write ``responses`` as one new shard, atomically (``merged``: a run's merged shard).
        Returns its path."""
        if not responses:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._written += 1
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{self._written:05d}{RUN_SUFFIX if merged else '.parquet'}"
        final = self.directory / name
        tmp = self.directory / (TMP_PREFIX + name)
        table = pa.Table.from_pylist([asdict(r) for r in responses], schema=SCHEMA)
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    def consolidate(self, shards: list[Path]) -> Path | None:
        """Merge ``shards`` (the batches of one run) into one run shard, then delete them.
        Safe against a kill at any point: the merged shard lands before any source is
        removed (a single shard is renamed, atomically)."""
        if not shards:
            return None
        if len(shards) == 1:
            merged = shards[0].with_name(shards[0].name.removesuffix(".parquet") + RUN_SUFFIX)
            os.replace(shards[0], merged)
            return merged
        merged = self.append([r for shard in shards for r in self.read_shard(shard)], merged=True)
        for shard in shards:
            shard.unlink(missing_ok=True)
        return merged

    def merge_leftovers(self) -> Path | None:
        """Merge the batch shards of runs that never finished (killed, or stopped by an
        error) into one run shard. Returns it, or None when there were none."""
        return self.consolidate([s for s in self.shards() if not s.name.endswith(RUN_SUFFIX)])

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.load().values()], columns=SCHEMA.names)
