"""Stage pretrain_lm: continue MLM pretraining of the text LM's base on the LLM's class descriptions.

    python stages/pretrain_lm.py --base models/base_lm --descriptions data/descriptions.parquet \
        --out models/text_lm --metrics metrics/lm.json --live dvclive/pretrain_lm

metrics/lm.json: held-out perplexity (as loaded, before and after; before = the base
encoder with a fitted MLM head), which base (name, version, sha256), and the retrieval
check (same-class nearest-neighbour accuracy of the descriptions, before and after).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, whatever the shell says

from dvclive import Live  # noqa: E402

from multifusion.core.errors import run_stage  # noqa: E402
from multifusion.core.config import load_config  # noqa: E402
from multifusion.core.json_files import write_json  # noqa: E402
from multifusion.text.corpus import build_corpus, load_descriptions  # noqa: E402
from multifusion.text.base import BaseInfo, read_base  # noqa: E402
from multifusion.text.pretrain import PretrainResult, pretrain, save_lm  # noqa: E402
from multifusion.text.retrieval import retrieval_accuracy  # noqa: E402
from multifusion.core.timings import write_timing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("models/base_lm"))
    parser.add_argument("--descriptions", type=Path, default=Path("data/descriptions.parquet"))
    parser.add_argument("--out", type=Path, default=Path("models/text_lm"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/lm.json"))
    parser.add_argument("--live", type=Path, default=Path("dvclive/pretrain_lm"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    base = read_base(args.base, cfg.text.base_model)  # checks the weights' sha256 before use
    descriptions = load_descriptions(args.descriptions)
    corpus = build_corpus(descriptions, cfg.text.heldout, cfg.seed)
    texts, labels = descriptions["description"].astype(str).tolist(), descriptions["class_name"].astype(str).tolist()

    def probe(model, tokenizer) -> dict[str, float]:
        return {"retrieval": retrieval_accuracy(model, tokenizer, texts, labels, cfg.text.max_length, cfg.text.batch_size)}

    with Live(str(args.live), dvcyaml=None, save_dvc_exp=False) as live:
        def log(step: int, metrics: dict[str, float]) -> None:
            live.step = step
            for name, value in metrics.items():
                live.log_metric(name, value)

        result = pretrain(cfg.text, cfg.seed, corpus, None if base.kind == "scratch" else args.base, log=log, probe=probe)
    save_lm(result, args.out)
    metrics = lm_metrics(result, base)
    write_timing("pretrain_lm", result.seconds)  # not in metrics/lm.json, whose hash dvc.lock records
    write_json(args.metrics, metrics)
    print(
        f"pretrain_lm: held-out perplexity {result.perplexity_before:.1f} -> {result.perplexity_after:.1f}, "
        f"description retrieval {metrics['retrieval_before']:.3f} -> {metrics['retrieval_after']:.3f} "
        f"({result.train_sentences} train / {result.heldout_sentences} held-out sentences, {result.seconds:.1f} s)"
    )


def lm_metrics(result: PretrainResult, base: BaseInfo) -> dict[str, object]:
    """metrics/lm.json: what the inputs determine (no wall-clock time)."""
    return {
        "base": base.name if base.kind != "scratch" else "scratch",
        "base_version": base.version,
        "base_sha256": base.sha256,
        "heldout_perplexity_initial": round(result.perplexity_initial, 4),
        "heldout_perplexity_before": round(result.perplexity_before, 4),
        "heldout_perplexity_after": round(result.perplexity_after, 4),
        "retrieval_before": round(result.probe_before["retrieval"], 4),
        "retrieval_after": round(result.probe_after["retrieval"], 4),
        "train_sentences": result.train_sentences,
        "heldout_sentences": result.heldout_sentences,
        "vocab_size": len(result.tokenizer),
        "hidden": result.model.config.hidden_size,
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "head_steps": result.head_steps,
        "steps": result.steps,
    }


if __name__ == "__main__":
    run_stage("pretrain_lm", main)
