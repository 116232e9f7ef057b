"""Screen micrographs with a trained model: ``multifusion predict``.

    result = predict_paths("models/hnf", ["new_shots/", "extra/*.tif"], out_csv="predictions.csv",
                           top_k=3, uncertain_threshold=0.5, batch_size=64)

Inputs are files, folders (walked recursively; hidden files skipped) and glob patterns.
Every image goes through ``multifusion.data.preprocess.load_micrograph`` with the data
section stored in the model's config.json: the very preprocessing of training (grey,
info-bar crop, square, resize, grey-level policy). Decoding runs on worker processes ahead of inference
(``multifusion.data.parallel``). Probabilities are calibrated by the temperature saved with the model.

The CSV holds one row per input file, in input order: ``path, status`` (ok | error),
``top1_class, top1_prob, ... topK_class, topK_prob, uncertain`` (top-1 probability below
the threshold), ``ood_score`` and ``unknown`` (the unknown-material score saved with the model
and whether it is above the model's threshold: unlike anything trained on; both empty for a
model without a fitted score), ``abstained`` (with ``target_accuracy``: the top-1 probability is
below what the model's val risk-coverage curve needs for that accuracy; the row stays, marked)
and ``error`` (why a file could not be read). An unreadable file keeps its reason row and
is never called ``unknown``. A bad file never stops the batch.

Views (``views``, params ``predict.first_views`` / ``predict.view_confidence``): the first
views (identity, 180-degree turn) on every image; the rest of the 8-view average only where
their calibrated top-1 probability is not above the confidence (:mod:`multifusion.inference.views`). The model carries the class-description text features in its weights, so
screening needs no LLM and no network.
"""

from __future__ import annotations

import errno
import glob
import heapq
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from multifusion.core.config import DataConfig, PredictConfig, load_config
from multifusion.inference.contact_sheet import SheetEntry, draw_contact_sheet
from multifusion.data.decode import ImageError
from multifusion.data.parallel import parallel_map
from multifusion.data.preprocess import load_micrograph
from multifusion.evaluation.evaluate import softmax
from multifusion.evaluation.ood import UnknownScore, load_unknown
from multifusion.evaluation.spectrum import BANDS
from multifusion.evaluation.selective import RiskCoverage
from multifusion.inference.views import ScreenOutputs, ViewPolicy, screen_outputs
from multifusion.model.card import LoadedModel, load_model
from multifusion.model.card_v1 import PACKAGE_PARAMS
from multifusion.inference.screening_report import ScreeningReport
from multifusion.core.atomic import atomic_write
from multifusion.core.output_paths import CSV_RULE, FIGURE_RULE, HTML_RULE, check_outputs

GLOB_CHARS = set("*?[")


@dataclass
class PredictionResult:
    table: pd.DataFrame                 # one row per input file, the CSV's content
    n_read: int                         # files decoded and classified
    n_failed: int                       # files listed with an error
    least_certain: list[SheetEntry] = field(default_factory=list)  # lowest top-1 probability first


EMPTY_FOLDER = "no micrographs found in this folder (hidden files are skipped)"


