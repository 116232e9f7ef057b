"""The ``label`` fallback: descriptions built from a class's label, for classes that have
no curated text while no LLM is configured (``llm.provider: curated``).

The image side of MultiFusion needs no text, so a folder of one's own classes must train
without an API key. Each fallback description says only what is known: the class label
and hint from ``prompts/classes.yaml`` (or the folder name), and the topic of the
template it stands in for. It invents no facts. Rows built this way say
``provider=label``, ``model=label``; ``metrics/llm.json`` lists their classes, and the
describe step warns once how to get real descriptions.
"""

from __future__ import annotations

from multifusion.llm.prompts import ClassInfo
from multifusion.llm.requests import LLMRequest

PROVIDER = "label"
MODEL = "label"

# What each shipped template asks about, in a few words (an unknown template: its name).
TOPICS = {
    "morphology": "shape, size and surface texture in electron micrographs",
    "synthesis": "how samples are made and prepared for imaging",
    "properties": "physical and chemical properties",
    "applications": "uses and applications",
    "distinguish": "features that tell it apart from look-alike classes",
}


def label_description(info: ClassInfo, template: str) -> str:
    """One or two sentences from the label (and hint) only, e.g.
    ``"Hollow spheres: shape, size and surface texture in electron micrographs of hollow
    spheres. Context: silica shells."``"""
    topic = TOPICS.get(template, template.replace("_", " "))
    head = info.label[:1].upper() + info.label[1:]
    text = f"{head}: {topic} of {info.label}."
    return f"{text} Context: {info.hint.rstrip('.')}." if info.hint else text


def label_answers(requests: list[LLMRequest], infos: dict[str, ClassInfo]) -> dict[str, str]:
    """The label description of every request, by key (samples of one class x template share it)."""
    return {r.key: label_description(infos[r.class_name], r.template) for r in requests}


def fallback_warning(classes: list[str]) -> str:
    """The one line that says which classes fell back and how to get real descriptions."""
    shown = ", ".join(classes[:8]) + (f" and {len(classes) - 8} more" if len(classes) > 8 else "")
    return (
        f"{len(classes)} class(es) have no curated text and no LLM is configured: {shown}; "
        f"their descriptions are built from their labels (provider=label). For real ones: "
        f"`multifusion describe --init prompts/curated/<dataset>.yaml` and fill it in, or "
        f"-S llm.provider=openai -S llm.model=<model> (llm.base_url for a local OpenAI-compatible "
        f"server: Ollama, vLLM, llama.cpp)"
    )
