"""One typed configuration object, built from params.yaml.

params.yaml is the only place a default lives: every field below is required, so a key
missing from params.yaml (or an unknown one) is a clear error rather than a silent
second default. Stage scripts call ``load_config()`` once and hand the sections down.

    cfg = load_config("params.yaml", overrides={"hnf.layers": 4})
    cfg.hnf.layers  # 4
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from multifusion.cli_errors import UserError


class ConfigError(UserError, ValueError):
    """A params.yaml problem; the message names the key and the fix."""


# The allowed values of every choice key. The modules acting on a choice import its tuple
# from here, so adding a choice is one edit, and params.yaml is checked without torch.
ASPECTS = ("crop", "pad")                          # data.aspect
INFOBAR_MODES = ("auto", "none")                   # data.infobar
LLM_PROVIDERS = ("curated", "openai")              # llm.provider
STEMS = ("pyramid", "conv", "linear")              # hnf.stem
SEQUENCE_ENCODERS = ("ode", "transformer", "none")  # hnf.sequence_encoder
SOLVERS = ("rk4", "euler", "dopri5")               # hnf.ode.solver
FUSION_MODES = ("mha", "concat")                   # fusion.mode
BALANCE_MODES = ("loss", "sampler", "none")        # train.balance
DEVICES = ("auto", "cpu", "cuda")                  # train.device, evaluate.device
MAX_HNF_LAYERS = 4


@dataclass(frozen=True)
class SynthesizeConfig:
    total: int
    min_per_class: int
    width: int
    height: int


@dataclass(frozen=True)
class SplitConfig:
    train: float
    val: float
    test: float


@dataclass(frozen=True)
class DataConfig:
    root: str
    image_size: int
    aspect: str
    infobar: str
    split: SplitConfig
    group_pattern: str | None
    near_duplicate_bits: int
    max_pixels: int
    workers: int


@dataclass(frozen=True)
class LLMConfig:
    provider: str
    model: str
    base_url: str | None
    concurrency: int
    samples: int
    temperature: float
    seed: int
    max_tokens: int
    timeout: float
    max_retries: int
    backoff: float
    backoff_max: float
    templates: list[str]
    classes_file: str


@dataclass(frozen=True)
class TextConfig:
    base_model: str | None
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_length: int
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    mask_prob: float
    whole_word_mask: bool
    heldout: float
    threads: int


@dataclass(frozen=True)
class ODEConfig:
    solver: str
    steps: int
    t1: float
    adjoint: bool
    rtol: float
    atol: float


@dataclass(frozen=True)
class HNFConfig:
    layers: int
    dim: int
    patch_sizes: list[int] | None
    heads: int
    stem: str
    sequence_encoder: str
    graph: bool
    dropout: float
    ode: ODEConfig


@dataclass(frozen=True)
class GraphConfig:
    k: int
    cheb_k: int
    layers: int
    lambda_max: float | None


@dataclass(frozen=True)
class FusionConfig:
    text: bool
    mode: str
    heads: int


@dataclass(frozen=True)
class AugmentConfig:
    flips: bool
    rot90: bool
    crop_scale: float
    brightness: float
    contrast: float
    noise: float


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: int
    label_smoothing: float
    balance: str
    patience: int
    compile: bool
    num_workers: int
    device: str
    grad_clip: float
    augment: AugmentConfig


@dataclass(frozen=True)
class EvaluateConfig:
    ece_bins: int
    batch_size: int
    device: str


@dataclass(frozen=True)
class CompareConfig:
    models: list[str]                          # baselines and ablations the comparison trains
    ablations: dict[str, dict[str, Any]]       # ablation name -> dotted params overrides
    robustness: bool


@dataclass(frozen=True)
class PredictConfig:
    top_k: int
    batch_size: int
    uncertain_threshold: float
    contact_sheet: int


@dataclass(frozen=True)
class RobustnessConfig:
    seed: int
    batch_size: int
    gaussian_noise: list[float]
    poisson_noise: list[float]
    defocus_blur: list[float]
    contrast: list[float]
    brightness: list[float]
    jpeg_quality: list[int]
    rotation: list[int]
    zoom_in: list[float]
    zoom_out: list[float]
    info_bar: list[float]


@dataclass(frozen=True)
class Config:
    seed: int
    synthesize: SynthesizeConfig
    data: DataConfig
    llm: LLMConfig
    text: TextConfig
    hnf: HNFConfig
    graph: GraphConfig
    fusion: FusionConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    predict: PredictConfig
    robustness: RobustnessConfig
    compare: CompareConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Validate one scalar/list value against its annotation (ints accepted as floats)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"params.yaml: '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"params.yaml: '{key}' must be true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"params.yaml: '{key}' must be an integer, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"params.yaml: '{key}' must be a {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, recursing into nested sections."""
    where = prefix or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: '{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        keys = ", ".join(f"'{prefix + '.' if prefix else ''}{k}'" for k in unknown)
        raise ConfigError(f"params.yaml: unknown key {keys}; remove it or check its spelling")
    values = {}
    for name in sorted(names):
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            raise ConfigError(f"params.yaml: missing key '{key}'; add it (see the repository's params.yaml)")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], key)
        else:
            values[name] = _check_type(raw[name], hint, key)
    return cls(**values)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``{"hnf.layers": 4}``) on a nested params mapping, in place."""
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override '{dotted}': '{part}' is not a section of params.yaml")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"override '{dotted}': no such key in params.yaml")
        node[leaf] = value
    return raw


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate the Config of a params mapping (params.yaml, a model's config.json)."""
    return validate(_build(Config, raw, ""))


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read params.yaml (plus dotted overrides) into a validated :class:`Config`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the project root or pass --params")
    with path.open() as f:
        raw = yaml.safe_load(f) or {}
    return config_from_dict(apply_overrides(raw, overrides or {}))
