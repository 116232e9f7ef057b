"""Screen micrographs with a trained model: ``multifusion predict``.

    result = predict_paths("models/hnf", ["new_shots/", "extra/*.tif"], out_csv="predictions.csv",
                           top_k=3, uncertain_threshold=0.5, batch_size=64)

Inputs are files, folders (walked recursively; hidden files skipped) and glob patterns.
Every image goes through ``multifusion.data.preprocess.load_micrograph`` with the data
section stored in the model's config.json: the very preprocessing of training (grey,
info-bar crop, square, resize). Decoding runs in a thread pool one batch ahead of
inference. Probabilities are calibrated by the temperature saved with the model.

The CSV holds one row per input file, in input order: ``path, status`` (ok | error),
``top1_class, top1_prob, ... topK_class, topK_prob, uncertain`` (top-1 probability below
the threshold) and ``error`` (why a file could not be read). A bad file never stops the
batch. The model carries the class-description text features in its weights, so
screening needs no LLM and no network.
"""

from __future__ import annotations

import glob
import heapq
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from multifusion.config import DataConfig, PredictConfig, load_config
from multifusion.contact_sheet import SheetEntry, draw_contact_sheet
from multifusion.data.decode import ImageError
from multifusion.data.preprocess import load_micrograph
from multifusion.evaluate import predict_probs
from multifusion.saved_model import CONFIG, load_model, model_config, read_record
from multifusion.screening_report import ScreeningReport
from multifusion.output_paths import CSV_RULE, FIGURE_RULE, HTML_RULE, check_outputs

GLOB_CHARS = set("*?[")


@dataclass
class PredictionResult:
    table: pd.DataFrame                 # one row per input file, the CSV's content
    n_read: int                         # files decoded and classified
    n_failed: int                       # files listed with an error
    least_certain: list[SheetEntry] = field(default_factory=list)  # lowest top-1 probability first


