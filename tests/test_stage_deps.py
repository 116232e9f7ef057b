"""Every stage's deps follow the code: the source files its script imports (the import
closure inside src/, walked with ast) are all deps of the stage, and no source file it does
not import is, so editing a file re-runs exactly the stages that import it (and DVC then
re-runs what lies downstream). Deps may name a package folder where the stage imports every
module under it. Fails naming the stage, the pipeline file and the file to add or drop."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PIPELINES = ("dvc.yaml", "comparison/dvc.yaml", "synthesize/dvc.yaml")
SCRIPT = re.compile(r"\bpython\s+(?:-\S+\s+)*(stages/\w+\.py)")


def module_file(module: str) -> Path | None:
    """The file of ``multifusion.x.y`` under src/ (a package's __init__.py), or None."""
    path = SRC.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def import_nodes(tree: ast.AST):
    """Every import statement of a module at any depth (lazy imports inside functions run
    when called, so they count), except those that never run when the module is imported or
    used by a stage: ``if TYPE_CHECKING:`` blocks and a package's lazy ``__getattr__``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from import_nodes(node)


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the ``multifusion`` modules (and candidate submodules) ``path`` imports."""
    names: set[str] = set()
    for node in import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "multifusion"}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the importing file's package
                package = path.relative_to(SRC).parent.parts
                module = ".".join(package[: len(package) - node.level + 1] + ((module,) if module else ()))
            if module.split(".")[0] == "multifusion":
                names.add(module)
                names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def import_closure(script: Path) -> set[Path]:
    """The src/ files that running ``script`` imports, parent packages' __init__.py included."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            todo += [f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i]))) and f not in seen]
    return {path for path in seen if path.is_relative_to(SRC)}


def stages() -> list[tuple[str, str, Path, list[Path]]]:
    """(pipeline file, stage name, script, deps as paths) of every stage running a stage script."""
    found = []
    for pipeline in PIPELINES:
        spec = yaml.safe_load((ROOT / pipeline).read_text())
        for name, stage in spec["stages"].items():
            wdir = (ROOT / pipeline).parent / stage.get("wdir", ".")
            match = SCRIPT.search(stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"]))
            assert match, f"{pipeline}: stage {name} does not run a stages/*.py script"
            deps = [(wdir / d).resolve() for d in stage.get("deps", []) if isinstance(d, str) and "${" not in d]
            found.append((pipeline, name, (wdir / match.group(1)).resolve(), deps))
    return found


def source_files(dep: Path) -> set[Path]:
    """The .py files under src/ that a dep covers (a file, or every file below a folder)."""
    if not dep.is_relative_to(SRC):
        return set()
    return set(dep.rglob("*.py")) if dep.is_dir() else {dep} if dep.suffix == ".py" else set()


def suggested_deps(closure: set[Path]) -> list[str]:
    """The closure as deps: a package folder where every module below it is imported, else files."""
    folders = sorted({p.parent for p in closure}, key=lambda p: len(p.parts))
    whole = [f for f in folders if set(f.rglob("*.py")) <= closure and f != SRC / "multifusion"]
    out: list[Path] = []
    for folder in whole:
        if not any(folder.is_relative_to(kept) for kept in out):
            out.append(folder)
    out += [p for p in sorted(closure) if not any(p.is_relative_to(f) for f in out)]
    return [str(p.relative_to(ROOT)) for p in out]


@pytest.mark.parametrize("pipeline,name,script,deps", stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_stage_depends_on_exactly_the_source_it_imports(pipeline, name, script, deps):
    assert script in deps, f"{pipeline}: stage {name} does not depend on its own script {script.relative_to(ROOT)}"
    closure = import_closure(script)
    covered = set().union(*(source_files(d) for d in deps))
    missing = sorted(str(p.relative_to(ROOT)) for p in closure - covered)
    extra = sorted(str(p.relative_to(ROOT)) for p in covered - closure)
    hint = "; its source deps should be: " + ", ".join(suggested_deps(closure))
    assert not missing, f"{pipeline}: stage {name} imports {', '.join(missing)} but does not depend on it{hint}"
    assert not extra, f"{pipeline}: stage {name} depends on {', '.join(extra)}, which it never imports (edits would re-run it for nothing){hint}"


def test_the_closure_walk_follows_lazy_and_relative_imports_only(tmp_path, monkeypatch):
    pkg = tmp_path / "src" / "multifusion"
    (pkg / "sub").mkdir(parents=True)
    files = {"__init__.py": "def __getattr__(name):\n    from multifusion import unused\n",
             "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import multifusion.unused\n"
                     "def f():\n    from multifusion.sub import b\n",
             "sub/__init__.py": "", "sub/b.py": "from . import c\n", "sub/c.py": "", "unused.py": ""}
    for name, text in files.items():
        (pkg / name).write_text(text)
    script = tmp_path / "stage.py"
    script.write_text("import multifusion.a\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path / "src")
    got = {str(p.relative_to(tmp_path / "src")) for p in import_closure(script)}
    assert got == {"multifusion/__init__.py", "multifusion/a.py", "multifusion/sub/__init__.py", "multifusion/sub/b.py",
                   "multifusion/sub/c.py"}


def rewrite_deps(pipeline: str) -> bool:
    """Rewrite the src/ deps of every stage of ``pipeline`` to its import closure, in place:
    they replace the stage's src/ lines, or follow its script's line when it has none
    (comments and every other dep kept). Returns whether the file changed."""
    path = ROOT / pipeline
    lines = path.read_text().splitlines(keepends=True)
    wanted = {name: script for p, name, script, _ in stages() if p == pipeline}
    out: list[str] = []
    stage, in_deps, done = None, False, set()
    for line in lines:
        code = line.split("#", 1)[0].rstrip()  # the YAML without its comment
        stripped, indent = code.strip(), len(code) - len(code.lstrip())
        if indent == 2 and stripped.endswith(":") and not stripped.startswith("-"):
            stage, in_deps = stripped[:-1], False
        elif stage and stripped and indent == 4 and not stripped.startswith("-"):
            in_deps = stripped == "deps:"
        is_src = re.match(r"-\s+src/multifusion\b", stripped)
        if stage in wanted and in_deps and (is_src or re.match(r"-\s+stages/\w+\.py$", stripped)):
            if not is_src:
                out.append(line)
            if stage not in done:
                prefix = line[: line.index("-")] + "- "
                out += [f"{prefix}{dep}\n" for dep in suggested_deps(import_closure(wanted[stage]))]
                done.add(stage)
            continue
        out.append(line)
    text = "".join(out)
    changed = text != path.read_text()
    if changed:
        path.write_text(text)
    return changed


if __name__ == "__main__":  # python tests/test_stage_deps.py --write: make every stage's src deps its import closure
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_stage_deps.py --write")
    for pipeline in PIPELINES:
        print(f"{pipeline}: {'rewritten' if rewrite_deps(pipeline) else 'already right'}")
