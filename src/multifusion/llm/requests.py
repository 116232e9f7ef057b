"""The requests of a describe run: one per class x template x sample, each with its cache key.

The key is the sha256 of the canonical JSON (sorted keys, no spaces) of everything that
determines an answer: provider, model, messages, sampling parameters and sample index.
Never the server URL or the API key, so a cache filled against one server serves a
teammate using another address for the same model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from multifusion.core.config import LLMConfig
from multifusion.llm.prompts import ClassInfo, PromptSet, build_messages


@dataclass(frozen=True)
class LLMRequest:
    class_name: str
    template: str
    sample: int                     # 0 .. llm.samples - 1
    messages: list[dict[str, str]]  # system + user chat messages
    params: dict[str, Any]          # temperature, seed, max_tokens as sent
    key: str                        # sha256 hex of the canonical request

    @property
    def prompt(self) -> str:
        """The user prompt (the part that differs between requests)."""
        return self.messages[-1]["content"]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(provider: str, model: str, messages: list[dict[str, str]], params: dict[str, Any], sample: int) -> str:
    payload = {"provider": provider, "model": model, "messages": messages, "params": params, "sample": sample}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def sampling_params(llm: LLMConfig, sample: int) -> dict[str, Any]:
    """What is sent besides model and messages. Each sample gets its own seed (llm.seed +
    sample), so servers that honour seeds give distinct but reproducible samples."""
    return {"temperature": llm.temperature, "seed": llm.seed + sample, "max_tokens": llm.max_tokens}


def plan_requests(llm: LLMConfig, classes: list[ClassInfo], prompts: PromptSet) -> list[LLMRequest]:
    """Every request of the run, in the deterministic order class, template, sample."""
    requests = []
    for info in classes:
        for template in llm.templates:
            messages = build_messages(prompts, template, info)
            for sample in range(llm.samples):
                params = sampling_params(llm, sample)
                requests.append(
                    LLMRequest(
                        class_name=info.name,
                        template=template,
                        sample=sample,
                        messages=messages,
                        params=params,
                        key=cache_key(llm.provider, llm.model, messages, params, sample),
                    )
                )
    return requests
