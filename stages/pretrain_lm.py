"""Stage pretrain_lm: MLM-pretrain the small text LM on the LLM's class descriptions.

    python stages/pretrain_lm.py --descriptions data/descriptions.parquet --out models/text_lm \
        --metrics metrics/lm.json --live dvclive/pretrain_lm
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, whatever the shell says

from dvclive import Live  # noqa: E402

from multifusion.config import load_config  # noqa: E402
from multifusion.text.corpus import build_corpus, load_descriptions  # noqa: E402
from multifusion.text.pretrain import pretrain, save_lm  # noqa: E402
from multifusion.timings import write_timing  # noqa: E402
from multifusion.cli_errors import run_stage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--descriptions", type=Path, default=Path("data/descriptions.parquet"))
    parser.add_argument("--out", type=Path, default=Path("models/text_lm"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/lm.json"))
    parser.add_argument("--live", type=Path, default=Path("dvclive/pretrain_lm"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    corpus = build_corpus(load_descriptions(args.descriptions), cfg.text.heldout, cfg.seed)
    with Live(str(args.live), dvcyaml=None, save_dvc_exp=False) as live:
        def log(step: int, metrics: dict[str, float]) -> None:
            live.step = step
            for name, value in metrics.items():
                live.log_metric(name, value)

        result = pretrain(cfg.text, cfg.seed, corpus, log=log)
    save_lm(result, args.out)

    metrics = {
        "heldout_perplexity_before": round(result.perplexity_before, 4),
        "heldout_perplexity_after": round(result.perplexity_after, 4),
        "train_sentences": result.train_sentences,
        "heldout_sentences": result.heldout_sentences,
        "vocab_size": len(result.tokenizer),
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "steps": result.steps,
    }
    write_timing("pretrain_lm", result.seconds)  # not in metrics/lm.json, whose hash dvc.lock records
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"pretrain_lm: held-out perplexity {result.perplexity_before:.1f} -> {result.perplexity_after:.1f} "
        f"({result.train_sentences} train / {result.heldout_sentences} held-out sentences, {result.seconds:.1f} s)"
    )


if __name__ == "__main__":
    run_stage("pretrain_lm", main)