def _link_problem(path: Path) -> str | None:
    """Why the symbolic link ``path`` cannot be read (a loop, a missing target), or None."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop: the link leads back to itself; skipped"
        return f"broken symbolic link: its target {os.readlink(path)} does not exist"
    return None


def expand_inputs(inputs: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """Files, folders (recursive) and globs -> ordered unique (path, problem) pairs.

    ``problem`` is None for a file to decode, or the reason an input names nothing (a
    missing file, an empty folder, a link loop). Folder contents and glob matches are
    sorted; hidden files and folders are skipped. Inputs that are the same file (relative,
    absolute, ``a/../a`` or a link to it) give one pair, under the first spelling met.
    """
    found: dict[str, tuple[Path, str | None]] = {}

    def add(path: Path, problem: str | None = None) -> None:
        if problem is None and os.path.islink(path):
            problem = _link_problem(path)
        found.setdefault(os.path.realpath(path), (path, problem))

    def add_folder(folder: Path) -> None:
        before = len(found)
        any_file = False
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    any_file = True
                    add(Path(root) / name)
        if not any_file and len(found) == before:
            add(folder, EMPTY_FOLDER)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            add_folder(path)
        elif path.is_file():
            add(path)
        elif os.path.islink(path):
            add(path, _link_problem(path) or "no such file or folder")
        elif GLOB_CHARS & set(str(item)):
            matches = sorted(glob.glob(str(item), recursive=True))
            if not matches:
                add(path, "no file matches this pattern")
            for match in matches:
                match_path = Path(match)
                if match_path.is_dir():
                    add_folder(match_path)
                elif match_path.is_file() or os.path.islink(match_path):
                    add(match_path)
        else:
            add(path, "no such file or folder")
    return list(found.values())


def input_folders(inputs: Sequence[str | Path]) -> list[Path]:
    """The folders :func:`expand_inputs` walks for ``inputs`` (given, or matched by a glob)."""
    folders = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            folders.append(path)
        elif not path.is_file() and GLOB_CHARS & set(str(item)):
            folders += [Path(m) for m in glob.glob(str(item), recursive=True) if Path(m).is_dir()]
    return folders


def files_to_read(items: list[tuple[Path, str | None]]) -> list[Path]:
    """The files of ``items`` to decode; a one-line ValueError when there is none (no CSV
    of error rows alone: e.g. "no micrographs found in shots/")."""
    to_read = [path for path, problem in items if problem is None]
    if to_read:
        return to_read
    if not items:
        raise ValueError("no input given: name micrograph files, folders or glob patterns")
    if all(problem == EMPTY_FOLDER for _, problem in items):
        raise ValueError(f"no micrographs found in {', '.join(str(p) for p, _ in items)} (hidden files are skipped)")
    raise ValueError("nothing to classify: " + "; ".join(f"{p}: {problem}" for p, problem in items))


def check_output_paths(outputs: dict, inputs: Sequence[str | Path], items: list[tuple[Path, str | None]],
                       model_dir: str | Path) -> list[Path]:
    """The output guard (:mod:`multifusion.core.output_paths`) for ``inputs`` expanded to
    ``items``, then the files to read: all before the model is loaded."""
    to_read = [path for path, problem in items if problem is None]
    check_outputs(outputs, to_read, folders=input_folders(inputs), model=model_dir)
    return files_to_read(items)


def image_probs(loaded: LoadedModel, images: np.ndarray, batch_size: int, device: str, views: ViewPolicy = ViewPolicy()) -> np.ndarray:
    """uint8 images (B, S, S) -> calibrated class probabilities (B, C) under the model's
    test-time policy (``evaluate.tta``: the 8-view average; adaptive under ``views``) and its temperature: the views of ``predict`` (which goes
    through :func:`screen_images` for the unknown score too), its report and ``explain``."""
    out = screen_outputs(loaded.model, images, batch_size, device, loaded.temperature, loaded.input.tta, views)
    return softmax(out.logits, loaded.temperature)


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """A text cell a spreadsheet would run as a formula (starting with = + - @, tab or CR)
    prefixed with a single quote, as OWASP advises against CSV injection; others unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def write_csv(table: pd.DataFrame, path: str | Path) -> None:
    """``table`` as CSV at ``path``: spreadsheet-safe text cells, written atomically."""
    with atomic_write(path, "w", newline="") as f:
        table.map(spreadsheet_safe).to_csv(f, index=False)


def read_one(path: Path, data: DataConfig) -> tuple[np.ndarray | None, str | None]:
    """(image uint8 (S, S), None) or (None, one-line reason). Never raises on bad files."""
    try:
        return load_micrograph(path, data), None
    except ImageError as exc:
        return None, str(exc)
    except Exception as exc:  # a screening batch must survive any single bad file
        return None, f"{type(exc).__name__}: {exc}"


def decode_batches(
    items: list[tuple[Path, str | None]], data: DataConfig, batch_size: int, workers: int
) -> Iterator[list[tuple[Path, np.ndarray | None, str | None]]]:
    """Yield batches of (path, image or None, problem or None), in input order. Decoding runs
    on the package's one parallel map (worker processes, BLAS at one thread each), which
    keeps decoding ahead of the batch being classified."""
    to_read = [path for path, problem in items if problem is None]
    decoded = parallel_map(partial(read_one, data=data), to_read, workers, progress=False, desc="decode", chunksize=8)
    batch: list[tuple[Path, np.ndarray | None, str | None]] = []
    for path, problem in items:
        image, reason = next(decoded) if problem is None else (None, problem)
        batch.append((path, image, reason))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_arguments(device: str, top_k: int, batch_size: int, uncertain_threshold: float,
                    target_accuracy: float | None = None) -> None:
    """One-line errors for screening options that cannot work, before any file is read."""
    if target_accuracy is not None and not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"--target-accuracy must be an accuracy in (0, 1], e.g. 0.99; got {target_accuracy}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu")
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"--top-k and --batch-size must be >= 1, got {top_k} and {batch_size}")
    if not 0.0 <= uncertain_threshold <= 1.0:
        raise ValueError(f"--threshold must be a probability in [0, 1], got {uncertain_threshold}")


