"""Append-only Parquet cache of LLM responses, keyed by request hash.

Each write is one new shard ``shard-<time>-<pid>-<n>.parquet``, written to a temporary
name, fsynced and moved into place with ``os.replace``: a reader (or a run killed
mid-write) sees a whole shard or none. Shards are never edited; the same key in two
shards (a run killed between :meth:`ResponseCache.consolidate` steps) reads as the first.
Only successful answers are written: a failure is never cached.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_GLOB = "shard-*.parquet"
TMP_PREFIX = ".tmp-"


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

    def load(self) -> dict[str, CachedResponse]:
        """Every cached answer by key (first occurrence wins, shards in name order)."""
        entries: dict[str, CachedResponse] = {}
        for shard in self.shards():
            try:
                table = pq.read_table(shard, schema=SCHEMA)
            except (pa.ArrowInvalid, OSError) as err:
                raise ValueError(f"{shard}: unreadable cache shard ({err}); delete that file and rerun") from err
            for row in table.to_pylist():
                entries.setdefault(row["key"], CachedResponse(**row))
        return entries

    def remove_partial_writes(self) -> None:
        """Delete temporary files left by a run killed in the middle of a write."""
        for tmp in self.directory.glob(TMP_PREFIX + "*"):
            tmp.unlink(missing_ok=True)

    def append(self, responses: list[CachedResponse]) -> Path | None:
        """Write ``responses`` as one new shard, atomically. Returns its path."""
        if not responses:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._written += 1
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{self._written:05d}.parquet"
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
        """Merge ``shards`` (written by this run) into one, then delete them. Safe against a
        kill at any point: the merged shard lands before any source is removed."""
        if len(shards) < 2:
            return shards[0] if shards else None
        rows = [CachedResponse(**row) for shard in shards for row in pq.read_table(shard, schema=SCHEMA).to_pylist()]
        merged = self.append(rows)
        for shard in shards:
            shard.unlink(missing_ok=True)
        return merged

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.load().values()], columns=SCHEMA.names)
