"""``multifusion explain IMAGE... --out DIR``: explanation overlays as PNG files, for papers
and slides.

    done = explain_paths("models/hnf", ["shots/a.tif", "more/"], "figures/", size=512)

Each readable image gets ``DIR/<name>.png``: the micrograph as the model saw it (the
training preprocessing), upscaled to about ``size`` pixels, with the Grad-CAM map of the
predicted class (or of ``target``) blended over it, the same overlay as the screening
report's. ``DIR/explanations.csv`` lists per input the overlay file, the class explained
and its calibrated probability, the method, the most attended descriptions, or why the
file could not be read.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from multifusion.core.atomic import atomic_path, atomic_write
from multifusion.core.output_paths import FOLDER_RULE
from multifusion.inference.explain import Explainer, overlay, saved_text_record, top_descriptions
from multifusion.inference.predict import check_output_paths, expand_inputs, image_probs, read_one, spreadsheet_safe
from multifusion.inference.views import ViewPolicy
from multifusion.model.card import load_model
from multifusion.inference.screening_report import ATTENDED

COLUMNS = ["path", "overlay", "class", "probability", "method", "attended", "error"]


def _unique_name(path: Path, taken: set[str]) -> str:
    """``<stem>.png``, or ``<stem>-2.png``... when another input had the same stem."""
    name, n = f"{path.stem}.png", 1
    while name in taken:
        n += 1
        name = f"{path.stem}-{n}.png"
    taken.add(name)
    return name


def explain_paths(
    model_dir: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, *,
    size: int = 512, target: str | None = None, batch_size: int = 32, device: str = "cpu",
    views: ViewPolicy = ViewPolicy(),
) -> list[dict]:
    """Write one overlay PNG per readable input and ``explanations.csv``; returns the CSV rows.

    The call and its probability are ``predict``'s (:func:`multifusion.inference.predict.image_probs`:
    the same test-time views, adaptive under ``views`` as ``predict.first_views`` / ``predict.view_confidence``
    make predict's, the same calibration). ``out_dir`` is checked before any work:
    it may not be a file, an input folder (or inside one), hold an input or lie in the model folder."""
    items = expand_inputs(inputs)
    check_output_paths({"--out": (out_dir, FOLDER_RULE)}, inputs, items, model_dir)
    loaded = load_model(model_dir, device=device)
    if target is not None and target not in loaded.classes:
        raise ValueError(f"--target {target!r} is not a class of {model_dir}; choose one of {', '.join(loaded.classes)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text, taken, rows = saved_text_record(model_dir), set(), []
    explainer = Explainer(loaded.model)
    for start in range(0, len(items), batch_size):
        decoded = [(p, *((None, problem) if problem else read_one(p, loaded.input))) for p, problem in items[start : start + batch_size]]
        good = [(p, image) for p, image, _ in decoded if image is not None]
        rows += [{"path": str(p), "error": reason} for p, image, reason in decoded if image is None]
        if not good:
            continue
        images = np.stack([image for _, image in good])  # (B, S, S) uint8
        probs = image_probs(loaded, images, batch_size, device, views)  # (B, C): predict's probabilities
        targets = probs.argmax(axis=1) if target is None else np.full(len(good), loaded.classes.index(target))
        maps = explainer.explain(images, targets, device)
        scale = max(1, round(size / images.shape[-1]))
        for j, (path, image) in enumerate(good):
            name = _unique_name(path, taken)
            with atomic_path(out_dir / name) as tmp:  # ".png" kept: PIL picks the format by it
                Image.fromarray(overlay(image, maps.heat[j], scale)).save(tmp)
            attended = top_descriptions(None if maps.attention is None else maps.attention[j], text, ATTENDED)
            rows.append({
                "path": str(path), "overlay": name, "class": loaded.classes[targets[j]],
                "probability": round(float(probs[j, targets[j]]), 6), "method": maps.method,
                "attended": "; ".join(f"{c}/{t}:{w:.3f}" for c, t, w in attended), "error": "",
            })
    order = {str(p): i for i, (p, _) in enumerate(items)}
    rows.sort(key=lambda r: order[r["path"]])  # input order, unreadable files in place
    with atomic_write(out_dir / "explanations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)
    return rows
