"""One typed configuration object, built from params.yaml.

params.yaml is the only place a default lives: every field below is required, so a key
missing from params.yaml (or an unknown one) is a clear error rather than a silent
second default. Stage scripts call ``load_config()`` once and hand the sections down.

    cfg = load_config("params.yaml", overrides={"hnf.layers": 4})
    cfg.hnf.layers  # 4
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from multifusion.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A params.yaml problem; the message names the key and the fix."""


# The allowed values of every choice key. The modules acting on a choice import its tuple
# from here, so adding a choice is one edit, and params.yaml is checked without torch.
ASPECTS = ("crop", "pad")                          # data.aspect
INFOBAR_MODES = ("auto", "none")                   # data.infobar
GREY_LEVELS = ("standardize", "raw")               # data.grey_levels
RENAMED_KEYS = {  # keys of earlier versions -> what replaced them (named in the error)
    "predict.single_view_confidence": "'predict.view_confidence', beside 'predict.first_views' (see the repository's params.yaml)",
}
LLM_PROVIDERS = ("curated", "openai")              # llm.provider
STEMS = ("graph", "pyramid", "conv", "linear")              # hnf.stem
SEQUENCE_ENCODERS = ("ode", "transformer", "none")  # hnf.sequence_encoder
SOLVERS = ("rk4", "euler", "dopri5")               # hnf.ode.solver
FUSION_MODES = ("mha", "concat")                   # fusion.mode
BALANCE_MODES = ("loss", "sampler", "none")        # train.balance
DEVICES = ("auto", "cpu", "cuda")                  # train.device, evaluate.device
PRECISIONS = ("auto", "fp32", "bf16")              # predict.precision
OOD_SCORES = ("knn_spectrum", "knn", "mahalanobis", "energy", "max_softmax")  # ood.score
PRETRAIN_METHODS = ("byol",)                       # pretrain.method
MAX_HNF_LAYERS = 4
FULL_MODEL = "multifusion"                         # compare.models: the full model (default config), every paired test's reference


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
    grey_levels: str
    split: SplitConfig
    group_pattern: str | None
    near_duplicate_bits: int
    max_pixels: int
    workers: int
    unlabeled: str | None                      # a folder of unlabelled micrographs for pretrain_image (null: none)


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
    head_steps: int
    head_lr: float
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
    stem_width: int
    stem_depth: int
    global_token: bool
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
    info_bar: float  # probability per image of a burnt-in instrument bar (``burn_info_bars``)


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
class PretrainConfig:
    """``pretrain:``: self-supervised pretraining of the image trunk (stage pretrain_image)."""

    enabled: bool                              # false: the stage writes a marker and train starts from random init
    method: str                                # one of PRETRAIN_METHODS
    epochs: int
    batch_size: int
    lr: float                                  # AdamW peak lr (warmup then cosine)
    weight_decay: float
    warmup_epochs: int
    momentum: float                            # BYOL: the target network's EMA momentum at step 0 (cosine to 1)
    projection_dim: int                        # projector / predictor output width
    hidden_dim: int                            # projector / predictor hidden width
    shift: int                                 # random shift in pixels (reflect-pad + crop at the stored resolution)
    noise: float                               # Gaussian noise std on [0, 1] pixels


@dataclass(frozen=True)
class EvaluateConfig:
    ece_bins: int
    batch_size: int
    device: str
    tta: bool


@dataclass(frozen=True)
class CompareConfig:
    set: str                                   # reports/<set>/: the name of the data set compared
    models: list[str]                          # baselines and ablations the comparison trains
    ablations: dict[str, dict[str, Any]]       # ablation name -> dotted params overrides
    recipes: dict[str, dict[str, Any]]         # model name -> dotted train.* overrides (its optimiser recipe)
    robustness: bool
    seeds: list[int]                           # training seeds crossed with every model (the comparison's matrix)
    labels_per_class: list[int]                # low-label runs: k labelled groups per class, crossed with models and seeds ([]: none)
    label_draw: int                            # seed of the low-label draw (the same labels for every model and training seed)


@dataclass(frozen=True)
class PredictConfig:
    top_k: int
    batch_size: int
    uncertain_threshold: float
    contact_sheet: int
    first_views: int                           # adaptive views: views every image takes first (identity, 180-degree turn, ...); 8 = all
    view_confidence: float                     # the first views stand above this calibrated top-1 prob; else all 8; 1 = always 8
    precision: str                             # the screening forward pass: auto (bf16 where the device has it natively) | fp32 | bf16
    drift_p: float                             # screening page: warn when the batch's unknown count has a binomial p below this