def expand_inputs(inputs: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """Files, folders (recursive) and globs -> ordered unique (path, problem) pairs.

    ``problem`` is None for a file to decode, or the reason an input names nothing.
    Folder contents and glob matches are sorted; hidden files and folders are skipped.
    """
    found: dict[Path, str | None] = {}

    def add_folder(folder: Path) -> None:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    found.setdefault(Path(root) / name, None)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            add_folder(path)
        elif path.is_file():
            found.setdefault(path, None)
        elif GLOB_CHARS & set(str(item)):
            matches = sorted(glob.glob(str(item), recursive=True))
            if not matches:
                found.setdefault(path, "no file matches this pattern")
            for match in matches:
                match_path = Path(match)
                if match_path.is_dir():
                    add_folder(match_path)
                elif match_path.is_file():
                    found.setdefault(match_path, None)
        else:
            found.setdefault(path, "no such file or folder")
    return list(found.items())


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
    """Yield batches of (path, image or None, problem or None), decoding one batch ahead."""
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def submit(batch: list[tuple[Path, str | None]]) -> list[tuple[Path, Future | None, str | None]]:
            return [(p, None if problem else pool.submit(read_one, p, data), problem) for p, problem in batch]

        pending: deque = deque(submit(b) for b in batches[:2])
        for i in range(len(batches)):
            current = pending.popleft()
            if i + 2 < len(batches):
                pending.append(submit(batches[i + 2]))
            out = []
            for path, future, problem in current:
                image, reason = future.result() if future is not None else (None, problem)
                out.append((path, image, reason))
            yield out


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
) -> PredictionResult:
    """Classify every micrograph named by ``inputs``; write the CSV (and contact sheet).

    ``workers``: decoding threads (None: the model's ``data.workers``; 0 = all cores).
    ``report``: also write the screening page (HTML with explanation overlays) there.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu")
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"--top-k and --batch-size must be >= 1, got {top_k} and {batch_size}")
    if not 0.0 <= uncertain_threshold <= 1.0:
        raise ValueError(f"--threshold must be a probability in [0, 1], got {uncertain_threshold}")
    items = expand_inputs(inputs)
    outputs = {"--out": (out_csv, CSV_RULE), "--contact-sheet": (contact_sheet, FIGURE_RULE), "--report": (report, HTML_RULE)}
    check_outputs(outputs, [path for path, problem in items if problem is None])  # before any inference
    loaded = load_model(model_dir, device=device)
    data = loaded.cfg.data
    classes = np.array(loaded.classes)
    k = min(top_k, len(classes))

    page = None if report is None else ScreeningReport(report, model_dir, loaded, uncertain_threshold, k)
    rows: list[dict] = []
    sheet: list[tuple[float, int, SheetEntry]] = []  # max-heap on probability via negation
    n_read = 0
    bar = tqdm(total=len(items), unit="img", desc="predict", disable=not progress)
    # Decoding threads run beside torch: one BLAS thread each (load_micrograph's resize is
    # a small product; a multi-threaded BLAS per decoding thread oversubscribes the cores).
    with threadpool_limits(limits=1, user_api="blas"):
        for batch in decode_batches(items, data, batch_size, data.workers if workers is None else workers):
            good = [i for i, (_, image, _) in enumerate(batch) if image is not None]
            probs = np.zeros((0, len(classes)))
            if good:
                images = np.stack([batch[i][1] for i in good])  # (B, S, S) uint8
                probs = predict_probs(loaded.model, images, batch_size, device, loaded.temperature, loaded.cfg.evaluate.tta)  # (B, C)
            prob_of = dict(zip(good, probs))
            for i, (path, image, reason) in enumerate(batch):
                row: dict = {"path": str(path), "status": "ok" if image is not None else "error"}
                if image is None:
                    rows.append(row | {"uncertain": "", "error": reason})  # class/prob columns stay empty
                    continue
                p = prob_of[i]
                order = np.argsort(-p, kind="stable")[:k]
                for r, c in enumerate(order, start=1):
                    row[f"top{r}_class"] = classes[c]
                    row[f"top{r}_prob"] = round(float(p[c]), 6)
                row["uncertain"] = bool(p[order[0]] < uncertain_threshold)
                row["error"] = ""
                rows.append(row)
                n_read += 1
                if contact_sheet_size > 0:
                    entry = SheetEntry(str(path), image, [(str(classes[c]), float(p[c])) for c in order])
                    heapq.heappush(sheet, (-float(p[order[0]]), -len(rows), entry))
                    if len(sheet) > contact_sheet_size:
                        heapq.heappop(sheet)  # drops the most certain
            if page is not None:
                page.add_batch(batch, good, rows[-len(batch):], probs, device)
            bar.update(len(batch))
        bar.close()

    table = pd.DataFrame(rows, columns=_columns(k))
    least_certain = [entry for _, _, entry in sorted(sheet, key=lambda t: (-t[0], -t[1]))]
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_csv, index=False)
    if contact_sheet is not None and least_certain:
        draw_contact_sheet(least_certain, contact_sheet, title=f"{len(least_certain)} least certain of {n_read}")
    if page is not None:
        page.close()
    return PredictionResult(table=table, n_read=n_read, n_failed=len(rows) - n_read, least_certain=least_certain)


def _columns(k: int) -> list[str]:
    ranked = [f"top{r}_{what}" for r in range(1, k + 1) for what in ("class", "prob")]
    return ["path", "status", *ranked, "uncertain", "error"]


def predict_settings(model_dir: str | Path, params: str | Path | None) -> PredictConfig:
    """The ``predict`` section: from ``params`` if given, else ./params.yaml if present,
    else the params the model was trained with (its config.json)."""
    if params is not None or Path("params.yaml").is_file():
        return load_config(params or "params.yaml").predict
    record_path = Path(model_dir) / CONFIG
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path}: missing; pass the directory of a trained model to --model")
    return model_config(read_record(record_path), record_path).predict