def ranked_row(path: Path, probs: np.ndarray, order: np.ndarray, classes: np.ndarray, uncertain_threshold: float) -> dict:
    """The CSV row of one classified image: probs (C,), its top-k class indices ``order`` (k,)."""
    row: dict = {"path": str(path), "status": "ok"}
    for r, c in enumerate(order, start=1):
        row[f"top{r}_class"] = classes[c]
        row[f"top{r}_prob"] = round(float(probs[c]), 6)
    return row | {"uncertain": bool(probs[order[0]] < uncertain_threshold), "error": ""}


@dataclass
class Screening:
    """What a predict run adds to each call beyond the classes: the model's unknown score and
    the abstention threshold for ``--target-accuracy`` (None where not asked for / not fitted)."""

    unknown: UnknownScore | None
    abstain_below: float | None = None     # abstain where the top-1 probability is below this (inf: on every row)
    views: ViewPolicy = ViewPolicy()

    def columns(self, probs: np.ndarray, out: ScreenOutputs) -> list[dict]:
        """probs (B, C) and the batch's screen outputs -> per image {ood_score, unknown, abstained}."""
        scores = None if self.unknown is None else self.unknown(out.logits, out.features, out.spectra)  # (B,)
        top1 = probs.max(axis=1)  # (B,)
        return [{
            "ood_score": "" if scores is None else round(float(scores[j]), 6),
            "unknown": "" if scores is None else bool(scores[j] > self.unknown.threshold),
            "abstained": self.abstain_below is not None and bool(top1[j] < self.abstain_below),
        } for j in range(len(probs))]


def screening_for(model_dir: str | Path, loaded: LoadedModel, target_accuracy: float | None, views: ViewPolicy) -> Screening:
    """The run's :class:`Screening` from the model card's ``"unknown"`` entry (and its tensors file)."""
    unknown = load_unknown(model_dir, loaded.unknown)
    abstain_below = None
    if target_accuracy is not None:
        curve = (loaded.unknown or {}).get("selective")
        if curve is None:
            raise ValueError(f"{Path(model_dir) / 'config.json'}: no val risk-coverage curve (the model was trained before "
                             "selective prediction); retrain it (`dvc repro train`) to use --target-accuracy")
        threshold = RiskCoverage.from_record(curve).threshold_for(target_accuracy)
        abstain_below = float("inf") if threshold is None else threshold
    return Screening(unknown, abstain_below, views)


def screen_images(loaded: LoadedModel, images: np.ndarray, batch_size: int, device: str,
                  screening: Screening) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """uint8 images (B, S, S) -> (calibrated probabilities (B, C), per image {ood_score, unknown,
    abstained}, views averaged (B,))."""
    bands = screening.unknown.bands if screening.unknown is not None else BANDS  # the profiles its score was fitted on
    out = screen_outputs(loaded.model, images, batch_size, device, loaded.temperature, loaded.input.tta, screening.views, bands)
    probs = softmax(out.logits, loaded.temperature)  # (B, C)
    return probs, screening.columns(probs, out), out.views