@dataclass(frozen=True)
class OodConfig:
    score: str                                 # the unknown-material score fitted at the end of train
    keep_rate: float                           # share of val (in-distribution) images the threshold keeps as known
    knn_k: int                                 # knn: the neighbour whose distance is the score
    target_accuracies: list[float]             # evaluate: coverage reported at each of these accuracies


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
    pretrain: PretrainConfig
    evaluate: EvaluateConfig
    predict: PredictConfig
    ood: OodConfig
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
        keys = [f"{prefix + '.' if prefix else ''}{k}" for k in unknown]
        renamed = [f"'{k}' is now {RENAMED_KEYS[k]}" for k in keys if k in RENAMED_KEYS]
        raise ConfigError(f"params.yaml: unknown key {', '.join(repr(k) for k in keys)}; "
                          + ("; ".join(renamed) if renamed else "remove it or check its spelling"))
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


# ---------------------------------------------------------------------------------------
# Validation: every choice and range, checked once when params.yaml is loaded, before any
# stage does work. One row per key; a row's check applies to every item of a list value.


@dataclass(frozen=True)
class Check:
    test: Callable[[Any], bool]
    allowed: str            # what the message offers instead
    bad: Any                # a value the check refuses (the tests try every row with it)
    whole_list: bool = False  # True: tests a list value itself; False: each item of a list value


def one_of(choices: tuple[str, ...]) -> Check:
    return Check(lambda v: v in choices, "one of " + ", ".join(choices), "foo")


def at_least(low: int | float) -> Check:
    return Check(lambda v: v >= low, f">= {low}", low - 1)


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Check:
    def test(v: float) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    kind = "an integer" if isinstance(low, int) and isinstance(high, int) else "a number"
    return Check(test, f"{kind} in {bounds}", low if low_open else high + 1)


def optional(check: Check) -> Check:
    return Check(lambda v: v is None or check.test(v), f"null or {check.allowed}", check.bad, check.whole_list)


NON_EMPTY = Check(lambda v: len(v) > 0, "a non-empty list", [], whole_list=True)
MULTIPLE_OF_90 = Check(lambda v: v % 90 == 0, "a multiple of 90", 45)
POSITIVE = in_range(0, float("inf"), low_open=True, high_open=True)
FRACTION = in_range(0.0, 1.0)

