"""Unknown-material scores, every one in the same run: near (leave-classes-out on NCM) and far
(the NCM model on synthetic SEM-10 micrographs, the synthetic model on NCM).

    python bench/ood.py --ncm WS_NCM --syn WS_SYN --work /tmp/ood-bench --epochs 10 \
        --out bench/results/ood_<date>.txt

``WS_NCM`` / ``WS_SYN``: workspaces where ``prepare`` and the text stages have run
(``data/prepared``, ``data/text_features``, ``params.yaml``: the project's, ``data.root``
set). Each model is trained with the product's ``fit`` (train.epochs overridden by
``--epochs``) and scored with :mod:`multifusion.evaluation.ood` on the same outputs:

- near: train without two of NCM's 11 classes (prepared rows of those classes removed, and
  their descriptions: the model never sees them); the in-distribution test set is the test
  split of the other nine, the unknown set every image of the two held-out classes;
- far: the full 11-class NCM model, in-distribution its test split, unknown the synthetic
  set's test split; the synthetic model the other way round. ``--ncm-model`` / ``--syn-model``
  score models trained elsewhere (a default run's ``models/hnf``, 30 epochs) for these two.

Per score: AUROC (unknown = positive), FPR@95%TPR (the share of unknown images kept as known
at the threshold that keeps 95% of the in-distribution test images) and what the threshold
chosen on val (``ood.keep_rate``) flags: the share of in-distribution test images and of
unknown images called unknown. Logits: the 8-view policy (evaluate.tta); features: the
identity view (as ``predict``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from multifusion.core.config import OOD_SCORES, Config, load_config
from multifusion.data.dataset import CLASSES, IMAGES, MANIFEST, Prepared, load_prepared
from multifusion.evaluation.evaluate import softmax
from multifusion.evaluation.ood import fit_unknown
from multifusion.inference.views import ScreenOutputs, screen_outputs
from multifusion.model import build_model
from multifusion.model.card import load_model
from multifusion.text.features import TextFeatures
from multifusion.training.train import fit

# (composition class, state class) pairs held out together: a pristine composition whose
# formation state stays known, and a cycled / formation state whose pristine stays known
HOLDOUTS = [("622", "333_cycled"), ("523", "811_formation"), ("333", "811_cycled")]


@dataclass
class Split:
    images: np.ndarray      # (N, S, S) uint8
    labels: np.ndarray      # (N,)


def subset_prepared(src: Path, dst: Path, drop: tuple[str, ...]) -> list[str]:
    """Write ``dst`` (a prepared set) without the classes ``drop``, labels renumbered; -> kept classes."""
    prepared = load_prepared(src)
    kept = [c for c in prepared.classes if c not in drop]
    keep = ~prepared.manifest["class_name"].isin(drop).to_numpy()
    manifest = prepared.manifest[keep].reset_index(drop=True).copy()
    manifest["label"] = manifest["class_name"].map({c: i for i, c in enumerate(kept)}).astype(np.int64)
    dst.mkdir(parents=True, exist_ok=True)
    np.save(dst / IMAGES, np.asarray(prepared.images)[keep])
    manifest.to_parquet(dst / MANIFEST)
    (dst / CLASSES).write_text(json.dumps(kept, indent=2) + "\n")
    return kept


def subset_text(text: TextFeatures, classes: list[str]) -> TextFeatures:
    """Only the descriptions of ``classes``."""
    keep = [i for i, c in enumerate(text.class_names) if c in classes]
    return TextFeatures(text.token_states[keep], text.attention_mask[keep], [text.class_names[i] for i in keep],
                        [text.templates[i] for i in keep], [text.samples[i] for i in keep])


def train_model(cfg: Config, prepared_dir: Path, text: TextFeatures, out: Path) -> tuple[torch.nn.Module, float]:
    """Train with the product's fit; -> (model, temperature)."""
    classes = load_prepared(prepared_dir).classes
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, classes, text)
    model = fit(model, cfg, prepared_dir, out / "model", out / "checkpoints", out / "live", "hnf", text=text)
    return model, float(json.loads((out / "model" / "config.json").read_text())["temperature"])


