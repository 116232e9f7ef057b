"""requirements/*.lock agree with pyproject.toml: every runtime and dev requirement is pinned at
a version its range admits, every pin is `==` with sha256 hashes, and the reproducibility pins
of requirements/constraints.txt hold. Offline and fast (parses files only). When it fails after a
pyproject.toml change: `make lock` (see docs/reproducibility-install.md)."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ["requirements/cpu.lock", "requirements/cuda.lock"]
# The platform every lock is resolved for (Makefile: --python-version 3.11
# --python-platform x86_64-manylinux_2_28); pyproject's markers are evaluated against it.
TARGET = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# The CPU wheel of torch 2.13.0 for CPython 3.11 on Linux x86-64, as PyTorch's CPU index
# (https://download.pytorch.org/whl/cpu) serves it; this workplace's /opt/wheels holds the same file.
TORCH_CPU_WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
TORCH_CPU_SHA256 = "6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b"


def parse_lock(text: str) -> dict[str, tuple[str, str, list[str]]]:
    """{canonical name: (pin line, version, sha256 hashes)} of a `--generate-hashes` lock."""
    entries: dict[str, tuple[str, str, list[str]]] = {}
    logical = re.sub(r"\\\n", " ", text)  # join backslash continuations
    for line in logical.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        spec, *options = line.split(" --")
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        pins = [s for s in req.specifier if s.operator in ("==", "===")]
        version = pins[0].version if len(pins) == 1 and len(req.specifier) == 1 else ""
        hashes = [o.split(":", 1)[1] for o in options if o.startswith("hash=sha256:")]
        assert name not in entries, f"{name} is pinned twice in the lock"
        entries[name] = (spec.strip(), version, hashes)
    return entries


def project_requirements(pyproject: dict) -> list[tuple[str, Requirement]]:
    """(where, requirement) for the runtime dependencies and the dev extra."""
    project = pyproject["project"]
    out = [("dependencies", Requirement(r)) for r in project.get("dependencies", [])]
    out += [("optional-dependencies.dev", Requirement(r)) for r in project.get("optional-dependencies", {}).get("dev", [])]
    return out


def problems(pyproject: dict, lock_text: str, lock_name: str = "the lock") -> list[str]:
    """What is wrong between pyproject.toml and one lock; [] when they agree."""
    found: list[str] = []
    entries = parse_lock(lock_text)
    for name, (spec, version, hashes) in sorted(entries.items()):
        if not version:
            found.append(f"{lock_name}: {spec!r} is not pinned with ==")
        if not hashes:
            found.append(f"{lock_name}: {name}=={version} has no --hash=sha256: (lock made without --generate-hashes?)")
    for where, req in project_requirements(pyproject):
        extra = "dev" if where.endswith("dev") else ""
        if req.marker is not None and not req.marker.evaluate({**TARGET, "extra": extra}):
            continue  # not needed on the locked platform
        name = canonicalize_name(req.name)
        if name not in entries:
            found.append(
                f"{name}: pyproject.toml {where} requires {str(req)!r}, but {lock_name} does not pin it; run `make lock`"
            )
            continue
        version = entries[name][1]
        if version and not req.specifier.contains(Version(version), prereleases=True):
            found.append(
                f"{name}: {lock_name} pins {version}, outside pyproject.toml's {str(req)!r} ({where}); run `make lock`"
            )
    return found


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("lock", LOCKS)
def test_the_lock_pins_every_requirement_of_pyproject_with_hashes(lock):
    assert problems(_pyproject(), (ROOT / lock).read_text(), lock) == []


@pytest.mark.parametrize("lock", LOCKS)
def test_the_lock_holds_the_versions_the_committed_dvc_lock_was_made_with(lock):
    entries = parse_lock((ROOT / lock).read_text())
    constraints = (ROOT / "requirements/constraints.txt").read_text()
    pins = [Requirement(line.split("#")[0]) for line in constraints.splitlines() if line.split("#")[0].strip()]
    assert {canonicalize_name(p.name) for p in pins} >= {"transformers", "tokenizers", "sentence-transformers"}
    for pin in pins:
        name = canonicalize_name(pin.name)
        assert name in entries and pin.specifier.contains(entries[name][1], prereleases=True), (
            f"{lock} has {name} {entries.get(name, ('', 'missing'))[1]}, requirements/constraints.txt says {pin}"
        )


def test_the_cpu_lock_takes_the_cpu_build_of_torch_and_the_cuda_lock_does_not():
    cpu = parse_lock((ROOT / "requirements/cpu.lock").read_text())["torch"]
    assert cpu[1] == "2.13.0+cpu" and cpu[2] == [TORCH_CPU_SHA256]
    cuda = parse_lock((ROOT / "requirements/cuda.lock").read_text())["torch"]
    assert Version(cuda[1]).local is None and TORCH_CPU_SHA256 not in cuda[2]


def test_the_cpu_torch_hash_is_the_wheel_on_this_disk():
    wheel = Path("/opt/wheels") / TORCH_CPU_WHEEL
    if not wheel.is_file():
        pytest.skip(f"{wheel} not on this machine")
    digest = hashlib.sha256()
    with wheel.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == TORCH_CPU_SHA256


def test_a_dependency_missing_from_the_lock_fails_naming_it():
    pyproject = _pyproject()
    pyproject["project"]["dependencies"] = [*pyproject["project"]["dependencies"], "Some_New.Package>=1.0"]
    pyproject["project"]["optional-dependencies"]["dev"] = [
        *pyproject["project"]["optional-dependencies"]["dev"],
        "transformers>=99",  # a range the pin falls outside of
        "pywin32>=300; sys_platform == 'win32'",  # not needed on the locked platform
    ]
    found = problems(pyproject, (ROOT / "requirements/cpu.lock").read_text(), "requirements/cpu.lock")
    assert len(found) == 2, found
    assert "some-new-package" in found[0] and "does not pin it" in found[0]
    assert found[1].startswith("transformers: requirements/cpu.lock pins 5.24.0, outside")


def test_a_pin_without_a_hash_is_reported():
    lock = "torch==2.13.0+cpu \\\n    --hash=sha256:" + TORCH_CPU_SHA256 + "\n    # via x\nnumpy==2.4.6\n"
    assert problems({"project": {"dependencies": ["torch>=2.2", "numpy>=2"]}}, lock) == [
        "the lock: numpy==2.4.6 has no --hash=sha256: (lock made without --generate-hashes?)"
    ]