RULES: dict[str, Check] = {
    "seed": at_least(0),
    "synthesize.total": at_least(1), "synthesize.min_per_class": at_least(1),
    "synthesize.width": at_least(8), "synthesize.height": at_least(8),
    "data.image_size": at_least(8), "data.aspect": one_of(ASPECTS), "data.infobar": one_of(INFOBAR_MODES),
    "data.grey_levels": one_of(GREY_LEVELS),
    "data.split.train": in_range(0.0, 1.0, low_open=True), "data.split.val": FRACTION, "data.split.test": FRACTION,
    "data.near_duplicate_bits": in_range(0, 64), "data.max_pixels": at_least(1), "data.workers": at_least(0),
    "llm.provider": one_of(LLM_PROVIDERS), "llm.concurrency": at_least(1), "llm.samples": at_least(1),
    "llm.temperature": in_range(0.0, 2.0), "llm.max_tokens": at_least(1), "llm.timeout": POSITIVE,
    "llm.max_retries": at_least(0), "llm.backoff": at_least(0), "llm.backoff_max": at_least(0),
    "llm.templates": NON_EMPTY,
    "text.vocab_size": at_least(1), "text.hidden": at_least(1), "text.layers": at_least(1), "text.heads": at_least(1),
    "text.intermediate": at_least(1), "text.max_length": at_least(8), "text.steps": at_least(1),
    "text.head_steps": at_least(0), "text.head_lr": POSITIVE,
    "text.batch_size": at_least(1), "text.lr": POSITIVE, "text.weight_decay": at_least(0),
    "text.warmup_steps": at_least(0), "text.grad_clip": at_least(0), "text.mask_prob": in_range(0.0, 1.0, True, True),
    "text.heldout": in_range(0.0, 1.0, True, True), "text.threads": at_least(0),
    "hnf.layers": in_range(1, MAX_HNF_LAYERS), "hnf.dim": at_least(1), "hnf.heads": at_least(1),
    "hnf.patch_sizes": optional(NON_EMPTY), "hnf.stem": one_of(STEMS), "hnf.stem_width": at_least(8), "hnf.stem_depth": at_least(1), "hnf.sequence_encoder": one_of(SEQUENCE_ENCODERS),
    "hnf.dropout": in_range(0.0, 1.0, high_open=True),
    "hnf.ode.solver": one_of(SOLVERS), "hnf.ode.steps": at_least(1), "hnf.ode.t1": POSITIVE,
    "hnf.ode.rtol": POSITIVE, "hnf.ode.atol": POSITIVE,
    "graph.k": at_least(1), "graph.cheb_k": at_least(1), "graph.layers": at_least(1), "graph.lambda_max": optional(POSITIVE),
    "fusion.mode": one_of(FUSION_MODES), "fusion.heads": at_least(1),
    "train.epochs": at_least(1), "train.batch_size": at_least(1), "train.lr": at_least(0),  # 0: weights frozen
    "train.weight_decay": at_least(0), "train.warmup_epochs": at_least(0),
    "train.label_smoothing": in_range(0.0, 1.0, high_open=True), "train.balance": one_of(BALANCE_MODES),
    "train.patience": at_least(0), "train.num_workers": at_least(0), "train.device": one_of(DEVICES),
    "train.grad_clip": at_least(0), "train.augment.crop_scale": in_range(0.0, 1.0, low_open=True),
    "train.augment.brightness": at_least(0), "train.augment.contrast": at_least(0), "train.augment.noise": at_least(0),
    "train.augment.info_bar": in_range(0.0, 1.0),
    "pretrain.method": one_of(PRETRAIN_METHODS), "pretrain.epochs": at_least(1), "pretrain.batch_size": at_least(2),
    "pretrain.lr": POSITIVE, "pretrain.weight_decay": at_least(0), "pretrain.warmup_epochs": at_least(0),
    "pretrain.momentum": in_range(0.0, 1.0), "pretrain.projection_dim": at_least(1), "pretrain.hidden_dim": at_least(1),
    "pretrain.shift": at_least(0), "pretrain.noise": at_least(0),
    "evaluate.ece_bins": at_least(1), "evaluate.batch_size": at_least(1), "evaluate.device": one_of(DEVICES),
    "predict.top_k": at_least(1), "predict.batch_size": at_least(1), "predict.uncertain_threshold": FRACTION,
    "predict.contact_sheet": at_least(0), "predict.first_views": in_range(1, 8),
    "predict.view_confidence": in_range(0.0, 1.0, low_open=True), "predict.precision": one_of(PRECISIONS),
    "ood.score": one_of(OOD_SCORES), "ood.keep_rate": in_range(0.0, 1.0, low_open=True), "ood.knn_k": at_least(1),
    "predict.drift_p": in_range(0.0, 1.0, True, True), "ood.target_accuracies": in_range(0.0, 1.0, True),
    "robustness.seed": at_least(0), "robustness.batch_size": at_least(1),
    "robustness.gaussian_noise": at_least(0), "robustness.poisson_noise": POSITIVE,
    "robustness.defocus_blur": at_least(0), "robustness.contrast": at_least(0),
    "robustness.jpeg_quality": in_range(1, 100), "robustness.rotation": MULTIPLE_OF_90,
    "robustness.zoom_in": at_least(1.0), "robustness.zoom_out": in_range(0.0, 1.0, low_open=True),
    "robustness.info_bar": in_range(0.0, 1.0, high_open=True),
    "compare.models": NON_EMPTY,
    "compare.labels_per_class": Check(lambda v: len(set(v)) == len(v) and all(k >= 1 for k in v),
                                      "a list of distinct k >= 1, e.g. [10, 25], or [] for none", [0], whole_list=True),
    "compare.label_draw": at_least(0),
    "compare.seeds": Check(lambda v: len(v) > 0 and len(set(v)) == len(v) and all(s >= 0 for s in v),
                           "a non-empty list of distinct seeds >= 0, e.g. [42, 43, 44] or [42]", [42, 42], whole_list=True),
}


def lookup(cfg: Config, dotted: str) -> Any:
    """``lookup(cfg, "hnf.ode.solver")`` -> cfg.hnf.ode.solver."""
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _rule_problem(key: str, value: Any, check: Check) -> str | None:
    each = isinstance(value, list) and not check.whole_list
    if all(check.test(v) for v in (value if each else [value])):
        return None
    return f"{key} is {value!r}; allowed: {'a list of values each ' if each else ''}{check.allowed}"


