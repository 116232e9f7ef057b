"""Why the model made its call: where on the micrograph (Grad-CAM) and which class
descriptions the image attended to (the cross-modal attention).

    maps = explain_batch(model, images_u8, targets, device="cpu")   # Explanations for a batch
    rgb = overlay(image_u8, maps.heat[i])                            # (H, W, 3) uint8

Grad-CAM (Selvaraju et al., ICCV 2017): with A (B, K, h, w) the output of the model's
last convolutional feature map and y_c the target logit, the channel weights are
alpha_k = mean_{h,w} dy_c/dA_k and the map is ReLU(sum_k alpha_k A_k), bilinearly
upsampled to the image and scaled to [0, 1] per image. For a model whose logits are a
linear layer on the global average of A, this equals the class activation map
ReLU(sum_k W_ck A_k) / (h w) (Zhou et al., CVPR 2016): the identity the tests check.

The feature map comes from ``model.cam_layer`` (MultiFusion names its stem's output
there), else the last ``nn.Conv2d`` (the baselines); a model with neither gets the
gradient x input saliency of the image. ``model.description_attention(x)`` gives (B, T)
attention over the T stored descriptions (None without cross-modal attention); the
saved model's config.json names the class and template of each.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from multifusion.checkpoint import CONFIG
from multifusion.data.dataset import to_model_input

OVERLAY_ALPHA = 0.55  # colour weight where the map is 1 (the micrograph shows through below)


@dataclass
class Explanations:
    heat: np.ndarray                          # (B, S, S) float32 in [0, 1]: where the call came from
    attention: np.ndarray | None              # (B, T) float32, rows sum to 1; None without text attention
    method: str                               # "grad-cam" | "input-gradient"


def cam_target_layer(model: nn.Module) -> nn.Module | None:
    """``model.cam_layer``, else the last ``nn.Conv2d`` in the model, else None."""
    try:
        layer = getattr(model, "cam_layer", None)
    except (AttributeError, NotImplementedError):  # a property that does not apply to this variant
        layer = None
    if isinstance(layer, nn.Module):
        return layer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """(B, S, S) >= 0 -> each map divided by its maximum (an all-zero map stays zero)."""
    peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12)  # (B,)
    return maps / peak[:, None, None]


def grad_cam(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """x (B, 1, S, S), targets (B,) class indices -> (B, S, S) Grad-CAM in [0, 1]."""
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        captured.append(output)

    handle = layer.register_forward_hook(keep)
    try:
        logits = model(x)  # (B, C)
    finally:
        handle.remove()
    if not captured or captured[-1].ndim != 4:
        raise ValueError(f"{type(layer).__name__}: Grad-CAM needs a (B, C, h, w) feature map from the target layer")
    features = captured[-1]  # (B, K, h, w)
    # gradients of the target logits w.r.t. the feature map only: nothing below it, no parameter grads
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), features)  # (B, K, h, w)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (B, S, S)
    return _normalise(cam.detach())


def input_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """|d y_c / d x * x|, smoothed by a 5 x 5 box: (B, S, S) in [0, 1], for models without convolutions."""
    logits = model(x)  # (B, C)
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    saliency = (grad * x).abs()  # (B, 1, S, S)
    saliency = F.avg_pool2d(saliency, 5, stride=1, padding=2, count_include_pad=False)[:, 0]
    return _normalise(saliency.detach())


def explain_batch(
    model: nn.Module, images_u8: np.ndarray, targets: np.ndarray, device: str | torch.device = "cpu"
) -> Explanations:
    """Overlay maps for ``targets`` (B,) on uint8 images (B, S, S), plus the description attention."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x = to_model_input(np.asarray(images_u8)).to(device).requires_grad_(True)  # (B, 1, S, S)
    target = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device)  # (B,)
    layer = cam_target_layer(model)
    try:
        with torch.enable_grad():
            heat = grad_cam(model, x, target, layer) if layer is not None else input_gradient(model, x, target)
        attention = description_attention(model, x.detach())
    finally:
        model.train(was_training)
    return Explanations(
        heat=heat.float().cpu().numpy(),
        attention=attention,
        method="grad-cam" if layer is not None else "input-gradient",
    )


@torch.no_grad()
def description_attention(model: nn.Module, x: torch.Tensor) -> np.ndarray | None:
    """(B, T) attention of each image over the stored descriptions, or None."""
    attend = getattr(model, "description_attention", None)
    weights = attend(x) if callable(attend) else None  # (B, T) or None
    return None if weights is None else weights.float().cpu().numpy()


def saved_text_record(model_dir: str | Path) -> dict | None:
    """The "text" record of a saved model's config.json (class_names, templates of its T
    descriptions), or None for a model without text."""
    path = Path(model_dir) / CONFIG
    return json.loads(path.read_text()).get("text") if path.is_file() else None


def top_descriptions(attention_row: np.ndarray, text: dict | None, k: int) -> list[tuple[str, str, float]]:
    """The k most attended descriptions as (class name, template, weight), heaviest first.

    ``text`` is the "text" record of the model's config.json (class_names, templates)."""
    if text is None or attention_row is None:
        return []
    order = np.argsort(-attention_row, kind="stable")[:k]
    return [(str(text["class_names"][t]), str(text["templates"][t]), float(attention_row[t])) for t in order]


def _colormap() -> np.ndarray:
    """(256, 3) uint8 lookup table of matplotlib's 'inferno' (perceptually uniform, prints in grey)."""
    from matplotlib import colormaps

    return (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


_LUT: np.ndarray | None = None


def overlay(image_u8: np.ndarray, heat: np.ndarray, scale: int = 1) -> np.ndarray:
    """Grey image (S, S) + map (S, S) in [0, 1] -> (S*scale, S*scale, 3) uint8: the map in
    colour, blended in proportion to its value, over the micrograph."""
    global _LUT
    if _LUT is None:
        _LUT = _colormap()
    if scale > 1:
        image_u8 = np.asarray(Image.fromarray(image_u8).resize((image_u8.shape[1] * scale, image_u8.shape[0] * scale), Image.BICUBIC))
        heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(image_u8.shape[::-1], Image.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    colour = _LUT[(heat * 255).astype(np.uint8)].astype(np.float32)  # (H, W, 3)
    weight = (OVERLAY_ALPHA * heat)[..., None]  # (H, W, 1)
    grey = image_u8.astype(np.float32)[..., None]  # (H, W, 1)
    return np.clip((1.0 - weight) * grey + weight * colour, 0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
