"""The pretrained image trunk (``models/image_trunk/``): the HNF patch embedding's stem
(``model.embed.stem``: the graph, pyramid or conv trunk) as stage ``pretrain_image`` leaves it.

    trunk.safetensors   the stem's state dict (keys as in ``model.embed.stem``)
    trunk.json          the card: {"enabled": true, "method", "epochs", "architecture": trunk_args(...),
                        "images": {"count", "train", "unlabeled", "sha256": [...]}, "excluded": [...], "loss": ...}

With ``pretrain.enabled: false`` the folder holds only ``trunk.json`` = ``{"enabled": false}``
(a fixed marker: the default pipeline downstream stays byte-identical). ``train`` calls
:func:`start_from_trunk`, which loads the stem's tensors when ``pretrain.enabled``; a trunk
pretrained for another ``hnf.*`` / ``data.image_size`` is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from multifusion.core.atomic import atomic_path
from multifusion.core.config import Config
from multifusion.core.errors import UserError
from multifusion.core.json_files import write_json
from multifusion.core.patch_grid import derive_patch_sizes

WEIGHTS = "trunk.safetensors"
CARD = "trunk.json"
DISABLED = {"enabled": False}
REPRETRAIN = "re-run `dvc repro pretrain_image` (it pretrains for the current hnf.* and data.image_size) or set pretrain.enabled: false"


class TrunkError(UserError, ValueError):
    """models/image_trunk cannot start this model; the message names the fix."""


def trunk_args(cfg: Config) -> dict[str, Any]:
    """What fixes the stem's architecture (the card's ``architecture``): every argument
    ``HierarchicalPatchEmbed`` passes its stem."""
    hnf, size = cfg.hnf, cfg.data.image_size
    return {"stem": hnf.stem, "image_size": size, "patch_sizes": derive_patch_sizes(size, hnf.layers, hnf.patch_sizes, hnf.stem),
            "dim": hnf.dim, "stem_width": hnf.stem_width, "stem_depth": hnf.stem_depth}


def write_disabled(out_dir: str | Path) -> None:
    """The marker of a disabled stage: ``trunk.json`` = {"enabled": false}, no weights."""
    out_dir = Path(out_dir)
    (out_dir / WEIGHTS).unlink(missing_ok=True)
    write_json(out_dir / CARD, DISABLED)


def save_trunk(out_dir: str | Path, stem: nn.Module, card: dict[str, Any]) -> None:
    """Write the stem's weights and its card (``enabled`` set to true) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in stem.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(out_dir / CARD, {"enabled": True, **card})


def read_card(trunk_dir: str | Path) -> dict[str, Any]:
    """The trunk's card; TrunkError when the folder holds none."""
    path = Path(trunk_dir) / CARD
    if not path.is_file():
        raise TrunkError(f"{path}: missing; run `dvc repro pretrain_image` or set pretrain.enabled: false")
    return json.loads(path.read_text())


def load_trunk(model: nn.Module, trunk_dir: str | Path, cfg: Config) -> dict[str, Any]:
    """Copy the pretrained stem's tensors into ``model.embed.stem`` (strict); returns the card.
    TrunkError (one line) when the trunk is missing, disabled or for another architecture."""
    card = read_card(trunk_dir)
    if not card.get("enabled"):
        raise TrunkError(f"{trunk_dir}: pretrain.enabled is true but the trunk there was not pretrained (its stage ran "
                         f"disabled); {REPRETRAIN}")
    want = trunk_args(cfg)
    have = card.get("architecture", {})
    differ = [f"{k} {have.get(k)!r} vs {v!r}" for k, v in want.items() if have.get(k) != v]
    if differ:
        raise TrunkError(f"{trunk_dir}: the trunk was pretrained for another architecture than params.yaml's "
                         f"({', '.join(differ)}; trunk vs params); {REPRETRAIN}")
    stem = getattr(getattr(model, "embed", None), "stem", None)
    if stem is None:
        raise TrunkError(f"{trunk_dir}: this model has no trunk to load (hnf.stem linear); set pretrain.enabled: false")
    state = load_file(str(Path(trunk_dir) / WEIGHTS))
    try:
        stem.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TrunkError(f"{trunk_dir}: its weights do not fit the stem ({str(err).splitlines()[0]}); {REPRETRAIN}") from None
    return card


def start_from_trunk(model: nn.Module, cfg: Config, trunk_dir: str | Path) -> nn.Module:
    """``model`` with the pretrained stem loaded when ``cfg.pretrain.enabled``, untouched otherwise."""
    if cfg.pretrain.enabled:
        card = load_trunk(model, trunk_dir, cfg)
        print(f"train: trunk from {trunk_dir} ({card['method']}, {card['epochs']} epochs, {card['images']['count']} images)")
    return model


def stem_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stem's tensors of a MultiFusion model (what the trunk file holds)."""
    return model.embed.stem.state_dict()
