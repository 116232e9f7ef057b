"""Stage `robustness`: the trained model on the test split under distribution shifts.

Writes metrics/robustness.json (accuracy and macro-F1 per shift per severity), one plot
data file per shift (<plots>/<shift>.csv: level, severity, accuracy, macro_f1; level 0 =
clean) and <plots>/accuracy_vs_severity.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multifusion.core.atomic import atomic_write
from multifusion.core.errors import run_stage
from multifusion.core.config import load_config
from multifusion.data.dataset import load_prepared
from multifusion.evaluation.robustness import evaluate_under_shifts, robustness_table
from multifusion.evaluation.robustness_plot import plot_robustness
from multifusion.core.json_files import write_json
from multifusion.core.runtime import resolve_device
from multifusion.model.card import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/hnf")
    parser.add_argument("--prepared", default="data/prepared")
    parser.add_argument("--metrics", default="metrics/robustness.json")
    parser.add_argument("--plots", default="plots/robustness")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    cfg = load_config(args.params)
    device = resolve_device(cfg.evaluate.device, "evaluate.device")
    loaded = load_model(args.model, device=device)
    prepared = load_prepared(args.prepared)
    if prepared.classes != loaded.classes:
        raise SystemExit(f"{args.model}: trained on other classes than {args.prepared}/classes.json; retrain (`dvc repro train`)")
    test = prepared.split_indices("test")
    if len(test) == 0:
        raise SystemExit(f"{args.prepared}: the test split is empty; check data.split in params.yaml")

    result = evaluate_under_shifts(  # the model's own grey-level policy, as predict applies it
        loaded.model, prepared.images[test], prepared.labels(test), cfg, loaded.temperature, device=device,
        grey_levels=loaded.input.grey_levels,
    )
    result = {"model": loaded.model_name, **result}
    write_json(args.metrics, result)

    table = robustness_table(result, loaded.model_name)
    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    for shift, rows in table.groupby("shift", sort=False):
        with atomic_write(plots / f"{shift}.csv", "w", newline="") as f:
            rows[["level", "severity", "accuracy", "macro_f1"]].to_csv(f, index=False)
    plot_robustness(table, plots / "accuracy_vs_severity.png")

    clean = result["clean"]["accuracy"]
    print(f"robustness: {len(test)} test images, clean accuracy {clean:.3f}")
    for shift, rows in table[table.level > 0].groupby("shift", sort=False):
        cells = "  ".join(f"{s:g}:{a:.3f}" for s, a in zip(rows.severity, rows.accuracy))
        print(f"  {shift:15s} {cells}")


if __name__ == "__main__":
    run_stage("robustness", main)