def _cross_problems(cfg: Config) -> list[str]:
    """Checks that tie keys together: split shares, attention heads, the patch grid, the regex."""
    from multifusion.core.patch_grid import derive_patch_sizes

    problems = []
    split = cfg.data.split
    if abs(split.train + split.val + split.test - 1.0) > 1e-6:
        problems.append(f"data.split train {split.train} + val {split.val} + test {split.test} = "
                        f"{split.train + split.val + split.test:g}; the three shares must sum to 1")
    for dim_key, heads_key in (("hnf.dim", "hnf.heads"), ("hnf.dim", "fusion.heads"), ("text.hidden", "text.heads")):
        dim, heads = lookup(cfg, dim_key), lookup(cfg, heads_key)
        if heads >= 1 and dim % heads:
            problems.append(f"{dim_key} = {dim} is not divisible by {heads_key} = {heads}; change one of them")
    if 1 <= cfg.hnf.layers <= MAX_HNF_LAYERS and cfg.data.image_size >= 1:
        try:
            derive_patch_sizes(cfg.data.image_size, cfg.hnf.layers, cfg.hnf.patch_sizes, cfg.hnf.stem)
        except ValueError as err:
            problems.append(str(err))
    if cfg.pretrain.enabled and cfg.hnf.stem == "linear":
        problems.append("pretrain.enabled is true but hnf.stem linear has no trunk to pretrain; "
                        "set hnf.stem to graph, pyramid or conv, or pretrain.enabled: false")
    if cfg.pretrain.enabled and cfg.pretrain.shift * 2 >= cfg.data.image_size >= 1:
        problems.append(f"pretrain.shift {cfg.pretrain.shift} must be under half of data.image_size {cfg.data.image_size}")
    if cfg.data.group_pattern is not None:
        try:
            re.compile(cfg.data.group_pattern)
        except re.error as err:
            problems.append(f"data.group_pattern {cfg.data.group_pattern!r} is not a valid regular expression ({err})")
    return problems


def validate(cfg: Config) -> Config:
    """``cfg`` if every choice and range holds, else ConfigError naming every bad key, its
    value and what is allowed (all problems in one line)."""
    problems = [p for key, check in RULES.items() if (p := _rule_problem(key, lookup(cfg, key), check))]
    problems += _cross_problems(cfg)
    if problems:
        raise ConfigError("params.yaml: " + "; ".join(problems))
    return cfg


def section_from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """One typed section (e.g. ``HNFConfig``) from its mapping, checked like params.yaml's
    (every key present, none unknown, types right): how a model card's arguments come back."""
    return _build(cls, raw, prefix)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate the Config of a params mapping (params.yaml, a model's config.json)."""
    return validate(_build(Config, raw, ""))


def yaml_problem(path: str | Path, err: yaml.YAMLError) -> str:
    """``<path>:<line>:<column>: <what is wrong>`` for a YAML syntax error (1-based, as editors
    count), on one line, with the fix: what a user needs to find the mistake."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(err, "problem", None) or type(err).__name__
    context, begun = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and begun is not None and begun is not mark:
        context += f" begun at line {begun.line + 1}, column {begun.column + 1}"
    return f"{where}: invalid YAML: {problem}{f' ({context})' if context else ''}; fix the syntax there"


def read_yaml(path: str | Path, error: type[Exception] = ConfigError) -> Any:
    """The parsed YAML document in ``path``; a syntax error raises ``error`` with one line
    naming the file, line and column (:func:`yaml_problem`). Used for params.yaml and every
    YAML file a user edits (prompts/curated/*.yaml, prompts/classes.yaml)."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise error(yaml_problem(path, err)) from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The raw params mapping of ``path`` (not yet checked against :class:`Config`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the project root or pass --params")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections (seed, data, train, ...), got {type(raw).__name__}")
    return raw


# The params file this process loaded last, with the digest of its values then (see
# check_params_unchanged). One file: a stage reads one params.yaml, once, at its start; a
# later load (a notebook that edits params.yaml and loads it again) is the new reference.
_LOADED: dict[Path, str] = {}


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read params.yaml (plus dotted overrides) into a validated :class:`Config`. The file's
    values are remembered, for :func:`check_params_unchanged`."""
    raw = read_params(path)
    _LOADED.clear()
    _LOADED[Path(path).resolve()] = digest_params(raw)
    return config_from_dict(apply_overrides(raw, overrides or {}))


def digest_params(raw: dict[str, Any]) -> str:
    """sha256 of a parsed params mapping (so comments and layout do not count)."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def check_params_unchanged(stage: str) -> None:
    """Raise ConfigError when the params file this process loaded now holds other values.

    DVC runs one ``dvc exp run`` per workspace, but a second one started meanwhile
    rewrites params.yaml with its ``-S`` values before it finds the workspace busy, and DVC
    would then record those values in dvc.lock for a stage that ran with the old ones. A
    long stage (the trainer: after every epoch and before it saves) calls this and stops
    with one line instead."""
    for path, digest in _LOADED.items():
        try:
            now = digest_params(read_params(path))
        except ConfigError:
            now = None
        if now != digest:
            raise ConfigError(
                f"{path.name} changed while {stage} was running (a second `dvc exp run -S ...`, or an edit); "
                f"{stage} stops rather than let DVC record params it did not run with. Restore {path.name} "
                "and rerun; DVC runs one `dvc exp run` at a time per workspace: queue several with "
                "`dvc exp run --queue -S ...` then `dvc queue start`"
            )