def trained_model(model_dir: Path) -> tuple[torch.nn.Module, float]:
    """A model saved by ``train`` (its card's weights and temperature), to score without training."""
    loaded = load_model(model_dir)
    return loaded.model.eval(), loaded.temperature


def outputs(model: torch.nn.Module, images: np.ndarray, cfg: Config, temperature: float, tta: bool) -> ScreenOutputs:
    return screen_outputs(model, images, cfg.evaluate.batch_size, "cpu", temperature, tta)  # all eight views


def split_of(prepared: Prepared, split: str) -> Split:
    idx = prepared.split_indices(split)
    return Split(np.asarray(prepared.images[idx]), prepared.labels(idx))


def score_table(model: torch.nn.Module, cfg: Config, temperature: float, prepared: Prepared,
                unknown_sets: dict[str, np.ndarray], log, knn_ks: list[int] = ()) -> list[dict]:
    """Every score of ``model``: its in-distribution test split against each of ``unknown_sets``
    (case name -> uint8 images (N, S, S)); logs and returns the rows."""
    t0 = time.perf_counter()
    train, val, test = (split_of(prepared, s) for s in ("train", "val", "test"))
    tr = outputs(model, train.images, cfg, temperature, tta=False)
    va, te = (outputs(model, x, cfg, temperature, cfg.evaluate.tta) for x in (val.images, test.images))
    unknown = {name: outputs(model, x, cfg, temperature, cfg.evaluate.tta) for name, x in unknown_sets.items()}
    top1 = float((softmax(te.logits, temperature).argmax(1) == test.labels).mean())
    log(f"model on {len(prepared.classes)} classes: test top-1 {top1:.3f} ({len(test.labels)} in-distribution test images; "
        f"scoring {time.perf_counter() - t0:.0f} s)")
    def fit(score: str, k: int):
        return fit_unknown(score, cfg.ood.keep_rate, torch.from_numpy(tr.features), torch.from_numpy(train.labels),
                           len(prepared.classes), torch.from_numpy(va.logits), torch.from_numpy(va.features), temperature, k,
                           torch.from_numpy(tr.spectra), torch.from_numpy(va.spectra))

    fits = {score: fit(score, cfg.ood.knn_k) for score in OOD_SCORES}
    for k in knn_ks:  # the kNN score at other neighbours (--knn-ks)
        fits[f"knn@{k}"] = fit("knn", k)
    rows = []
    for name, un in unknown.items():
        log(f"{name} ({len(un.logits)} unknown images)")
        for score, fitted in fits.items():
            s_id, s_un = fitted(te.logits, te.features, te.spectra), fitted(un.logits, un.features, un.spectra)
            auroc = roc_auc_score(np.r_[np.zeros(len(s_id)), np.ones(len(s_un))], np.r_[s_id, s_un])
            t95 = np.quantile(s_id, 0.95, method="higher")  # keeps >= 95% of the in-distribution test
            row = {"case": name, "score": score, "auroc": float(auroc), "fpr95": float((s_un <= t95).mean()),
                   "flag_id": float(fitted.flags(s_id).mean()), "flag_unknown": float(fitted.flags(s_un).mean()), "top1": top1}
            log(f"  {score:<12} AUROC {row['auroc']:.3f}  FPR@95%TPR {row['fpr95']:.3f}  "
                f"threshold flags: {row['flag_id']:.3f} of known test, {row['flag_unknown']:.3f} of unknown")
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ncm", type=Path, required=True)
    parser.add_argument("--syn", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default="h1,syn,h2,h3,ncm", help="which models, in order (h1..h3: the holdouts)")
    parser.add_argument("--ncm-model", type=Path, default=None,
                        help="case ncm: score this trained 11-class model directory (e.g. a default run's models/hnf) instead of training one")
    parser.add_argument("--syn-model", type=Path, default=None, help="case syn: the same for the synthetic model")
    parser.add_argument("--tta", type=int, choices=(0, 1), default=1, help="evaluate.tta for the bench (0: one view, 8x cheaper)")
    parser.add_argument("--knn-ks", type=lambda v: [int(k) for k in v.split(",")], default=[],
                        help="also score kNN at these k (rows knn@k); a rerun on the same --work resumes the trained models")
    args = parser.parse_args()
    out = args.out.open("a")
    args.work.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    overrides = {"train.epochs": args.epochs, "evaluate.tta": bool(args.tta)}
    cfg_ncm = load_config(args.ncm / "params.yaml", overrides)
    cfg_syn = load_config(args.syn / "params.yaml", overrides)
    ncm_dir, syn_dir = args.ncm / "data/prepared", args.syn / "data/prepared"
    ncm, syn = load_prepared(ncm_dir), load_prepared(syn_dir)
    text_ncm = TextFeatures.load(args.ncm / "data/text_features")
    default_epochs = load_config(args.ncm / "params.yaml").train.epochs
    budget = "the default" if args.epochs == default_epochs else f"budget reduced from the default {default_epochs}"
    log(f"=== bench/ood.py {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC: train.epochs {args.epochs} ({budget}), "
        f"{torch.get_num_threads()} thread(s); evaluate.tta {bool(args.tta)} (logits of "
        f"{'8 views' if args.tta else 'one view'}); ood.keep_rate {cfg_ncm.ood.keep_rate}, ood.knn_k {cfg_ncm.ood.knn_k}")
    all_rows: list[dict] = []
    for case in args.cases.split(","):
        started = time.perf_counter()
        work = args.work / case
        syn_test = split_of(syn, "test").images
        given = {"ncm": args.ncm_model, "syn": args.syn_model}.get(case)
        if given:
            log(f"case {case}: the trained model {given} (its own epochs; not trained here)")
        if case == "ncm":
            model, t = trained_model(args.ncm_model) if args.ncm_model else train_model(cfg_ncm, ncm_dir, text_ncm, work)
            rows = score_table(model, cfg_ncm, t, ncm, {"far: NCM model (11 classes) vs synthetic test": syn_test}, log,
                               args.knn_ks)
        elif case == "syn":
            model, t = (trained_model(args.syn_model) if args.syn_model
                        else train_model(cfg_syn, syn_dir, TextFeatures.load(args.syn / "data/text_features"), work))
            rows = score_table(model, cfg_syn, t, syn, {"far: synthetic model (10 classes) vs NCM test": split_of(ncm, "test").images}, log,
                               args.knn_ks)
        else:
            drop = HOLDOUTS[int(case[1:]) - 1]
            kept = subset_prepared(ncm_dir, work / "prepared", drop)
            model, t = train_model(cfg_ncm, work / "prepared", subset_text(text_ncm, kept), work)
            held = ncm.manifest["class_name"].isin(drop).to_numpy()
            rows = score_table(model, cfg_ncm, t, load_prepared(work / "prepared"), {
                f"near: NCM without {' + '.join(drop)} (all their images)": np.asarray(ncm.images)[held],
                f"far: NCM model without {' + '.join(drop)} vs synthetic test": syn_test}, log, args.knn_ks)
        log(f"  ({case}: {time.perf_counter() - started:.0f} s with training)")
        all_rows += rows
        (args.work / "rows.json").write_text(json.dumps(all_rows, indent=1))
    log("\nsummary (mean over the cases of each kind)")
    log(f"{'score':<12} {'near AUROC':>10} {'near FPR95':>10} {'far AUROC':>10} {'far FPR95':>10}")
    for score in [*OOD_SCORES, *(f"knn@{k}" for k in args.knn_ks)]:
        cells = []
        for kind in ("near", "far"):
            rs = [r for r in all_rows if r["score"] == score and r["case"].startswith(kind)]
            cells += [np.mean([r["auroc"] for r in rs]) if rs else float("nan"), np.mean([r["fpr95"] for r in rs]) if rs else float("nan")]
        log(f"{score:<12} {cells[0]:>10.3f} {cells[1]:>10.3f} {cells[2]:>10.3f} {cells[3]:>10.3f}")


if __name__ == "__main__":
    main()