class LeastCertain:
    """The ``size`` images with the lowest top-1 probability seen so far (a bounded heap)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.heap: list[tuple[float, int, SheetEntry]] = []  # max-heap on probability via negation

    def add(self, row_index: int, entry: SheetEntry) -> None:
        if self.size > 0:
            heapq.heappush(self.heap, (-entry.top[0][1], -row_index, entry))
            if len(self.heap) > self.size:
                heapq.heappop(self.heap)  # drops the most certain

    def entries(self) -> list[SheetEntry]:
        """Lowest top-1 probability first; ties in input order."""
        return [entry for _, _, entry in sorted(self.heap, key=lambda t: (-t[0], -t[1]))]


def predict_paths(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    out_csv: str | Path | None = None,
    *,
    top_k: int,
    uncertain_threshold: float,
    batch_size: int,
    device: str = "cpu",
    contact_sheet: str | Path | None = None,
    contact_sheet_size: int = 16,
    report: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    target_accuracy: float | None = None,
    views: ViewPolicy = ViewPolicy(),
    drift_p: float | None = None,
) -> PredictionResult:
    """Classify every micrograph named by ``inputs``; write the CSV (and contact sheet).

    ``workers``: decoding processes (None or 0 = all cores).
    ``report``: also write the screening page (HTML with explanation overlays) there.
    ``target_accuracy``: mark ``abstained`` the rows the val curve says to withhold for it.
    ``views``: adaptive views (the default: all eight on every image).
    ``drift_p``: the screening page's drift warning level (None: no test).
    """
    check_arguments(device, top_k, batch_size, uncertain_threshold, target_accuracy)
    items = expand_inputs(inputs)
    outputs = {"--out": (out_csv, CSV_RULE), "--contact-sheet": (contact_sheet, FIGURE_RULE), "--report": (report, HTML_RULE)}
    check_output_paths(outputs, inputs, items, model_dir)  # before any inference
    loaded = load_model(model_dir, device=device)
    classes = np.array(loaded.classes)
    k = min(top_k, len(classes))
    screening = screening_for(model_dir, loaded, target_accuracy, views)
    page = None if report is None else ScreeningReport(report, model_dir, loaded, uncertain_threshold, k, drift_p=drift_p)
    rows: list[dict] = []
    least_certain = LeastCertain(contact_sheet_size)
    bar = tqdm(total=len(items), unit="img", desc="predict", disable=not progress)
    for batch in decode_batches(items, loaded.input, batch_size, 0 if workers is None else workers):
        good = [i for i, (_, image, _) in enumerate(batch) if image is not None]
        probs, extra, views = np.zeros((0, len(classes))), [], np.zeros(0, dtype=np.int64)
        if good:
            images = np.stack([batch[i][1] for i in good])  # (B, S, S) uint8
            probs, extra, views = screen_images(loaded, images, batch_size, device, screening)  # (B, C), B dicts, (B,)
        prob_of, extra_of = dict(zip(good, probs)), dict(zip(good, extra))
        for i, (path, image, reason) in enumerate(batch):
            if image is None:  # class/prob columns stay empty; an unreadable file is never `unknown`
                rows.append({"path": str(path), "status": "error", "uncertain": "", "ood_score": "", "unknown": "",
                             "abstained": "", "error": reason})
                continue
            p = prob_of[i]  # (C,)
            order = np.argsort(-p, kind="stable")[:k]  # (k,)
            rows.append(ranked_row(path, p, order, classes, uncertain_threshold) | extra_of[i])
            least_certain.add(len(rows), SheetEntry(str(path), image, [(str(classes[c]), float(p[c])) for c in order]))
        if page is not None:
            page.add_batch(batch, good, rows[-len(batch):], probs, device, views)
        bar.update(len(batch))
    bar.close()
    return write_outputs(rows, k, least_certain.entries(), out_csv, contact_sheet, page)


def write_outputs(rows: list[dict], k: int, least_certain: list[SheetEntry], out_csv: str | Path | None,
                  contact_sheet: str | Path | None, page: ScreeningReport | None) -> PredictionResult:
    """The CSV, the contact sheet and the screening page from the rows of every input."""
    table = pd.DataFrame(rows, columns=_columns(k))
    n_read = int((table["status"] == "ok").sum())
    if out_csv is not None:
        write_csv(table, out_csv)
    if contact_sheet is not None and least_certain:
        draw_contact_sheet(least_certain, contact_sheet, title=f"{len(least_certain)} least certain of {n_read}")
    if page is not None:
        page.close()
    return PredictionResult(table=table, n_read=n_read, n_failed=len(rows) - n_read, least_certain=least_certain)


def _columns(k: int) -> list[str]:
    ranked = [f"top{r}_{what}" for r in range(1, k + 1) for what in ("class", "prob")]
    return ["path", "status", *ranked, "uncertain", "ood_score", "unknown", "abstained", "error"]


def predict_settings(model_dir: str | Path, params: str | Path | None) -> PredictConfig:
    """The ``predict`` section: from ``params`` if given, else ./params.yaml if present, else
    the params.yaml of the source tree this package runs from. The model's card holds no
    settings of its own (it describes the model, not how a lab screens with it)."""
    for source in (params, "params.yaml", PACKAGE_PARAMS):
        if source is not None and (source == params or Path(source).is_file()):
            return load_config(source).predict
    raise FileNotFoundError("no params.yaml here for the predict defaults; pass --params, or run from a project folder")
