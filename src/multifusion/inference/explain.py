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

from multifusion.data.dataset import to_model_input
from multifusion.model.card import CONFIG

VERIFY_IMAGES = 4     # images on which the attention shortcut is checked against the contract's call
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


def grad_cam(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, layer: nn.Module, watch: nn.Module | None = None
) -> tuple[torch.Tensor, tuple | None]:
    """x (B, 1, S, S), targets (B,) class indices -> ((B, S, S) Grad-CAM in [0, 1], the
    positional inputs of ``watch`` in that forward pass, detached, or None).

    Autograd records only from ``layer``'s output on: nothing below it is kept for a
    backward pass that never goes there, and no parameter gradient is computed."""
    captured: list[torch.Tensor] = []
    seen: list[tuple] = []

    def start_recording(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ValueError(f"{type(layer).__name__}: Grad-CAM needs a (B, C, h, w) feature map from the target layer")
        torch.set_grad_enabled(True)  # the rest of this forward pass is recorded
        captured.append(output.detach().requires_grad_(True))
        return captured[-1]

    handles = [layer.register_forward_hook(start_recording)]
    if watch is not None:
        handles.append(watch.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(
            t.detach() if isinstance(t, torch.Tensor) else t for t in inputs))))
    try:
        with torch.no_grad():
            logits = model(x)  # (B, C)
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise ValueError(f"{type(layer).__name__}: the Grad-CAM target layer did not run in the forward pass")
    features = captured[-1]  # (B, K, h, w)
    # gradients of the target logits w.r.t. the feature map only
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), features)  # (B, K, h, w)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (B, S, S)
    return _normalise(cam.detach()), (seen[-1] if seen else None)


def input_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """|d y_c / d x * x|, smoothed by a 5 x 5 box: (B, S, S) in [0, 1], for models without convolutions."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)  # (B, C)
        (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    saliency = (grad * x).abs()  # (B, 1, S, S)
    saliency = F.avg_pool2d(saliency, 5, stride=1, padding=2, count_include_pad=False)[:, 0]
    return _normalise(saliency.detach())


def _attention_head(model: nn.Module) -> nn.Module | None:
    """A submodule with its own ``description_attention(*inputs)`` (MultiFusion's cross-modal head)."""
    return next((m for m in model.modules() if m is not model and callable(getattr(m, "description_attention", None))), None)


class Explainer:
    """Explanations of one model, batch after batch.

    The description attention is ``model.description_attention(x)``: a second forward
    pass. When a submodule offers ``description_attention`` on its own inputs (the head),
    the inputs it saw in the Grad-CAM pass are reused instead, once the first batch has
    shown on a few images that both give the same weights; otherwise every batch takes the
    contract's call."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layer = cam_target_layer(model)
        self.method = "grad-cam" if self.layer is not None else "input-gradient"
        attend = getattr(model, "description_attention", None)
        self.attend = attend if callable(attend) else None
        self.head = _attention_head(model) if self.attend is not None else None
        self.head_verified = False

    def explain(self, images_u8: np.ndarray, targets: np.ndarray, device: str | torch.device = "cpu") -> Explanations:
        """Overlay maps for ``targets`` (B,) on uint8 images (B, S, S), plus the description attention."""
        device = torch.device(device)
        was_training = self.model.training
        self.model.eval()
        x = to_model_input(np.asarray(images_u8)).to(device)  # (B, 1, S, S)
        target = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device)  # (B,)
        try:
            if self.layer is None:
                heat, head_inputs = input_gradient(self.model, x, target), None
            else:
                heat, head_inputs = grad_cam(self.model, x, target, self.layer, watch=self.head)
            attention = self._attention(x, head_inputs)
        finally:
            self.model.train(was_training)
        return Explanations(heat=heat.float().cpu().numpy(), attention=attention, method=self.method)

    @torch.no_grad()
    def _attention(self, x: torch.Tensor, head_inputs: tuple | None) -> np.ndarray | None:
        """(B, T) attention of each image over the stored descriptions, or None."""
        if self.attend is None:
            return None
        quick = None
        if self.head is not None and head_inputs is not None:
            try:
                quick = self.head.description_attention(*head_inputs)  # (B, T)
            except (TypeError, ValueError, RuntimeError, IndexError):
                self.head = None
        if quick is not None and not self.head_verified:  # check the shortcut once, on a few images
            probe = self.attend(x[:VERIFY_IMAGES])  # (b, T) or None
            self.head_verified = probe is not None and quick[:VERIFY_IMAGES].shape == probe.shape and bool(
                torch.allclose(quick[:VERIFY_IMAGES], probe, atol=1e-5))
            self.head = self.head if self.head_verified else None
        if quick is not None and self.head_verified:
            return quick.float().cpu().numpy()
        full = self.attend(x)  # (B, T) or None
        return None if full is None else full.float().cpu().numpy()


def explain_batch(
    model: nn.Module, images_u8: np.ndarray, targets: np.ndarray, device: str | torch.device = "cpu"
) -> Explanations:
    """One batch's :class:`Explanations` (for many batches keep one :class:`Explainer`)."""
    return Explainer(model).explain(images_u8, targets, device)


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
