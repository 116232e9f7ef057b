"""What a MultiFusion call actually used: its logit margin split into the head's terms.

The cross-modal head (:class:`multifusion.model.fusion.CrossModalHead`) adds three terms per
class: ``visual`` (the linear classifier on the image's tokens), ``descriptions`` (the
class's descriptions' match with the image) and ``prototypes`` (the scaled cosine to the
class's mean description). The call beats the runner-up class by
``logit[call] - logit[runner-up]``; that margin is the sum over the terms of
``term[call] - term[runner-up]``, so each term's part says how much it pushed this call
over the next class (negative: it argued for the runner-up).

    parts = margin_terms(model, images_u8, calls, device, views)   # None without the cross-modal head
    parts.terms (B, 3)  parts.runner_up (B,)  parts.margin (B,)

The terms are averaged over the views the call averaged (``views``: n = the first n of
:data:`multifusion.inference.views.VIEW_ORDER`, 1 the identity view, 8 all the dihedral views,
as :mod:`multifusion.inference.views` decided per image), so they sum to the margin of the very
logits behind the call.

The description attention (visual-to-text weights over all T descriptions) is listed only
where it is not flat: :func:`attention_flatness` is its entropy over log T (1 = uniform).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from multifusion.data.dataset import to_model_input
from multifusion.evaluation.evaluate import dihedral_views
from multifusion.inference.views import VIEW_ORDER

TERMS = ("visual", "descriptions", "prototypes")
FLAT = 0.95  # normalised attention entropy at or above which the attention is called flat


@dataclass
class MarginTerms:
    terms: np.ndarray       # (B, 3) each term's part of the margin, in TERMS order
    runner_up: np.ndarray   # (B,) the class with the next highest logit
    margin: np.ndarray      # (B,) logit[call] - logit[runner-up] = terms.sum(1)


@torch.no_grad()
def margin_terms(
    model: nn.Module, images_u8: np.ndarray, calls: np.ndarray, device: str | torch.device = "cpu", views: np.ndarray | None = None
) -> MarginTerms | None:
    """uint8 images (B, S, S), called classes (B,), views (B,) of 1 to 8 (None: 1) -> the
    margin's split over the head's terms, averaged over those views; None for a model
    without the cross-modal head's ``logit_terms``."""
    head = getattr(model, "head", None)
    if not callable(getattr(head, "logit_terms", None)) or not callable(getattr(model, "text_embeddings", None)):
        return None
    was_training = model.training
    model.eval()
    try:
        x = to_model_input(np.asarray(images_u8)).to(device)  # (B, 1, S, S)
        text = model.text_embeddings()  # (T, C)

        def terms_of(v: torch.Tensor) -> torch.Tensor:  # (b, 1, S, S) -> (b, K, 3)
            parts = head.logit_terms(model.forward_features(v), text)
            return torch.stack([parts[name].float() for name in TERMS], dim=-1).cpu()

        stacked = terms_of(x)  # (B, K, 3): the identity view's
        counts = np.ones(len(x), dtype=int) if views is None else np.asarray(views)
        for n in sorted(set(counts.tolist()) - {1}):  # the images whose call averaged the first n views
            idx = torch.from_numpy(np.flatnonzero(counts == n))
            turned = dihedral_views(x[idx.to(x.device)])
            stacked[idx] = (stacked[idx] + sum(terms_of(turned[i]) for i in VIEW_ORDER[1:n])) / n
    finally:
        model.train(was_training)
    rows = torch.arange(len(stacked))
    call = torch.as_tensor(np.asarray(calls), dtype=torch.long)  # (B,)
    others = stacked.sum(-1).index_put((rows, call), torch.tensor(float("-inf")))  # (B, K): the call masked out
    runner = others.argmax(dim=1)  # (B,)
    terms = stacked[rows, call] - stacked[rows, runner]  # (B, 3)
    return MarginTerms(terms.numpy(), runner.numpy(), terms.sum(-1).numpy())


def attention_flatness(attention: np.ndarray) -> np.ndarray:
    """attention (B, T), rows summing to 1 -> (B,) entropy / log T: 1 for uniform weights, 0 for one description."""
    p = np.clip(np.asarray(attention, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1) / np.log(p.shape[1])
