"""The Python API: load a trained model, classify micrographs, explain the calls.

    import multifusion

    clf = multifusion.load_model("models/hnf")            # a trained model's directory
    table = clf.predict(["new_shots/", "more/*.tif"])      # pandas.DataFrame, one row per file
    print(table[["path", "top1_class", "top1_prob", "uncertain"]])
    clf.explain(["new_shots/a.tif"], "figures/")           # overlay PNGs + explanations.csv

A thin layer over the functions behind ``multifusion predict`` and ``multifusion explain``
(:func:`multifusion.inference.predict.predict_paths`,
:func:`multifusion.inference.overlays.explain_paths`): the same preprocessing as training,
the same calibrated probabilities and the same table as the CLI's CSV. A file that cannot
be read is a row with ``status == "error"`` and its reason, never an exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from multifusion.model.card import LoadedModel
from multifusion.model.card import load_model as _load_saved_model

__all__ = ["Classifier", "load_model"]


class Classifier:
    """A trained model ready to screen micrographs; build it with :func:`load_model`.

    Attributes:
        path: the model directory (``config.json`` + ``model.safetensors``).
        classes: the class names, in the order of the model's outputs.
        temperature: the calibration temperature saved with the model.
        loaded: the rebuilt model and its card (:class:`multifusion.model.card.LoadedModel`).
    """

    def __init__(self, path: str | Path, loaded: LoadedModel, device: str = "cpu") -> None:
        self.path = Path(path)
        self.loaded = loaded
        self.device = device

    @property
    def classes(self) -> list[str]:
        return list(self.loaded.classes)

    @property
    def temperature(self) -> float:
        return self.loaded.temperature

    def __repr__(self) -> str:
        return f"Classifier({str(self.path)!r}, {len(self.classes)} classes, device={self.device!r})"

    def predict(
        self,
        paths: str | Path | Sequence[str | Path],
        *,
        top_k: int = 3,
        uncertain_threshold: float = 0.5,
        batch_size: int = 64,
        workers: int | None = None,
        first_views: int = 2,
        view_confidence: float = 0.9,
        precision: str = "auto",
        target_accuracy: float | None = None,
    ) -> pd.DataFrame:
        """Classify the micrographs named by ``paths`` (files, folders walked recursively, glob patterns).

        Returns one row per input file, in input order, with the columns of
        ``multifusion predict``'s CSV: ``path``, ``status`` (``ok`` | ``error``),
        ``top1_class``, ``top1_prob`` ... ``topK_class``, ``topK_prob``, ``uncertain`` (top-1
        probability below ``uncertain_threshold``), ``ood_score`` and ``unknown`` (the model's
        unknown-material score and its threshold), ``abstained`` (with ``target_accuracy``:
        below the val risk-coverage curve's confidence for it) and ``error`` (why a file could
        not be read). ``first_views`` / ``view_confidence``: adaptive views (:class:`multifusion.inference.views.ViewPolicy`;
        8 or 1.0: all eight everywhere); ``precision``: auto (bf16 where the device has it natively) | fp32 | bf16. The defaults are those of
        ``params.yaml``'s ``predict`` section (a test keeps them equal); a call does not
        read ``params.yaml``. ``workers``: decoding processes (None: every core).
        """
        from multifusion.inference.predict import predict_paths
        from multifusion.inference.views import ViewPolicy

        result = predict_paths(
            self.path,
            _as_list(paths),
            None,
            top_k=top_k,
            uncertain_threshold=uncertain_threshold,
            batch_size=batch_size,
            device=self.device,
            workers=workers,
            progress=False,
            views=ViewPolicy(first_views, view_confidence, precision),
            target_accuracy=target_accuracy,
        )
        return result.table

    def explain(
        self,
        paths: str | Path | Sequence[str | Path],
        out: str | Path,
        *,
        size: int = 512,
        target: str | None = None,
        first_views: int = 2,
        view_confidence: float = 0.9,
        precision: str = "auto",
    ) -> pd.DataFrame:
        """Write one explanation overlay PNG per readable input into the folder ``out``
        (Grad-CAM of the predicted class, or of ``target``, over the micrograph as the model
        saw it, upscaled to about ``size`` pixels) and ``out/explanations.csv``.

        Returns the CSV's rows as a DataFrame: ``path``, ``overlay`` (file name in ``out``),
        ``class``, ``probability``, ``method``, ``attended`` (the most attended class
        descriptions) and ``error``. ``first_views`` / ``view_confidence`` / ``precision``: those of :meth:`predict`,
        so that the class and probability are the ones ``predict`` gives.
        """
        from multifusion.inference.overlays import COLUMNS, explain_paths
        from multifusion.inference.views import ViewPolicy

        rows = explain_paths(self.path, _as_list(paths), out, size=size, target=target, device=self.device,
                             views=ViewPolicy(first_views, view_confidence, precision))
        return pd.DataFrame(rows, columns=COLUMNS)


def load_model(path: str | Path = "models/hnf", device: str = "cpu") -> Classifier:
    """Load a trained model directory (``config.json`` + ``model.safetensors``, as ``train``
    writes ``models/hnf/``) for screening.

    Raises FileNotFoundError when a file is missing and
    :class:`multifusion.model.card.ModelDirError` (a ValueError) when the directory is
    damaged or its weights do not match its config; both messages name the file and the fix.
    """
    return Classifier(path, _load_saved_model(path, device=device), device=device)


def _as_list(paths: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)
