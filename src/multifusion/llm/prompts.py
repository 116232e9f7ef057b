"""Zero-shot chain-of-thought prompts: templates, the classes file, and the final marker.

A template is a plain text file ``prompts/templates/<name>.txt`` with named fields in
:class:`string.Template` syntax (``$label``): filling one substitutes text and can never
execute code. Fields: ``class_name`` (the dataset folder), ``label`` and ``hint`` (from
the classes file), ``context`` (a "Context: <hint>" line, empty without a hint) and
``marker``. Every template asks the model to reason step by step and then to write
:data:`MARKER` followed by the final description, which :func:`extract_description` cuts out.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

from multifusion.core.config import read_yaml

MARKER = "FINAL DESCRIPTION:"
TEMPLATES_DIR = "templates"
SYSTEM_FILE = "system.txt"
FIELDS = frozenset({"class_name", "label", "hint", "context", "marker"})


class PromptError(ValueError):
    """A problem with a template or the classes file; the message names the file and the fix."""


@dataclass(frozen=True)
class ClassInfo:
    """The words a prompt uses for one dataset class."""

    name: str   # dataset folder name, e.g. "MEMS_devices_and_electrodes"
    label: str  # human-readable, e.g. "MEMS devices and electrodes"
    hint: str   # optional context, "" when none


@dataclass(frozen=True)
class PromptSet:
    """The system prompt and the templates by name, as read from ``prompts/``."""

    system: str
    templates: dict[str, string.Template]


def load_classes_file(path: str | Path, class_names: list[str]) -> list[ClassInfo]:
    """ClassInfo for each of ``class_names``, in order; a class missing from the file gets
    its folder name with underscores as spaces and no hint."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{path}: classes file not found; create it or set llm.classes_file in params.yaml")
    raw = read_yaml(path, PromptError) or {}
    if not isinstance(raw, dict):
        raise PromptError(f"{path}: must map folder names to {{label, hint}}; see prompts/classes.yaml")
    infos = []
    for name in class_names:
        entry = raw.get(name) or {}
        if not isinstance(entry, dict) or not isinstance(entry.get("label", ""), str):
            raise PromptError(f"{path}: entry '{name}' must be a mapping with a 'label' string")
        label = entry.get("label") or name.replace("_", " ")
        infos.append(ClassInfo(name=name, label=label.strip(), hint=str(entry.get("hint") or "").strip()))
    return infos


def load_prompt_set(prompts_dir: str | Path, template_names: list[str]) -> PromptSet:
    """Read ``system.txt`` and ``templates/<name>.txt`` for each requested template."""
    prompts_dir = Path(prompts_dir)
    system_path = prompts_dir / SYSTEM_FILE
    if not system_path.is_file():
        raise PromptError(f"{system_path}: system prompt not found; restore it from the repository")
    templates = {}
    for name in template_names:
        path = prompts_dir / TEMPLATES_DIR / f"{name}.txt"
        if not path.is_file():
            available = sorted(p.stem for p in (prompts_dir / TEMPLATES_DIR).glob("*.txt"))
            raise PromptError(f"{path}: no template '{name}'; llm.templates may name only {available}")
        template = string.Template(path.read_text())
        unknown = set(template.get_identifiers()) - FIELDS
        if unknown or not template.is_valid():
            raise PromptError(
                f"{path}: unknown or malformed fields {sorted(unknown)}; use only "
                f"{sorted('$' + f for f in FIELDS)} (write $$ for a literal $)"
            )
        if "$marker" not in template.template and "${marker}" not in template.template:
            raise PromptError(f"{path}: the template must ask for '$marker' before the final description")
        templates[name] = template
    return PromptSet(system=system_path.read_text().strip(), templates=templates)


def render(template: string.Template, info: ClassInfo) -> str:
    """The user prompt for one class: substitution only, never evaluation."""
    context = f"Context: {info.hint}." if info.hint else ""
    text = template.substitute(
        class_name=info.name, label=info.label, hint=info.hint, context=context, marker=MARKER
    )
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def build_messages(prompts: PromptSet, template_name: str, info: ClassInfo) -> list[dict[str, str]]:
    """Chat messages for one class x template: the system prompt, then the user prompt."""
    return [
        {"role": "system", "content": prompts.system},
        {"role": "user", "content": render(prompts.templates[template_name], info)},
    ]


def extract_description(response: str) -> str:
    """The text after the last :data:`MARKER` (case-insensitive, markdown emphasis removed);
    the whole response when the model left the marker out."""
    matches = list(re.finditer(r"FINAL\s+DESCRIPTION\s*\**\s*:\s*\**", response, re.IGNORECASE))
    text = response[matches[-1].end():] if matches else response
    return text.strip().strip("*").strip()
